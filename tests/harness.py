"""
A minimal protocol-level client for Chromium, injected into a page of the server's origin: publish a camera with
or without simulcast, subscribe, say how big a track is shown, read WebRTC statistics. The adaptive-quality tests
use it to drive exactly what they measure, independently of the bundled page's own behaviour.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from browser import CHROMIUM, FLAGS

#: Chromium with a 30 fps fake camera (the issue's set-up).
CAMERA_FLAGS = [f for f in FLAGS if f != "--use-fake-device-for-media-stream"] + [
    "--use-fake-device-for-media-stream=fps=30"]

HARNESS_JS = r"""
window.harness = (() => {
  const wsUrl = location.origin.replace(/^http/, 'ws') + '/ws';
  const h = {events: [], offers: 0, pub: null, sub: null, tracks: {}, layers: []};
  let nextId = 1;
  const pending = new Map();
  let ws;
  function request(method, data = {}) {
    const id = nextId++;
    return new Promise((resolve, reject) => {
      pending.set(id, {resolve, reject});
      ws.send(JSON.stringify({type: 'req', id, method, data}));
    });
  }
  async function onOffer(offer) {
    if (offer.restart && h.sub) { h.sub.close(); h.sub = null; }
    if (!h.sub) {
      h.sub = new RTCPeerConnection({bundlePolicy: 'max-bundle'});
      h.sub.onicecandidate = (e) => e.candidate && request('trickle', {target: 'subscribe', candidate: e.candidate});
      // Play what arrives, as a page would (audio is only decoded, and counted, when played out).
      h.sub.ontrack = (e) => {
        const el = document.createElement(e.track.kind === 'audio' ? 'audio' : 'video');
        el.autoplay = true; el.muted = e.track.kind === 'video'; el.playsInline = true;
        el.srcObject = new MediaStream([e.track]);
        document.body.appendChild(el);
        el.play().catch(() => {});
      };
    }
    for (const c of offer.consumers) h.tracks[c.mid] = c;
    await h.sub.setRemoteDescription({type: 'offer', sdp: offer.sdp});
    await h.sub.setLocalDescription(await h.sub.createAnswer());
    await request('answer', {type: 'answer', sdp: h.sub.localDescription.sdp});
    h.offers++;
  }
  h.join = async (room, name) => {
    ws = new WebSocket(wsUrl);
    await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
    ws.onmessage = (m) => {
      const msg = JSON.parse(m.data);
      if (msg.type === 'res') {
        const p = pending.get(msg.id); pending.delete(msg.id);
        if (p) msg.ok ? p.resolve(msg.data) : p.reject(new Error(msg.error.code + ': ' + msg.error.reason));
      } else if (msg.type === 'evt') {
        h.events.push([msg.method, msg.data]);
        if (msg.method === 'offer') onOffer(msg.data).catch((e) => h.events.push(['harness-error', String(e)]));
        if (msg.method === 'publish_layers') h.applyLayers(msg.data);
      }
    };
    h.joined = await request('join', {v: 1, room, name});
    return h.joined.peer_id;
  };
  h.publish = async ({simulcast = true, width = 1280, height = 720, audio = true} = {}) => {
    const stream = await navigator.mediaDevices.getUserMedia(
      {audio, video: {width: {ideal: width}, height: {ideal: height}, frameRate: 30}});
    h.pub = new RTCPeerConnection({bundlePolicy: 'max-bundle'});
    h.pub.onicecandidate = (e) => e.candidate && request('trickle', {target: 'publish', candidate: e.candidate});
    for (const track of stream.getTracks()) {
      const init = {direction: 'sendonly', streams: [stream]};
      if (track.kind === 'video' && simulcast) {
        init.sendEncodings = [
          {rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150000, scalabilityMode: 'L1T3'},
          {rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500000, scalabilityMode: 'L1T3'},
          {rid: 'f', maxBitrate: 1500000, scalabilityMode: 'L1T3'}];
      }
      h.pub.addTransceiver(track, init);
    }
    await h.pub.setLocalDescription(await h.pub.createOffer());
    const answer = await request('publish', {type: 'offer', sdp: h.pub.localDescription.sdp});
    await h.pub.setRemoteDescription({type: 'answer', sdp: answer.sdp});
    h.published = answer.tracks;
    return answer.tracks;
  };
  h.applyLayers = async ({track_id, active}) => {
    h.layers.push([Date.now(), track_id, active]);
    const sender = h.pub && h.pub.getSenders().find((s) => s.track && s.track.kind === 'video');
    if (!sender) return;
    const params = sender.getParameters();
    for (const e of params.encodings) if (e.rid) e.active = active.includes(e.rid);
    await sender.setParameters(params);
  };
  h.prefer = (track_id, max_height, paused = false) => request('set_preferences', {track_id, max_height, paused});
  h.request = request;
  h.close = () => { ws && ws.close(); h.pub && h.pub.close(); h.sub && h.sub.close(); };
  h.outbound = async () => {
    const out = [];
    if (!h.pub) return out;
    (await h.pub.getStats()).forEach((r) => {
      if (r.type === 'outbound-rtp' && r.kind === 'video') out.push({rid: r.rid || null, active: r.active,
        height: r.frameHeight || 0, fps: r.framesPerSecond || 0, target: r.targetBitrate || 0,
        bytes: r.bytesSent, limit: r.qualityLimitationReason});
    });
    out.sort((a, b) => (a.rid || '').localeCompare(b.rid || ''));
    return out;
  };
  h.availableOutgoing = async () => {
    let value = 0;
    if (h.pub) (await h.pub.getStats()).forEach((r) => {
      if (r.type === 'candidate-pair' && r.nominated && r.availableOutgoingBitrate) value = r.availableOutgoingBitrate;
    });
    return value;
  };
  h.inbound = async () => {
    const out = {video: [], audio: []};
    if (!h.sub) return out;
    (await h.sub.getStats()).forEach((r) => {
      if (r.type !== 'inbound-rtp') return;
      const track = h.tracks[r.mid] || {};
      if (r.kind === 'video') out.video.push({track_id: track.track_id, height: r.frameHeight || 0,
        frames: r.framesDecoded || 0, keyframes: r.keyFramesDecoded || 0, bytes: r.bytesReceived || 0,
        freezes: r.freezeCount || 0, freeze_s: r.totalFreezesDuration || 0, plis: r.pliCount || 0,
        nacks: r.nackCount || 0, lost: r.packetsLost || 0, jitter_delay: r.jitterBufferDelay || 0,
        emitted: r.jitterBufferEmittedCount || 0});
      if (r.kind === 'audio') out.audio.push({track_id: track.track_id, samples: r.totalSamplesReceived || 0,
        concealed: r.concealedSamples || 0, bytes: r.bytesReceived || 0});
    });
    return out;
  };
  return h;
})();
"""


@asynccontextmanager
async def chromium(playwright: Any, *, executable: str = CHROMIUM, extra: list[str] | None = None
                   ) -> AsyncIterator[Any]:
    """A Chromium with the 30 fps fake camera; closed afterwards."""
    browser = await playwright.chromium.launch(executable_path=executable, args=[*CAMERA_FLAGS, *(extra or [])])
    try:
        yield browser
    finally:
        await browser.close()


async def open_harness(browser: Any, http_url: str, *, viewport: dict[str, int] | None = None) -> Any:
    """A page of the server's origin (a secure context on loopback) with the harness loaded."""
    context = await browser.new_context(viewport=viewport or {"width": 640, "height": 480})
    page = await context.new_page()
    await page.goto(f"{http_url}/healthz")
    await page.evaluate(HARNESS_JS)
    return page


def chromium_available() -> bool:
    return os.path.exists(CHROMIUM)
