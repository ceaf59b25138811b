// The Chorus live viewer: /live?room=R[&egress=ID][&token=T][&quality=auto|max|HEIGHT]. Plays the room's HLS
// egress with hls.js (vendored), offers a quality menu (auto and each rung) and shows the live latency.
// window.live exposes the player to tests: live.hls, live.video, live.stats().
import { takeToken } from "./token.js";

const params = new URLSearchParams(location.search);
const room = params.get("room") || "";
const egress = params.get("egress");
const token = takeToken(params, `live:${room}`);
const video = document.getElementById("player");
const quality = document.getElementById("quality");
const status = document.getElementById("status");
const latencyLabel = document.getElementById("latency");
const playingLabel = document.getElementById("playing");
const errorLabel = document.getElementById("error");
document.getElementById("room-name").textContent = room;

const base = `/hls/${encodeURIComponent(room)}/${egress ? encodeURIComponent(egress) + "/" : ""}`;
const source = base + "index.m3u8" + (token ? `?token=${encodeURIComponent(token)}` : "");

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

function showError(text) {
  errorLabel.textContent = text;
  errorLabel.hidden = !text;
}

const live = { hls: null, video, source, errors: [], switches: [] };
window.live = live;

// Seconds from capture to what is on screen now: the wall-clock time of the playing position
// (EXT-X-PROGRAM-DATE-TIME), and how far behind the playlist's live edge the player is.
live.stats = () => {
  const hls = live.hls;
  const playing = hls && hls.playingDate ? hls.playingDate.getTime() : null;
  const level = hls && hls.currentLevel >= 0 ? hls.levels[hls.currentLevel] : null;
  return {
    currentTime: video.currentTime,
    paused: video.paused,
    readyState: video.readyState,
    latency: playing ? (Date.now() - playing) / 1000 : null,
    edgeLatency: hls ? hls.latency : null,
    level: hls ? hls.currentLevel : -1,
    auto: hls ? hls.autoLevelEnabled : true,
    height: level ? level.height : null,
    bandwidthEstimate: hls ? hls.bandwidthEstimate : null,
    levels: hls ? hls.levels.map((l) => ({ height: l.height, bitrate: l.bitrate })) : [],
    errors: live.errors.slice(-20),
  };
};

function fillQualityMenu(hls) {
  quality.replaceChildren(new Option("auto", "-1"));
  hls.levels.forEach((level, i) => {
    const kbps = Math.round(level.bitrate / 1000);
    quality.add(new Option(`${level.height}p · ${kbps} kbps`, String(i)));
  });
  quality.value = "-1";
}

quality.addEventListener("change", () => {
  const hls = live.hls;
  if (!hls) return;
  // -1 turns automatic selection back on; a rung index locks playback to that rung.
  hls.currentLevel = Number(quality.value);
});

function showLatency() {
  const s = live.stats();
  if (s.latency === null) {
    latencyLabel.textContent = "latency –";
  } else {
    latencyLabel.textContent = `latency ${s.latency.toFixed(1)} s` +
      (s.edgeLatency !== null ? ` (${s.edgeLatency.toFixed(1)} s behind the edge)` : "");
    latencyLabel.dataset.level = s.latency < 4 ? "good" : "high";
  }
  playingLabel.textContent = s.height ? `${s.height}p${s.auto ? " (auto)" : ""}` : "";
}

function start() {
  if (!window.Hls || !Hls.isSupported()) {
    showError("This browser cannot play HLS with Media Source Extensions.");
    return;
  }
  setStatus("connecting", "loading");
  const hls = new Hls({
    // LL-HLS parts and blocking reload when the egress has them (the target latency is then the playlist's
    // PART-HOLD-BACK); plain HLS otherwise, three segments behind the live edge as RFC 8216 asks. Setting
    // liveSyncDuration(Count) here would override PART-HOLD-BACK.
    lowLatencyMode: true,
    // Catch up (play up to 1.5x) after a stall instead of staying behind.
    maxLiveSyncPlaybackRate: 1.5,
    backBufferLength: 30,
  });
  live.hls = hls;
  hls.on(Hls.Events.MANIFEST_PARSED, () => {
    fillQualityMenu(hls);
    const wanted = params.get("quality");
    if (wanted && wanted !== "auto") {
      // A fixed rung from the start: the highest, or the one of that height.
      const heights = hls.levels.map((l) => l.height);
      const level = wanted === "max" ? heights.indexOf(Math.max(...heights)) : heights.indexOf(Number(wanted));
      if (level >= 0) {
        hls.currentLevel = level;
        quality.value = String(level);
      }
    }
    setStatus("connected", "live");
    showError("");
    video.play().catch(() => {});
  });
  hls.on(Hls.Events.LEVEL_SWITCHED, (_, data) => {
    const level = hls.levels[data.level];
    live.switches.push({ t: Date.now(), level: data.level, height: level ? level.height : null });
  });
  hls.on(Hls.Events.ERROR, (_, data) => {
    live.errors.push({ t: Date.now(), type: data.type, details: data.details, fatal: data.fatal });
    if (!data.fatal) return;
    if (data.details === Hls.ErrorDetails.MANIFEST_LOAD_ERROR) {
      // The stream has not started yet (or the egress ended): look again shortly.
      setStatus("connecting", "waiting for the stream");
      hls.destroy();
      live.hls = null;
      setTimeout(start, 2000);
    } else if (data.type === Hls.ErrorTypes.NETWORK_ERROR) {
      hls.startLoad();
    } else if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
      hls.recoverMediaError();
    } else {
      setStatus("failed", "playback failed");
      showError(`${data.details}`);
    }
  });
  hls.loadSource(source);
  hls.attachMedia(video);
}

setInterval(showLatency, 500);
if (!room) {
  showError("Open this page as /live?room=NAME.");
} else {
  start();
}
