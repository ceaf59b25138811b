"""The distribution installs one import namespace, ``chorus``, and claims no generic top-level name."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Names the repository's folders carry, which an installed Chorus must not take from other projects.
GENERIC = ("sfu", "signaling", "turn", "web", "bench")


@pytest.mark.timeout(240)
def test_wheel_installs_only_the_chorus_namespace(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=180)
    (wheel,) = wheels.glob("chorus-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/", 1)[0] for name in archive.namelist()}
        names = archive.namelist()
    assert {t for t in top if not t.endswith(".dist-info")} == {"chorus"}, top
    assert "chorus/web/index.html" in names and "chorus/bench/native/loopback_ifaddrs.c" in names

    # A fresh venv outside the repository; the dependencies come from this environment's site-packages
    # through a plain path entry (so this environment's editable install of Chorus is not seen there).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    (Path(target) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, str(wheel)],
                   check=True, capture_output=True, timeout=120)

    probe = (
        "import importlib.util, json;"
        f"print(json.dumps({{n: importlib.util.find_spec(n) is not None for n in {list(GENERIC)!r}}}));"
        "import chorus.sfu, chorus.signaling.cli, chorus.turn, chorus.bench;"
        "print(chorus.sfu.__file__)"
    )
    out = subprocess.run([str(python), "-P", "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    found, location = out.stdout.splitlines()
    assert found == '{"sfu": false, "signaling": false, "turn": false, "web": false, "bench": false}', found
    assert location.startswith(target), location
    # The command works from the installed package.
    out = subprocess.run([str(python), "-P", "-m", "chorus.signaling", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert "serve" in out.stdout
