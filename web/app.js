// The Chorus call page. Open as /?room=NAME&name=ALICE to join at once (optional: &token=..., &ice=relay,
// &mode=mcu for a new room mixed on the server, &mic=0 / &cam=0 to join with them off, &simulcast=0 for one
// camera layer, &video=640x360 for a smaller camera capture than 1280x720); otherwise a form asks. Tests find the RoomClient as window.chorus, the page's own state as
// window.chorusPage, and wait for window.chorusReady.
import { RoomClient } from './chorus-client.js';
import { GAP, gridLayout, speakerLayout } from './layout.js';
import { takeToken } from './token.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = takeToken(params, params.get('room') || '');
const TOP_LAYER_HEIGHT = 2160; // what a pinned or speaker tile asks for: the best layer there is

let client = null;
let localStream = null;
let layoutMode = 'grid'; // or 'speaker'
let layoutChosen = false; // the user picked a layout: a screen share no longer switches it
let pinned = null; // tile id
let lastSpeaker = null; // peer id of the latest loudest speaker
let unread = 0;

// Tiles by id: a participant's camera (id = peer id, 'local' for us), a screen share ('<peer>:screen'), and
// the MCU composite ('mcu'). Each: {id, peerId, kind: 'camera'|'screen'|'mcu', el, video, stream, local,
// videoTrackId, rect, hidden}.
const tiles = new Map();

const STATUS_TEXT = {
  connecting: 'connecting…', connected: 'connected', reconnecting: 'reconnecting…', closed: 'left',
  failed: 'connection lost',
};


function setStatus(state, text = STATUS_TEXT[state] || state) {
  $('status').textContent = text;
  $('status').dataset.state = state;
}

// The connection's state in words: while reconnecting, when the next attempt starts and which it is.
let statusTimer = null;
function showConnection(detail) {
  clearInterval(statusTimer);
  const { state, attempt, maxAttempts, retryAt } = detail;
  const render = () => {
    if (state === 'reconnecting' || (state === 'connecting' && retryAt)) {
      const wait = retryAt ? Math.max(0, Math.ceil((retryAt - Date.now()) / 1000)) : 0;
      setStatus(state, `${wait ? `reconnecting in ${wait} s` : 'reconnecting…'} (attempt ${attempt} of ${maxAttempts})`);
    } else {
      setStatus(state);
    }
    $('status').dataset.attempt = attempt;
  };
  render();
  if (retryAt) statusTimer = setInterval(render, 500);
  if (state === 'failed') {
    showError(`Connection lost: gave up after ${attempt} attempts${detail.reason ? ` (${detail.reason})` : ''}. `
      + 'Reload the page to try again.');
  }
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
  layout();
}

function updateCount() {
  const n = client && !['closed', 'failed'].includes(client.state) ? client.peers.size + 1 : 0;
  $('count').textContent = n ? `${n} participant${n === 1 ? '' : 's'}` : '';
  $('count').dataset.count = n;
}

// Button labels, and the short ones a phone shows.
const SHORT = {
  Mute: 'Mute', Unmute: 'Unmute', 'Camera off': 'Cam', 'Camera on': 'Cam', 'Share screen': 'Share',
  'Stop sharing': 'Stop', 'Speaker view': '◧', 'Grid view': '▦',
};
function setLabel(button, text) {
  button.querySelector('.label-text').textContent = text;
  button.dataset.short = SHORT[text] || text;
}

// --- tiles -------------------------------------------------------------------------------------------

function peerName(peerId) {
  if (peerId === 'local') return 'You';
  if (peerId === 'mcu') return 'Everyone (mixed)';
  return client?.peers.get(peerId)?.name || peerId;
}

