// The Chorus group-call page. Open as /?room=NAME&name=ALICE (optional &token=..., &ice=relay) to join
// at once; otherwise a form asks for the room and name. Tests find the RoomClient as window.chorus and
// wait for window.chorusReady.
import { RoomClient } from './chorus-client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = takeToken(params);
const tiles = new Map(); // peer id -> {el, video, stream}
let client = null;
let localStream = null;

const STATUS_TEXT = {
  connecting: 'connecting…', connected: 'connected', reconnecting: 'reconnecting…', closed: 'left',
  failed: 'connection lost',
};

// A room token in the address (?token=...) must not stay in the address bar, the history or bookmarks: it
// is taken out at once and kept for this tab only (a reload joins again with it).
function takeToken(query) {
  const key = `chorus-token:${query.get('room') || ''}`;
  const fromUrl = query.get('token');
  if (fromUrl) {
    sessionStorage.setItem(key, fromUrl);
    query.delete('token');
    history.replaceState(null, '', `${location.pathname}${query.size ? `?${query}` : ''}${location.hash}`);
  }
  return fromUrl || sessionStorage.getItem(key) || undefined;
}

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
}

function updateCount() {
  const n = client && !['closed', 'failed'].includes(client.state) ? client.peers.size + 1 : 0;
  $('count').textContent = n ? `${n} participant${n === 1 ? '' : 's'}` : '';
  $('count').dataset.count = n;
}

// --- remote tiles: one <video> and one MediaStream (audio + video) per peer -------------------------

function addTile(peer) {
  if (tiles.has(peer.id)) return tiles.get(peer.id);
  const el = document.createElement('div');
  el.className = 'tile remote';
  el.dataset.peerId = peer.id;
  const video = document.createElement('video');
  video.className = 'remote-video';
  video.autoplay = true;
  video.playsInline = true;
  const label = document.createElement('span');
  label.className = 'label';
  label.textContent = peer.name;
  el.append(video, label);
  $('grid').append(el);
  const tile = { el, video, stream: new MediaStream() };
  tiles.set(peer.id, tile);
  return tile;
}

function removeTile(peerId) {
  tiles.get(peerId)?.el.remove();
  tiles.delete(peerId);
}

// Re-attach the stream after its tracks change, and start playing.
function refresh(tile) {
  tile.video.srcObject = tile.stream.getTracks().length ? tile.stream : null;
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
  for (const { video } of tiles.values()) {
    video.muted = false;
    video.play().catch(() => {});
  }
});

function setTrackMuted(peerId, kind, muted) {
  const tile = tiles.get(peerId);
  if (tile && kind) tile.el.classList.toggle(`${kind}-muted`, muted);
}

// --- joining -----------------------------------------------------------------------------------------

async function start({ room, name, token }) {
  $('join-form').hidden = true;
  $('call').hidden = false;
  $('room-name').textContent = room;
  showError('');
  resetControls();
  setStatus('connecting');

  // window.chorusReconnect (set before this script runs) may shorten the reconnection schedule (tests).
  client = new RoomClient({
    iceTransportPolicy: params.get('ice') === 'relay' ? 'relay' : 'all', reconnect: window.chorusReconnect,
  });
  window.chorus = client;
  window.chorusReady = false;
  client.on('connection-state', (detail) => { showConnection(detail); updateCount(); });
  client.on('draining', ({ deadline, url }) => {
    if (!url) showError(`The server is restarting: the call may drop at ${new Date(deadline * 1000).toLocaleTimeString()}.`);
  });
  // In an MCU room everyone arrives mixed in one composite (from peer 'mcu'): no tile per participant.
  client.on('peer-joined', ({ peer }) => { if (client.mode !== 'mcu') addTile(peer); updateCount(); });
  client.on('peer-left', ({ peerId }) => { removeTile(peerId); updateCount(); });
  client.on('track-added', ({ peerId, kind, track, muted }) => {
    const peer = client.peers.get(peerId) || { id: peerId, name: peerId === 'mcu' ? 'Everyone (mixed)' : peerId };
    const tile = addTile(peer);
    for (const old of tile.stream.getTracks()) {
      if (old.kind === kind) tile.stream.removeTrack(old); // one track of each kind per tile
    }
    tile.stream.addTrack(track);
    setTrackMuted(peerId, kind, muted);
    refresh(tile);
  });
  client.on('track-removed', ({ peerId, track }) => {
    const tile = tiles.get(peerId);
    if (!tile) return;
    tile.stream.removeTrack(track);
    refresh(tile);
  });
  client.on('track-muted', ({ peerId, kind, muted }) => setTrackMuted(peerId, kind, muted));

  try {
    localStream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
    $('local-video').srcObject = localStream;
  } catch (error) {
    localStream = null;
    showError(`No camera or microphone (${error.name}: ${error.message}). You can still watch and listen.`);
  }
  $('mic-button').disabled = !localStream?.getAudioTracks().length;
  $('cam-button').disabled = !localStream?.getVideoTracks().length;

  try {
    // One identity per tab, kept across reloads: a reloaded tab replaces its own ghost at once.
    const identity = sessionStorage.getItem('chorus-identity') || `id-${Math.random().toString(36).slice(2, 12)}`;
    sessionStorage.setItem('chorus-identity', identity);
    await client.join({ room, name, token, identity });
    if (localStream) await client.publish(localStream);
    window.chorusReady = true;
  } catch (error) {
    setStatus('failed', 'failed');
    showError(`Could not join: ${error.reason || error.message}`);
  }
}

// --- controls ----------------------------------------------------------------------------------------

function toggle(button, kind, onText, offText) {
  button.addEventListener('click', async () => {
    const muted = !client.muted[kind];
    button.setAttribute('aria-pressed', String(muted));
    button.textContent = muted ? offText : onText;
    $('local-tile').classList.toggle(`${kind}-muted`, muted);
    try {
      await client.setMuted(kind, muted);
    } catch (error) {
      showError(`Could not ${muted ? 'mute' : 'unmute'}: ${error.reason || error.message}`);
    }
  });
}
toggle($('mic-button'), 'audio', 'Mute mic', 'Unmute mic');
toggle($('cam-button'), 'video', 'Camera off', 'Camera on');

$('leave-button').addEventListener('click', async () => {
  await client.leave();
  for (const track of localStream?.getTracks() || []) track.stop();
  localStream = null;
  $('local-video').srcObject = null;
  for (const peerId of [...tiles.keys()]) removeTile(peerId);
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
  history.replaceState(null, '', `?${new URLSearchParams({ room, name })}`);
  start({ room, name });
});

// Reset the buttons for a new call.
function resetControls() {
  $('mic-button').textContent = 'Mute mic';
  $('cam-button').textContent = 'Camera off';
  for (const id of ['mic-button', 'cam-button']) $(id).setAttribute('aria-pressed', 'false');
  $('local-tile').classList.remove('audio-muted', 'video-muted');
}

const room = params.get('room');
const name = params.get('name');
$('room-input').value = room || '';
$('name-input').value = name || '';
if (room && name) {
  start({ room, name, token });
} else {
  $('join-form').hidden = false;
}
