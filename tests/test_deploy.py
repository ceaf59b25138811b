"""The deployment files are consistent with the code (no Docker engine runs here: checked statically)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from netns import NetworkNamespace

from chorus.signaling import tls
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
    settings = Settings(**{k.removeprefix("CHORUS_").lower(): json.loads(v) if str(v).startswith("[") else v
                           for k, v in env.items()})
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


CHORUS = str(Path(sys.executable).parent / "chorus")
CADDY = shutil.which("caddy") or str(ROOT / ".tools" / "caddy" / "usr" / "bin" / "caddy")


def readme_deploy_script() -> str:
    """The shell block of the README's Deploy section, as written."""
    section = (ROOT / "README.md").read_text().split("## Deploy", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Deploy section has one block of commands"
    return blocks[0]


def test_caddy_config_validates(tmp_path: Path) -> None:
    if not os.path.exists(CADDY):
        pytest.fail("caddy is missing: make test takes it from Debian's package into .tools/")
    env = {**os.environ, "DOMAIN": "chorus.example.org", "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([CADDY, "validate", "--config", str(ROOT / "Caddyfile"), "--adapter", "caddyfile"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Valid configuration" in out.stdout + out.stderr, out.stderr[-2000:]


@pytest.mark.timeout(120)
async def test_readme_deploy_commands(tmp_path: Path, netns: NetworkNamespace) -> None:
    """The Deploy commands, run as written with PUBLIC_IP a test host's address (a network namespace is the
    server); `up` is checked with docker-compose config and replaced by starting the services as compose would
    (host networking: in the namespace), the ACME certificate by a self-signed one where Caddy keeps it."""
    folder = tmp_path / "deploy"
    folder.mkdir()
    for name in ("docker-compose.yml", "docker-compose.https.yml", "Caddyfile"):
        shutil.copy(ROOT / name, folder / name)
    public_ip = netns.ns_ip
    script = readme_deploy_script()
    assert "PUBLIC_IP=203.0.113.7" in script
    script = script.replace("PUBLIC_IP=203.0.113.7", f"PUBLIC_IP={public_ip}")
    up = next(line for line in script.splitlines() if line.startswith("docker compose"))
    # At `up`, hand over to the test and wait until it has started the services.
    script = script.replace(up, "touch up.requested; while [ ! -f up.done ]; do sleep 0.05; done")
    env = {**os.environ, "PATH": f"{Path(CHORUS).parent}:{os.environ['PATH']}"}
    log = open(tmp_path / "script.log", "w")
    shell = subprocess.Popen(["ip", "netns", "exec", netns.name, "bash", "-euo", "pipefail", "-c", script],
                             cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    services: list[subprocess.Popen[bytes]] = []
    files = [open(tmp_path / "coturn.log", "wb"), open(tmp_path / "chorus.log", "wb")]
    try:
        deadline = time.monotonic() + 60
        while not (folder / "up.requested").exists():
            assert shell.poll() is None, (tmp_path / "script.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dotenv = dict(line.split("=", 1) for line in (folder / ".env").read_text().splitlines() if "=" in line)
        assert dotenv["PUBLIC_IP"] == public_ip and len(dotenv["CHORUS_AUTH_SECRET"]) == 64
        # `up`: the compose files resolve (docker-compose reads .env from the folder) ...
        compose_args = [c for c in up.split() if c.endswith(".yml")]
        config = yaml.safe_load(subprocess.run(
            [shutil.which("docker-compose") or "docker-compose", *[f"-f{c}" for c in compose_args], "config"],
            cwd=folder, capture_output=True, text=True, check=True, env=os.environ).stdout)
        assert {"chorus", "coturn", "caddy"} <= set(config["services"])
        assert all(s.get("network_mode") == "host" for s in config["services"].values())
        assert config["services"]["chorus"]["stop_grace_period"] == "75s"
        chorus_env = {k: str(v) for k, v in config["services"]["chorus"]["environment"].items()}
        assert float(chorus_env["CHORUS_DRAIN_TIMEOUT"]) < 75
        # ... the certificate Caddy would have obtained (ACME is not run here) ...
        cert_dir = folder / "caddy-data" / "caddy" / "certificates" / "acme-v02.api.letsencrypt.org-directory"
        domain = dotenv["DOMAIN"]
        made = tls.self_signed([domain], cert_dir / domain)
        made[0].rename(cert_dir / domain / f"{domain}.crt")
        made[1].rename(cert_dir / domain / f"{domain}.key")
        # ... and the services start as compose starts them: coturn with the rendered config (its volumes:
        # ./turnserver.conf, and Caddy's data at /caddy-data), Chorus (`chorus serve`) with the resolved env.
        conf = (folder / "turnserver.conf").read_text().replace("/caddy-data/", f"{folder}/caddy-data/")
        (folder / "turnserver.run.conf").write_text(conf)
        assert config["services"]["coturn"]["command"] == ["-c", "/etc/coturn/turnserver.conf"]
        services.append(subprocess.Popen(
            ["ip", "netns", "exec", netns.name, "turnserver", "-c", str(folder / "turnserver.run.conf"),
             f"--pidfile={folder}/turn.pid", f"--userdb={folder}/turndb", "--log-file=stdout", "--simple-log"],
            stdout=files[0], stderr=subprocess.STDOUT))
        services.append(subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "chorus.signaling", "serve"], cwd=folder,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}, **chorus_env},
            stdout=files[1], stderr=subprocess.STDOUT))
        health = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-m", "chorus.signaling",
                                 "health", "--ready", "--wait", "30"], env={**os.environ, **chorus_env},
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, (tmp_path / "chorus.log").read_text()
        (folder / "up.done").touch()
        assert shell.wait(60) == 0, (tmp_path / "script.log").read_text()
        output = (tmp_path / "script.log").read_text()
        token = output.strip().splitlines()[-1]
        assert token.count(".") == 2, output
        assert "fail" not in output.lower().replace("failures", ""), output
        # The deployment works: two participants with tokens (the README's, and one for bob) in a call, media
        # on the public address and the configured port range, TURN handed out with credentials.
        bob = subprocess.run([CHORUS, "token", "create", "--room", "demo", "--identity", "bob"], env={
            **os.environ, "CHORUS_AUTH_SECRET": dotenv["CHORUS_AUTH_SECRET"]}, capture_output=True, text=True,
            check=True).stdout.strip()
        call = subprocess.run(
            ["ip", "netns", "exec", netns.name, sys.executable, str(ROOT / "tests" / "deploy_client.py"),
             f"ws://127.0.0.1:{chorus_env['CHORUS_PORT']}/ws", token, bob, public_ip],
            capture_output=True, text=True, timeout=60)
        assert call.returncode == 0, call.stderr[-3000:]
        result = json.loads(call.stdout.strip().splitlines()[-1])
        print(f"deploy: turn check and token as in the README, a call on {public_ip}: {result['frames']} frames in "
              f"2 s, media ports {result['media_ports']}, ICE servers "
              f"{[u for s in result['ice_servers'] for u in s['urls']]}")
        assert result["frames"] >= 20
        assert result["media_ports"] and all(40000 <= p <= 40999 for p in result["media_ports"])
        urls = [u for s in result["ice_servers"] for u in s["urls"]]
        assert f"turns:{domain}:5349?transport=tcp" in urls and f"turn:{public_ip}:3478?transport=udp" in urls
        assert "Certificate file found" in (tmp_path / "coturn.log").read_text()  # turns: with Caddy's file
    finally:
        for proc in [shell, *services]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()
        for file in files:
            file.close()
    assert "Traceback" not in (tmp_path / "chorus.log").read_text()
