"""`worker run`: load the model, then start a Celery worker bound to one device.

Why the `threads` pool with one thread per batch row (VQ_MAX_BATCH, default 1 on CPU):
- The model is loaded once, in this process, before the worker connects to take
  messages; prefork would need the model in a child (CUDA does not survive fork) and
  would start consuming before the child finished loading. A failed load exits
  non-zero having consumed nothing.
- Each slot runs one task top-down and hands its request to the engine's one
  scheduler, which decodes the slots' requests together; each message is acked when
  its own result is stored. Prefetch multiplier 1, `worker_disable_prefetch` and late
  acks mean a worker holds only messages it is running. With one slot this is exactly
  one generation at a time.
- The task runs in a pool thread while the main thread keeps the broker connection,
  remote control and event heartbeats going, so Flower shows the worker online during a
  long generation (torch releases the GIL inside its kernels). `solo` would block them.
- Cancellation is cooperative (checked between tokens), and time limits are enforced by
  the engine's deadline, since thread pools cannot kill a running task; a task stuck
  past it anyway is the stuck-task watchdog's (worker/shutdown.py).

Before anything is loaded, the worker checks that its visibility timeout is the one the
deployment runs with (worker/broker/deployment.py). Messages reach Celery only through the
consumer's door (worker/broker/consumer.py and door.py, rules in worker/broker/intake.py).
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.signals import worker_ready

from vision_queue import tracing
from vision_queue.celery_config import make_celery_app
from vision_queue.master_fence import FENCE
from vision_queue.protocol import priority_queues
from vision_queue.redis_connect import redis_client, sentinel_watch
from vision_queue.settings import Settings
from worker import trace_stages
from worker.broker.consumer import consumer_class
from worker.broker.deployment import (
    VisibilityTimeoutConflict,
    claim_visibility_timeout,
    keep_visibility_timeout_claimed,
)
from worker.broker.door import Door
from worker.broker.lease_keeper import LeaseKeeper
from worker.broker.leases import LeaseBook, install
from worker.broker.transport import transport_for
from worker.delivery.results import ResultStore, backend_url
from worker.delivery.webhook_outbox import WebhookOutbox
from worker.delivery.webhooks import WebhookSender
from worker.health import HealthReporter
from worker.identity import IdentityTaken, WorkerIdentity, claim_host_identity
from worker.inference.engine import Engine, EngineConfig
from worker.metrics import WorkerMetrics
from worker.shutdown import install_shutdown_handlers, start_stuck_task_watchdog
from worker.tasks import WorkerRuntime, register_tasks

log = logging.getLogger("vision_queue.worker")

EXIT_SETTINGS_CONFLICT = 2
EXIT_MODEL_FAILED = 1


def run_worker(settings: Settings) -> int:
    """Load and warm the model, then consume until shut down. Returns the exit code."""
    log.info("settings: %s", settings)
    # Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set: then each task runs inside the trace
    # its message's traceparent header names (docs/tracing.md).
    if tracing.setup("vq-worker"):
        tracing.instrument_celery()
        trace_stages.connect()
    redis = redis_client(settings)
    identity = _claim_deployment(redis, settings)
    if identity is None:
        return EXIT_SETTINGS_CONFLICT
    name = identity.name
    health = _start_health(settings, identity)
    engine = _load_engine(settings, health)
    if engine is None:
        return EXIT_MODEL_FAILED
    metrics = _start_metrics(settings, name, engine)
    metrics.watch_running(health.running)
    book = LeaseBook(name, settings.lease_ttl_s)
    _watch_master(settings)
    app = _leased_app(settings, book)
    keeper = _lease_keeper(app, book, redis, settings)
    runtime = _runtime(settings, engine, name, metrics, health, redis, book, keeper)
    register_tasks(app, runtime)
    keep_visibility_timeout_claimed(redis, settings)
    door = Door(settings, name, redis, app.backend, metrics, health)
    health.model_ready()
    _log_ready(settings, engine, name)
    worker = _celery_worker(app, settings, engine, name, door)
    _report_lifecycle(worker, health, settings)
    return _consume(worker, runtime, keeper)


def _claim_deployment(redis: Any, settings: Settings) -> WorkerIdentity | None:
    """The checks that must pass before anything is loaded: this worker's visibility
    timeout is the deployment's, and no other live worker on this host has its name.
    None (the reason logged) when one fails."""
    try:
        claim_visibility_timeout(redis, settings)
    except VisibilityTimeoutConflict as exc:
        log.error("not starting: %s", exc)
        return None
    try:
        return claim_host_identity(settings)
    except IdentityTaken as exc:
        log.error("not starting: %s", exc)
        return None


def _start_health(settings: Settings, identity: WorkerIdentity) -> HealthReporter:
    # Beating before the model loads: a long load reads as live and `loading`, not as dead.
    stuck_after_s = settings.task_time_limit_s + settings.stuck_task_grace_s
    health = HealthReporter(
        identity.health_file, identity.name, settings.heartbeat_interval_s, stuck_after_s
    )
    health.start()
    return health


def _load_engine(settings: Settings, health: HealthReporter) -> Engine | None:
    """The loaded and warmed engine, or None (logged, health stopped) if it failed."""
    try:
        engine = Engine.load(
            EngineConfig(
                model=settings.model,
                device=settings.device,
                dtype=settings.dtype,
                attention=settings.attention,
                num_crops=settings.default_num_crops or None,
                max_batch=settings.max_batch,
                kv_cache_positions=settings.kv_cache_positions or None,
                prefill_chunk_tokens=settings.prefill_chunk_tokens or None,
                longrope_switch=settings.longrope_switch,
                image_cache_bytes=settings.image_cache_bytes,
            )
        )
        engine.warmup()
    except Exception as exc:  # any failure to load ends the process before consuming
        log.error("model failed to load, not consuming any task: %s", exc)
        health.stop()
        return None
    return engine


def _start_metrics(settings: Settings, name: str, engine: Engine) -> WorkerMetrics:
    metrics = WorkerMetrics(name, engine.device)
    metrics.model_load.set(engine.load_seconds)
    metrics.watch_image_cache(engine.image_cache)
    metrics.model_loaded.set(1)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_address)
    return metrics


def _runtime(
    settings: Settings,
    engine: Engine,
    name: str,
    metrics: WorkerMetrics,
    health: HealthReporter,
    redis: Any,
    book: LeaseBook,
    keeper: LeaseKeeper,
) -> WorkerRuntime:
    """What the tasks share; the webhook sender's outbox threads start here."""
    return WorkerRuntime(
        settings=settings,
        engine=engine,
        name=name,
        metrics=metrics,
        health=health,
        redis=redis,
        results=_result_store(settings, redis, name),
        webhooks=WebhookSender(
            settings,
            outbox=WebhookOutbox(redis, settings.result_expires_s),
            poll_s=settings.heartbeat_interval_s,
        ),
        leases=book,
        keeper=keeper,
        document_renders=threading.BoundedSemaphore(settings.document_renders),
    )