function addTile(id, peerId, kind, { local = false } = {}) {
  if (tiles.has(id)) return tiles.get(id);
  const el = document.createElement('div');
  el.className = `tile ${local ? 'local' : 'remote'} ${kind}`;
  el.dataset.tileId = id;
  el.dataset.peerId = peerId;
  el.dataset.kind = kind;
  const video = document.createElement('video');
  video.autoplay = true;
  video.playsInline = true;
  video.muted = local;
  if (!local) video.className = 'remote-video';
  const avatar = document.createElement('div');
  avatar.className = 'avatar';
  const label = document.createElement('span');
  label.className = 'label';
  const quality = document.createElement('span');
  quality.className = 'quality';
  quality.dataset.quality = 'unknown';
  quality.setAttribute('aria-hidden', 'true');
  for (let i = 0; i < 3; i++) quality.append(document.createElement('i'));
  const pin = document.createElement('button');
  pin.type = 'button';
  pin.className = 'pin icon';
  pin.title = 'Pin: keep this one large';
  pin.setAttribute('aria-pressed', 'false');
  pin.textContent = 'Pin';
  pin.addEventListener('click', (event) => {
    event.stopPropagation();
    setPinned(pinned === id ? null : id);
  });
  el.append(video, avatar, label, quality, pin);
  $('stage').append(el);
  const tile = { id, peerId, kind, el, video, stream: new MediaStream(), local, videoTrackId: null, hidden: false };
  tiles.set(id, tile);
  renderName(tile);
  tile.resize = new ResizeObserver(() => sendPreferences(tile));
  tile.resize.observe(el);
  layout();
  return tile;
}

function renderName(tile) {
  const name = peerName(tile.peerId);
  const role = tile.local ? client?.metadata?.role : client?.peers.get(tile.peerId)?.metadata?.role;
  tile.el.querySelector('.label').textContent = tile.kind === 'screen' ? `${name}'s screen`
    : role ? `${name} · ${role}` : name;
  tile.el.querySelector('.avatar').textContent = (name.trim()[0] || '?').toUpperCase();
}

function removeTile(id) {
  const tile = tiles.get(id);
  if (!tile) return;
  tile.resize.disconnect();
  tile.el.remove();
  tiles.delete(id);
  if (pinned === id) pinned = null;
  layout();
}

function removePeerTiles(peerId) {
  for (const id of [...tiles.keys()]) if (tiles.get(id).peerId === peerId) removeTile(id);
}

// Re-attach the stream after its tracks change, and start playing.
function refresh(tile) {
  const tracks = tile.stream.getTracks();
  tile.video.srcObject = tracks.length ? tile.stream : null;
  tile.el.classList.toggle('no-video', !tile.stream.getVideoTracks().length);
  if (tile.video.srcObject) play(tile.video);
}

// Autoplay with sound may be refused until the user interacts: play muted and offer to unmute.
function play(video) {
  video.play().catch((error) => {
    if (error.name !== 'NotAllowedError' || video.muted) return; // AbortError: a newer load won
    video.muted = true;
    $('sound-hint').hidden = false;
    video.play().catch(() => {});
  });
}

document.addEventListener('click', () => {
  if ($('sound-hint').hidden) return;
  $('sound-hint').hidden = true;
  for (const tile of tiles.values()) {
    if (tile.local) continue;
    tile.video.muted = false;
    tile.video.play().catch(() => {});
  }
});

function tileFor(peerId, source) {
  if (peerId === 'mcu') return addTile('mcu', 'mcu', 'mcu');
  if (source === 'screen' || source === 'screen_audio') return addTile(`${peerId}:screen`, peerId, 'screen');
  return addTile(peerId, peerId, 'camera');
}

function onTrackAdded({ peerId, trackId, kind, source, track, muted }) {
  const tile = tileFor(peerId, source);
  for (const old of tile.stream.getTracks()) {
    if (old.kind === kind) tile.stream.removeTrack(old); // one track of each kind per tile
  }
  tile.stream.addTrack(track);
  if (kind === 'video') {
    tile.videoTrackId = trackId;
    tile.el.classList.toggle('video-muted', muted);
  } else {
    tile.el.classList.toggle('audio-muted', muted);
  }
  refresh(tile);
  layout();
}

function onTrackRemoved({ peerId, trackId, kind, source, track }) {
  const id = peerId === 'mcu' ? 'mcu' : (source === 'screen' || source === 'screen_audio') ? `${peerId}:screen` : peerId;
  const tile = tiles.get(id);
  if (!tile) return;
  tile.stream.removeTrack(track);
  if (tile.videoTrackId === trackId) tile.videoTrackId = null;
  if (tile.kind === 'screen' && !tile.stream.getVideoTracks().length) {
    removeTile(id); // a screen share that ended: gone at once
    return;
  }
  refresh(tile);
}

