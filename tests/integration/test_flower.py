"""Flower for real: on loopback with basic auth, watching a real worker run real tasks, and
the shipped proxy (ops/flower-proxy, a real nginx) in front of it, as operators run it.

Flower is started before any task runs, since it only knows what it saw as live events
(the worker sends them: worker_send_task_events and task_send_sent_event are on).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support.flower import (
    FlowerProcess,
    FlowerProxy,
    HeadlessChromium,
    find_chromium,
    find_nginx,
    http_get,
    http_request,
    screenshot,
    shipped_flower_option,
)
from support.redis_server import PASSWORD as REDIS_PASSWORD
from support.redis_server import RedisServer
from support.workers import WorkerProcess, wait_until_generating

from producer.client import Client
from producer.submission import SubmitRequest
from vision_queue.protocol import TaskName
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(240)

T = TypeVar("T")

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"

# Bootstrap's badge colours in Flower's tasks table: SUCCESS (bg-success), FAILURE (bg-danger).
SUCCESS_GREEN = (25, 135, 84)
FAILURE_RED = (220, 53, 69)


@dataclass(frozen=True)
class RanTask:
    id: str
    name: str  # Celery task name, as Flower shows it
    state: str  # final state the client saw


@pytest.fixture(scope="module")
def flower(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerProcess]:
    # Run with the options docker-compose.yml gives it that shape what a user sees.
    columns = shipped_flower_option("tasks_columns")
    with FlowerProcess(
        module_redis.url,
        tmp_path_factory.mktemp("flower"),
        extra_args=[f"--tasks_columns={columns}"],
    ) as process:
        yield process


needs_nginx = pytest.mark.skipif(
    find_nginx() is None, reason="no nginx (scripts/setup.sh installs Debian's nginx)"
)
needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="no `chromium` on PATH (scripts/setup.sh installs Debian's chromium)",
)


@pytest.fixture(scope="module")
def proxy(flower: FlowerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerProxy]:
    """The proxy as shipped: reads and revokes only."""
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("no nginx (scripts/setup.sh installs Debian's nginx)")
    with FlowerProxy(nginx, flower, tmp_path_factory.mktemp("proxy")) as running:
        yield running


@pytest.fixture(scope="module")
def control_proxy(
    flower: FlowerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerProxy]:
    """The proxy with the operator's opt-in, FLOWER_ALLOW_CONTROL=1."""
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("no nginx (scripts/setup.sh installs Debian's nginx)")
    workdir = tmp_path_factory.mktemp("control-proxy")
    with FlowerProxy(nginx, flower, workdir, allow_control="1") as running:
        yield running


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def wait_until(check: Callable[[], T], timeout_s: float, interval_s: float = 0.25) -> T:
    """Call `check` until it returns something truthy; return its last value either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def ran_tasks(
    flower: FlowerProcess, shared_worker: WorkerProcess, module_redis: RedisServer, images: Path
) -> list[RanTask]:
    """describe, ocr, compare succeed; an ask fails with resource_exhausted (injected OOM)."""

    # Flower answering HTTP does not prove its event receiver is subscribed yet: wait until
    # it has heard the worker's events (worker-online, heartbeats), or the tasks' events
    # could be missed.
    def worker_online() -> bool:
        samples = metric_samples(flower.get("/metrics", auth=False).text)
        return ("flower_worker_online", {"worker": shared_worker.name}, 1.0) in samples

    assert wait_until(worker_online, 20), f"Flower never saw the worker:\n{flower.log()[-3000:]}"

    settings = Settings.from_env(
        {},
        redis_url=module_redis.url,
        connect_timeout_s=3.0,
        max_new_tokens_caps="describe=16,ocr=16,compare=16,ask=64",
    )
    with Client(settings) as client:
        handles = [
            client.submit("describe", [images / "small_400x300.jpg"]),
            client.submit("ocr", [images / "doc_900x600.png"]),
            client.submit(
                "compare", [images / "shapes_640x480.png", images / "shapes_b_640x480.png"]
            ),
            client.submit("ask", [], "__OOM__ what is on the table?"),
        ]
        results = [client.result(h.id, wait=True, timeout=120) or {} for h in handles]
    ran = [
        RanTask(h.id, h.task.celery_name, r["state"]) for h, r in zip(handles, results, strict=True)
    ]
    assert [t.state for t in ran] == ["SUCCESS", "SUCCESS", "SUCCESS", "FAILURE"], results
    assert results[-1]["error"]["code"] == "resource_exhausted", results[-1]
    return ran


def flower_tasks_when_final(flower: FlowerProcess, ran: list[RanTask]) -> dict[str, dict[str, Any]]:
    """/api/tasks once Flower has the final event of every task (events arrive async)."""

    def final() -> dict[str, dict[str, Any]] | None:
        tasks = flower.get("/api/tasks").json()
        done = all(tasks.get(t.id, {}).get("state") == t.state for t in ran)
        return tasks if done else None

    tasks = wait_until(final, 10)
    assert tasks, flower.get("/api/tasks").text[:3000]
    return tasks


def test_api_lists_the_worker(
    flower: FlowerProcess, shared_worker: WorkerProcess, ran_tasks: list[RanTask]
) -> None:
    # Without refresh=1, /api/workers returns what Flower's last inspect broadcast gathered,
    # which is {} until something asked; refresh=1 asks the workers now.
    reply = flower.get("/api/workers?refresh=1", timeout_s=15)
    assert reply.status == 200
    workers = reply.json()
    assert shared_worker.name in workers, list(workers)
    info = workers[shared_worker.name]
    # One queue per priority: the high, normal and low lists.
    assert {q["name"] for q in info["active_queues"]} == {"gpu.high", "gpu", "gpu.low"}
    assert set(info["registered"]) >= {t.name for t in ran_tasks}
    # The worker's own count of tasks it ran, by name.
    assert info["stats"]["total"] == {t.name: 1 for t in ran_tasks}


def test_api_lists_the_tasks_with_their_states(
    flower: FlowerProcess, shared_worker: WorkerProcess, ran_tasks: list[RanTask]
) -> None:
    tasks = flower_tasks_when_final(flower, ran_tasks)
    for ran in ran_tasks:
        seen = tasks[ran.id]
        assert (seen["name"], seen["state"], seen["worker"]) == (
            ran.name,
            ran.state,
            shared_worker.name,
        ), seen
        # Args are what the client put in argsrepr: references to staged images, no bytes.
        assert seen["args"].startswith(f"({ran.name.split('.')[-1]}, images=["), seen["args"]
        assert seen["received"] and seen["started"]
    failed = tasks[ran_tasks[-1].id]
    assert failed["failed"] and failed["result"] is None
    assert "resource_exhausted" in failed["exception"]
    # Filters by state, as the UI's "Failed" tab uses them.
    only_failed = flower.get("/api/tasks?state=FAILURE").json()
    assert set(only_failed) == {ran_tasks[-1].id}


def metrics_problems(
    samples: list[tuple[str, dict[str, str], float]], worker: str, ran_tasks: list[RanTask]
) -> list[str]:
    """What /metrics lacks for the tasks that ran; empty when it shows all of it."""
    problems = []
    events = {
        (labels["task"], labels["type"]): value
        for name, labels, value in samples
        if name == "flower_events_total" and labels["worker"] == worker
    }
    for ran in ran_tasks:
        final = "task-succeeded" if ran.state == "SUCCESS" else "task-failed"
        for kind in ("task-received", "task-started", final):
            count = events.get((ran.name, kind))
            if count != 1.0:
                problems.append(f"flower_events_total {ran.name} {kind}: {count}")
    # task-sent is counted under the producer's node name (gen<pid>@host), not the worker's.
    sent = {
        labels["task"]
        for name, labels, value in samples
        if name == "flower_events_total" and labels["type"] == "task-sent" and value >= 1
    }
    if not sent >= {t.name for t in ran_tasks}:
        problems.append(f"task-sent only for {sorted(sent)}")
    # The run time histogram observes task-succeeded only (a failed task has no runtime).
    runtime_counts = {
        labels["task"]: value
        for name, labels, value in samples
        if name == "flower_task_runtime_seconds_count" and labels["worker"] == worker
    }
    if runtime_counts != {t.name: 1.0 for t in ran_tasks if t.state == "SUCCESS"}:
        problems.append(f"flower_task_runtime_seconds_count: {runtime_counts}")
    prefetched = {
        labels["task"]: value
        for name, labels, value in samples
        if name == "flower_worker_prefetched_tasks" and labels["worker"] == worker
    }
    if prefetched != {t.name: 0.0 for t in ran_tasks}:
        problems.append(f"flower_worker_prefetched_tasks: {prefetched}")
    if ("flower_worker_online", {"worker": worker}, 1.0) not in samples:
        problems.append("flower_worker_online is not 1")
    # Set from worker-heartbeat events only (every 2 s), so it shows up a little later.
    executing = ("flower_worker_number_of_currently_executing_tasks", {"worker": worker}, 0.0)
    if executing not in samples:
        problems.append("flower_worker_number_of_currently_executing_tasks is not 0")
    return problems


def test_metrics_expose_the_task_counters(
    flower: FlowerProcess, shared_worker: WorkerProcess, ran_tasks: list[RanTask]
) -> None:
    def problems() -> list[str]:
        reply = flower.get("/metrics", auth=False)
        assert reply.status == 200
        return metrics_problems(metric_samples(reply.text), shared_worker.name, ran_tasks)

    # Events and heartbeats reach Flower asynchronously: poll, bounded.
    assert wait_until(lambda: not problems(), 10), problems()
    names = {name for name, _, _ in metric_samples(flower.get("/metrics", auth=False).text)}
    assert {
        "flower_events_total",
        "flower_task_runtime_seconds_bucket",
        "flower_task_runtime_seconds_count",
        "flower_task_runtime_seconds_sum",
        "flower_task_prefetch_time_seconds",
        "flower_worker_prefetched_tasks",
        "flower_worker_online",
        "flower_worker_number_of_currently_executing_tasks",
    } <= names, sorted(names)


def test_requests_without_credentials_get_401(flower: FlowerProcess) -> None:
    # The UI pages challenge the browser; the API answers a bare 401.
    for path in ("/", "/workers", "/tasks", "/tasks/datatable", "/broker"):
        reply = flower.get(path, auth=False)
        assert reply.status == 401, (path, reply.status)
        assert reply.headers.get("www-authenticate") == 'Basic realm="flower"', path
    for path in ("/api/workers", "/api/tasks", "/api/task/types", "/api/queues/length"):
        assert flower.get(path, auth=False).status == 401, path
    assert http_get(flower.url("/api/workers"), ("user", "wrong")).status == 401
    assert http_get(flower.url("/api/workers"), ("other", "pass")).status == 401
    assert flower.get("/api/workers").status == 200

    # Flower 2.2 serves /metrics and /healthcheck without authentication, even with
    # --basic-auth (Prometheus scrapes and health probes carry no credentials). That is
    # why docker-compose.yml publishes Flower on the host's loopback only and ops/README.md
    # says so; the assertion pins the behaviour so an upgrade that changes it is noticed.
    assert flower.get("/metrics", auth=False).status == 200
    healthcheck = flower.get("/healthcheck", auth=False)
    assert (healthcheck.status, healthcheck.text) == (200, "OK")


def test_the_redis_password_is_not_shown(flower: FlowerProcess, ran_tasks: list[RanTask]) -> None:
    flower_tasks_when_final(flower, ran_tasks)
    pages = {
        "/api/tasks": flower.get("/api/tasks").text,
        "/api/workers": flower.get("/api/workers?refresh=1", timeout_s=15).text,
        "/metrics": flower.get("/metrics", auth=False).text,
        "/broker": flower.get("/broker").text,
        "/tasks/datatable": flower.get("/tasks/datatable?draw=1&start=0&length=50").text,
    }
    pages.update(
        {f"/api/task/info/{t.id}": flower.get(f"/api/task/info/{t.id}").text for t in ran_tasks}
    )
    for path, body in pages.items():
        assert body, path
        assert REDIS_PASSWORD not in body, path
    # The worker's broker settings are there, with the password masked.
    workers = json.loads(pages["/api/workers"])
    conf = next(iter(workers.values()))["conf"]
    assert conf["broker_url"].startswith("redis://:********@127.0.0.1:"), conf["broker_url"]
    assert REDIS_PASSWORD not in flower.log()


# Screenshots ---------------------------------------------------------------------------


def badge_pixels(png: Path) -> tuple[int, int]:
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
    counts = {colour: count for count, colour in colours}
    return counts.get(SUCCESS_GREEN, 0), counts.get(FAILURE_RED, 0)


def check_png(png: Path, size: tuple[int, int]) -> None:
    assert png.is_file(), png
    assert png.stat().st_size > 20_000, png.stat().st_size  # a blank page is a few KB
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert (image.format, image.size) == ("PNG", size)
        darkest, lightest = cast("tuple[int, int]", image.convert("L").getextrema())
    assert lightest - darkest > 100, (darkest, lightest)  # not one flat colour


def publish(shot: Path, name: str) -> None:
    """Copy a screenshot into docs/img only on request, or when it is missing.

    Every run regenerates the screenshot in a temp folder and checks it; docs/img is
    written only with VQ_UPDATE_SCREENSHOT=1 (or when the file does not exist yet), so
    test runs in CI do not dirty the tree with a new timestamp or worker name.
    """
    target = DOCS_IMG / name
    if os.environ.get("VQ_UPDATE_SCREENSHOT") == "1" or not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


@needs_nginx
@needs_chromium
def test_dashboard_screenshot(
    flower: FlowerProcess,
    proxy: FlowerProxy,
    shared_worker: WorkerProcess,
    ran_tasks: list[RanTask],
    tmp_path: Path,
) -> None:
    # Through the proxy, as operators open it.
    chromium = find_chromium()
    assert chromium is not None
    flower_tasks_when_final(flower, ran_tasks)  # the table has every final state
    user, password = flower.auth
    size = (1400, 900)

    shots = {}
    for path, name in (("/tasks", "flower.png"), ("/", "flower-workers.png")):
        out = tmp_path / name
        url = f"http://{user}:{password}@127.0.0.1:{proxy.port}{path}"
        done = screenshot(chromium, url, out, tmp_path / f"profile-{name}", size=size)
        assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
        check_png(out, size)
        shots[name] = out

    # The tasks table rendered with its state badges (about 1,000 pixels each at this
    # size): a login prompt, a 401 page, or an empty table (the rows come by XHR) has none.
    green, red = badge_pixels(shots["flower.png"])
    assert green > 3 * 500 and red > 500, (green, red)
    # The workers page shows the worker with its green "Online" badge.
    green, _ = badge_pixels(shots["flower-workers.png"])
    assert green > 400, green
    for name, shot in shots.items():
        publish(shot, name)


# The proxy in front of Flower ------------------------------------------------------------

REFUSAL = "refused by the vision-queue Flower proxy"
DESCRIBE = TaskName.DESCRIBE.celery_name


def worker_controls(worker: str) -> dict[str, str]:
    """Each state-changing request of Flower's API, as its own pages or a script send it."""
    return {
        "shut down": f"/api/worker/shutdown/{worker}",
        "restart pool": f"/api/worker/pool/restart/{worker}",
        "grow pool": f"/api/worker/pool/grow/{worker}?n=1",
        "shrink pool": f"/api/worker/pool/shrink/{worker}?n=1",
        "autoscale pool": f"/api/worker/pool/autoscale/{worker}?min=1&max=4",
        "add consumer": f"/api/worker/queue/add-consumer/{worker}?queue=extra",
        "cancel consumer": f"/api/worker/queue/cancel-consumer/{worker}?queue=gpu",
        "rate limit": f"/api/task/rate-limit/{DESCRIBE}?workername={worker}&ratelimit=1/h",
        "time limit": f"/api/task/timeout/{DESCRIBE}?workername={worker}&hard=1",
        "apply a task": f"/api/task/apply/{DESCRIBE}",
        "async-apply a task": f"/api/task/async-apply/{DESCRIBE}",
        "send a task": f"/api/task/send-task/{DESCRIBE}",
        "abort a task": "/api/task/abort/0f7a3c1e-0000-4000-8000-000000000000",
    }


