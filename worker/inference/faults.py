"""Test-only fault injection, switched on by the VQ_FAULT_INJECTION environment variable.

The value is comma-separated `key=value` pairs. A key `<kind>_marker` arms fault `<kind>`
for every prompt that contains the value, e.g. `VQ_FAULT_INJECTION=oom_marker=__OOM__`.
Kinds the engine acts on:

* `oom`: generate() makes a genuinely impossible allocation (2**60 bytes) on its own
  device inside the normal request path, so the real out-of-memory handling runs.
* `crash`: the worker process SIGKILLs itself mid-request, as a segfault in a kernel or
  the kernel's OOM killer would, so redelivery and the delivery bound can be tested.
* `decode_oom`: every batched decode step that includes this request makes the same
  impossible allocation, so the batch's out-of-memory handling runs for real (the
  other requests of the batch must go on; this one must fail alone).
* `hang`: the request blocks forever, as a kernel that never returns or a deadlock
  would, so the stuck-task health check and watchdog can be tested.

Without the variable nothing here does anything. Never set it in production.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping

ENV_VAR = "VQ_FAULT_INJECTION"
_MARKER_SUFFIX = "_marker"
IMPOSSIBLE_BYTES = 2**60


def parse_faults(value: str) -> dict[str, str]:
    """`"oom_marker=__OOM__,crash_marker=X"` -> `{"oom_marker": "__OOM__", ...}`."""
    pairs: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip() and val:
            pairs[key.strip()] = val
    return pairs


def fault_for(prompt: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The kind of the first armed fault whose marker `prompt` contains, else None."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR, "")
    if not value:
        return None
    for key, marker in parse_faults(value).items():
        if key.endswith(_MARKER_SUFFIX) and marker in prompt:
            return key[: -len(_MARKER_SUFFIX)]
    return None


def inject(prompt: str, device: str) -> None:
    """Called by the engine in its request path; raises what the armed fault calls for."""
    kind = fault_for(prompt)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        threading.Event().wait()  # never set: only the watchdog or a signal ends this
    if kind == "oom":
        allocate_impossibly(device)


def allocate_impossibly(device: str) -> None:
    """A genuine out-of-memory on `device`."""
    import torch  # only when a fault is armed: this module stays light

    torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8, device=device)
