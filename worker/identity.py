"""A worker's node name and health file: unique on its host, found again by `worker health`.

One naming rule serves both sides. A worker without VQ_WORKER_NAME is `gpu-<device>@host`
(`gpu-cuda0@host`); a second one on the same device and host takes the next free slot,
`gpu-cuda0-2@host`, and so on. Its health file is named after it in the temp dir unless
VQ_HEALTH_FILE says otherwise. A worker holds an exclusive lock (flock) on a file beside
the name and on one beside an explicit health file for as long as it runs; the kernel
drops the locks when the process ends, however it ends, so a crashed worker's slot is
free again at once and nothing has to clean up. A second worker given a name or a health
file already held on this host is refused with the setting to change.

`worker health` without a name finds the heartbeat files in the temp dir whose process is
still running: on a host (or in a container) with one worker, that worker.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from vision_queue.settings import Settings

log = logging.getLogger("vision_queue.worker")

_PREFIX = "vision-queue-"
_HEALTH_SUFFIX = ".health.json"
# Default names tried on one host and device before giving up (each is a running worker).
MAX_SLOTS = 64


class IdentityTaken(Exception):
    """The worker name or health file is in use by a running worker on this host."""


def default_worker_name(device: str, slot: int = 1) -> str:
    suffix = "" if slot == 1 else f"-{slot}"
    return f"gpu-{device.replace(':', '')}{suffix}@{socket.gethostname()}"


def health_dir() -> Path:
    return Path(tempfile.gettempdir())


def default_health_file(worker_name: str) -> Path:
    return health_dir() / f"{_PREFIX}{_safe(worker_name)}{_HEALTH_SUFFIX}"


@dataclass
class WorkerIdentity:
    name: str
    health_file: Path
    _locks: list[IO[str]] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Let the name and health file go (the kernel also drops the locks when the
        process ends; this removes the lock files too, while still holding them)."""
        for lock in self._locks:
            with contextlib.suppress(OSError):
                Path(lock.name).unlink()
            lock.close()
        self._locks.clear()


def claim_identity(worker_name: str, health_file: str, device: str) -> WorkerIdentity:
    """This worker's name and health file, held until it exits.

    `worker_name` / `health_file` are the settings (VQ_WORKER_NAME, VQ_HEALTH_FILE; empty
    for the default); `device` the resolved device (`cuda:0`, `cpu`) the default name uses.
    Raises IdentityTaken when an explicit name or health file is held by another worker.
    """
    if worker_name:
        candidates = [worker_name]
    else:
        candidates = [default_worker_name(device, slot) for slot in range(1, MAX_SLOTS + 1)]
    for name in candidates:
        path = Path(health_file) if health_file else default_health_file(name)
        try:
            name_lock = _try_lock(_lock_path_for_name(name), name)
        except OSError as exc:  # a read-only temp dir must not keep a worker from starting
            log.warning("cannot hold worker name %s on this host (%s): not checked", name, exc)
            return WorkerIdentity(name, path)
        if name_lock is None:
            continue
        locks = [name_lock]
        if health_file:
            try:
                file_lock = _try_lock(Path(f"{path}.lock"), name)
            except OSError as exc:
                log.warning("cannot hold health file %s (%s): not checked", path, exc)
                return WorkerIdentity(name, path, locks)
            if file_lock is None:
                name_lock.close()
                holder = _holder(Path(f"{path}.lock"))
                raise IdentityTaken(
                    f"health file {path} is in use by another worker on this host{holder}; "
                    "give each worker its own VQ_HEALTH_FILE (or leave it unset)"
                )
            locks.append(file_lock)
        return WorkerIdentity(name, path, locks)
    if worker_name:
        holder = _holder(_lock_path_for_name(worker_name))
        raise IdentityTaken(
            f"worker name {worker_name} is in use by another worker on this host{holder}; "
            "give each worker its own --name / VQ_WORKER_NAME (or leave it unset)"
        )
    raise IdentityTaken(
        f"{MAX_SLOTS} workers on device {device} already run on this host; set VQ_WORKER_NAME"
    )


def claim_host_identity(settings: Settings) -> WorkerIdentity:
    """`claim_identity` for `worker run`: the default name uses the device the engine will
    load on (`auto` resolved), and the log says how to check this worker's health."""
    try:
        from worker.inference.engine_setup import resolve_device

        device = str(resolve_device(settings.device))
    except Exception:  # a bad device spec is the engine's to report, with its own message
        device = settings.device
    identity = claim_identity(settings.worker_name, settings.health_file, device)
    atexit.register(identity.release)
    log.info(
        "worker %s, health file %s (check: worker health --ready --health-file %s)",
        identity.name,
        identity.health_file,
        identity.health_file,
    )
    return identity


def running_health_files() -> list[Path]:
    """Heartbeat files in the temp dir whose worker process is still running, by name."""
    found = []
    for path in sorted(health_dir().glob(f"{_PREFIX}*{_HEALTH_SUFFIX}")):
        try:
            pid = json.loads(path.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pid, int) and pid_running(pid):
            found.append(path)
    return found


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "worker"


def _lock_path_for_name(name: str) -> Path:
    return health_dir() / f"{_PREFIX}{_safe(name)}.lock"


def _try_lock(path: Path, name: str) -> IO[str] | None:
    """The open, exclusively locked file; None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        # The holder removes the file when it lets go: a lock taken on the removed file
        # protects nothing, so take it again on the file now at `path`.
        try:
            if path.stat().st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    # Who holds it, for the message another worker gets (the lock itself is the truth).
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"worker": name, "pid": os.getpid()}))
    handle.flush()
    return handle


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        return f" (pid {int(data['pid'])}, {data['worker']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def pid_running(pid: int) -> bool:
    """A process with this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
