"""Cold start, before and after, side by side: `worker infer` once, and `worker run` to ready.

    python benchmarks/bench_cold_start.py --baseline before=7efae71 --runs 5
    python benchmarks/bench_cold_start.py --baseline before=7efae71 --baseline layers=6a56a95 \
        --gc-variant --runs 5                  # what each change contributes

Each baseline commit is exported with `git archive` into a temporary folder (nothing in the
repository changes) and every measurement goes round all contenders in turn, the order
alternating, so all see the same machine load. Each tree runs its own code: the commands
start in its folder with it first on PYTHONPATH. `--gc-variant` adds this tree run without
its collector pause and `os._exit` ("after-gc"): `infer_main` called then a normal exit,
and `worker run` with the pause switched off.

Measured per run, medians reported:
- `import worker.inference.engine`: the model stack's import alone (what a cold process pays first);
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
    done = subprocess.run(
        argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        check=False,
    )
    wall, cpu = time.perf_counter() - began, child_cpu_s() - cpu_before
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} in {tree} failed ({done.returncode}):\n{done.stderr}")
    return wall, cpu


@dataclass(frozen=True)
class Contender:
    label: str
    tree: Path
    keep_gc: bool = False  # this tree without the collector pause and os._exit


def import_engine(who: Contender, threads: int) -> tuple[float, float]:
    argv = [sys.executable, "-c", "import worker.inference.engine"]
    return run_once(argv, who.tree, tree_env(who.tree, threads))


INFER_ARGS = [
    "--model", str(MODEL), "--task", "describe", "--image", str(IMAGE), "--device", "cpu",
    "--json",
]
# The library call, then an ordinary interpreter exit: no collector pause, no os._exit.
INFER_KEEPING_GC = "import sys; from worker.infer_cli import infer_main; " \
    "sys.exit(infer_main(sys.argv[1:]))"
RUN_KEEPING_GC = "import sys; from worker import cli; " \
    "cli._pause_collector_until_consuming = lambda: None; sys.exit(cli.main(['run']))"


def infer_once(who: Contender, threads: int) -> tuple[float, float]:
    if who.keep_gc:
        argv = [sys.executable, "-c", INFER_KEEPING_GC, *INFER_ARGS]
    else:
        argv = [sys.executable, "-m", "worker.infer_cli", *INFER_ARGS]
    return run_once(argv, who.tree, tree_env(who.tree, threads))


def worker_ready_once(who: Contender, threads: int, redis_url: str, scratch: Path) -> float:
    """Seconds from `worker run`'s start until its health file says consuming."""
    tree = who.tree
    name = f"bench-{uuid.uuid4().hex[:8]}@localhost"
    health = scratch / f"{name}.health.json"
    env = tree_env(
        tree, threads, REDIS_URL=redis_url, VQ_MODEL=str(MODEL), VQ_DEVICE="cpu",
        VQ_WORKER_NAME=name, VQ_HEALTH_FILE=str(health), VQ_METRICS_PORT="0",
    )
    log = (scratch / f"{name}.log").open("wb")
    command = ["-c", RUN_KEEPING_GC] if who.keep_gc else ["-m", "worker.cli", "run"]
    began = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *command], cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
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
    contenders: list[Contender], runs: int, measure: Callable[[Contender], tuple[float, float]]
) -> dict[str, Sample]:
    samples = {who.label: Sample() for who in contenders}
    for run in range(runs):
        order = contenders if run % 2 == 0 else contenders[::-1]  # nobody always goes first
        for who in order:
            wall, cpu = measure(who)
            samples[who.label].wall_s.append(wall)
            samples[who.label].cpu_s.append(cpu)
    return samples


def report(title: str, samples: dict[str, Sample], with_cpu: bool = True) -> list[str]:
    lines = [f"{title}:"]
    medians = {label: statistics.median(s.wall_s) for label, s in samples.items()}
    first = next(iter(medians))
    for label, sample in samples.items():
        walls = ", ".join(f"{v:.2f}" for v in sample.wall_s)
        line = f"  {label:>9}: wall median {medians[label]:6.2f} s [{walls}]"
        if with_cpu:
            line += f"; CPU median {statistics.median(sample.cpu_s):.2f} s"
        if label != first:
            line += f"; {medians[label] / medians[first]:.2f} x {first}"
        lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", action="append", default=[], metavar="LABEL=COMMIT",
        help="a commit to compare with (repeatable; the first is the reference)",
    )
    parser.add_argument("--gc-variant", action="store_true", help="add this tree, gc kept")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--skip-worker", action="store_true", help="no `worker run` timing")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vq-cold-") as tmp:
        scratch = Path(tmp)
        contenders = []
        for spec in args.baseline:
            label, _, commit = spec.rpartition("=")
            contenders.append(Contender(label or "before", export_tree(commit, scratch)))
        if args.gc_variant:
            contenders.append(Contender("after-gc", ROOT, keep_gc=True))
        contenders.append(Contender("after", ROOT))
        threads = args.threads
        results: dict[str, dict[str, Sample]] = {}
        results["import worker.inference.engine"] = alternate(
            contenders, args.runs, lambda who: import_engine(who, threads)
        )
        results["worker infer (one describe, 512 tokens)"] = alternate(
            contenders, args.runs, lambda who: infer_once(who, threads)
        )
        if not args.skip_worker:
            with RedisServer(scratch / "redis") as redis_server:
                results["worker run: start to consuming"] = alternate(
                    contenders, args.runs,
                    lambda who: (worker_ready_once(who, threads, redis_server.url, scratch), 0.0),
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
