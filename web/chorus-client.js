// Chorus browser client (see docs/signaling.md).
//
// SignalClient: one websocket; requests become promises matched by id, notifications become events.
// RoomClient: a participant of a room. It publishes on its own *publish* RTCPeerConnection (we offer,
// the server answers) and receives everyone else on a *subscribe* RTCPeerConnection (the server offers,
// we answer), and reconnects when the websocket drops.

const PROTOCOL_VERSION = 1;

/** An error response from the server, or a local failure ('timeout', 'closed'). */
export class ChorusError extends Error {
  constructor(code, reason, url = null) {
    super(`${code}: ${reason}`);
    this.name = 'ChorusError';
    this.code = code;
    this.reason = reason;
    this.url = url; // for 'redirect': the node hosting the room
  }
}

/** EventTarget whose events carry their payload in `detail`; `on(type, fn)` calls fn(detail). */
class Emitter extends EventTarget {
  on(type, fn) {
    const listener = (event) => fn(event.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/**
 * The signaling websocket. Events: one per notification method (detail = its data), and 'close'
 * (detail = {code, reason}) once the socket is closed, by either side.
 */
export class SignalClient extends Emitter {
  constructor(url) {
    super();
    this.url = url;
    this.closed = false;
    this._nextId = 0;
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this.ws = new WebSocket(url);
    // Resolved when the socket is open; rejected if it closes first.
    this.ready = new Promise((resolve, reject) => {
      this.ws.onopen = () => resolve();
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // nobody may be waiting on it
    this.ws.onmessage = (event) => this._onMessage(event.data);
    this.ws.onclose = (event) => this._closed(event.code, event.reason || 'websocket closed');
  }

  /** Send a request; resolves with the response's `data`, rejects with a ChorusError. */
  async request(method, data = {}, { timeout = 10000 } = {}) {
    await this.ready;
    if (this.closed) throw new ChorusError('closed', 'websocket closed');
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = timeout > 0 ? setTimeout(() => {
        this._pending.delete(id);
        reject(new ChorusError('timeout', `no response to ${method} in ${timeout} ms`));
      }, timeout) : null;
      this._pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ type: 'req', id, method, data }));
    });
  }

  close() {
    if (this.closed) return;
    this.ws.close(1000);
    this._closed(1000, 'closed by client');
  }

  _onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      console.warn('chorus: ignoring a message that is not JSON');
      return;
    }
    if (msg.type === 'evt') {
      this.emit(msg.method, msg.data || {});
    } else if (msg.type === 'res') {
      const pending = this._pending.get(msg.id);
      if (!pending) {
        if (!msg.ok) console.warn('chorus: error without a request', msg.error);
        return;
      }
      this._pending.delete(msg.id);
      clearTimeout(pending.timer);
      if (msg.ok) pending.resolve(msg.data || {});
      else pending.reject(new ChorusError(msg.error?.code || 'unknown', msg.error?.reason || '', msg.error?.url));
    }
  }

  _closed(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this.closeCode = code;
    this.closeReason = reason;
    const error = new ChorusError('closed', reason);
    this._rejectReady(error);
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this._pending.clear();
    this.emit('close', { code, reason });
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Reconnection schedule: exponential backoff with jitter. The n-th consecutive failure waits a random
 * time in [½, 1] × min(maxDelay, initialDelay × 2^n); after `maxAttempts` consecutive failed attempts the
 * client gives up (state 'failed'). The count starts again only after `stableAfter` ms of media flowing
 * (a connection that fails again within 10 s keeps climbing the schedule). Defaults: 1 s, 2 s, 4 s, 8 s,
 * 16 s, then 20 s; giving up after 12 attempts (about three minutes). A peer connection that is not
 * connected `connectTimeout` ms after its negotiation counts as failed (browsers may take 30 s to say so).
 */
export const RECONNECT_DEFAULTS = Object.freeze({
  initialDelay: 1000, maxDelay: 20000, maxAttempts: 12, stableAfter: 10000, connectTimeout: 15000,
});

export class Backoff {
  constructor(options = {}) {
    Object.assign(this, RECONNECT_DEFAULTS, options);
    this.attempt = 0; // failures since the last reset
  }

  /** The delay before the next attempt (ms), or null when it is time to give up. */
  next(random = Math.random) {
    if (this.attempt >= this.maxAttempts) return null;
    const ceiling = Math.min(this.maxDelay, this.initialDelay * 2 ** this.attempt);
    this.attempt += 1;
    return Math.round(ceiling / 2 + random() * (ceiling / 2));
  }

  reset() {
    this.attempt = 0;
  }
}

// Errors that another attempt cannot fix: reported at once instead of retried.
const PERMANENT_ERRORS = new Set([
  'unauthorized', 'forbidden', 'bad_request', 'unsupported_version', 'invalid_state', 'limit_exceeded',
  'not_found', 'unsupported_codec',
]);
// Reasons in a 'left' notification after which we must not rejoin by ourselves.
const FINAL_LEAVE_REASONS = new Set(['kicked', 'replaced', 'closed by admin']);

// Liveness: a websocket over a dead network stays "open" for minutes (TCP retransmits quietly), so the
// client pings and reconnects when an answer does not come back in time.
const PING_INTERVAL_MS = 3000;
const PING_TIMEOUT_MS = 3000;

// Resolves once `track` (video) has produced a frame, or after `timeout` ms.
function firstFrame(track, timeout) {
  return new Promise((resolve) => {
    const video = document.createElement('video');
    video.muted = true;
    video.playsInline = true;
    video.srcObject = new MediaStream([track]);
    const done = () => {
      clearTimeout(timer);
      video.srcObject = null;
      resolve();
    };
    const timer = setTimeout(done, timeout);
    if ('requestVideoFrameCallback' in video) video.requestVideoFrameCallback(done);
    else video.addEventListener('loadeddata', done, { once: true });
    video.play().catch(done);
  });
}

function defaultUrl() {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
}

// What a published track is (`publish.sources` in docs/signaling.md).
export const SOURCES = Object.freeze(['microphone', 'camera', 'screen', 'screen_audio']);

// The camera's simulcast layers, lowest first: a quarter, half and full resolution, each with three temporal
// layers (VP8). The server forwards to each viewer the one that fits its tile and its network (issue 11).
export const SIMULCAST_ENCODINGS = Object.freeze([
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150000, scalabilityMode: 'L1T3' },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500000, scalabilityMode: 'L1T3' },
  { rid: 'f', maxBitrate: 1500000, scalabilityMode: 'L1T3' },
]);
// A single camera encoding: without simulcast, or where the browser or the server refuses it.
const SINGLE_ENCODING = Object.freeze({ maxBitrate: 1500000 });

