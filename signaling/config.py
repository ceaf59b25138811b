"""
Chorus settings: one object, read from an optional TOML/JSON config file and ``CHORUS_*`` environment
variables (the environment wins). Every field has a default, so ``chorus serve`` runs with no file.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All of Chorus's configuration."""

    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP/websocket server listens on.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP/websocket port (0 picks a free one).")
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
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    max_message_bytes: int = Field(256 * 1024, ge=1024, description="Largest websocket message accepted.")
    web_root: Path | None = Field(None, description="Folder served at /; the bundled page by default.")

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from ``path`` (TOML or JSON) if given, then the environment, then ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            values = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        from_env = cls().model_dump(exclude_unset=True)  # only what the environment actually set
        return cls(**{**values, **from_env, **overrides})
