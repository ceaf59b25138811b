"""The deployment files are consistent with the code (no Docker engine runs here: checked statically)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chorus.signaling.config import Settings

ROOT = Path(__file__).resolve().parent.parent
ENV = {"CHORUS_AUTH_SECRET": "a" * 40, "CHORUS_TURN_SECRET": "t" * 20, "PUBLIC_IP": "203.0.113.7"}


def compose_config() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose (Debian package) is not installed: make test installs it")
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"],
                         env={**os.environ, **ENV}, capture_output=True, text=True, check=True)
    return yaml.safe_load(out.stdout)


def test_compose_file_validates_and_configures_real_settings() -> None:
    config = compose_config()
    assert {"chorus", "coturn", "redis"} <= set(config["services"])
    env = config["services"]["chorus"]["environment"]
    known = {f"CHORUS_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    # The values parse as Chorus settings (JSON lists included).
    settings = Settings(**{k.removeprefix("CHORUS_").lower(): v for k, v in env.items()
                           if not k.endswith(("_URLS", "_ADDRESSES"))},
                        ice_host_addresses=json.loads(env["CHORUS_ICE_HOST_ADDRESSES"]),
                        turn_urls=json.loads(env["CHORUS_TURN_URLS"]),
                        stun_urls=json.loads(env["CHORUS_STUN_URLS"]))
    assert settings.ice_host_addresses == ["203.0.113.7"]
    assert settings.turn_urls[0] == "turn:203.0.113.7:3478?transport=udp"


def test_compose_refuses_missing_secrets() -> None:
    exe = shutil.which("docker-compose") or "docker-compose"
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"],
                         env={k: v for k, v in os.environ.items() if k not in ENV}, capture_output=True, text=True)
    assert out.returncode != 0 and "CHORUS_AUTH_SECRET" in out.stderr


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"COPY (.+) \S+$", line)
        if m:
            for source in m.group(1).split():
                assert (ROOT / source).exists(), source


def test_print_config_hides_secrets() -> None:
    out = subprocess.run([sys.executable, "-m", "chorus.signaling", "serve", "--print-config"], cwd=ROOT.parent,
                         env={**os.environ, **ENV}, capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    assert shown["auth_secret"] == "***" and shown["turn_secret"] == "***"
    assert ENV["CHORUS_AUTH_SECRET"] not in out.stdout


def test_serve_refuses_to_run_without_auth_or_dev_mode() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    out = subprocess.run([sys.executable, "-m", "chorus.signaling", "serve", "--port", "0"], cwd=ROOT.parent, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "dev_mode" in out.stderr