// Preferences are sent again only when the wanted height changes by more than this share (or `paused` flips),
// so a tile that breathes by a few pixels does not flood the server or make its layer flap.
const PREFERENCE_HYSTERESIS = 0.1;

/**
 * One participant of a room.
 *
 * State (`state`, reported by 'connection-state'): new → connecting → connected ⇄ reconnecting → closed, or
 * → failed when reconnection gives up (see Backoff; `reconnect` options override RECONNECT_DEFAULTS).
 * Every failure — the websocket closing or missing pings, a peer connection's ICE or DTLS failing, the
 * server dropping us — leads to 'reconnecting': the client waits its backoff delay, then joins again with
 * the same identity (on another node of the cluster if this one is gone) and publishes again.
 * A `draining` notification with a `url` (the node is shutting down) moves us there at once.
 *
 * Events (detail):
 *   peer-joined        {peerId, peer}          peer = {id, name, metadata, tracks: [{id, kind, muted, source}]}
 *   peer-left          {peerId, peer}
 *   track-added        {peerId, trackId, kind, source, track, muted, mid}   track is a MediaStreamTrack;
 *                                              source: 'camera', 'microphone', 'screen' or 'screen_audio'
 *   track-removed      {peerId, trackId, kind, source, track}
 *   track-muted        {peerId, trackId, kind, muted}
 *   local-track        {source, track}         what we publish for a source changed (null: nothing any more),
 *                                              e.g. a device switch, or a screen share that ended
 *   chat               {message, own}          message = {id, from, name, to, text, ts}; `from` null: the server.
 *                                              Plain text: never render it as HTML. `own`: we sent it.
 *   active-speakers    {peerIds}               who speaks now, loudest first (us included); at most 4 a second
 *   connection-quality {peers}                 peer id → {quality, uplink_loss, downlink_loss, rtt_ms}, as the
 *                                              server sees each participant's connection (every 2 s)
 *   metadata           {room} | {peerId, metadata}   room or participant metadata changed (admin API)
 *   connection-state   {state, publish, subscribe, attempt, maxAttempts, retryAt, reason}
 *                      publish/subscribe: the PeerConnections' connectionState; while reconnecting, attempt
 *                      counts the failed attempts, retryAt (Date.now() ms) is when the next one starts
 *   draining           {deadline, url}         the server shuts down (deadline: Unix time, seconds)
 *   closed             {reason}
 */
export class RoomClient extends Emitter {
  constructor({ url = defaultUrl(), iceTransportPolicy = 'all', reconnect = {}, simulcast = true } = {}) {
    super();
    this.url = url;
    this.backoff = new Backoff(reconnect || {});
    this.retryAt = null; // while reconnecting: when the next attempt starts (ms since the epoch)
    this.lastError = null; // why the last attempt or connection failed
    this._stableTimer = null;
    this.iceTransportPolicy = iceTransportPolicy;
    this.state = 'new';
    this.signal = null;
    this.peerId = null;
    this.peers = new Map(); // peer id -> {id, name, tracks: [{id, kind, muted}]}
    this.iceServers = [];
    this.publishPc = null;
    this.subscribePc = null;
    this.localStream = null;
    this.localTracks = []; // what the server made of our tracks: [{id, kind, mid, source, track}]
    this.sources = {}; // source -> the MediaStreamTrack we publish for it
    this.simulcast = simulcast; // publish the camera in three layers (SIMULCAST_ENCODINGS)
    this.muted = { audio: false, video: false };
    this.chat = []; // chat messages of this room, oldest first (the join response's history, then new ones)
    this.activeSpeakers = []; // peer ids, loudest first
    this.quality = new Map(); // peer id -> {quality, uplink_loss, downlink_loss, rtt_ms}
    this.roomMetadata = {};
    this.metadata = {}; // ours
    this._transceivers = {}; // source -> the RTCRtpTransceiver that carries it on the publish connection
    this._preferences = new Map(); // remote track id -> {max_height, paused} last sent
    this._preferencesUnsupported = false;
    this.remoteTracks = new Map(); // track id -> track-added detail
    this._consumers = new Map(); // mid -> {mid, track_id, peer_id, kind}, from the latest offer
    this._endedTracks = new Set(); // unpublished track ids, never to be shown again
    this._queuedCandidates = { publish: [], subscribe: [] };
    this._offers = Promise.resolve(); // offers are handled one at a time, in order
  }

