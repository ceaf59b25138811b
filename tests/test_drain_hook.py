"""The drain hook other subsystems use (signaling/drain.py): told when the drain starts, refused new work, and
held work keeps the node waiting (until the deadline)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestServer

from chorus.signaling.app import DRAIN, create_app, start_drain
from chorus.signaling.config import Settings
from chorus.signaling.drain import Draining


async def test_subsystems_stop_and_hold_work() -> None:
    app = create_app(Settings(dev_mode=True, drain_timeout=5))
    server = TestServer(app, port=0)
    await server.start_server()
    try:
        drain = app[DRAIN]
        told: list[float] = []
        drain.subscribe(told.append)  # e.g. an egress closes its listeners here
        drain.refuse("new recordings")  # serving: no error
        with drain.hold("recording r1"):
            assert start_drain(app) and not start_drain(app)  # idempotent
            assert told == [drain.deadline]
            with pytest.raises(Draining) as excinfo:
                drain.refuse("new recordings")
            assert excinfo.value.code == "unavailable"
            await asyncio.sleep(0.5)
            assert not drain.finished.is_set()  # the recording is still being finalised
            assert drain.describe()["holds"] == ["recording r1"]
        await asyncio.wait_for(drain.finished.wait(), 3)
        late: list[float] = []
        drain.subscribe(late.append)  # subscribing after the start: called at once
        assert late == [drain.deadline]
    finally:
        await server.close()


async def test_held_work_does_not_outlive_the_deadline() -> None:
    app = create_app(Settings(dev_mode=True, drain_timeout=0.5))
    server = TestServer(app, port=0)
    await server.start_server()
    try:
        drain = app[DRAIN]
        with drain.hold("stuck upload"):
            start_drain(app)
            await asyncio.wait_for(drain.finished.wait(), 3)
    finally:
        await server.close()
