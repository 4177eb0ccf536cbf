"""The remote-control door: which broadcasts kombu may dispatch, and what a worker answers.

Against Celery's real command table (`celery.worker.control.Panel.data`); the worker
processes that answer them are in tests/integration/test_control_broadcasts.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import WorkerShutdown
from celery.worker import control

from worker.broker.remote_control import (
    CONTROL_COMMANDS,
    INSPECT_COMMANDS,
    check_control_message,
    command_handlers,
)
from worker.broker.transport import BroadcastsChecked

CELERY = control.Panel.data
RESTRICTED = command_handlers("restricted", CELERY)


def broadcast(**fields: Any) -> dict[str, Any]:
    """A control message as Celery's `app.control.broadcast` sends it."""
    return {
        "method": "ping",
        "arguments": {},
        "destination": None,
        "pattern": None,
        "matcher": None,
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "a-ticket"},
        "ticket": "a-ticket",
        **fields,
    }


@pytest.mark.parametrize(
    "body",
    [
        broadcast(),
        broadcast(method="revoke", arguments={"task_id": "abc", "terminate": False}),
        broadcast(destination=["gpu-0@host"], reply_to=None, ticket=None),
        broadcast(pattern="gpu-*", matcher="glob"),
        {"method": "enable_events"},  # a cast: no reply wanted, nothing else given
    ],
)
def test_celerys_own_broadcasts_pass(body: dict[str, Any]) -> None:
    assert check_control_message(body, {"clock": 7, "expires": 1.5e9}, RESTRICTED) is None


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (["ping"], {}, "not an object"),
        (broadcast(self="x"), {}, "fields a broadcast does not have"),
        (broadcast(method="no_such_command"), {}, "no known command"),
        (broadcast(method=["ping"]), {}, "no known command"),
        (broadcast(arguments=["x"]), {}, "arguments are not an object"),
        (broadcast(arguments={"state": 1}), {}, "arguments are not an object"),
        (broadcast(arguments={"not a name": 1}), {}, "arguments are not an object"),
        (broadcast(destination="gpu-0@host"), {}, "destination"),
        (broadcast(destination=["x" * 300]), {}, "destination"),
        # A regular expression is run against the hostname on the event loop's thread.
        (broadcast(pattern="(a+)+$", matcher="pcre"), {}, "matcher is not glob"),
        (broadcast(pattern=["gpu"], matcher="glob"), {}, "pattern"),
        (broadcast(reply_to={"exchange": 1}), {}, "reply_to"),
        (broadcast(reply_to="somewhere"), {}, "reply_to"),
        (broadcast(ticket={"a": 1}), {}, "ticket"),
        (broadcast(), ["clock"], "headers are not an object"),
        (broadcast(), {"clock": "late"}, "clock is not a number"),
        (broadcast(), {"clock": True}, "clock is not a number"),
    ],
)
def test_malformed_broadcasts_are_refused_with_the_reason(
    body: Any, headers: Any, reason: str
) -> None:
    problem = check_control_message(body, headers, RESTRICTED)
    assert problem is not None and reason in problem


def test_restricted_answers_inspection_cancel_and_the_event_switch() -> None:
    answered = {name for name in CELERY if "refused" not in str(RESTRICTED[name](None))}
    assert answered == (INSPECT_COMMANDS | CONTROL_COMMANDS) & set(CELERY)
    assert {"ping", "stats", "active", "registered", "revoke", "enable_events"} <= answered


@pytest.mark.parametrize(
    "command",
    [
        "shutdown",
        "pool_restart",
        "pool_grow",
        "autoscale",
        "cancel_consumer",
        "rate_limit",
        "time_limit",
        "add_consumer",
        "memdump",
        "disable_events",
        "terminate",
    ],
)
def test_restricted_refuses_what_changes_or_stops_the_worker(
    command: str, caplog: pytest.LogCaptureFixture
) -> None:
    answer = RESTRICTED[command](None, whatever=1)
    assert answer == {
        "error": f"{command} is refused by this worker (VQ_REMOTE_CONTROL=restricted)"
    }
    assert f"refused remote control command {command}" in caplog.text


def test_revoke_never_asks_a_thread_pool_to_kill() -> None:
    calls: list[dict[str, Any]] = []

    def celery_revoke(state: Any, task_id: Any, **arguments: Any) -> dict[str, str]:
        calls.append({"task_id": task_id, **arguments})
        return {"ok": "revoked"}

    handlers = command_handlers("restricted", {**CELERY, "revoke": celery_revoke})
    answer = handlers["revoke"](None, task_id="abc", terminate=True, signal="SIGKILL")
    assert answer == {"ok": "revoked"}
    assert calls == [{"task_id": "abc"}]


def test_a_command_failing_on_odd_arguments_answers_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answer = RESTRICTED["revoke"](None, task=7)  # no task_id: Celery's revoke raises
    assert answer == {"error": "revoke failed (TypeError)"}
    assert "remote control command revoke failed (TypeError)" in caplog.text
    assert "Traceback" not in caplog.text


def test_full_answers_every_celery_command_and_shutdown_still_stops() -> None:
    full = command_handlers("full", CELERY)
    assert set(full) == set(CELERY)
    with pytest.raises(WorkerShutdown):
        full["shutdown"](None)


class RecordingChannel:
    """Stands in for kombu's Redis channel below the mixin: records what it delivers."""

    def __init__(self) -> None:
        self.delivered: list[Any] = []

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        self.delivered.append(message)
        return True


class CheckedChannel(BroadcastsChecked, RecordingChannel):
    pass


def fanout(headers: Any) -> dict[str, Any]:
    return {
        "body": "e30=",  # {}
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": headers,
        "properties": {"delivery_tag": "t", "body_encoding": "base64", "delivery_info": {}},
    }


@pytest.mark.parametrize(
    "message",
    [["not", "an", "object"], fanout(["not", "headers"]), fanout({"compression": "zlib"})],
)
def test_a_broadcast_kombu_would_fail_on_is_dropped_at_the_channel(
    message: Any, caplog: pytest.LogCaptureFixture
) -> None:
    channel = CheckedChannel()
    assert channel._deliver_fanout_message(message, "celery.pidbox") is False
    assert channel.delivered == []
    assert "refused broadcast on celery.pidbox" in caplog.text


def test_a_well_formed_broadcast_reaches_kombu() -> None:
    channel = CheckedChannel()
    assert channel._deliver_fanout_message(fanout({"clock": 3}), "celery.pidbox") is True
    assert channel.delivered == [fanout({"clock": 3})]
