"""
``make fuzz``: run each fuzz target for FUZZ_SECONDS (default 300) with fresh random inputs, showing
progress; a failing input is saved to tests/fuzz_corpus/ (replayed by test_fuzz.py from then on).

    python tests/fuzz.py [TARGET ...]
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_targets import TARGETS, save_failure  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402


def fuzz(name: str, seconds: float) -> bool:
    strategy, check = TARGETS[name]
    failures: list[object] = []

    def recording(data: object) -> None:
        try:
            check(data)
        except Exception:
            if not failures:
                path = save_failure(name, data)  # type: ignore[arg-type]
                print(f"\n  {name}: FAILED, input saved to {path}\n{traceback.format_exc()}", flush=True)
            failures.append(data)
            raise

    run = given(strategy)(settings(max_examples=200, deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck))(recording))
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < seconds:
        try:
            run()
        except Exception:
            return False
        rounds += 1
        print(f"\r  {name}: {rounds * 200} inputs, {time.monotonic() - started:.0f}/{seconds:.0f} s", end="",
              flush=True)
    print(f"\r  {name}: {rounds * 200} inputs in {time.monotonic() - started:.0f} s, no failure")
    return True


def main() -> int:
    seconds = float(os.environ.get("FUZZ_SECONDS", "300"))
    names = sys.argv[1:] or list(TARGETS)
    ok = True
    for name in names:
        ok = fuzz(name, seconds) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