  /**
   * Join a room; resolves with the join response. `identity` names this participant across reconnections
   * (a random one by default): when we rejoin after a network drop, the server replaces our stale session
   * instead of showing a duplicate. With a token the server uses the token's identity instead. `mode` ('sfu' or
   * 'mcu', with `mcu` composite options) applies when this join creates the room.
   */
  async join({ room, name, token, identity, mode, mcu } = {}) {
    if (this.state !== 'new' && this.state !== 'closed' && this.state !== 'failed') {
      throw new ChorusError('invalid_state', `cannot join while ${this.state}`);
    }
    identity = identity || this.identity || `id-${Math.random().toString(36).slice(2, 12)}`;
    Object.assign(this, { room, name, token, identity, requestedMode: mode, mcuOptions: mcu });
    this._setState('connecting');
    this.backoff.reset();
    // The first join is retried like a reconnection (a server restarting, a full node), except for
    // errors another attempt cannot fix.
    for (;;) {
      try {
        const response = await this._connect();
        if (this.state !== 'connecting') throw new ChorusError('closed', 'left while joining');
        this._setState('connected');
        return response;
      } catch (error) {
        this._teardown();
        this.lastError = error;
        const delay = PERMANENT_ERRORS.has(error.code) || this.state !== 'connecting' ? null : this.backoff.next();
        if (delay === null) {
          if (this.state === 'connecting') this._setState(PERMANENT_ERRORS.has(error.code) ? 'closed' : 'failed');
          throw error;
        }
        console.warn(`chorus: join failed (${error.message}); retrying in ${delay} ms`);
        this.retryAt = Date.now() + delay;
        this.retryDelay = delay;
        this._emitConnectionState();
        await sleep(delay);
        this.retryAt = null;
        if (this.state !== 'connecting') throw new ChorusError('closed', 'left while joining');
      }
    }
  }

  /**
   * Publish every track of `stream`: its audio as the microphone, its video as the camera (once per join; they
   * are published again after a reconnection). More sources come and go with setSource() and shareScreen().
   */
  async publish(stream) {
    if (this.state !== 'connected') throw new ChorusError('invalid_state', 'join first');
    if (this.publishPc) throw new ChorusError('invalid_state', 'already published');
    this.localStream = stream;
    for (const track of stream.getTracks()) {
      this.sources[track.kind === 'audio' ? 'microphone' : 'camera'] = track;
      if (this.muted[track.kind]) track.enabled = false;
    }
    try {
      await this._publish();
    } catch (error) {
      if (this.state !== 'connected') return; // left, or the reconnection publishes again
      // Refused (e.g. unsupported_codec): forget the stream so a reconnection does not retry it.
      this.publishPc?.close();
      this.publishPc = null;
      this.localStream = null;
      this.sources = {};
      this._transceivers = {};
      throw error;
    }
  }

  /**
   * Publish `track` as `source` ('camera', 'microphone', 'screen', 'screen_audio'), replacing what that source
   * sent before without renegotiating (a device switch: the others see no gap), or stop publishing it with
   * `track` null (the others see its track end). Resolves once the server has applied it; a refusal (e.g.
   * `limit_exceeded`) rejects with a ChorusError and leaves the other tracks as they were.
   */
  async setSource(source, track) {
    if (!SOURCES.includes(source)) throw new ChorusError('bad_request', `unknown source ${source}`);
    if (this.state !== 'connected') throw new ChorusError('invalid_state', 'join first');
    const transceiver = this._transceivers[source];
    const sending = transceiver && transceiver.direction === 'sendonly';
    if (track) {
      track.enabled = !this.muted[track.kind] || !['camera', 'microphone'].includes(source);
      this.sources[source] = track;
      if (sending) {
        await transceiver.sender.replaceTrack(track);
      } else if (transceiver) {
        // An m-section we stopped sending on earlier: send on it again (the server makes it a new track).
        await transceiver.sender.replaceTrack(track);
        transceiver.direction = 'sendonly';
        await this._renegotiate(() => {
          transceiver.direction = 'inactive';
          transceiver.sender.replaceTrack(null);
          delete this.sources[source];
        });
      } else if (!this.publishPc) {
        await this._publish();
      } else {
        const added = this._addTransceiver(this.publishPc, source, track);
        await this._renegotiate(() => {
          added.stop();
          delete this._transceivers[source];
          delete this.sources[source];
        });
      }
    } else if (sending) {
      delete this.sources[source];
      for (const t of this.localTracks.filter((x) => x.mid === transceiver.mid)) {
        this.signal.request('unpublish', { track_id: t.id }).catch((error) => console.debug('chorus: unpublish', error));
      }
      await transceiver.sender.replaceTrack(null);
      transceiver.direction = 'inactive';
      await this._renegotiate(() => {});
    }
    this.emit('local-track', { source, track: track || null });
  }

  /**
   * Publish one more track beyond the four sources (an application's own), on a new m-section. The server
   * allows `max_tracks_per_peer` (4 by default) and refuses more with `limit_exceeded`; nothing else changes.
   */
  async publishTrack(track, { source = track.kind === 'audio' ? 'microphone' : 'camera' } = {}) {
    if (this.state !== 'connected' || !this.publishPc) throw new ChorusError('invalid_state', 'publish first');
    const transceiver = this.publishPc.addTransceiver(track, { direction: 'sendonly' });
    await this._renegotiate(() => transceiver.stop(), [[transceiver, source]]);
    return this.localTracks.find((t) => t.track === track) || null;
  }