function setTrackMuted(peerId, trackId, kind, muted) {
  for (const tile of tiles.values()) {
    if (tile.peerId !== peerId || tile.kind === 'screen') continue;
    if (kind) tile.el.classList.toggle(`${kind}-muted`, muted);
  }
}

// --- layout --------------------------------------------------------------------------------------------

// The tile shown large in the speaker layout: the pinned one, else a screen share, else who speaks.
function mainTile() {
  if (pinned && tiles.has(pinned)) return tiles.get(pinned);
  if (tiles.has('mcu')) return tiles.get('mcu');
  const screen = [...tiles.values()].find((t) => t.kind === 'screen');
  if (screen) return screen;
  const speaker = lastSpeaker && tiles.get(lastSpeaker);
  if (speaker) return speaker;
  return [...tiles.values()].find((t) => !t.local) || tiles.get('local') || null;
}

function currentLayout() {
  const screenShared = [...tiles.values()].some((t) => t.kind === 'screen');
  if (tiles.has('mcu') || pinned) return 'speaker';
  if (!layoutChosen && screenShared) return 'speaker'; // a presentation is shown large
  return layoutMode;
}

let layoutQueued = false;
function layout() {
  if (layoutQueued) return;
  layoutQueued = true;
  queueMicrotask(() => {
    layoutQueued = false;
    applyLayout();
  });
}

function applyLayout() {
  const stage = $('stage');
  const width = stage.clientWidth;
  const height = stage.clientHeight;
  const mode = currentLayout();
  stage.dataset.layout = mode;
  $('layout-button').dataset.layout = mode;
  setLabel($('layout-button'), mode === 'grid' ? 'Speaker view' : 'Grid view');
  const ordered = [...tiles.values()];
  let rects;
  let more = 0;
  let moreRect = null;
  if (mode === 'grid') {
    rects = gridLayout(ordered.length, width, height);
  } else {
    const main = mainTile();
    const rest = ordered.filter((t) => t !== main);
    ordered.splice(0, ordered.length, ...(main ? [main] : []), ...rest);
    ({ rects, more, moreRect } = speakerLayout(ordered.length, width, height));
  }
  ordered.forEach((tile, i) => {
    const rect = rects[i];
    tile.hidden = !rect;
    tile.el.hidden = !rect;
    tile.el.classList.toggle('main', mode === 'speaker' && i === 0);
    tile.el.querySelector('.pin').setAttribute('aria-pressed', String(pinned === tile.id));
    if (rect) {
      Object.assign(tile.el.style, {
        left: `${rect.x}px`, top: `${rect.y}px`, width: `${rect.width}px`, height: `${rect.height}px`,
      });
      tile.rect = rect;
    }
    sendPreferences(tile);
  });
  let badge = stage.querySelector('.more');
  if (more && moreRect) {
    if (!badge) {
      badge = document.createElement('div');
      badge.className = 'more';
      stage.append(badge);
    }
    badge.textContent = `+${more}`;
    Object.assign(badge.style, {
      left: `${moreRect.x}px`, top: `${moreRect.y}px`, width: `${moreRect.width}px`, height: `${moreRect.height}px`,
    });
  } else {
    badge?.remove();
  }
}

new ResizeObserver(() => layout()).observe($('stage'));
document.addEventListener('visibilitychange', () => {
  for (const tile of tiles.values()) sendPreferences(tile);
});

// Tell the server how large each remote video is shown (issue 11: it sends the layer that fits).
function sendPreferences(tile) {
  if (!client || tile.local || !tile.videoTrackId) return;
  const paused = tile.hidden || document.hidden;
  const top = tile.el.classList.contains('main') || pinned === tile.id;
  const height = top ? TOP_LAYER_HEIGHT : tile.el.clientHeight * (window.devicePixelRatio || 1);
  client.setPreferences(tile.videoTrackId, { maxHeight: height, paused });
}

