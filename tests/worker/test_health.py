"""Health file: live while the heartbeat runs, ready once the model is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

from support.redis_server import PASSWORD

from vision_queue.settings import Settings
from worker.health import (
    RESTART_WINDOW_S,
    HealthReporter,
    check_live,
    check_ready,
    read_health,
)


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
        assert set(read_health(reporter.path)["running"]) == {"t1"}
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


def test_ready_reports_a_refused_password_with_the_setting_to_fix(tmp_path: Path, redis_url):
    wrong = redis_url.replace(PASSWORD, "not-the-password")
    settings = Settings.from_env({}, redis_url=wrong, heartbeat_interval_s=1.0)
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=1.0)
    reporter.start()
    try:
        reporter.model_ready()
        ready, reason = check_ready(reporter.path, settings)
        assert not ready and "authentication failed" in reason and "REDIS_URL" in reason
        assert "not-the-password" not in reason
    finally:
        reporter.stop()


def test_every_busy_slot_is_listed_with_its_start(tmp_path: Path):
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=1.0)
    reporter.start()
    try:
        reporter.model_ready()
        reporter.task_started("a")
        reporter.task_started("b")
        data = read_health(reporter.path)
        assert data is not None and set(data["running"]) == {"a", "b"}
        assert data["state"] == "busy"
        reporter.task_finished("a")
        assert set(read_health(reporter.path)["running"]) == {"b"}
        reporter.task_finished("b")
        data = read_health(reporter.path)
        assert data["running"] == {} and data["state"] == "ready"
    finally:
        reporter.stop()


def test_a_task_busy_past_its_limit_fails_readiness(tmp_path: Path, redis_url):
    # Given a worker whose tasks count as stuck after 10 s, running one task
    # (heartbeats every 10 s: the file stays live at both instants asked about below)
    settings = Settings.from_env(
        {}, redis_url=redis_url, heartbeat_interval_s=10.0, lease_ttl_s=20.0
    )
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=10.0, stuck_after_s=10.0)
    reporter.start()
    try:
        reporter.model_ready()
        reporter.task_started("slow-one")
        started = reporter.running()["slow-one"]
        # When readiness is asked within the limit, and past it (the file is fresh both times)
        within = check_ready(reporter.path, settings, now=started + 9.0)
        past = check_ready(reporter.path, settings, now=started + 11.0)
    finally:
        reporter.stop()
    # Then only the second answer is "not ready", naming the task
    assert within[0], within
    assert not past[0] and "slow-one" in past[1] and "stuck" in past[1]


def test_a_restart_looping_consumer_fails_readiness(tmp_path: Path, redis_url):
    settings = Settings.from_env({}, redis_url=redis_url, heartbeat_interval_s=1.0)
    reporter = HealthReporter(tmp_path / "h.json", "w1", interval_s=1.0)
    reporter.start()
    try:
        reporter.model_ready()
        reporter.consumer_started()
        reporter.consumer_started()  # one reconnect (a Redis restart) is no loop,
        reporter.consumer_started()  # nor two (a Sentinel failover, its vote in between)
        assert check_ready(reporter.path, settings)[0]
        reporter.consumer_started()
        ready, reason = check_ready(reporter.path, settings)
        assert not ready and "restart-looping" in reason
        # A minute later the loop, if it stopped, no longer counts
        assert (
            check_ready(reporter.path, settings, now=time.time() + RESTART_WINDOW_S + 1)[1]
            != reason
        )
    finally:
        reporter.stop()
