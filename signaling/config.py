"""
Chorus settings: one object, read from an optional TOML/JSON config file and ``CHORUS_*`` environment
variables (the environment wins). Every field has a default, so ``chorus serve`` runs with no file.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chorus.turn.credentials import check_secret


class Settings(BaseSettings):
    """All of Chorus's configuration."""

    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP/websocket server listens on.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP/websocket port (0 picks a free one).")
    # --- TLS (HTTPS and WSS on the same port; see README "Deploy") ----------------------------------------
    tls_cert: Path | None = Field(None, description="PEM certificate chain: with tls_key, Chorus serves HTTPS and "
                                  "WSS on its port. Re-read on SIGHUP.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For is believed; from anyone else the header is ignored. Per-address limits and logs then "
        "use the client's address, e.g. [\"127.0.0.1\"] behind a Caddy on the same host.",
    )
    rtc_min_port: int | None = Field(None, ge=1024, le=65535, description="Lowest UDP port of the media plane's "
                                     "ICE sockets (with rtc_max_port; unset: any port the kernel picks). Each "
                                     "participant uses two ports (publish and subscribe connection).")
    rtc_max_port: int | None = Field(None, ge=1024, le=65535, description="Highest UDP port of the media plane.")
    ice_host_addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="Addresses the media plane advertises as ICE host candidates. Loopback by default, "
        "so a browser on this machine connects; set your server's reachable address(es) to deploy.",
    )
    ice_servers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="ICE servers handed to clients in the join response, e.g. "
        '[{"urls": ["stun:stun.example.org:3478"]}].',
    )
    # --- auth ---------------------------------------------------------------------------------------------
    auth_secret: str | None = Field(
        None, description="HS256 secret (>= 32 bytes) for room tokens. When set, join needs a valid token and "
        "the admin API an admin token.",
    )
    dev_mode: bool = Field(
        False, description="Run without auth_secret: anyone may join any room and use the admin API. "
        "Chorus refuses to start with neither auth_secret nor dev_mode.",
    )
    webhook_urls: list[str] = Field(default_factory=list, description="URLs that receive event webhooks (POST).")
    webhook_secret: str | None = Field(
        None, description="HMAC-SHA256 key for the X-Chorus-Signature header; auth_secret when unset."
    )

    @field_validator("auth_secret")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < 32:
            raise ValueError("auth_secret must be at least 32 bytes")
        return value

    @field_validator("ingest_passthrough_profiles")
    @classmethod
    def _known_profiles(cls, value: list[str]) -> list[str]:
        known = {"constrained-baseline", "baseline", "main", "high", "constrained-high", "predictive-high-444"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown H.264 profile(s) {sorted(unknown)}; known: {sorted(known)}")
        return value

    @field_validator("turn_secret")
    @classmethod
    def _no_padding(cls, value: str | None) -> str | None:
        return check_secret(value)

    # --- TURN (coturn with use-auth-secret) -------------------------------------------------------------
    turn_secret: str | None = Field(
        None, description="Shared secret with coturn (static-auth-secret). When set, join hands out TURN "
        "credentials; when unset, only stun_urls are handed out."
    )
    turn_urls: list[str] = Field(
        default_factory=lambda: ["turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3478?transport=tcp"],
        description="TURN URLs handed to clients (turn:/turns:, with ?transport=udp|tcp).",
    )
    stun_urls: list[str] = Field(default_factory=list, description="STUN URLs handed to clients.")
    turn_ttl: int = Field(3600, ge=60, le=7 * 86400, description="Lifetime of minted TURN credentials, seconds.")
    turn_realm: str = Field("chorus.local", description="coturn realm.")
    turn_listening_ip: str = Field("127.0.0.1", description="coturn listening address (rendered config).")
    turn_relay_ip: str | None = Field(None, description="coturn relay address (rendered config).")
    turn_external_ip: str | None = Field(None, description="coturn external-ip, behind NAT (rendered config).")
    turn_port: int = Field(3478, ge=1, le=65535, description="coturn listening port (rendered config).")
    turn_tls_port: int = Field(5349, ge=1, le=65535, description="coturn TLS port, used with cert and key.")
    turn_min_port: int = Field(49160, ge=1024, le=65535, description="Lowest relay port.")
    turn_max_port: int = Field(49999, ge=1024, le=65535, description="Highest relay port.")
    turn_tls_cert: Path | None = Field(None, description="TLS certificate for turns: (rendered config).")
    turn_tls_key: Path | None = Field(None, description="TLS private key for turns: (rendered config).")
    turn_user_quota: int = Field(12, ge=0, description="Max allocations per TURN user (0: unlimited).")
    turn_total_quota: int = Field(1200, ge=0, description="Max allocations in total (0: unlimited).")
    turn_max_bps: int = Field(0, ge=0, description="Max bytes/s per TURN session (0: unlimited).")

    # --- cluster (several nodes on one Redis; see docs/cluster.md) ----------------------------------------
    redis_url: str | None = Field(None, description="Redis shared by the nodes, e.g. redis://127.0.0.1:6379/0. "
                                  "Unset: a single node with an in-memory registry.")
    node_url: str | None = Field(None, description="This node's websocket URL as clients reach it "
                                 "(default ws://host:port/ws); other nodes redirect joins here.")
    node_id: str | None = Field(None, description="This node's id in the cluster (default: derived from node_url).")
    node_ttl: float = Field(5.0, ge=1.0, le=60.0, description="Seconds after its last heartbeat a node (and its "
                            "rooms) expire.")

    # --- MCU rooms ----------------------------------------------------------------------------------------
    mcu_width: int = Field(640, ge=64, le=1920, description="Composite width of MCU rooms (a join may ask less).")
    mcu_height: int = Field(480, ge=64, le=1080, description="Composite height of MCU rooms.")
    mcu_fps: int = Field(15, ge=1, le=30, description="Composite frame rate of MCU rooms.")

    # --- egress: HLS/DASH and recordings (see docs/egress.md) --------------------------------------------
    egress_segment_seconds: float = Field(2.0, ge=0.5, le=10.0, description="HLS/DASH segment length.")
    egress_part_seconds: float = Field(0.25, ge=0.1, le=2.0, description="LL-HLS part length (egresses started "
                                       "with low_latency).")
    egress_window_segments: int = Field(6, ge=3, le=60, description="Segments listed in a live playlist.")
    egress_ladder: list[str] = Field(default_factory=lambda: ["360:800", "180:250"],
                                     description="Lower rungs as 'height:kbps' (the top rung is the source).")
    egress_top_kbps: int = Field(2500, ge=100, le=50000, description="Bit rate of the top rung when it is "
                                 "encoded (a VP8 publisher, a composite).")
    egress_composite_width: int = Field(1280, ge=64, le=1920, description="Width of a room composite egress.")
    egress_composite_height: int = Field(720, ge=64, le=1080, description="Height of a room composite egress.")
    egress_composite_fps: int = Field(30, ge=1, le=30, description="Frame rate of a room composite egress.")
    egress_output_dir: Path | None = Field(None, description="Also write every HLS/DASH file under this folder "
                                           "({room}/{egress_id}/...), for an external web server or CDN origin.")
    egress_public: bool = Field(False, description="HLS/DASH readable without a token unless an egress says "
                                "otherwise (with auth off, everything is readable).")
    egress_max: int = Field(8, ge=1, le=256, description="Egresses running at once at most.")
    egress_worker_nice: int = Field(10, ge=0, le=19, description="Niceness added to egress worker processes, "
                                    "so forwarding wins the CPU.")
    egress_room_grace: float = Field(30.0, ge=0, le=3600, description="Seconds an egress waits for its room to "
                                     "reopen (a publisher reconnecting) before it ends.")
    egress_keep_ended: float = Field(600.0, ge=0, description="Seconds an ended egress stays listed and served.")
    recordings_dir: Path = Field(Path("recordings"), description="Folder of recordings ({room}/{folder}/{file}).")
    recordings_retention_days: float = Field(0.0, ge=0, description="Delete recordings older than this many "
                                             "days (0: keep them).")

    # --- limits (one client must never hurt another) -----------------------------------------------------
    max_sdp_bytes: int = Field(64 * 1024, ge=1024, description="Largest SDP accepted.")
    max_sdp_lines: int = Field(2000, ge=20, description="Most lines in an SDP accepted.")
    max_rooms: int = Field(1000, ge=1, description="Rooms this node hosts at most.")
    max_peers_per_room: int = Field(100, ge=1, description="Participants per room at most.")
    max_tracks_per_peer: int = Field(4, ge=1, description="Tracks one participant may publish at most.")
    join_rate_per_ip: float = Field(5.0, gt=0, description="Joins per second allowed per client IP (sustained).")
    join_burst_per_ip: int = Field(20, ge=1, description="Joins allowed per client IP in a burst.")
    max_connections: int = Field(5000, ge=1, description="Websockets open at once at most; more are refused "
                                 "with HTTP 429 before the upgrade.")
    max_connections_per_ip: int = Field(100, ge=1, description="Websockets open at once from one client address "
                                        "at most (HTTP 429 before the upgrade beyond).")
    join_timeout: float = Field(10.0, gt=0, description="Seconds a websocket may stay open without joining a "
                                "room; then it is closed (4008 \"join timeout\").")
    allowed_origins: list[str] | None = Field(
        None, description="If set, websocket upgrades whose Origin header is not in this list are refused "
        "(403). Requests without an Origin (non-browser clients) are allowed.",
    )

    # --- shutdown and health -------------------------------------------------------------------------------
    drain_timeout: float = Field(60.0, ge=0, description="On SIGTERM or POST /api/drain: seconds to wait for the "
                                 "rooms to empty (participants move to another node by themselves in a cluster) "
                                 "before closing what is left and exiting.")
    loop_lag_warning: float = Field(0.1, gt=0, description="Event-loop lag (seconds) above which a warning is "
                                    "logged; reported in /readyz and /metrics.")
    debug_hooks: bool = Field(False, description="Test-only admin routes (POST /api/debug/block). Never in "
                              "production.")

    # --- ingest and playback (RTMP, SRT, WHIP, URL pull; WHEP; see docs/ingest.md) -------------------------
    rtmp_port: int = Field(0, ge=0, le=65535, description="RTMP ingest port (0: off; `make run` uses 1935).")
    srt_port: int = Field(0, ge=0, le=65535, description="SRT ingest port, UDP (0: off). Needs Debian's libsrt.")
    ingest_host: str | None = Field(None, description="Address the RTMP and SRT listeners bind (default: host).")
    ingest_public_host: str | None = Field(
        None, description="Host named in the ingest URLs handed out, as encoders reach it (default: ingest_host)."
    )
    public_url: str | None = Field(
        None, description="This server's HTTP base URL as clients reach it, for WHIP/WHEP URLs (default: from "
        "node_url, else http://host:port)."
    )
    max_ingresses: int = Field(16, ge=1, description="Ingested streams live at once (RTMP, SRT, URL pulls, WHIP "
                               "with a stream key).")
    ingest_max_per_address: int = Field(4, ge=1, description="RTMP/SRT connections and WHIP/WHEP sessions per "
                                        "client address.")
    ingress_store: Path = Field(Path("chorus-ingresses.json"), description="File keeping the ingress definitions "
                                "of a single node (keys only as SHA-256 digests); a cluster keeps them in Redis.")
    ingest_media_root: Path | None = Field(None, description="Folder URL-pull ingresses may read files from "
                                           "(unset: no files).")
    ingest_passthrough_profiles: list[str] = Field(
        default_factory=lambda: ["constrained-baseline", "baseline", "main"],
        description="H.264 profiles forwarded without re-encoding (what the audience's browsers decode over "
        "WebRTC); others, and any stream with B-frames, are re-encoded.",
    )
    ingest_idle_timeout: float = Field(4.0, ge=1.0, le=60.0, description="Seconds an RTMP/SRT/WHIP publisher may "
                                       "send nothing before it is dropped.")
    reencode_bitrate: int = Field(1_500_000, ge=100_000, description="Bit rate of re-encoded ingest video.")
    reencode_preset: str = Field("veryfast", description="libx264 preset of re-encoded ingest video.")
    whep_max_viewers: int = Field(100, ge=0, description="WHEP viewers this node serves at once.")
    # --- chat, metadata, rooms made ahead of time ---------------------------------------------------------
    chat_max_bytes: int = Field(4096, ge=1, le=65536, description="Longest chat message text (UTF-8 bytes).")
    chat_history: int = Field(100, ge=0, le=10000, description="Chat messages kept per room for late joiners.")
    chat_rate_per_peer: float = Field(5.0, gt=0, description="Chat messages per second allowed per participant "
                                      "(sustained); more get limit_exceeded.")
    chat_burst_per_peer: int = Field(20, ge=1, description="Chat messages one participant may send in a burst.")
    max_metadata_bytes: int = Field(4096, ge=64, le=65536,
                                    description="Largest room or participant metadata (its JSON, in bytes).")
    room_empty_timeout: float = Field(300.0, ge=0, le=86400,
                                      description="Seconds a room created through the admin API stays open "
                                      "with nobody in it (before the first join and after the last leave).")

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    max_message_bytes: int = Field(256 * 1024, ge=1024, description="Largest websocket message handled; a "
                                   "bigger one (up to max_frame_bytes) is answered with limit_exceeded.")
    max_frame_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest websocket message read at all "
                                 "(at least max_message_bytes); a bigger one closes the socket with code 1009.")
    web_root: Path | None = Field(None, description="Folder served at /; the bundled page by default.")

    @model_validator(mode="after")
    def _pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if (self.rtc_min_port is None) != (self.rtc_max_port is None):
            raise ValueError("rtc_min_port and rtc_max_port go together: set both or neither")
        if self.rtc_min_port is not None and self.rtc_max_port is not None and self.rtc_min_port > self.rtc_max_port:
            raise ValueError("rtc_min_port must not be above rtc_max_port")
        for entry in self.trusted_proxies:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return self

    @property
    def scheme(self) -> str:
        """``https`` with a certificate, else ``http``."""
        return "https" if self.tls_cert is not None else "http"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from ``path`` (TOML or JSON) if given, then the environment, then ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            values = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        from_env = cls().model_dump(exclude_unset=True)  # only what the environment actually set
        return cls(**{**values, **from_env, **overrides})
