// A small WHIP (RFC 9725) / WHEP client, used by the watch and broadcast pages and usable on its own.
// The offer is POSTed once ICE gathering has finished (so nothing needs trickling), the answer applied, and the
// session resource (the Location header) DELETEd on stop. Errors carry the problem document's code and detail.

export class HttpSessionError extends Error {
  constructor(status, code, detail, retryAfter) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, when the server said when to try again (409 nothing live, 503)
  }
}

// ICE servers of RFC 9725 §4.6 Link headers: <turn:host:3478?transport=udp>; rel="ice-server"; username=...
export function iceServersFromLinks(header) {
  const servers = [];
  for (const link of (header || '').split(/,(?=\s*<)/)) {
    const url = /<([^>]+)>/.exec(link);
    if (!url || !/rel="?ice-server"?/.test(link)) continue;
    const param = (name) => {
      const m = new RegExp(`${name}="((?:[^"\\\\]|\\\\.)*)"`).exec(link);
      return m ? m[1].replace(/\\(.)/g, '$1') : undefined;
    };
    const server = { urls: url[1] };
    if (param('username') !== undefined) Object.assign(server, { username: param('username'), credential: param('credential') });
    servers.push(server);
  }
  return servers;
}

function gathered(pc, timeoutMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === 'complete') { pc.removeEventListener('icegatheringstatechange', done); resolve(); } };
    pc.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, timeoutMs);
  });
}

// One WHIP or WHEP session on an RTCPeerConnection that already has its transceivers.
export class WebRtcHttpSession {
  constructor(pc, endpoint, { token } = {}) {
    this.pc = pc;
    this.endpoint = endpoint;
    this.token = token;
    this.location = null;
    this.etag = null;
    this.iceServers = [];
  }

  headers(type) {
    const headers = { 'Content-Type': type };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  async start() {
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await gathered(this.pc, 2000);
    // fetch follows a 307 (the room lives on another node of a cluster) with the same method and body
    const response = await fetch(this.endpoint, {
      method: 'POST', headers: this.headers('application/sdp'), body: this.pc.localDescription.sdp,
    });
    if (response.status !== 201) {
      let problem = {};
      try { problem = await response.json(); } catch (e) { /* not a problem document */ }
      const retry = response.headers.get('Retry-After');
      throw new HttpSessionError(response.status, problem.code, problem.detail, retry ? Number(retry) : undefined);
    }
    this.location = new URL(response.headers.get('Location'), response.url).href;
    this.etag = response.headers.get('ETag');
    this.iceServers = iceServersFromLinks(response.headers.get('Link'));
    await this.pc.setRemoteDescription({ type: 'answer', sdp: await response.text() });
  }

  // End the session: the connection closes and the server frees the resource (a WHIP participant leaves).
  async stop() {
    this.pc.close();
    if (!this.location) return;
    const location = this.location;
    this.location = null;
    await fetch(location, { method: 'DELETE', headers: this.token ? { Authorization: `Bearer ${this.token}` } : {} })
      .catch(() => {});
  }
}