def worker_info(flower: FlowerProcess, name: str) -> dict[str, Any]:
    workers = flower.get("/api/workers?refresh=1", timeout_s=15).json()
    assert name in workers, list(workers)
    info: dict[str, Any] = workers[name]
    return info


@needs_nginx
def test_dashboard_users_read_everything_through_the_proxy(
    proxy: FlowerProxy, shared_worker: WorkerProcess, ran_tasks: list[RanTask]
) -> None:
    # Pages and the read API pass, with Flower's basic auth still in force.
    for path in ("/", "/workers", "/tasks", f"/worker/{shared_worker.name}",
                 f"/task/{ran_tasks[0].id}", "/broker", "/api/tasks", "/api/task/types",
                 f"/api/task/info/{ran_tasks[0].id}", "/api/workers?refresh=1"):
        reply = proxy.get(path)
        assert reply.status == 200, (path, reply.status, reply.text[:300])
        assert proxy.get(path, auth=False).status == 401, path
    # HEAD passes too (Flower itself answers it with 405).
    assert proxy.request("HEAD", "/tasks").status == 405
    # The tasks table loads its rows with a POST; that passes too.
    rows = proxy.post("/tasks/datatable", DATATABLE_QUERY).json()["data"]
    assert {row["uuid"] for row in rows} >= {t.id for t in ran_tasks}


