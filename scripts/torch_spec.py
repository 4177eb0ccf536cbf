"""Does the virtualenv's torch do, or must setup install the torch TORCH_SPEC asks for?

    python scripts/torch_spec.py [--explicit] [--stamp FILE] -- "torch==2.13.0 [pip options]"

Run by scripts/setup.sh with the virtualenv's Python. Prints the reason and exits 0 (keep
the installed torch), 10 (install: none there) or 11 (replace the installed one); 2 when
the spec is not a torch requirement. The stamp file holds the spec setup last installed.

Rules: without an explicit TORCH_SPEC any installed torch is kept (a GPU host may have put
its CUDA build there first). With one, the installed torch must satisfy its version, and
a CPU build (local version `+cpu`) does not count as the requested torch unless the spec
asks for a CPU build or setup itself installed it from this very spec.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # a fresh virtualenv has pip, which carries packaging
    from pip._vendor.packaging.requirements import (  # type: ignore[assignment]
        InvalidRequirement,
        Requirement,
    )
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[assignment]

KEEP, INSTALL, REPLACE, BAD_SPEC = 0, 10, 11, 2


@dataclass(frozen=True)
class Decision:
    action: int  # KEEP | INSTALL | REPLACE | BAD_SPEC
    reason: str


def decide(
    installed: str | None, spec: str, *, explicit: bool, last_spec: str | None = None
) -> Decision:
    """What setup does about torch, given the installed version (None: not installed)."""
    words = spec.split()
    try:
        requirement = Requirement(words[0]) if words else None
    except InvalidRequirement as exc:
        return Decision(BAD_SPEC, f"TORCH_SPEC {spec!r} is not a requirement: {exc}")
    if requirement is None or requirement.name.lower() != "torch":
        return Decision(BAD_SPEC, f"TORCH_SPEC {spec!r} must start with a torch requirement")
    if installed is None:
        return Decision(INSTALL, f"installing {spec}")
    if not explicit:
        return Decision(KEEP, f"torch {installed} is installed (set TORCH_SPEC to replace it)")
    try:
        version = Version(installed)
    except InvalidVersion:
        return Decision(REPLACE, f"torch {installed!r} has no valid version; installing {spec}")
    if not requirement.specifier.contains(version, prereleases=True):
        return Decision(
            REPLACE, f"torch {installed} does not satisfy {words[0]}; installing {spec}"
        )
    if spec.strip() == (last_spec or "").strip():
        return Decision(KEEP, f"torch {installed} (installed from TORCH_SPEC={spec})")
    if version.local == "cpu" and "cpu" not in spec.lower():
        return Decision(
            REPLACE, f"torch {installed} is a CPU build, TORCH_SPEC asks for {spec}: replacing it"
        )
    return Decision(KEEP, f"torch {installed} satisfies TORCH_SPEC={spec}")


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--explicit", action="store_true", help="TORCH_SPEC was set by the user")
    parser.add_argument("--stamp", type=Path, help="file holding the spec last installed")
    parser.add_argument("spec", help="requirement, then pip options")
    args = parser.parse_args(argv)
    last = None
    if args.stamp is not None and args.stamp.is_file():
        last = args.stamp.read_text(encoding="utf-8")
    decision = decide(installed_torch(), args.spec, explicit=args.explicit, last_spec=last)
    print(decision.reason)
    return decision.action


if __name__ == "__main__":
    sys.exit(main())