function setPinned(id) {
  pinned = id;
  layout();
}

// --- who speaks, how the connections are ----------------------------------------------------------

function onActiveSpeakers({ peerIds }) {
  // The large tile follows the loudest of the others (never ourselves), and stays on them through silences.
  const other = peerIds.find((id) => id !== client.peerId);
  if (other) lastSpeaker = other;
  const speaking = new Set(peerIds);
  for (const tile of tiles.values()) {
    const peerId = tile.local ? client.peerId : tile.peerId;
    const on = tile.kind === 'camera' && speaking.has(peerId);
    tile.el.classList.toggle('speaking', on);
    tile.el.classList.toggle('loudest', on && peerIds[0] === peerId);
  }
  if (currentLayout() === 'speaker') layout();
}

const QUALITY_TEXT = { excellent: 'excellent', good: 'good', poor: 'poor', unknown: 'unknown' };
function onQuality({ peers }) {
  for (const tile of tiles.values()) {
    if (tile.kind !== 'camera') continue;
    const q = peers.get(tile.local ? client.peerId : tile.peerId);
    if (!q) continue;
    const indicator = tile.el.querySelector('.quality');
    indicator.dataset.quality = q.quality;
    const loss = Math.max(q.uplink_loss ?? 0, q.downlink_loss ?? 0);
    indicator.title = `Connection ${QUALITY_TEXT[q.quality] || q.quality}: ${(loss * 100).toFixed(1)} % loss`
      + (q.rtt_ms !== null && q.rtt_ms !== undefined ? `, ${q.rtt_ms} ms round trip` : '');
  }
}

// The viewer's own downlink, in the header, every 2 s.
setInterval(async () => {
  if (!client || client.state !== 'connected') return;
  const stats = await client.downlinkStats().catch(() => null);
  if (!stats) return;
  const el = $('downlink');
  el.hidden = false;
  el.textContent = `↓ ${(stats.bitrate / 1e6).toFixed(1)} Mb/s · ${(stats.packetLoss * 100).toFixed(1)} % loss`;
  el.dataset.loss = stats.packetLoss.toFixed(3);
  el.classList.toggle('bad', stats.packetLoss > 0.05);
}, 2000);

function showRoomMetadata(metadata) {
  const el = $('room-topic');
  const text = metadata.title || metadata.topic || '';
  el.textContent = text;
  el.hidden = !text;
  el.dataset.metadata = JSON.stringify(metadata);
}

// --- chat --------------------------------------------------------------------------------------------

function chatEntry(message) {
  const li = document.createElement('li');
  li.className = 'chat-message';
  li.dataset.id = message.id;
  const mine = message.from && message.from === client.peerId;
  if (mine) li.classList.add('own');
  if (message.to) li.classList.add('private');
  if (!message.from) li.classList.add('server');
  const head = document.createElement('div');
  head.className = 'chat-head';
  const who = document.createElement('span');
  who.className = 'chat-from';
  who.textContent = mine ? 'You' : message.from ? (message.name || peerName(message.from)) : 'Server';
  const to = message.to ? ` → ${message.to === client.peerId ? 'you' : peerName(message.to)} (private)` : '';
  const when = document.createElement('time');
  when.textContent = `${to} ${new Date(message.ts * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })}`;
  head.append(who, when);
  const text = document.createElement('p');
  text.className = 'chat-text';
  text.textContent = message.text; // plain text, never HTML
  li.append(head, text);
  return li;
}

function addChat(message) {
  const log = $('chat-log');
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(chatEntry(message));
  while (log.children.length > 500) log.firstChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function setUnread(n) {
  unread = n;
  $('chat-unread').textContent = String(n);
  $('chat-unread').hidden = n === 0;
}

function toggleChat(open = $('chat-panel').hidden) {
  $('chat-panel').hidden = !open;
  $('chat-button').setAttribute('aria-expanded', String(open));
  if (open) {
    setUnread(0);
    $('chat-log').scrollTop = $('chat-log').scrollHeight;
    $('chat-input').focus();
  }
  layout();
}

function refreshChatRecipients() {
  const select = $('chat-to');
  const chosen = select.value;
  select.replaceChildren(new Option('Everyone', ''));
  for (const peer of client?.peers.values() || []) select.append(new Option(peer.name, peer.id));
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : '';
}

$('chat-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = $('chat-input').value;
  if (!text.trim() || !client) return;
  try {
    await client.sendChat(text, $('chat-to').value || null);
    $('chat-input').value = '';
  } catch (error) {
    showError(error.code === 'limit_exceeded' ? `Message not sent: ${error.reason}` : `Message not sent: ${error.message}`);
  }
});
$('chat-button').addEventListener('click', () => toggleChat());
$('chat-close').addEventListener('click', () => toggleChat(false));

