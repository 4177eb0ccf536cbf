"""An image's HD transform and normalised crops, from the image cache when it holds them.

Keyed by the image's SHA-256 and the crop count (worker.model.image_cache). Runs on the
request's own thread, like the rest of a request's preprocessing. The cached crops are
read, never written: the runner only slices them and copies them to the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from worker.model.image_cache import ImageCache
from worker.model.processor import EncodedPrompt, HDImage, Phi3VProcessor

KIND = "crops"


def pixels_hash(image: Image.Image) -> str:
    """A decoded image's identity when its file's hash is not known (engine callers)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return "pixels:" + digest.hexdigest()


class ImageCrops:
    def __init__(self, processor: Phi3VProcessor, cache: ImageCache, device_type: str) -> None:
        self.processor = processor
        self.cache = cache
        self.pin = device_type == "cuda"  # so the device thread's copy does not wait
        self._found: list[tuple[HDImage, torch.Tensor] | None] = []

    def cached(self, hashes: Sequence[str], num_crops: int | None) -> list[HDImage | None]:
        """The transform of each image the cache holds (None where it does not)."""
        self._found = [self.cache.get(KIND, (KIND, digest, num_crops)) for digest in hashes]
        return [None if entry is None else entry[0] for entry in self._found]

    def crops(
        self, encoded: EncodedPrompt, hashes: Sequence[str], num_crops: int | None
    ) -> torch.Tensor:
        """Every image's crops in order, [total, 3, crop, crop]; new ones are cached."""
        if not hashes:
            return self.processor.crops(encoded, self.pin)
        parts: list[torch.Tensor] = []
        for digest, hd, entry in zip(hashes, encoded.images, self._found, strict=True):
            key = (KIND, digest, num_crops)
            if entry is None:
                single = EncodedPrompt(input_ids=[], spans=(), images=(hd,))
                tensor = self.processor.crops(single, self.pin)
                nbytes = tensor.numel() * tensor.element_size() + hd.resized.nbytes
                self.cache.put(KIND, key, (hd, tensor), nbytes)
            else:
                tensor = entry[1]
            parts.append(tensor)
        if len(parts) == 1:
            return parts[0]
        whole = torch.cat(parts)
        return whole.pin_memory() if self.pin else whole
