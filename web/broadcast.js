// A WHIP publisher: /broadcast?room=R&name=N (or &token=T: a room token with the publish grant, or an ingress
// stream key) sends the camera and microphone into the room over WHIP. Stop DELETEs the session. Tests use
// window.broadcast.
import { takeToken } from './token.js';
import { WebRtcHttpSession } from './whip-client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const room = params.get('room');
const token = takeToken(params, `broadcast:${room || ''}`);
window.broadcast = { pc: null, session: null, state: 'idle', stop: null };

function setStatus(state, text = state) {
  window.broadcast.state = state;
  $('status').textContent = text;
  $('status').dataset.state = state;
}

async function start() {
  const media = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
  $('video').srcObject = media;
  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  for (const track of media.getTracks()) pc.addTransceiver(track, { direction: 'sendonly', streams: [media] });
  const query = params.get('name') ? `?name=${encodeURIComponent(params.get('name'))}` : '';
  const session = new WebRtcHttpSession(pc, `/whip/${encodeURIComponent(room)}${query}`,
    { token });
  Object.assign(window.broadcast, { pc, session });
  setStatus('connecting', 'connecting…');
  await session.start();
  setStatus('live', 'live');
  window.broadcast.stop = async () => {
    await session.stop();
    for (const track of media.getTracks()) track.stop();
    setStatus('stopped', 'stopped');
  };
  $('stop-button').disabled = false;
}

$('stop-button').addEventListener('click', () => window.broadcast.stop && window.broadcast.stop());
$('room-name').textContent = room || '';
if (room) {
  start().catch((error) => {
    setStatus('failed', 'failed');
    $('error').textContent = `Cannot broadcast: ${error.message}`;
    $('error').hidden = false;
  });
} else {
  setStatus('failed', 'open as /broadcast?room=NAME&name=YOU');
}