// --- local media: devices, level meter --------------------------------------------------------------

let meter = null;
function watchLevel(track) {
  meter?.stop();
  meter = null;
  if (!track) return;
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  context.createMediaStreamSource(new MediaStream([track])).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const x of samples) sum += x * x;
    const rms = Math.sqrt(sum / samples.length);
    // -60 dBFS .. 0 dBFS onto 0..100 %.
    const level = track.enabled ? Math.max(0, Math.min(1, (20 * Math.log10(rms || 1e-9) + 60) / 60)) : 0;
    for (const id of ['mic-level', 'mic-level-panel']) $(id).style.width = `${Math.round(level * 100)}%`;
    $('mic-button').dataset.level = level.toFixed(2);
  }, 100);
  meter = { stop: () => { clearInterval(timer); context.close().catch(() => {}); }, context };
}
// A page opened by a link (no click yet) may start its audio suspended.
document.addEventListener('click', () => meter?.context.resume().catch(() => {}));

async function fillDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices().catch(() => []);
  for (const [kind, select, source] of [['videoinput', 'camera-select', 'camera'], ['audioinput', 'mic-select', 'microphone']]) {
    const current = client?.sources[source]?.getSettings().deviceId;
    const el = $(select);
    el.replaceChildren(...devices.filter((d) => d.kind === kind && d.deviceId !== 'default')
      .map((d, i) => new Option(d.label || `${kind === 'videoinput' ? 'Camera' : 'Microphone'} ${i + 1}`, d.deviceId)));
    if (current) el.value = current;
  }
}

async function switchDevice(kind, deviceId, { check = true } = {}) {
  const previous = client.sources[kind === 'video' ? 'camera' : 'microphone']?.getSettings().deviceId;
  try {
    const track = await client.switchDevice(kind, deviceId, kind === 'video' ? cameraConstraints() : {});
    if (kind === 'video') $('local-video-el').srcObject = new MediaStream([track]);
    else watchLevel(track);
  } catch (error) {
    showError(`Could not switch ${kind === 'video' ? 'camera' : 'microphone'}: ${error.message}`);
    return;
  }
  // Some cameras give frames WebRTC cannot encode (depth cameras: Chromium's second fake device is one): if the
  // new one sends nothing, go back to the previous one rather than leave everyone with a frozen picture.
  if (kind !== 'video' || !check || !previous || client.muted.video) return;
  const before = await client.framesEncoded('camera');
  await new Promise((resolve) => setTimeout(resolve, 2500));
  const after = await client.framesEncoded('camera');
  if (before !== null && after === before && !client.muted.video && client.state === 'connected') {
    await switchDevice('video', previous, { check: false });
    $('camera-select').value = previous;
    showError('That camera gives no video the browser can send: back to the previous one.');
  }
}

$('devices-button').addEventListener('click', async () => {
  const open = $('devices-panel').hidden;
  if (open) await fillDevices();
  $('devices-panel').hidden = !open;
  $('devices-button').setAttribute('aria-expanded', String(open));
});
$('camera-select').addEventListener('change', (e) => switchDevice('video', e.target.value));
$('mic-select').addEventListener('change', (e) => switchDevice('audio', e.target.value));

function cameraConstraints() {
  const [width, height] = (params.get('video') || '1280x720').split('x').map(Number);
  return { width: { ideal: width || 1280 }, height: { ideal: height || 720 }, frameRate: { ideal: 30 } };
}

// --- joining -----------------------------------------------------------------------------------------

