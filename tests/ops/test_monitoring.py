"""ops/monitoring: the alert rules, their unit tests, the example Prometheus configuration
and the Grafana dashboard, checked with promtool and against real running processes.

Every metric name a rule or a dashboard query uses must be exported by one of our
processes: the queue exporter, a worker (tiny CPU model), the gateway and Flower are
started for real and their /metrics parsed. promtool comes with Debian's `prometheus`
package (scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.flower import FlowerProcess
from support.redis_server import RedisServer, free_port
from support.workers import WorkerProcess

from producer.client import Client
from vision_queue.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "ops" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS = MONITORING / "prometheus.yml"
sys.path.insert(0, str(ROOT / "tests" / "gateway"))
from gateway_support import GatewayProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_queue_exporter import ExporterProcess  # noqa: E402

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (Debian's prometheus package; scripts/setup.sh)"
)

# PromQL words that are not metric names.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "le",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_promql_name_reader() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, task) (rate(vq_generation_seconds_bucket[5m])))'
    ) == {"vq_generation_seconds_bucket"}
    assert promql_metric_names(
        'a_total{status=~"5.."} / on(instance) (b > 0) and c offset 5m unless d[5m:1m]'
    ) == {"a_total", "b", "c", "d"}


@needs_promtool
def test_promtool_accepts_the_rules_their_unit_tests_and_the_prometheus_config() -> None:
    assert PROMTOOL is not None
    for command in (
        [PROMTOOL, "check", "rules", str(ALERTS)],
        [PROMTOOL, "test", "rules", str(MONITORING / "alerts.test.yml")],
        [PROMTOOL, "check", "config", str(PROMETHEUS)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"


def test_the_rules_cover_what_an_operator_is_paged_for() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert {
        "VQQueueGrowing", "VQOldestTaskTooOld", "VQNoLiveWorker", "VQWorkerOutOfMemory",
        "VQRedeliveries", "VQWebhookFailures", "VQRedisMemoryNearLimit",
    } <= alerts


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _families(text: str) -> dict[str, str]:
    """{canonical name: type} of an exposition: a counter as `<name>_total`, else its name."""
    return {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in text_string_to_metric_families(text)
    }


def _sample_names(families: dict[str, str]) -> set[str]:
    """Every sample name the families can export (histograms' buckets, sums and counts)."""
    names = set(families)
    for name, kind in families.items():
        if kind in ("histogram", "summary"):
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


@pytest.fixture(scope="module")
def exported(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, dict[str, str]]]:
    """{process: {metric: type}} of a real exporter, worker, gateway and Flower."""
    logdir = tmp_path_factory.mktemp("monitoring")
    module_redis.flush()
    metrics_port = free_port()
    worker = WorkerProcess(
        module_redis.url, logdir, VQ_METRICS_PORT=str(metrics_port), VQ_QUEUE="gpu"
    )
    exporter = ExporterProcess(module_redis.url, logdir)
    flower = FlowerProcess(module_redis.url, logdir)
    gateway = GatewayProcess(module_redis.url, logdir, VQ_QUEUE="gpu")
    started: list[object] = []
    try:
        for process in (worker, exporter, flower, gateway):
            process.start()
            started.append(process)
        # One task through the worker, so that its and Flower's counters have samples too.
        settings = Settings.from_env(
            {}, redis_url=module_redis.url, queue="gpu", connect_timeout_s=3.0,
            max_new_tokens_caps="describe=16,ocr=16,compare=16,ask=64",
        )
        with Client(settings) as client:
            handle = client.submit("ask", prompt="Say hello.", max_new_tokens=4)
            client.result(handle.id, wait=True, timeout=120)
        time.sleep(1)  # Flower takes the task events in
        yield {
            "exporter": _families(exporter.scrape_text()),
            "worker": _families(_scrape(f"http://127.0.0.1:{metrics_port}/metrics")),
            "gateway": _families(_scrape(gateway.url("/metrics"))),
            "flower": _families(flower.get("/metrics").text),
        }
    finally:
        for process in reversed(started):
            process.stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "source", ["alerts", "dashboard"], ids=["alert rules", "grafana dashboard"]
)
def test_every_query_names_metrics_the_running_processes_export(
    source: str, exported: dict[str, dict[str, str]]
) -> None:
    names = set().union(*(_sample_names(families) for families in exported.values()))
    expressions = rule_expressions() if source == "alerts" else dashboard_expressions()
    assert expressions
    missing = {
        name: expr
        for expr in expressions
        for name in promql_metric_names(expr)
        if name not in names
    }
    assert not missing, f"not exported by any running process: {missing}"


def test_the_metrics_reference_lists_what_the_processes_export(
    exported: dict[str, dict[str, str]],
) -> None:
    """ops/README.md's tables name every metric of the exporter and the workers, and only
    metrics that some process exports."""
    text = (ROOT / "ops" / "README.md").read_text()
    documented = set(re.findall(r"`((?:vq|flower)_[a-z_]+)[{`]", text))
    everything = set().union(*exported.values())
    assert documented, "ops/README.md documents no metric"
    assert not documented - everything, f"documented, not exported: {documented - everything}"
    ours = {
        name
        for process in ("exporter", "worker", "gateway")
        for name in exported[process]
        if not name.endswith("_created")  # prometheus_client's creation times
    }
    assert not ours - documented, f"exported, not documented in ops/README.md: {ours - documented}"


def test_the_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