  /**
   * Share the screen (a window or tab): its video, and its audio where the browser offers it, as two more
   * tracks. The share ends by stopScreenShare() or when the browser ends the capture (its "Stop sharing").
   */
  async shareScreen({ audio = true } = {}) {
    const stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio });
    const [video] = stream.getVideoTracks();
    const [sound] = stream.getAudioTracks();
    if ('contentHint' in video) video.contentHint = 'detail';
    video.addEventListener('ended', () => this.stopScreenShare());
    try {
      await this.setSource('screen', video);
      if (sound) await this.setSource('screen_audio', sound);
    } catch (error) {
      for (const track of stream.getTracks()) track.stop();
      await this.stopScreenShare().catch(() => {});
      throw error;
    }
    return stream;
  }

  /** End our screen share (its video and audio, in one renegotiation): the others see it gone at once. */
  async stopScreenShare() {
    // Tell the server first (`unpublish` is handled at once); the renegotiation that stops sending follows.
    const ending = this.localTracks.filter((t) => t.source === 'screen' || t.source === 'screen_audio');
    if (this.state === 'connected') {
      for (const t of ending) {
        this.signal.request('unpublish', { track_id: t.id }).catch((error) => console.debug('chorus: unpublish', error));
      }
    }
    let renegotiate = false;
    for (const source of ['screen', 'screen_audio']) {
      const track = this.sources[source];
      if (!track) continue;
      track.stop();
      delete this.sources[source];
      const transceiver = this._transceivers[source];
      if (transceiver && transceiver.direction === 'sendonly') {
        await transceiver.sender.replaceTrack(null);
        transceiver.direction = 'inactive';
        renegotiate = true;
      }
      this.emit('local-track', { source, track: null });
    }
    if (renegotiate && this.state === 'connected' && this.publishPc) await this._renegotiate(() => {});
  }

  /**
   * Use another camera or microphone mid-call (`kind` 'video' or 'audio'): the new device's track replaces the
   * old one on the same sender, so nobody sees the call renegotiate. Resolves with the new track.
   */
  async switchDevice(kind, deviceId, constraints = {}) {
    const source = kind === 'audio' ? 'microphone' : 'camera';
    const stream = await navigator.mediaDevices.getUserMedia(
      { [kind]: { ...constraints, deviceId: { exact: deviceId } } });
    const track = stream.getTracks()[0];
    const old = this.sources[source];
    // The old camera keeps sending until the new one delivers its first frame: no gap for the others.
    if (kind === 'video') await firstFrame(track, 1500);
    if (this.state === 'connected' && this._transceivers[source]) await this.setSource(source, track);
    else this.sources[source] = track;
    track.enabled = !this.muted[kind];
    if (this.localStream) {
      if (old) this.localStream.removeTrack(old);
      this.localStream.addTrack(track);
    }
    old?.stop();
    if (!this._transceivers[source]) this.emit('local-track', { source, track });
    return track;
  }

  /** Mute or unmute our own microphone ('audio') or camera ('video'): disables the track and tells the server. */
  async setMuted(kind, muted) {
    this.muted[kind] = muted;
    const track = this.sources[kind === 'audio' ? 'microphone' : 'camera'];
    if (track) track.enabled = !muted;
    if (this.state === 'connected') await this._sendMute(kind, muted);
  }

  /**
   * Send a chat message to the room, or to one participant (`to`: a peer id). Resolves with the message as
   * delivered; rejects with `limit_exceeded` (over 4 kB, or too many too fast) or `not_found`.
   */
  async sendChat(text, to = null) {
    if (this.state !== 'connected') throw new ChorusError('invalid_state', 'join first');
    const { message } = await this.signal.request('chat', to ? { text, to } : { text });
    this._chatArrived(message, true);
    return message;
  }

  /**
   * Say how a remote video is shown, so the server sends the layer that fits (issue 11): `maxHeight` is the
   * tile's height in device pixels (CSS height × devicePixelRatio; a large number for the top layer), `paused`
   * when it is not visible at all. Sent only when it changes by more than 10 % (or `paused` flips).
   */
  setPreferences(trackId, { maxHeight, paused = false }) {
    if (this.state !== 'connected' || this._preferencesUnsupported) return;
    const height = Math.max(1, Math.round(maxHeight || 0)); // 0 would mean "no limit" to the server
    const last = this._preferences.get(trackId);
    if (last && last.paused === paused && Math.abs(height - last.max_height) <= PREFERENCE_HYSTERESIS * last.max_height) {
      return;
    }
    const preferences = { track_id: trackId, max_height: height, paused };
    this._preferences.set(trackId, preferences);
    this.signal.request('set_preferences', preferences).catch((error) => {
      if (error.code === 'unknown_method') {
        // A server without adaptive layers: it forwards everything anyway.
        if (!this._preferencesUnsupported) console.info('chorus: this server takes no set_preferences');
        this._preferencesUnsupported = true;
      } else {
        console.debug('chorus: set_preferences failed', error);
        this._preferences.delete(trackId);
      }
    });
  }

  /** Frames encoded so far for one of our sources (all its simulcast layers), or null when not published. */
  async framesEncoded(source) {
    const mid = this._transceivers[source]?.mid;
    if (!this.publishPc || mid === undefined || mid === null) return null;
    let frames = 0;
    (await this.publishPc.getStats()).forEach((r) => {
      if (r.type === 'outbound-rtp' && r.mid === mid) frames += r.framesEncoded || 0;
    });
    return frames;
  }

  /** Statistics of what we receive, for a "your network" display: {bitrate (bit/s), packetLoss (0-1), rtt}. */
  async downlinkStats() {
    const pc = this.subscribePc;
    if (!pc) return null;
    let bytes = 0; let received = 0; let lost = 0; let rtt = null;
    (await pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp') {
        bytes += r.bytesReceived || 0;
        received += r.packetsReceived || 0;
        lost += Math.max(r.packetsLost || 0, 0);
      } else if (r.type === 'candidate-pair' && r.nominated && r.currentRoundTripTime !== undefined) {
        rtt = r.currentRoundTripTime;
      }
    });
    const now = performance.now();
    const last = this._downlink;
    this._downlink = { now, bytes, received, lost };
    if (!last || now <= last.now) return null;
    const packets = received - last.received + lost - last.lost;
    return {
      bitrate: Math.max(0, ((bytes - last.bytes) * 8000) / (now - last.now)),
      packetLoss: packets > 0 ? Math.max(0, lost - last.lost) / packets : 0,
      rtt,
    };
  }

  /** Leave the room and close the websocket. Idempotent. */
  async leave() {
    if (this.state === 'closed' || this.state === 'new') return;
    if (this.state === 'failed') {
      this._setState('closed');
      return;
    }
    const signal = this.signal;
    const wasConnected = this.state === 'connected';
    this._setState('closed'); // stops any reconnection
    if (wasConnected) await signal.request('leave', {}, { timeout: 2000 }).catch(() => {});
    this._teardown();
    this.localStream = null; // a later join publishes whatever it is given
    this.sources = {};
    this.chat = [];
    this.activeSpeakers = [];
    this.quality.clear();
    for (const peerId of [...this.peers.keys()]) this._peerLeft(peerId);
    this.emit('closed', { reason: 'left' });
  }

  // --- connection --------------------------------------------------------------------------------

  // Open a websocket, join (following a cluster's redirect to the node hosting the room), and create a
  // fresh subscribe connection.
  async _connect() {
    for (let hops = 0; ; hops++) {
      try {
        return await this._connectOnce();
      } catch (error) {
        if (error.code !== 'redirect' || !error.url || hops >= 3) throw error;
        this.signal?.close();
        this.url = error.url;
      }
    }
  }

  async _connectOnce() {
    const signal = (this.signal = new SignalClient(this.url));
    // Offers that arrive before the join response (and so before the subscribe connection) wait for it.
    let joined;
    this._joinedGate = new Promise((resolve) => (joined = resolve));
    this._offers = Promise.resolve(); // nothing queued for an earlier socket may hold these up
    signal.on('close', () => this._onSignalClose(signal));
    const handlers = {
      chat: (d) => this._chatArrived(d, false),
      active_speakers: (d) => this._onActiveSpeakers(d.peers || []),
      connection_quality: (d) => this._onQuality(d.peers || []),
      metadata: (d) => this._onMetadata(d),
      publish_layers: (d) => this._onPublishLayers(d),
      peer_joined: (d) => this._onPeerJoined(d),
      peer_left: (d) => this._peerLeft(d.peer_id),
      track_published: (d) => this._onTrackPublished(d),
      track_unpublished: (d) => this._onTrackUnpublished(d),
      track_muted: (d) => this._onTrackMuted(d),
      offer: (d) => this._onOffer(signal, d),
      // The server dropped us (e.g. a failed media connection, or it shuts down): join again, unless
      // it was meant (kicked, or this identity joined elsewhere).
      left: (d) => (FINAL_LEAVE_REASONS.has(d.reason) ? this._finalLeft(d.reason) : this._reconnect(d.reason)),
      draining: (d) => this._onDraining(d),
    };
    for (const [method, fn] of Object.entries(handlers)) {
      signal.on(method, (data) => signal === this.signal && fn(data));
    }
    await signal.ready;
    const request = { v: PROTOCOL_VERSION, room: this.room, name: this.name, identity: this.identity };
    if (this.token) request.token = this.token;
    if (this.requestedMode) request.mode = this.requestedMode;
    if (this.mcuOptions) request.mcu = this.mcuOptions;
    const response = await signal.request('join', request);
    this.peerId = response.peer_id;
    this.nodes = response.nodes || []; // the cluster's nodes: where to go if this one dies
    this.mode = response.mode || 'sfu'; // 'mcu': one mixed audio and one composite video, from peer 'mcu'
    this.iceServers = (response.ice_servers || []).map(({ urls, username, credential }) => ({
      urls, username, credential,
    }));
    this._preferencesUnsupported = false; // this server may differ from the last
    this.roomMetadata = response.metadata || {};
    this.metadata = response.own_metadata || {};
    const seen = new Set(this.chat.map((m) => m.id));
    for (const message of response.chat || []) {
      if (!seen.has(message.id)) this.chat.push(message); // a rejoin gives the history again
    }
    this._syncPeers(response.peers || []);
    this._onActiveSpeakers(response.active_speakers || []);
    this.subscribePc = this._newPc('subscribe');
    joined();
    this._watch(signal);
    return response;
  }

  // Ping the server while `signal` is current; a missed answer means the network is gone: reconnect.
  _watch(signal) {
    const timer = setInterval(() => {
      if (signal !== this.signal || signal.closed) {
        clearInterval(timer);
        return;
      }
      signal.request('ping', {}, { timeout: PING_TIMEOUT_MS }).catch(() => {
        if (signal === this.signal && this.state === 'connected') this._reconnect('no answer to ping');
      });
    }, PING_INTERVAL_MS);
    signal.on('close', () => clearInterval(timer));
  }

  _onSignalClose(signal) {
    if (signal === this.signal && this.state === 'connected') {
      this._reconnect(`websocket closed (${signal.closeCode || 'no code'})`);
    }
  }

  _finalLeft(reason) {
    this._setState('closed');
    this._teardown();
    for (const peerId of [...this.peers.keys()]) this._peerLeft(peerId);
    this.emit('closed', { reason });
  }

  // The server is shutting down. With a url (another node of the cluster), move there now; without,
  // the call goes on until the server closes it at `deadline`, and we reconnect then.
  _onDraining({ deadline, url }) {
    this.emit('draining', { deadline, url: url || null });
    if (url && this.state === 'connected') {
      this.url = url;
      this._reconnect('server draining', { immediate: true });
    }
  }

  // Retry with backoff until joined (and published) again, leave(), or giving up (state 'failed').
  async _reconnect(reason = 'connection lost', { immediate = false } = {}) {
    if (this.state !== 'connected') return;
    console.warn(`chorus: ${reason}; reconnecting`);
    this.lastError = new ChorusError('disconnected', reason);
    this._setState('reconnecting');
    this._teardown();
    for (let first = true; this.state === 'reconnecting'; first = false) {
      const delay = first && immediate ? 0 : this.backoff.next();
      if (delay === null) {
        console.warn(`chorus: giving up after ${this.backoff.attempt} failed attempts`);
        this._setState('failed');
        for (const peerId of [...this.peers.keys()]) this._peerLeft(peerId);
        this.emit('closed', { reason: 'gave up reconnecting' });
        return;
      }
      this.retryAt = Date.now() + delay;
      this.retryDelay = delay;
      this._emitConnectionState();
      if (delay) await sleep(delay);
      this.retryAt = null;
      if (this.state !== 'reconnecting') return;
      this._emitConnectionState();
      try {
        await this._connect();
        await this._publish();
        if (this.state === 'reconnecting') this._setState('connected');
        return;
      } catch (error) {
        console.warn('chorus: reconnection failed', error);
        this.lastError = error;
        if (this.state === 'reconnecting') this._teardown();
        // Try the next node of the cluster (any node redirects to the one hosting the room).
        const urls = [...new Set([this.url, ...(this.nodes || [])])];
        this.url = urls[(urls.indexOf(this.url) + 1) % urls.length];
      }
    }
  }

  // The backoff starts again from its first step only once media has flowed for `stableAfter` ms: every
  // peer connection we have is connected, and stays so.
  _watchStability() {
    const pcs = [this.publishPc, this.subscribePc].filter(Boolean);
    const flowing = this.state === 'connected' && pcs.length > 0 && pcs.every((pc) => pc.connectionState === 'connected');
    if (!flowing) {
      clearTimeout(this._stableTimer);
      this._stableTimer = null;
    } else if (!this._stableTimer && this.backoff.attempt > 0) {
      this._stableTimer = setTimeout(() => {
        this._stableTimer = null;
        this.backoff.reset();
        this._emitConnectionState();
      }, this.backoff.stableAfter);
    }
  }

  // Close the websocket and both connections; every remote track ends.
  _teardown() {
    this.signal?.close();
    this.signal = null;
    this.publishPc?.close();
    this.subscribePc?.close();
    this.publishPc = this.subscribePc = null;
    this.localTracks = [];
    this._transceivers = {};
    this._preferences.clear();
    this._consumers.clear();
    this._queuedCandidates = { publish: [], subscribe: [] };
    this._offers = Promise.resolve();
    for (const trackId of [...this.remoteTracks.keys()]) this._removeRemoteTrack(trackId);
  }

  _setState(state) {
    this.state = state;
    this._emitConnectionState();
  }

  _emitConnectionState() {
    this._watchStability();
    this.emit('connection-state', {
      state: this.state,
      publish: this.publishPc?.connectionState || 'none',
      subscribe: this.subscribePc?.connectionState || 'none',
      attempt: this.backoff.attempt,
      maxAttempts: this.backoff.maxAttempts,
      retryAt: this.retryAt,
      reason: this.lastError ? this.lastError.reason || this.lastError.message : null,
    });
  }

  // --- peer connections -----------------------------------------------------------------------------

  // target is 'publish' or 'subscribe'.
  _newPc(target) {
    const pc = new RTCPeerConnection({
      iceServers: this.iceServers,
      iceTransportPolicy: this.iceTransportPolicy,
    });
    const current = () => pc === this[`${target}Pc`];
    pc.onicecandidate = ({ candidate }) => {
      if (!candidate || !candidate.candidate || !current()) return;
      const { sdpMid, sdpMLineIndex } = candidate;
      const c = { candidate: candidate.candidate, sdpMid, sdpMLineIndex };
      // The server takes candidates only once it has our description (see _flushCandidates).
      if (pc.remoteDescription) this._trickle(target, c);
      else this._queuedCandidates[target].push(c);
    };
    pc.onconnectionstatechange = () => {
      if (!current()) return;
      this._emitConnectionState();
      // 'failed': ICE found no working path, or DTLS failed (a bad handshake, or consent lost).
      if (pc.connectionState === 'failed') this._reconnect(`${target} connection failed`);
    };
    if (target === 'subscribe') pc.ontrack = ({ transceiver }) => this._addRemoteTrack(transceiver);
    return pc;
  }

  // A negotiated connection that does not connect in time has failed, whatever the browser says yet.
  _armConnectTimer(pc, target) {
    if (pc._connectTimer) return;
    pc._connectTimer = setTimeout(() => {
      const stuck = pc.connectionState === 'new' || pc.connectionState === 'connecting';
      if (stuck && pc === this[`${target}Pc`] && this.state === 'connected') {
        this._reconnect(`${target} connection not established in ${this.backoff.connectTimeout / 1000} s`);
      }
    }, this.backoff.connectTimeout);
  }

  _trickle(target, candidate) {
    this.signal?.request('trickle', { target, candidate }).catch((error) => {
      console.debug('chorus: trickle failed', error);
    });
  }

  _flushCandidates(target) {
    for (const c of this._queuedCandidates[target].splice(0)) this._trickle(target, c);
  }

  // Offer our sources on a fresh publish connection (after joining, and again after a reconnection).
  async _publish() {
    const present = SOURCES.filter((source) => this.sources[source]?.readyState === 'live');
    if (!present.length) return;
    const pc = (this.publishPc = this._newPc('publish'));
    this._transceivers = {};
    for (const source of present) this._addTransceiver(pc, source, this.sources[source]);
    await this._negotiate(pc);
    // A new session means new track ids: tell the server again what is muted.
    for (const kind of ['audio', 'video']) {
      if (this.muted[kind]) await this._sendMute(kind, true);
    }
  }

  // One sendonly transceiver for `source`; the camera in simulcast layers unless that is off or refused.
  _addTransceiver(pc, source, track) {
    const init = { direction: 'sendonly', streams: [this.localStream || new MediaStream([track])] };
    let transceiver = null;
    if (source === 'camera' && this.simulcast) {
      try {
        transceiver = pc.addTransceiver(track, { ...init, sendEncodings: SIMULCAST_ENCODINGS.map((e) => ({ ...e })) });
      } catch (error) {
        console.info('chorus: this browser refuses simulcast; publishing one layer', error);
      }
    }
    transceiver ||= pc.addTransceiver(track, { ...init, sendEncodings: source === 'camera' ? [SINGLE_ENCODING] : [] });
    this._transceivers[source] = transceiver;
    return transceiver;
  }

  // Offer the publish connection as it now is; on refusal, roll back and call `undo` (which restores our own
  // view of what is published), then rethrow. `extra`: [transceiver, source] pairs not in this._transceivers.
  async _renegotiate(undo, extra = []) {
    const pc = this.publishPc;
    try {
      await this._negotiate(pc, extra);
    } catch (error) {
      if (pc === this.publishPc && pc.signalingState === 'have-local-offer') {
        await pc.setLocalDescription({ type: 'rollback' }).catch(() => {});
      }
      undo();
      throw error;
    }
  }

  async _negotiate(pc, extra = []) {
    await pc.setLocalDescription(await pc.createOffer());
    const sources = {}; // mid -> source, for the server (mids exist once the offer is set)
    for (const [transceiver, source] of [...extra, ...Object.entries(this._transceivers).map(([s, t]) => [t, s])]) {
      if (transceiver.mid !== null) sources[transceiver.mid] = source;
    }
    const answer = await this.signal.request('publish', { type: 'offer', sdp: pc.localDescription.sdp, sources });
    if (pc !== this.publishPc) return;
    await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
    this._armConnectTimer(pc, 'publish');
    this._flushCandidates('publish');
    this._keepOneLayerIfRefused();
    // The tracks the server has now: those it just created, and the earlier ones still sending.
    const byMid = new Map(pc.getTransceivers().map((t) => [t.mid, t]));
    const live = this.localTracks.filter((t) => byMid.get(t.mid)?.direction === 'sendonly'
      && !answer.tracks.some((n) => n.mid === t.mid));
    this.localTracks = [...live, ...answer.tracks.map((t) => ({
      ...t, source: sources[t.mid], track: byMid.get(t.mid)?.sender.track || null,
    }))];
  }

  // A server that answers without simulcast leaves only the first (quarter-size) layer: make it full size.
  _keepOneLayerIfRefused() {
    const sender = this._transceivers.camera?.sender;
    if (!sender) return;
    const parameters = sender.getParameters();
    const encodings = parameters.encodings || [];
    if (encodings.length === 1 && encodings[0].rid && encodings[0].scaleResolutionDownBy !== 1) {
      encodings[0].scaleResolutionDownBy = 1;
      encodings[0].maxBitrate = SINGLE_ENCODING.maxBitrate;
      sender.setParameters(parameters).catch((error) => console.warn('chorus: cannot resize the layer', error));
    }
  }

  // The server says which camera layers anyone watches: the others are paused at the source (issue 11).
  _onPublishLayers({ track_id: trackId, active }) {
    const ours = this.localTracks.find((t) => t.id === trackId);
    const transceiver = ours && this.publishPc?.getTransceivers().find((t) => t.mid === ours.mid);
    if (!transceiver || !Array.isArray(active)) return;
    const parameters = transceiver.sender.getParameters();
    let changed = false;
    for (const encoding of parameters.encodings || []) {
      const wanted = !encoding.rid || active.includes(encoding.rid);
      if (encoding.active !== wanted) {
        encoding.active = wanted;
        changed = true;
      }
    }
    if (changed) {
      transceiver.sender.setParameters(parameters).catch((error) => console.warn('chorus: publish_layers', error));
    }
  }

  _sendMute(kind, muted) {
    const source = kind === 'audio' ? 'microphone' : 'camera';
    const ours = this.localTracks.filter((t) => (t.source || (t.kind === 'audio' ? 'microphone' : 'camera')) === source);
    return Promise.all(ours.map((t) => this.signal.request('mute', { track_id: t.id, muted })));
  }

  _chatArrived(message, own) {
    if (this.chat.some((m) => m.id === message.id)) return;
    this.chat.push(message);
    if (this.chat.length > 500) this.chat.splice(0, this.chat.length - 500);
    this.emit('chat', { message, own });
  }

  _onActiveSpeakers(peerIds) {
    this.activeSpeakers = peerIds;
    this.emit('active-speakers', { peerIds });
  }

  _onQuality(list) {
    for (const { peer_id: peerId, ...quality } of list) this.quality.set(peerId, quality);
    this.emit('connection-quality', { peers: this.quality });
  }

  _onMetadata({ room, peer_id: peerId, metadata }) {
    if (room !== undefined) {
      this.roomMetadata = room || {};
      this.emit('metadata', { room: this.roomMetadata });
      return;
    }
    if (peerId === this.peerId) this.metadata = metadata || {};
    const peer = this.peers.get(peerId);
    if (peer) peer.metadata = metadata || {};
    this.emit('metadata', { peerId, metadata: metadata || {} });
  }

  _onOffer(signal, offer) {
    const gate = this._joinedGate;
    this._offers = this._offers
      .then(() => gate)
      .then(() => signal === this.signal && this._answer(offer))
      .catch((error) => console.warn('chorus: cannot answer the subscribe offer', error));
  }

  // Answer one server offer on the subscribe connection.
  async _answer(offer) {
    if (offer.restart && this.subscribePc) {
      // The server moved our tracks to a new connection (it compacts long-lived ones): start afresh.
      for (const trackId of [...this.remoteTracks.keys()]) this._removeRemoteTrack(trackId);
      this.subscribePc.close();
      this.subscribePc = this._newPc('subscribe');
    }
    const pc = this.subscribePc;
    if (!pc) return;
    const consumers = new Map((offer.consumers || []).map((c) => [c.mid, c]));
    // Tracks whose m-section is gone (or now carries another track) have ended.
    for (const [trackId, t] of this.remoteTracks) {
      if (consumers.get(t.mid)?.track_id !== trackId) this._removeRemoteTrack(trackId);
    }
    this._consumers = consumers; // before setRemoteDescription: its 'track' events look mids up here
    await pc.setRemoteDescription({ type: 'offer', sdp: offer.sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    await this.signal.request('answer', { type: 'answer', sdp: pc.localDescription.sdp });
    this._armConnectTimer(pc, 'subscribe');
    this._flushCandidates('subscribe');
    // A reused m-section may fire no 'track' event: pick up whatever is still missing.
    for (const transceiver of pc.getTransceivers()) this._addRemoteTrack(transceiver);
  }

  _addRemoteTrack(transceiver) {
    const c = this._consumers.get(transceiver.mid);
    if (!c || this.remoteTracks.has(c.track_id) || this._endedTracks.has(c.track_id)) return;
    const known = this.peers.get(c.peer_id)?.tracks.find((t) => t.id === c.track_id);
    const detail = {
      peerId: c.peer_id, trackId: c.track_id, kind: c.kind, track: transceiver.receiver.track,
      muted: known?.muted || false, mid: c.mid,
      source: known?.source || (c.kind === 'audio' ? 'microphone' : 'camera'),
    };
    this.remoteTracks.set(c.track_id, detail);
    this.emit('track-added', detail);
  }

  _removeRemoteTrack(trackId) {
    const t = this.remoteTracks.get(trackId);
    if (!t) return;
    this.remoteTracks.delete(trackId);
    this._preferences.delete(trackId);
    this.emit('track-removed', { peerId: t.peerId, trackId, kind: t.kind, source: t.source, track: t.track });
  }

  // --- room notifications ---------------------------------------------------------------------------

  // After (re)joining: the server's list of peers replaces ours.
  _syncPeers(list) {
    const fresh = new Set(list.map((p) => p.id));
    for (const peerId of [...this.peers.keys()]) {
      if (!fresh.has(peerId)) this._peerLeft(peerId);
    }
    for (const peer of list) this._onPeerJoined({ peer });
  }

  _onPeerJoined({ peer }) {
    const isNew = !this.peers.has(peer.id);
    const tracks = (peer.tracks || []).map((t) => ({ id: t.id, kind: t.kind, muted: !!t.muted, source: t.source }));
    this.peers.set(peer.id, { id: peer.id, name: peer.name, metadata: peer.metadata || {}, tracks });
    if (isNew) this.emit('peer-joined', { peerId: peer.id, peer: this.peers.get(peer.id) });
  }

  _peerLeft(peerId) {
    const peer = this.peers.get(peerId);
    if (!peer) return;
    for (const t of this.remoteTracks.values()) {
      if (t.peerId === peerId) this._removeRemoteTrack(t.trackId);
    }
    this.peers.delete(peerId);
    this.emit('peer-left', { peerId, peer });
  }

  _onTrackPublished({ peer_id: peerId, track }) {
    const peer = this.peers.get(peerId);
    if (peer && !peer.tracks.some((t) => t.id === track.id)) {
      peer.tracks.push({ id: track.id, kind: track.kind, muted: !!track.muted, source: track.source });
    }
  }

  _onTrackUnpublished({ peer_id: peerId, track_id: trackId }) {
    const peer = this.peers.get(peerId);
    if (peer) peer.tracks = peer.tracks.filter((t) => t.id !== trackId);
    this._endedTracks.add(trackId);
    this._removeRemoteTrack(trackId);
  }

  _onTrackMuted({ peer_id: peerId, track_id: trackId, muted }) {
    const known = this.peers.get(peerId)?.tracks.find((t) => t.id === trackId);
    if (known) known.muted = muted;
    const remote = this.remoteTracks.get(trackId);
    if (remote) remote.muted = muted;
    const kind = known?.kind || remote?.kind;
    this.emit('track-muted', { peerId, trackId, kind, muted });
  }
}
