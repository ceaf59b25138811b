// The WHEP player: /watch?room=R (&participant=P to pick someone, &token=T with a subscribe grant). Plays one
// video and one audio track of the room; while nothing is live it asks again after Retry-After; when the
// stream ends it starts over. Tests read window.watch.pc.
import { takeToken } from './token.js';
import { HttpSessionError, WebRtcHttpSession } from './whip-client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const room = params.get('room');
const participant = params.get('participant');
const token = takeToken(params, `watch:${room || ''}`);
window.watch = { pc: null, state: 'idle', sessions: 0 };

function setStatus(state, text = state) {
  window.watch.state = state;
  $('status').textContent = text;
  $('status').dataset.state = state;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Resolves when the stream is over: every track ended or silent (RTCP BYE mutes a remote track) for 2 s, or the
// connection failed, closed, or stayed disconnected for 2 s.
function over(pc) {
  return new Promise((resolve) => {
    let since = null;
    const timer = setInterval(() => {
      const tracks = pc.getReceivers().map((r) => r.track).filter((t) => t);
      const gone = ['failed', 'closed'].includes(pc.connectionState);
      const quiet = pc.connectionState === 'disconnected'
        || (tracks.length > 0 && tracks.every((t) => t.readyState === 'ended' || t.muted));
      since = quiet ? (since ?? Date.now()) : null;
      if (gone || (since !== null && Date.now() - since > 2000)) {
        clearInterval(timer);
        resolve();
      }
    }, 250);
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
    const session = new WebRtcHttpSession(pc, endpoint, { token });
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