@needs_nginx
def test_the_proxy_refuses_worker_controls_before_flower_sees_them(
    proxy: FlowerProxy, flower: FlowerProcess, shared_worker: WorkerProcess
) -> None:
    before = worker_info(flower, shared_worker.name)
    # Given a dashboard user with valid credentials
    for action, path in worker_controls(shared_worker.name).items():
        # When they send a worker control, with the headers Flower's own pages send
        reply = proxy.post(path, b"terminate=false")
        # Then the proxy refuses it, saying why
        assert reply.status == 403, (action, reply.status, reply.text[:300])
        assert REFUSAL in reply.text, action
    # Other methods and spellings of the same paths are refused as well.
    shutdown = f"/api/worker/shutdown/{shared_worker.name}"
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert proxy.request(method, shutdown, body=b"").status == 403, method
    for path in (
        f"/api/task/revoke/../../worker/shutdown/{shared_worker.name}",
        f"/api/task/revoke/%2e%2e/%2e%2e/worker/shutdown/{shared_worker.name}",
        f"//api/worker/shutdown/{shared_worker.name}",
        f"/api/worker/./shutdown/{shared_worker.name}",
        f"/api/Worker/shutdown/{shared_worker.name}",
    ):
        reply = proxy.post(path)
        assert reply.status in (403, 404), (path, reply.status, reply.text[:300])
    # And nothing changed: the worker is up, consumes its queue, runs one task at a time.
    assert shared_worker.process is not None and shared_worker.process.poll() is None
    after = worker_info(flower, shared_worker.name)
    assert [q["name"] for q in after["active_queues"]] == ["gpu.high", "gpu", "gpu.low"]
    assert after["stats"]["pool"] == before["stats"]["pool"]
    assert after["stats"]["pool"]["max-concurrency"] == 1
    assert after["stats"]["rusage"] and "Shutting down" not in flower.log()