def _log_ready(settings: Settings, engine: Engine, name: str) -> None:
    log.info(
        "model %s ready on %s (%s, %s attention) in %.1fs; consuming %s as %s with %d slot(s)",
        engine.model_id,
        engine.device,
        engine.dtype,
        engine.attention,
        engine.load_seconds,
        ", ".join(priority_queues(settings.queue)),
        name,
        engine.max_batch,
    )


def _celery_worker(app: Celery, settings: Settings, engine: Engine, name: str, door: Door) -> Any:
    """Celery's worker: the threads pool, one slot per batch row (module docstring)."""
    return app.Worker(
        hostname=name,
        pool="threads",
        concurrency=engine.max_batch,  # one slot per batch row
        prefetch_multiplier=1,
        # Every priority's list; worker/broker/priorities.py decides which one the next task
        # is from.
        queues=list(priority_queues(settings.queue)),
        loglevel=settings.log_level,
        optimization="fair",
        redirect_stdouts=False,
        consumer_cls=consumer_class(door),
    )


def _consume(worker: Any, runtime: WorkerRuntime, keeper: LeaseKeeper) -> int:
    """Consume until shut down; returns Celery's exit code."""
    keeper.start()
    try:
        worker.start()
    finally:
        runtime.webhooks.close()  # takes over no more deliveries it could not finish
        keeper.stop()  # also leaves the queues' presence at once
        runtime.engine.close()
        runtime.health.stop()
    return int(worker.exitcode or 0)


def _leased_app(settings: Settings, book: LeaseBook) -> Celery:
    """The worker's Celery app: its consumers hold leases (`worker.broker.leases`) and what Celery
    stores itself follows the first-writer-wins rule (`worker.delivery.results`)."""
    install(book)
    app = make_celery_app(settings)
    app.conf.broker_transport = transport_for(settings.effective_broker_url)
    app.conf.result_backend = backend_url(settings)
    if urlsplit(settings.effective_broker_url).scheme == "rediss" and not app.conf.broker_use_ssl:
        # kombu turns TLS on by the URL's scheme only for its own transport names; ours
        # verifies certificates, as the project's own redis-py connections do.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app


def _watch_master(settings: Settings) -> None:
    """Through Sentinel, keep the master fence current (vision_queue/master_fence.py): the
    lease keeper asks the sentinels each beat, the consumer before recording each take."""
    watch = sentinel_watch(settings)
    if watch is not None:
        FENCE.watch(watch)
        FENCE.refresh()


def _lease_keeper(app: Celery, book: LeaseBook, broker: Any, settings: Settings) -> LeaseKeeper:
    return LeaseKeeper(
        book,
        broker,
        [settings.queue],
        settings.heartbeat_interval_s,
        connect=app.connection_for_write,
    )


def _result_store(settings: Settings, broker: Any, name: str) -> ResultStore:
    same = settings.effective_backend_url == settings.effective_broker_url
    results = broker if same else redis_client(settings, settings.effective_backend_url)
    return ResultStore(results, broker, settings, name, same_server=same)


def _report_lifecycle(worker: Any, health: HealthReporter, settings: Settings) -> None:
    """Report consuming once the consumer is up; from then on our signal handlers apply."""

    def on_ready(**_: object) -> None:
        install_shutdown_handlers(worker, health)
        start_stuck_task_watchdog(
            worker,
            health,
            settings.task_time_limit_s + settings.stuck_task_grace_s,
            settings.stuck_task_grace_s,
        )
        health.consumer_ready()

    worker_ready.connect(on_ready, weak=False)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Our task line replaces Celery's per-task "received"/"succeeded" lines, which would
    # repeat the task and print whole results.
    for noisy in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