async function start({ room, name, token, mode, micOn = true, camOn = true }) {
  $('join-form').hidden = true;
  $('call').hidden = false;
  $('room-name').textContent = room;
  showError('');
  setStatus('connecting');
  layoutMode = 'grid';
  layoutChosen = false;
  pinned = null;
  lastSpeaker = null;
  setUnread(0);
  $('chat-log').replaceChildren();

  // window.chorusReconnect (set before this script runs) may shorten the reconnection schedule (tests).
  client = new RoomClient({
    iceTransportPolicy: params.get('ice') === 'relay' ? 'relay' : 'all',
    simulcast: params.get('simulcast') !== '0',
    reconnect: window.chorusReconnect,
  });
  window.chorus = client;
  window.chorusReady = false;
  client.on('connection-state', (detail) => { showConnection(detail); updateCount(); });
  client.on('draining', ({ deadline, url }) => {
    if (!url) showError(`The server is restarting: the call may drop at ${new Date(deadline * 1000).toLocaleTimeString()}.`);
  });
  // In an MCU room everyone arrives mixed in one composite (from peer 'mcu'): no tile per participant.
  client.on('peer-joined', ({ peer }) => {
    if (client.mode !== 'mcu') addTile(peer.id, peer.id, 'camera');
    updateCount();
    refreshChatRecipients();
  });
  client.on('peer-left', ({ peerId }) => { removePeerTiles(peerId); updateCount(); refreshChatRecipients(); });
  client.on('track-added', onTrackAdded);
  client.on('track-removed', onTrackRemoved);
  client.on('track-muted', ({ peerId, trackId, kind, muted }) => setTrackMuted(peerId, trackId, kind, muted));
  client.on('active-speakers', onActiveSpeakers);
  client.on('connection-quality', onQuality);
  client.on('chat', ({ message, own }) => {
    addChat(message);
    if (!own && $('chat-panel').hidden) setUnread(unread + 1);
  });
  client.on('metadata', ({ room: roomMetadata, peerId }) => {
    if (roomMetadata) showRoomMetadata(roomMetadata);
    for (const tile of tiles.values()) if (!peerId || tile.peerId === peerId || tile.local) renderName(tile);
  });
  client.on('local-track', ({ source, track }) => {
    if (source === 'camera' && track) $('local-video-el').srcObject = new MediaStream([track]);
    if (source === 'screen') {
      $('screen-button').setAttribute('aria-pressed', String(!!track));
      setLabel($('screen-button'), track ? 'Stop sharing' : 'Share screen');
    }
  });

  const local = addTile('local', 'local', 'camera', { local: true });
  local.video.id = 'local-video-el';
  try {
    localStream = await navigator.mediaDevices.getUserMedia({ audio: true, video: cameraConstraints() });
    local.video.srcObject = new MediaStream(localStream.getVideoTracks());
  } catch (error) {
    localStream = null;
    local.el.classList.add('no-video');
    showError(`No camera or microphone (${error.name}: ${error.message}). You can still watch and listen.`);
  }
  $('mic-button').disabled = !localStream?.getAudioTracks().length;
  $('cam-button').disabled = !localStream?.getVideoTracks().length;
  $('screen-button').disabled = !navigator.mediaDevices?.getDisplayMedia;
  watchLevel(localStream?.getAudioTracks()[0]);
  resetControls();
  if (!micOn) await setMuted('audio', true);
  if (!camOn) await setMuted('video', true);

  try {
    // One identity per tab, kept across reloads: a reloaded tab replaces its own ghost at once.
    const identity = sessionStorage.getItem('chorus-identity') || `id-${Math.random().toString(36).slice(2, 12)}`;
    sessionStorage.setItem('chorus-identity', identity);
    await client.join({ room, name, token, identity, mode });
    if (client.mode === 'mcu') {
      // The server scales everyone into one composite: one modest layer is all it can use.
      client.simulcast = false;
      await localStream?.getVideoTracks()[0]?.applyConstraints({ width: { ideal: 640 }, height: { ideal: 360 } })
        .catch(() => {});
    }
    // In an MCU room the composite (shown large) has everyone, us included; our own tile stays as a small
    // self view in the strip, for framing.
    showRoomMetadata(client.roomMetadata);
    for (const message of client.chat) addChat(message);
    refreshChatRecipients();
    for (const tile of tiles.values()) renderName(tile);
    if (localStream) await client.publish(localStream);
    window.chorusReady = true;
  } catch (error) {
    setStatus('failed', 'failed');
    showError(`Could not join: ${error.reason || error.message}`);
  }
}

