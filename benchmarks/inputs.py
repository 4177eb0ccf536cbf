"""Synthetic inputs shared by the benchmarks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def test_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG: gradients, noise and blocks (compresses like a real picture)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    rgb = rgb + rng.integers(-20, 20, size=rgb.shape)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 30)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