@needs_nginx
def test_a_dashboard_user_revokes_a_task_through_the_proxy(
    proxy: FlowerProxy, shared_worker: WorkerProcess, module_redis: RedisServer, images: Path
) -> None:
    # Given a task waiting on a queue no worker consumes (so it is still waiting)
    settings = Settings.from_env({}, redis_url=module_redis.url, queue="parked",
                                 connect_timeout_s=3.0)
    with Client(settings) as client:
        handle = client.submit("describe", [images / "small_400x300.jpg"])
        # When a dashboard user revokes it, as the task page's Revoke button does
        reply = proxy.post(f"/api/task/revoke/{handle.id}", b"terminate=false")
        assert reply.status == 200, reply.text
        assert reply.json() == {"message": f"Revoked '{handle.id}'"}
        # Then the task ends cancelled for its producer (the workers marked it revoked)
        result = client.result(handle.id, wait=True, timeout=30)
    assert result is not None and result["state"] == "FAILURE", result
    assert result["error"]["code"] == "cancelled", result


@needs_nginx
def test_worker_controls_pass_only_when_the_operator_opts_in(
    proxy: FlowerProxy, control_proxy: FlowerProxy, shared_worker: WorkerProcess
) -> None:
    # A shutdown of a worker that does not exist: Flower itself answers 404 once the
    # request reaches it, so this shows what passes without touching the real worker.
    unknown = "/api/worker/shutdown/nobody@nowhere"
    assert proxy.post(unknown).status == 403
    passed = control_proxy.post(unknown)
    assert (passed.status, passed.text) == (404, "Unknown worker 'nobody@nowhere'")
    # Pool resizing never passes: one task per GPU, and the thread pool cannot do it.
    for action in ("grow pool", "shrink pool", "autoscale pool", "restart pool"):
        reply = control_proxy.post(worker_controls(shared_worker.name)[action])
        assert reply.status == 403 and REFUSAL in reply.text, action