// --- controls ----------------------------------------------------------------------------------------

async function setMuted(kind, muted) {
  const button = kind === 'audio' ? $('mic-button') : $('cam-button');
  button.setAttribute('aria-pressed', String(muted));
  setLabel(button, kind === 'audio' ? (muted ? 'Unmute' : 'Mute') : (muted ? 'Camera on' : 'Camera off'));
  tiles.get('local')?.el.classList.toggle(`${kind}-muted`, muted);
  try {
    if (client) await client.setMuted(kind, muted);
    else for (const t of localStream?.getTracks() || []) if (t.kind === kind) t.enabled = !muted;
  } catch (error) {
    showError(`Could not ${muted ? 'mute' : 'unmute'}: ${error.reason || error.message}`);
  }
}

$('mic-button').addEventListener('click', () => setMuted('audio', !client.muted.audio));
$('cam-button').addEventListener('click', () => setMuted('video', !client.muted.video));

$('screen-button').addEventListener('click', async () => {
  if (client.sources.screen) {
    await client.stopScreenShare().catch((error) => showError(`Could not stop sharing: ${error.message}`));
    return;
  }
  try {
    await client.shareScreen();
  } catch (error) {
    if (error.name === 'NotAllowedError') return; // the user cancelled the browser's picker
    showError(`Could not share the screen: ${error.reason || error.message}`);
  }
});

$('layout-button').addEventListener('click', () => {
  layoutMode = currentLayout() === 'grid' ? 'speaker' : 'grid';
  layoutChosen = true;
  pinned = null;
  layout();
});

$('leave-button').addEventListener('click', async () => {
  await client.leave();
  for (const track of localStream?.getTracks() || []) track.stop();
  await client.stopScreenShare().catch(() => {});
  localStream = null;
  watchLevel(null);
  for (const id of [...tiles.keys()]) removeTile(id);
  window.chorusReady = false;
  updateCount();
  // Offer to join again.
  $('call').hidden = true;
  $('join-form').hidden = false;
});

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const room = $('room-input').value.trim();
  const name = $('name-input').value.trim();
  const mode = new FormData($('join-form')).get('mode') || 'sfu';
  const micOn = $('join-mic').checked;
  const camOn = $('join-cam').checked;
  const query = { room, name };
  if (mode === 'mcu') query.mode = 'mcu'; // sent only for MCU: joining an existing room of either mode works
  if (!micOn) query.mic = '0';
  if (!camOn) query.cam = '0';
  history.replaceState(null, '', `?${new URLSearchParams(query)}`);
  start({ room, name, mode: mode === 'mcu' ? 'mcu' : undefined, micOn, camOn });
});

// Reset the buttons for a new call.
function resetControls() {
  setLabel($('mic-button'), 'Mute');
  setLabel($('cam-button'), 'Camera off');
  setLabel($('screen-button'), 'Share screen');
  for (const id of ['mic-button', 'cam-button', 'screen-button']) $(id).setAttribute('aria-pressed', 'false');
  tiles.get('local')?.el.classList.remove('audio-muted', 'video-muted');
}

window.chorusPage = {
  tiles,
  layout: () => currentLayout(),
  setLayout(mode) { layoutMode = mode; layoutChosen = true; pinned = null; applyLayout(); },
  pin(id) { setPinned(id); applyLayout(); },
  gap: GAP,
};

const room = params.get('room');
const name = params.get('name');
$('room-input').value = room || '';
$('name-input').value = name || '';
if (room && name) {
  start({
    room, name, token, mode: params.get('mode') === 'mcu' ? 'mcu' : undefined,
    micOn: params.get('mic') !== '0', camOn: params.get('cam') !== '0',
  });
} else {
  $('join-form').hidden = false;
}
