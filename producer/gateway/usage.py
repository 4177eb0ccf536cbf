"""Usage per API key: finished tasks, prompt and completion tokens, by day.

A task is counted once, when the gateway first sees its final result: a chat completion or
response that ends, `GET /v1/tasks/{id}` showing the result, or the batch feeder recording
a line. A marker per task (`vq:gw:counted:{task_id}`, set with NX in the same script that
adds the numbers) makes every later reading, in this process or another, count nothing.
Tasks nobody reads through the gateway (a native task never fetched) are not counted.

Per key and UTC day a hash `vq:gw:usage:{key_id}:{YYYY-MM-DD}` holds `tasks`,
`prompt_tokens` and `completion_tokens`; it is kept `RETENTION_DAYS` days. Each process
also counts in Prometheus counters labelled by the key's name (`key`: the key id, the
first 12 hex digits of the key's SHA-256, never the key itself).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import weakref
from typing import TYPE_CHECKING, Any

import redis
from fastapi import APIRouter, Query, Request
from prometheus_client import Counter

from producer.gateway.state import Authorized, state_of
from vision_queue.protocol import KEY_PREFIX

if TYPE_CHECKING:
    from producer.gateway.metrics import GatewayMetrics
    from producer.gateway.state import GatewayState

log = logging.getLogger(__name__)

USAGE_KEY = KEY_PREFIX + ":gw:usage:{key_id}:{day}"
COUNTED_KEY = KEY_PREFIX + ":gw:counted:{task_id}"
RETENTION_DAYS = 90
MAX_DAYS = RETENTION_DAYS
FIELDS = ("tasks", "prompt_tokens", "completion_tokens")

# KEYS: the task's marker, the day's hash. ARGV: marker seconds, hash seconds, prompt and
# completion tokens. 1 if counted now, 0 if it had been.
_COUNT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
redis.call('HINCRBY', KEYS[2], 'tasks', 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[2], 'completion_tokens', tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""


class UsageCounters:
    def __init__(self, metrics: GatewayMetrics) -> None:
        def counter(name: str, text: str) -> Counter:
            return Counter(name, text, ["key"], registry=metrics.registry)

        self.tasks = counter("vq_gateway_usage_tasks", "Finished tasks, by API key name.")
        self.prompt = counter(
            "vq_gateway_usage_prompt_tokens", "Prompt tokens of finished tasks, by API key name."
        )
        self.completion = counter(
            "vq_gateway_usage_completion_tokens",
            "Completion tokens of finished tasks, by API key name.",
        )


_COUNTERS: weakref.WeakKeyDictionary[GatewayMetrics, UsageCounters] = weakref.WeakKeyDictionary()


def counters(metrics: GatewayMetrics) -> UsageCounters:
    found = _COUNTERS.get(metrics)
    if found is None:
        found = _COUNTERS[metrics] = UsageCounters(metrics)
    return found


def tokens(result: dict[str, Any]) -> tuple[int, int]:
    counts = result.get("usage") or {}
    return int(counts.get("prompt_tokens", 0) or 0), int(counts.get("completion_tokens", 0) or 0)


def today(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d")


async def count(state: GatewayState, key_id: str, task_id: str, result: dict[str, Any]) -> None:
    """Count a finished task for `key_id`, once whoever reads it; best effort."""
    state_name = result.get("state") or ("FAILURE" if result.get("error") else "SUCCESS")
    if state_name not in ("SUCCESS", "FAILURE"):
        return
    prompt, completion = tokens(result)
    keys = [COUNTED_KEY.format(task_id=task_id), USAGE_KEY.format(key_id=key_id, day=today())]
    ttl = RETENTION_DAYS * 86400
    try:
        counted = await state.redis.eval(
            _COUNT, 2, *keys, state.settings.result_expires_s + 86400, ttl, prompt, completion
        )
    except redis.RedisError as exc:
        log.warning("usage of task %s not counted: %s", task_id, exc)
        return
    if counted:
        with contextlib.suppress(Exception):
            numbers = counters(state.metrics)
            numbers.tasks.labels(key_id).inc()
            numbers.prompt.labels(key_id).inc(prompt)
            numbers.completion.labels(key_id).inc(completion)


async def report(state: GatewayState, key_id: str, days: int) -> dict[str, Any]:
    """The calling key's usage over the last `days` UTC days, totals at the top level."""
    now = dt.datetime.now(dt.timezone.utc)
    dates = [today(now - dt.timedelta(days=back)) for back in range(days)][::-1]
    pipe = state.redis.pipeline(transaction=False)
    for day in dates:
        pipe.hgetall(USAGE_KEY.format(key_id=key_id, day=day))
    rows = await pipe.execute()
    data: list[dict[str, Any]] = []
    totals: dict[str, int] = dict.fromkeys(FIELDS, 0)
    for day, row in zip(dates, rows, strict=True):
        values = {_text(k): int(v) for k, v in (row or {}).items()}
        if not values:
            continue
        numbers = {name: values.get(name, 0) for name in FIELDS}
        total = numbers["prompt_tokens"] + numbers["completion_tokens"]
        data.append({"date": day, **numbers, "total_tokens": total})
        for name in FIELDS:
            totals[name] += numbers[name]
    return {
        "object": "usage",
        "key": key_id,
        "start_date": dates[0],
        "end_date": dates[-1],
        **totals,
        "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"],
        "retention_days": RETENTION_DAYS,
        "data": data,
    }


router = APIRouter(prefix="/v1", tags=["Usage"])


@router.get("/usage", summary="The calling key's usage: tasks and tokens, by UTC day")
async def get_usage(
    request: Request,
    who: Authorized,
    days: int = Query(30, ge=1, le=MAX_DAYS, description="How many UTC days, today included."),
) -> dict[str, Any]:
    return await report(state_of(request), who.key_id, days)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
