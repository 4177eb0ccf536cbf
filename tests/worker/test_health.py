"""Health file: live while the heartbeat runs, ready once the model is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

from producer.settings import Settings
from worker.health import HealthReporter, check_live, check_ready, read_health


def test_a_fresh_heartbeat_is_live_and_a_stale_one_is_not(tmp_path: Path):
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=0.05)
    reporter.start()
    try:
        time.sleep(0.2)
        assert check_live(reporter.path, 0.05)[0]
        data = read_health(reporter.path)
        assert data is not None and data["updated_at"] > time.time() - 1
    finally:
        reporter.stop()
    assert not reporter.path.exists()  # a stopped worker is not live


def test_stale_heartbeat_fails_liveness(tmp_path: Path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"updated_at": time.time() - 60, "model_loaded": True}))
    live, reason = check_live(path, 1.0)
    assert not live and "old" in reason


def test_not_ready_until_the_model_is_loaded_then_not_ready_while_stopping(
    tmp_path: Path, redis_url
):
    settings = Settings.from_env({}, redis_url=redis_url, heartbeat_interval_s=1.0)
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=1.0)
    reporter.start()
    try:
        assert check_ready(reporter.path, settings) == (False, "model not loaded yet")
        reporter.model_ready()
        assert check_ready(reporter.path, settings)[0]
        reporter.task_started("t1")
        assert read_health(reporter.path)["current_task"] == "t1"
        assert check_ready(reporter.path, settings)[0]  # busy is still ready
        reporter.shutting_down()
        assert not check_ready(reporter.path, settings)[0]
    finally:
        reporter.stop()


def test_ready_needs_a_reachable_broker(tmp_path: Path):
    settings = Settings.from_env({}, redis_url="redis://127.0.0.1:1/0", heartbeat_interval_s=1.0)
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=1.0)
    reporter.start()
    try:
        reporter.model_ready()
        ready, reason = check_ready(reporter.path, settings)
        assert not ready and "broker unreachable" in reason
    finally:
        reporter.stop()
