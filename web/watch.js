// The WHEP player: /watch?room=R (&participant=P to pick someone, &token=T with a subscribe grant). Plays one
// video and one audio track of the room; while nothing is live it asks again after Retry-After; when the
// stream ends it starts over. Tests read window.watch.pc.
import { HttpSessionError, WebRtcHttpSession } from './whip-client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const room = params.get('room');
const participant = params.get('participant');
window.watch = { pc: null, state: 'idle', sessions: 0 };

function setStatus(state, text = state) {
  window.watch.state = state;
  $('status').textContent = text;
  $('status').dataset.state = state;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Resolves when the stream is over: every track ended (RTCP BYE) or the connection failed or closed.
function over(pc) {
  return new Promise((resolve) => {
    const check = () => {
      const tracks = pc.getReceivers().map((r) => r.track).filter((t) => t);
      if (['failed', 'closed'].includes(pc.connectionState) || (tracks.length && tracks.every((t) => t.readyState === 'ended'))) {
        clearInterval(timer);
        resolve();
      }
    };
    const timer = setInterval(check, 500);
    pc.addEventListener('connectionstatechange', check);
  });
}

async function play() {
  const endpoint = `/whep/${encodeURIComponent(room)}` + (participant ? `/${encodeURIComponent(participant)}` : '');
  for (;;) {
    const pc = new RTCPeerConnection();
    const stream = new MediaStream();
    pc.addTransceiver('audio', { direction: 'recvonly' });
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.ontrack = (event) => {
      stream.addTrack(event.track);
      $('video').srcObject = stream;
      $('video').play().catch(() => {});
    };
    const session = new WebRtcHttpSession(pc, endpoint, { token: params.get('token') || undefined });
    window.watch.pc = pc;
    setStatus('connecting', 'connecting…');
    try {
      await session.start();
    } catch (error) {
      pc.close();
      if (error instanceof HttpSessionError && (error.status === 409 || error.status === 503)) {
        setStatus('waiting', 'nothing live yet: waiting…');
        await sleep((error.retryAfter || 5) * 1000);
        continue;
      }
      setStatus('failed', 'failed');
      $('error').textContent = `Cannot play: ${error.message}`;
      $('error').hidden = false;
      return;
    }
    window.watch.sessions += 1;
    setStatus('playing', 'playing');
    await over(pc);
    await session.stop();
    setStatus('waiting', 'the stream ended: waiting…');
    await sleep(1000);
  }
}

$('room-name').textContent = room || '';
if (room) {
  play();
} else {
  setStatus('failed', 'open as /watch?room=NAME');
}
