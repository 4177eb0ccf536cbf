"""Celery's remote-control channel, behind a door of its own.

Whoever can publish on the broker can broadcast a control command to every worker at
once, so the pidbox gets the treatment task messages get at the consumer's door:

* a fanout message kombu could not build a message object from (headers that are not
  an object, a compressed body) is dropped at the channel (`BroadcastsChecked`): kombu
  builds it in the event loop, where the error stopped the whole worker (the channel
  mixin is in worker/broker/transport.py);
* the message's shape is checked before kombu reads it (`check_control_message`): kombu
  passes the body to `dispatch(**body)`, the arguments to the command as keywords, and a
  `pcre` matcher's pattern to `re` (a pattern that backtracks for minutes would stall the
  worker's event loop: no tasks taken, no heartbeats). A bad message is dropped with one
  warning line, never a traceback, and counted in `vq_messages_refused_total{code=
  "control"}`;
* the commands answered (`command_handlers`): with `VQ_REMOTE_CONTROL=restricted`, the
  default, the read-only inspection Flower and `celery inspect` use, `revoke` (how a
  cancel reaches running tasks; `terminate` is ignored, since a thread cannot be killed
  and the task stops at its next token anyway) and the two commands Flower sends to keep
  events flowing. Shutdown, pool changes, consumer changes, rate and time limits, memory
  dumps and the rest are answered with an error naming the setting, and logged in one
  line. `VQ_REMOTE_CONTROL=full` answers every Celery command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery import bootsteps
from celery.worker import control
from celery.worker.consumer.control import Control
from celery.worker.pidbox import Pidbox

from vision_queue.setting_checks import REMOTE_CONTROL_MODES
from worker.broker.door import Door

log = logging.getLogger("vision_queue.worker")

Handler = Callable[..., Any]

# The values of VQ_REMOTE_CONTROL (checked at start: vision_queue/setting_checks.py).
RESTRICTED, FULL = REMOTE_CONTROL_MODES

# Read-only: what Flower's pages and `celery inspect` ask for; `hello` is the startup
# exchange of revoked ids between workers (Celery's mingle).
INSPECT_COMMANDS = frozenset(
    {
        "active",
        "active_queues",
        "clock",
        "conf",  # Celery censors passwords and keys in what it returns
        "hello",
        "ping",
        "query_task",
        "registered",
        "report",
        "reserved",
        "revoked",
        "scheduled",
        "stats",
    }
)
# What the system itself sends: cancels, and Flower keeping task events on.
CONTROL_COMMANDS = frozenset({"revoke", "enable_events", "heartbeat"})

_MAX_TEXT = 256
_MAX_DESTINATIONS = 1000


def _is_keywords(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and key.isidentifier() and key != "state" for key in value
    )


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def _is_destination(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= _MAX_DESTINATIONS
        and all(_is_text(name) for name in value)
    )


def _is_reply_to(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _is_text(value.get("exchange"))
        and _is_text(value.get("routing_key"))
    )


# The optional fields of a broadcast: (valid when set, why not).
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "arguments": (_is_keywords, "the control command's arguments are not an object of names"),
    "destination": (
        _is_destination,
        "the control message's destination is not a list of worker names",
    ),
    # `pcre` runs the pattern as a regular expression on the event loop: it could hang it.
    "matcher": (lambda value: value == "glob", "the control message's matcher is not glob"),
    "pattern": (_is_text, "the control message's pattern is not a short string"),
    "reply_to": (
        _is_reply_to,
        "the control message's reply_to is not an exchange and routing key",
    ),
    "ticket": (_is_text, "the control message's ticket is not a short string"),
}
_BODY_FIELDS = frozenset({"method", *_FIELD_RULES})


def check_control_message(body: Any, headers: Any, commands: Mapping[str, Handler]) -> str | None:
    """Why kombu must not dispatch this control message (None when it may)."""
    if not isinstance(body, dict):
        return "the control message is not an object"
    if not set(body) <= _BODY_FIELDS:
        return "the control message has fields a broadcast does not have"
    method = body.get("method")
    if not isinstance(method, str) or method not in commands:
        return "the control message names no known command"
    for name, (valid, reason) in _FIELD_RULES.items():
        value = body.get(name)
        if value is not None and not valid(value):
            return reason
    if headers is not None and not isinstance(headers, dict):
        return "the control message's headers are not an object"
    clock = (headers or {}).get("clock")
    if clock is not None and (not isinstance(clock, int) or isinstance(clock, bool)):
        return "the control message's clock is not a number"
    return None


def command_handlers(mode: str, celery_handlers: Mapping[str, Handler]) -> dict[str, Handler]:
    """The commands a worker answers in `mode`, each failing with an answer, not a raise."""
    if mode == FULL:
        return {name: _answering(name, handler) for name, handler in celery_handlers.items()}
    handlers = {name: _refusing(name) for name in celery_handlers}
    for name in INSPECT_COMMANDS | CONTROL_COMMANDS:
        if name in celery_handlers:
            handlers[name] = _answering(name, celery_handlers[name])
    handlers["revoke"] = _answering("revoke", _cooperative_revoke(celery_handlers["revoke"]))
    return handlers


def _cooperative_revoke(revoke: Handler) -> Handler:
    def cooperative(state: Any, task_id: Any, **arguments: Any) -> Any:
        arguments.pop("terminate", None)
        arguments.pop("signal", None)
        return revoke(state, task_id, **arguments)

    return cooperative


def _answering(name: str, handler: Handler) -> Handler:
    """`handler`, whose failure on odd arguments is answered and logged in one line."""

    def answer(state: Any, **arguments: Any) -> Any:
        try:
            return handler(state, **arguments)
        except Exception as exc:  # SystemExit (shutdown in full mode) passes on
            log.warning("remote control command %s failed (%s)", name, type(exc).__name__)
            return {"error": f"{name} failed ({type(exc).__name__})"}

    return answer


def _refusing(name: str) -> Handler:
    def refuse(state: Any, **arguments: Any) -> Any:
        log.warning("refused remote control command %s (VQ_REMOTE_CONTROL=%s)", name, RESTRICTED)
        return {"error": f"{name} is refused by this worker (VQ_REMOTE_CONTROL={RESTRICTED})"}

    return refuse


class GuardedPidbox(Pidbox):
    """Celery's worker mailbox, answering `command_handlers` after `check_control_message`."""

    def __init__(self, consumer: Any, door: Door) -> None:
        super().__init__(consumer)
        self.door = door
        self.node.handlers = command_handlers(door.settings.remote_control, control.Panel.data)

    def on_message(self, body: Any, message: Any) -> None:
        try:
            problem = check_control_message(
                body, getattr(message, "headers", None), self.node.handlers
            )
        except Exception as exc:  # a rule tripping over input: refuse, never crash
            problem = f"checking the control message failed ({type(exc).__name__})"
        if problem is not None:
            log.warning("refused control message: %s", problem)
            self.door.metrics.refused.labels("control").inc()
            return
        super().on_message(body, message)


class GuardedControl(Control):
    """Celery's remote-control bootstep with `GuardedPidbox` as its mailbox."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.is_green = False  # the worker runs the threads pool (worker/runner.py)
        self.box = GuardedPidbox(c, c.door)
        self.start = self.box.start
        self.stop = self.box.stop
        self.shutdown = self.box.shutdown
        bootsteps.StartStopStep.__init__(self, c, **kwargs)
