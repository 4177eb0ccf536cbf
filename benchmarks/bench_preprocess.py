"""Image preprocessing: this project's processor against the original's, side by side.

Same decoded input for both, in one run: the HD transform (resize, padding) and the crops
a model consumes. "original" is benchmarks/original_preprocess.py, a step-by-step
reimplementation of the Hub processor (its torchvision calls replaced by what they do).
Every run also checks that the crops are bit-identical.

    python benchmarks/bench_preprocess.py [--repeats 7] [--threads 1] [--json PATH]

Target (issue 9, item 7): at most half the original's time, bit-identical crops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.inputs import test_jpeg  # noqa: E402
from benchmarks.original_preprocess import preprocess as original_preprocess  # noqa: E402
from vision_queue.images import decode_image  # noqa: E402
from worker.model.processor import crops_of, hd_transform  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGES = ROOT / "tests" / "data" / "phi3v-reference" / "images"


def hd_transforms(images: list[Image.Image], num_crops: int) -> list[Any]:
    return [hd_transform(im, num_crops, 336) for im in images]


def ours(images: list[Image.Image], num_crops: int) -> torch.Tensor:
    return crops_of([hd_transform(im, num_crops, 336) for im in images], MEAN, STD)


def medians_s(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternation so load on the machine hits all."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)

    inputs = {
        "photo 4000x3000 JPEG, 16 crops": ([decode_image(test_jpeg(4000, 3000))], 16),
        "640x480 PNG, 16 crops": ([Image.open(IMAGES / "shapes_640x480.png").convert("RGB")], 16),
        "portrait 480x1200, 16 crops": (
            [Image.open(IMAGES / "portrait_gray_480x1200.jpg").convert("RGB")],
            16,
        ),
        "two images, 4 crops": (
            [
                Image.open(IMAGES / name).convert("RGB")
                for name in ("wide_800x400.png", "tall_300x600.jpg")
            ],
            4,
        ),
    }
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), medians of {args.repeats}",
        flush=True,
    )
    figures: dict[str, Any] = {}
    for name, (images, num_crops) in inputs.items():
        pixel_values, used = original_preprocess(images, num_crops, MEAN, STD)
        mine = ours(images, num_crops).split(used)
        identical = all(
            torch.equal(mine[i], pixel_values[i, : used[i]]) for i in range(len(images))
        )
        times = medians_s(
            {
                "original": partial(original_preprocess, images, num_crops, MEAN, STD),
                "ours": partial(ours, images, num_crops),
                "hd": partial(hd_transforms, images, num_crops),
            },
            args.repeats,
        )
        original_s, ours_s, resize_s = times["original"], times["ours"], times["hd"]
        ratio = ours_s / original_s
        figures[name] = {
            "original_ms": round(original_s * 1e3, 1),
            "ours_ms": round(ours_s * 1e3, 1),
            "of_which_hd_transform_ms": round(resize_s * 1e3, 1),
            "ratio": round(ratio, 3),
            "bit_identical": identical,
        }
        print(
            f"{name}: original {original_s * 1e3:.1f} ms, ours {ours_s * 1e3:.1f} ms "
            f"(HD transform {resize_s * 1e3:.1f} ms of it) = {ratio:.2f}x; "
            f"crops bit-identical: {identical}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(f["bit_identical"] for f in figures.values()) else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