def test_flower_reports_a_refused_shutdown_as_refused(
    flower: FlowerProcess, shared_worker: WorkerProcess
) -> None:
    """The demo's Flower (no proxy): a worker with VQ_REMOTE_CONTROL=restricted refuses to
    shut down, and Flower says so instead of "Shutting down!"."""
    worker_info(flower, shared_worker.name)  # Flower knows the worker
    reply = http_request(
        "POST", flower.url(f"/api/worker/shutdown/{shared_worker.name}"), flower.auth, body=b""
    )
    assert reply.status == 403, (reply.status, reply.text)
    assert "refused by this worker (VQ_REMOTE_CONTROL=restricted)" in reply.text, reply.text
    assert "Shutting down" not in reply.text
    assert shared_worker.process is not None and shared_worker.process.poll() is None


@needs_nginx
def test_a_mistyped_opt_in_refuses_everything(
    flower: FlowerProcess, tmp_path: Path
) -> None:
    nginx = find_nginx()
    assert nginx is not None
    with FlowerProxy(nginx, flower, tmp_path / "proxy", allow_control="yes") as typo:
        for path in ("/", "/api/workers", "/api/worker/shutdown/nobody@nowhere"):
            assert typo.get(path).status == 403, path
        assert typo.post("/api/worker/shutdown/nobody@nowhere").status == 403


