"""Prometheus metrics a worker exports on VQ_METRICS_ADDRESS:VQ_METRICS_PORT (off when 0).

The address defaults to loopback: the endpoint has no authentication, so exposing it to
a network (compose sets 0.0.0.0 for its Prometheus) is a deliberate choice.

Each worker owns a registry of its own rather than the process-global default, so
several engines in one process (tests, a future multi-GPU process) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker.model.image_cache import ImageCache

_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    def __init__(self, worker: str, device: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"worker": worker, "device": device}
        self.tasks = Counter(
            "vq_tasks",
            "Tasks finished, by task and outcome (success or an error code).",
            ["task", "outcome"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "vq_queue_wait_seconds",
            "Time from submit to the start of the run.",
            ["task"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.generation = Histogram(
            "vq_generation_seconds",
            "Prefill plus decode time per task.",
            ["task"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "vq_generated_tokens", "Tokens generated.", ["task"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "vq_prompt_tokens",
            "Prompt tokens processed (text and image).",
            ["task"],
            registry=self.registry,
        )
        self.device_memory = Gauge(
            "vq_device_memory_peak_bytes",
            "Peak device memory of the engine.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.model_load = Gauge(
            "vq_model_load_seconds",
            "Seconds the model took to load and warm up.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.refused = Counter(
            "vq_messages_refused",
            "Messages refused at the worker's door (worker/broker/intake.py), by rule.",
            ["code"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "vq_model_loaded",
            "1 once the model is resident and warmed up.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)

        self.running = Gauge(
            "vq_worker_running_tasks",
            "Tasks this worker runs now (busy batch slots, up to VQ_MAX_BATCH), in tasks.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)

    def watch_running(self, running: Callable[[], Sized]) -> None:
        """Read the running tasks at each scrape (the health reporter's busy slots)."""
        self.running.set_function(lambda: len(running()))

    def watch_image_cache(self, cache: ImageCache) -> None:
        """Read the image cache's hits, misses, evictions and bytes at each scrape."""
        self.registry.register(_ImageCacheCollector(cache))

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def record(
        self,
        task: str,
        outcome: str,
        *,
        queued_s: float,
        generate_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        peak_memory_bytes: int,
    ) -> None:
        self.tasks.labels(task, outcome).inc()
        self.queue_wait.labels(task).observe(queued_s)
        if completion_tokens:
            self.generation.labels(task).observe(generate_s)
            self.generated_tokens.labels(task).inc(completion_tokens)
        if prompt_tokens:
            self.prompt_tokens.labels(task).inc(prompt_tokens)
        self.device_memory.set(peak_memory_bytes)


class _ImageCacheCollector(Collector):
    """worker/model/image_cache.py's counts, by kind (crops, prefix), read when scraped."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self.cache
        for name, doc, counts in (
            ("vq_image_cache_hits", "Image cache lookups that found their entry.", cache.hits),
            ("vq_image_cache_misses", "Image cache lookups that did not.", cache.misses),
            ("vq_image_cache_evictions", "Entries evicted to make room.", cache.evictions),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in ("crops", "prefix"):
                family.add_metric([kind], counts[kind])
            yield family
        held = GaugeMetricFamily(
            "vq_image_cache_bytes", "Bytes the image cache holds (VQ_IMAGE_CACHE_BYTES bounds it)."
        )
        held.add_metric([], cache.bytes_held)
        yield held
