"""The original Phi-3-vision image preprocessing, step by step, for comparison.

A faithful reimplementation of the checkpoint's Hub processor (`Phi3VImageProcessor`:
`HD_transform`, `padding_336`, `ToTensor` + `Normalize`, the bicubic global view, the crop
reshape, `pad_to_max_num_crops_tensor`, `torch.stack`). torchvision cannot be installed
next to a CPU-only torch, so its calls are replaced by what they do for these inputs:
`F.resize` on a PIL image is `Image.resize(..., BILINEAR)`, `F.pad` with a constant fill
is `ImageOps.expand`, `ToTensor` is HWC -> CHW `.contiguous()` then `.float().div(255)`,
`Normalize` is `sub_(mean).div_(std)`. The same torch calls, so the same temporaries and
the same bits. Used by benchmarks/bench_preprocess.py and by the processor tests, which
check that `worker.model.processor` gives bit-identical crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

CROP = 336


def hd_transform(image: Image.Image, hd_num: int) -> Image.Image:
    width, height = image.size
    transposed = False
    if width < height:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        transposed = True
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)  # F.resize(img, [h, w])
    image = padding_336(image)
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    return image


def padding_336(image: Image.Image) -> Image.Image:
    _, height = image.size
    target = int(np.ceil(height / CROP) * CROP)
    top = int((target - height) / 2)
    bottom = target - height - top
    return ImageOps.expand(image, border=(0, top, 0, bottom), fill=(255, 255, 255))


def pad_to_max_num_crops_tensor(images: torch.Tensor, max_crops: int) -> torch.Tensor:
    crops, _, height, width = images.shape
    if crops < max_crops:
        pad = torch.zeros(max_crops - crops, 3, height, width, dtype=images.dtype)
        images = torch.cat([images, pad], dim=0)
    return images


def preprocess(
    images: Sequence[Image.Image], num_crops: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, list[int]]:
    """pixel_values [n_images, num_crops + 1, 3, 336, 336] and the crops each image uses."""
    images = [image.convert("RGB") for image in images]
    elems = [hd_transform(image, num_crops) for image in images]
    arrays = [np.array(elem) for elem in elems]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    hd_images = []
    for array in arrays:
        tensor = torch.from_numpy(array.transpose((2, 0, 1))).contiguous()  # ToTensor
        tensor = tensor.to(dtype=torch.float32).div(255)
        hd_images.append(tensor.sub_(mean_t).div_(std_t))  # Normalize
    global_images = [
        torch.nn.functional.interpolate(
            im.unsqueeze(0).float(), size=(CROP, CROP), mode="bicubic"
        ).to(im.dtype)
        for im in hd_images
    ]
    shapes = [(im.size(1), im.size(2)) for im in hd_images]
    reshaped = [
        im.reshape(1, 3, h // CROP, CROP, w // CROP, CROP)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(-1, 3, CROP, CROP)
        .contiguous()
        for im, (h, w) in zip(hd_images, shapes, strict=True)
    ]
    joined = [torch.cat([g, im], dim=0) for g, im in zip(global_images, reshaped, strict=True)]
    padded = [pad_to_max_num_crops_tensor(im, num_crops + 1) for im in joined]
    used = [1 + (h // CROP) * (w // CROP) for h, w in shapes]
    return torch.stack(padded, dim=0), used