@needs_nginx
def test_metrics_are_served_on_the_metrics_port_only(
    proxy: FlowerProxy, shared_worker: WorkerProcess, ran_tasks: list[RanTask]
) -> None:
    # The dashboard port, where people come in, does not serve /metrics at all.
    for auth in (False, True):
        assert proxy.get("/metrics", auth=auth).status == 404
    # The metrics port serves Prometheus (no credentials, like Flower's own /metrics) ...
    metrics = http_get(proxy.metrics_url("/metrics"))
    assert metrics.status == 200
    assert ("flower_worker_online", {"worker": shared_worker.name}, 1.0) in metric_samples(
        metrics.text
    )
    assert http_get(proxy.metrics_url("/healthcheck")).text == "OK"
    # ... and nothing else: no page, no API, no POST.
    for path in ("/", "/api/workers", "/tasks", "/metrics/"):
        assert http_get(proxy.metrics_url(path), ("user", "pass")).status == 404, path
    assert http_request("POST", proxy.metrics_url("/metrics"), body=b"").status == 403


DATATABLE_QUERY = (
    b"draw=1&start=0&length=50&search%5Bvalue%5D=&order%5B0%5D%5Bcolumn%5D=0"
    b"&order%5B0%5D%5Bdir%5D=desc&columns%5B0%5D%5Bdata%5D=received"
)


@needs_nginx
def test_the_tasks_list_shows_name_state_runtime_and_argument_summary(
    proxy: FlowerProxy, flower: FlowerProcess, ran_tasks: list[RanTask]
) -> None:
    flower_tasks_when_final(flower, ran_tasks)
    page = proxy.get("/tasks").text
    columns = re.findall(r'<th data-column="([a-z_]+)">', page)
    assert columns == ["name", "state", "runtime", "args", "received", "worker", "uuid"], columns
    table = proxy.post("/tasks/datatable", DATATABLE_QUERY).json()
    rows = {row["uuid"]: row for row in table["data"]}
    for ran in ran_tasks:
        row = rows[ran.id]
        assert (row["name"], row["state"]) == (ran.name, ran.state), row
        # The client's argsrepr: task, image references, the prompt's first 60 characters.
        assert row["args"].startswith(f"({ran.name.split('.')[-1]}, images=["), row["args"]
        assert len(row["args"]) < 200, row["args"]
        if ran.state == "SUCCESS":
            assert isinstance(row["runtime"], float) and row["runtime"] > 0, row


OFFERED_CONTROLS_JS = """(() => {
  if (document.readyState !== 'complete' || !document.getElementById('workername')) return null;
  // What a user can reach: every tab opened, every menu dropped down.
  document.querySelectorAll('.tab-pane').forEach(p => p.classList.add('show', 'active'));
  document.querySelectorAll('.dropdown-menu').forEach(m => m.classList.add('show'));
  return [...document.querySelectorAll('button, input, select')]
    .filter(el => el.checkVisibility())
    .map(el => el.id || el.getAttribute('aria-label') || el.textContent.trim());
})()"""


