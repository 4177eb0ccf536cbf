"""What the producer and the worker agree on: task names, their image counts and prompts.

Celery settings live in `vision_queue.celery_config`, request/result shapes in
`vision_queue.schemas`, error codes in `vision_queue.errors`. Nothing here imports Celery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class TaskName(str, Enum):
    DESCRIBE = "describe"
    OCR = "ocr"
    COMPARE = "compare"
    ASK = "ask"

    @property
    def celery_name(self) -> str:
        """The registered Celery task name; anything else on the queue is rejected."""
        return f"vision_queue.{self.value}"


@dataclass(frozen=True)
class TaskSpec:
    min_images: int
    max_images: int
    # None means the caller must supply the prompt (ask); otherwise the prompt is fixed.
    fixed_prompt: str | None


# The fixed prompts are part of the contract so that the README, the CLI and the
# worker all show and run the same text.
TASK_SPECS: dict[TaskName, TaskSpec] = {
    TaskName.DESCRIBE: TaskSpec(1, 1, "Describe this image in detail."),
    TaskName.OCR: TaskSpec(
        1,
        1,
        "Transcribe all of the text in this image exactly as written, preserving line "
        "breaks. Output only the text.",
    ),
    TaskName.COMPARE: TaskSpec(
        2, 8, "Compare these images. Describe what they have in common and how they differ."
    ),
    TaskName.ASK: TaskSpec(0, 8, None),
}


class Priority(str, Enum):
    """How soon a task runs: a worker takes a waiting high task before normal before low."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# Each priority has its own Redis list. Normal keeps the plain queue name, so messages
# queued before priorities existed, and deployments that watch that list, keep working.
_PRIORITY_SUFFIX = {Priority.HIGH: ".high", Priority.NORMAL: "", Priority.LOW: ".low"}


def priority_queue(queue: str, priority: Priority) -> str:
    """The Redis list (and Celery queue) of `priority` on the queue named `queue`."""
    return queue + _PRIORITY_SUFFIX[priority]


def priority_queues(queue: str) -> tuple[str, ...]:
    """Every list of `queue`, from the highest priority to the lowest."""
    return tuple(priority_queue(queue, priority) for priority in Priority)


# Redis key prefixes, in one place so operators can see what the system stores.
KEY_PREFIX = "vq"
STAGED_IMAGE_KEY = KEY_PREFIX + ":img:{digest}"
CANCEL_KEY = KEY_PREFIX + ":cancel:{task_id}"
DELIVERIES_KEY = KEY_PREFIX + ":deliveries:{task_id}"
SUBMITTED_KEY = KEY_PREFIX + ":submitted:{task_id}"
# Live workers per queue: a sorted set, member = worker name, score = the Unix time until
# which that worker counts as alive (refreshed by its heartbeat). See vision_queue.presence.
WORKER_PRESENCE_KEY = KEY_PREFIX + ":presence:{queue}"
# Messages refused at a worker's door (worker/broker/intake.py): a list of JSON entries, newest
# first, at most DEAD_LETTER_MAX_ENTRIES long, gone DEAD_LETTER_TTL_S after the last one.
DEAD_LETTER_KEY = KEY_PREFIX + ":dead-letters"
DEAD_LETTER_MAX_ENTRIES = 1000
DEAD_LETTER_TTL_S = 7 * 24 * 3600
# The visibility timeout every worker sharing this Redis database must use
# (worker/broker/deployment.py).
VISIBILITY_TIMEOUT_KEY = KEY_PREFIX + ":deployment:visibility-timeout-s"

# Leases (worker.broker.leases): a worker holds `LEASE_KEY` (value = its name, expiring a few
# heartbeats ahead) for every message it has taken; `LEASED_KEY` is a sorted set of the
# delivery tags that hold one, so a live worker can hand back those whose lease expired.
LEASE_KEY = KEY_PREFIX + ":lease:{tag}"
LEASED_KEY = KEY_PREFIX + ":leased"
LEASE_SWEEP_LOCK_KEY = KEY_PREFIX + ":lease-sweep"
# Webhooks waiting to be delivered (worker.delivery.webhook_outbox): a sorted set of task
# ids, scored with the time (ms) until which a worker's sender holds each, and one hash per
# delivery.
WEBHOOK_OUTBOX_KEY = KEY_PREFIX + ":webhooks"
WEBHOOK_KEY = KEY_PREFIX + ":webhook:{task_id}"
# Fleet-wide event counters (a hash; field -> count since the Redis data began), written by
# workers with HINCRBY and exported as `vq_<field>_total` by producer/queue_exporter.py.
STATS_KEY = KEY_PREFIX + ":stats"
STATS_FIELDS = {
    "redelivered": "Messages whose worker's lease lapsed, handed back to their queue by a "
    "live worker's sweep, in messages.",
    "webhooks_delivered": "Webhook deliveries the receiver answered with 2xx, in deliveries.",
    "webhooks_dropped": "Webhook deliveries given up (refused, out of attempts), in deliveries.",
}
# Text deltas of one task: a Redis Stream (entries `seq`, `kind` = delta|end, `text`, and
# on the end entry `result`, the final result JSON). Expires with the result. Writers also
# PUBLISH each new entry id on a channel of the same name, so readers wait without polling.
STREAM_KEY = KEY_PREFIX + ":stream:{task_id}"
# Most entries one task's stream holds; writers coalesce deltas so they never reach it.
STREAM_MAX_ENTRIES = 2048
# Celery's result key (and the channel it PUBLISHes every state change on).
RESULT_KEY = "celery-task-meta-{task_id}"
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

# Custom Celery state reported while a task generates (tokens so far).
PROGRESS_STATE = "PROGRESS"

# Text the tokenizer turns into control tokens: every added token of Phi-3-vision's
# tokenizer.json. A prompt containing one is refused (vision_queue.schemas.check_request);
# the worker's engine checks at load that its checkpoint adds no token outside this list
# and PROMPT_TAG_PATTERN, so another checkpoint cannot slip one through.
PROMPT_CONTROL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|user|>",
    "<|image|>",
    *(f"<|placeholder{n}|>" for n in range(1, 40)),
)
# Chat-template and image tags in general (`<|image_1|>`, `<|im_start|>`...): also refused.
PROMPT_TAG_PATTERN = r"<\|[A-Za-z0-9_]{1,64}\|>"


def control_token_in(text: str) -> str | None:
    """The first control token or chat tag `text` contains, else None."""
    if "<" not in text:  # every token and tag starts with one; most prompts have none
        return None
    for token in PROMPT_CONTROL_TOKENS:
        if token in text:
            return token
    match = re.search(PROMPT_TAG_PATTERN, text)
    return match.group(0) if match else None
