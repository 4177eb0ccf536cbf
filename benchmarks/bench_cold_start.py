"""Cold start, before and after, side by side: `worker infer` once, and `worker run` to ready.

    python benchmarks/bench_cold_start.py --baseline 7efae71 --runs 5

The baseline commit is exported with `git archive` into a temporary folder (nothing in the
repository changes) and every measurement alternates between it and this tree, so both
see the same machine load. Each tree runs its own code: the commands start in its folder
with it first on PYTHONPATH.

Measured per run, medians reported:
- `import worker.engine`: the model stack's import alone (what a cold process pays first);
- `worker infer`: `python -m worker.infer_cli --task describe --image ... --device cpu
  --json` on the small checkpoint, wall time of the whole process and its CPU time
  (user + sys);
- `worker run` to ready: from the process start until its health file says `consuming`
  (model loaded, warmed, Celery consumer connected), against a local redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.devstack import RedisServer  # noqa: E402

MODEL = ROOT / "tests" / "data" / "phi3v-reference" / "model"
IMAGE = ROOT / "tests" / "data" / "phi3v-reference" / "images" / "small_400x300.jpg"


@dataclass
class Sample:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def export_tree(commit: str, into: Path) -> Path:
    """The files of `commit` under `into`, as a fresh clone would have them."""
    archive = into / "tree.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit],
        check=True,
    )
    tree = into / commit
    tree.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    return tree


def tree_env(tree: Path, threads: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VQ_", "REDIS_"))}
    env.update(
        PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
        VQ_LOG_LEVEL="warning",
    )
    env.update(extra)
    return env


def run_once(argv: list[str], tree: Path, env: dict[str, str]) -> tuple[float, float]:
    cpu_before = child_cpu_s()
    began = time.perf_counter()
    subprocess.run(argv, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began, child_cpu_s() - cpu_before


def import_engine(tree: Path, threads: int) -> tuple[float, float]:
    argv = [sys.executable, "-c", "import worker.engine"]
    return run_once(argv, tree, tree_env(tree, threads))


def infer_once(tree: Path, threads: int) -> tuple[float, float]:
    argv = [
        sys.executable, "-m", "worker.infer_cli", "--model", str(MODEL), "--task", "describe",
        "--image", str(IMAGE), "--device", "cpu", "--json",
    ]
    return run_once(argv, tree, tree_env(tree, threads))


def worker_ready_once(tree: Path, threads: int, redis_url: str, scratch: Path) -> float:
    """Seconds from `worker run`'s start until its health file says consuming."""
    name = f"bench-{uuid.uuid4().hex[:8]}@localhost"
    health = scratch / f"{name}.health.json"
    env = tree_env(
        tree, threads, REDIS_URL=redis_url, VQ_MODEL=str(MODEL), VQ_DEVICE="cpu",
        VQ_WORKER_NAME=name, VQ_HEALTH_FILE=str(health), VQ_METRICS_PORT="0",
    )
    log = (scratch / f"{name}.log").open("wb")
    began = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run"], cwd=tree, env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}; see {log.name}")
            try:
                if json.loads(health.read_text()).get("consuming"):
                    return time.perf_counter() - began
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def alternate(
    trees: dict[str, Path], runs: int, measure: Callable[[Path], tuple[float, float]]
) -> dict[str, Sample]:
    samples = {label: Sample() for label in trees}
    labels = list(trees)
    for run in range(runs):
        order = labels if run % 2 == 0 else labels[::-1]  # neither side always goes first
        for label in order:
            wall, cpu = measure(trees[label])
            samples[label].wall_s.append(wall)
            samples[label].cpu_s.append(cpu)
    return samples


def report(title: str, samples: dict[str, Sample], with_cpu: bool = True) -> list[str]:
    lines = [f"{title}:"]
    medians = {label: statistics.median(s.wall_s) for label, s in samples.items()}
    for label, sample in samples.items():
        walls = ", ".join(f"{v:.2f}" for v in sample.wall_s)
        line = f"  {label:>6}: wall median {medians[label]:.2f} s [{walls}]"
        if with_cpu:
            line += f"; CPU median {statistics.median(sample.cpu_s):.2f} s"
        lines.append(line)
    if "before" in medians and "after" in medians:
        lines.append(f"  after / before: {medians['after'] / medians['before']:.2f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="commit to compare with (default: this tree only)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--skip-worker", action="store_true", help="no `worker run` timing")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vq-cold-") as tmp:
        scratch = Path(tmp)
        trees = {"after": ROOT}
        if args.baseline:
            trees = {"before": export_tree(args.baseline, scratch), "after": ROOT}
        results: dict[str, dict[str, Sample]] = {}
        results["import worker.engine"] = alternate(
            trees, args.runs, lambda tree: import_engine(tree, args.threads)
        )
        results["worker infer (one describe, 512 tokens)"] = alternate(
            trees, args.runs, lambda tree: infer_once(tree, args.threads)
        )
        if not args.skip_worker:
            with RedisServer(scratch / "redis") as redis_server:
                results["worker run: start to consuming"] = alternate(
                    trees, args.runs,
                    lambda tree: (
                        worker_ready_once(tree, args.threads, redis_server.url, scratch),
                        0.0,
                    ),
                )
    print(f"cold start, {args.runs} runs each, OMP_NUM_THREADS={args.threads}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    for title, samples in results.items():
        print("\n".join(report(title, samples, with_cpu="worker run" not in title)))
    if args.json:
        args.json.write_text(json.dumps({
            title: {label: vars(s) for label, s in samples.items()}
            for title, samples in results.items()
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