@needs_nginx
@needs_chromium
def test_the_dashboard_does_not_offer_what_the_proxy_refuses(
    proxy: FlowerProxy,
    control_proxy: FlowerProxy,
    flower: FlowerProcess,
    shared_worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    chromium = find_chromium()
    assert chromium is not None
    path = f"/worker/{shared_worker.name}"
    offered = {}
    with HeadlessChromium(chromium, tmp_path / "profile") as browser:
        for label, url in (("flower", flower.url(path)), ("proxy", proxy.url(path)),
                           ("control", control_proxy.url(path))):
            session = browser.open(url, flower.auth)
            offered[label] = set(browser.evaluate_until(session, OFFERED_CONTROLS_JS))
    refused = {"worker-shutdown", "worker-pool-restart", "worker-pool-grow",
               "worker-pool-shrink", "worker-pool-autoscale", "worker-add-consumer",
               "worker-cancel-consumer-gpu", f"task-rate-limit-{DESCRIBE}",
               f"task-timeout-hard-{DESCRIBE}"}
    pool = {"worker-pool-restart", "worker-pool-grow", "worker-pool-shrink",
            "worker-pool-autoscale"}
    # Flower alone (producer/flower_app.py, as the demo runs it) offers all of them but the
    # pool controls, which no worker accepts (so the check below can see a control) ...
    assert refused - pool <= offered["flower"], (refused - pool) - offered["flower"]
    assert not pool & offered["flower"], pool & offered["flower"]
    # ... the shipped proxy none, while the harmless ones stay.
    assert not refused & offered["proxy"], refused & offered["proxy"]
    assert {"worker-refresh", "worker-refresh-all"} <= offered["proxy"], offered["proxy"]
    # With the operator's opt-in: the controls that then pass, but still no pool resizing.
    assert refused - pool <= offered["control"], (refused - pool) - offered["control"]
    assert not pool & offered["control"], pool & offered["control"]


LONG = 100_000  # tokens: a generation that runs until it is stopped


@needs_nginx
def test_terminate_from_the_dashboard_stops_a_running_task(
    proxy: FlowerProxy, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given a worker of its own (queue "long", so the shared worker's tasks stay apart)
    # running a generation that would go on for minutes
    env = {"VQ_QUEUE": "long", "VQ_MAX_NEW_TOKENS_CAPS": f"ask={LONG}",
           "VQ_TASK_TIME_LIMIT_S": "120"}
    settings = Settings.from_env({}, redis_url=module_redis.url, queue="long",
                                 max_new_tokens_caps=f"ask={LONG}", connect_timeout_s=3.0)
    with WorkerProcess(module_redis.url, tmp_path_factory.mktemp("long-worker"), **env) as worker:
        with Client(settings) as client:
            handle = client.submit("ask", [], "Tell a very long story.", max_new_tokens=LONG)
            wait_until_generating(client, handle.id)
            # When a dashboard user presses Terminate on the task page (revoke, terminate=true)
            reply = proxy.post(f"/api/task/revoke/{handle.id}", b"terminate=true")
            assert reply.status == 200, reply.text
            # Then the generation stops and the task ends cancelled, not timed out
            result = client.result(handle.id, wait=True, timeout=110)
        # and the worker carries on (the thread pool cannot kill a job; the worker's
        # per-token check stops it)
        assert worker.process is not None and worker.process.poll() is None
    assert result is not None and result["state"] == "FAILURE", result
    assert result["error"]["code"] == "cancelled", result


def test_tasks_queued_in_one_batch_are_each_shown_as_sent(
    flower: FlowerProcess, module_redis: RedisServer
) -> None:
    # Given a batch queued on a list no worker consumes: its events went out in one publish
    settings = Settings.from_env({}, redis_url=module_redis.url, queue="flower-backlog")
    with Client(settings) as client:
        handles = client.submit_many(
            [SubmitRequest("ask", [], f"Say {i}.") for i in range(5)]
            + [SubmitRequest("describe", ["https://example.com/cat.jpg"], priority="high")]
        )

    # Then Flower lists each task, waiting in its queue, named and summarised
    def all_listed() -> dict[str, dict[str, Any]] | None:
        tasks = flower.get("/api/tasks").json()
        return tasks if all(h.id in tasks for h in handles) else None

    tasks = wait_until(all_listed, 20)
    assert tasks, flower.get("/api/tasks").text[:3000]
    for handle in handles:
        seen = tasks[handle.id]
        assert (seen["name"], seen["state"]) == (handle.task.celery_name, "PENDING"), seen
        assert seen["args"].startswith(f"({handle.task.value}, images=["), seen["args"]
    assert tasks[handles[-1].id]["routing_key"] == "flower-backlog.high"
