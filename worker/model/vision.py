"""The image side: transformers' CLIP tower and the original's HD image embedding.

Per image, CLIP runs on the global view and every tile; the features of the
second-to-last layer, class token dropped (24x24xC per crop), are merged 2x2 into
12x12x4C. The tiles are stitched into one grid whose feature rows each end with the
learnable `sub_GN` ("newline"); the global view gets the same row separators; the two
are joined around the learnable `glb_GN` in `hd_transform_order` ("sub_glb": tiles,
glb_GN, global) and projected by Linear(4C -> hidden), GELU, Linear(hidden -> hidden).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.model.config import Phi3VConfig, VisionTowerConfig
from worker.model.layers import CLIPVisionConfig, CLIPVisionModel


class ClipTower(nn.Module):
    """CLIP ViT held under `vision_model`, so the checkpoint's key names load unchanged."""

    def __init__(self, config: VisionTowerConfig, attn_implementation: str) -> None:
        super().__init__()
        clip_config = CLIPVisionConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            projection_dim=config.projection_dim,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
        )
        clip_config._attn_implementation = attn_implementation
        self.vision_model = CLIPVisionModel(clip_config)

    def patch_features(self, pixel_values: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """[crops, patches, C]: hidden state `layer_idx` of CLIP, without the class token.

        Same value as `vision_model(..., output_hidden_states=True).hidden_states[layer_idx]`,
        but the layers after it (and `post_layernorm`) are not run at all.
        """
        model = self.vision_model
        layers = model.encoder.layers
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k.
        depth = layer_idx if layer_idx >= 0 else len(layers) + 1 + layer_idx
        hidden: torch.Tensor = model.pre_layrnorm(model.embeddings(pixel_values))
        for layer in layers[:depth]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden[:, 1:]

    def reset_buffers(self, device: torch.device) -> None:
        """Recreate the non-persistent position ids (absent after a meta-device build)."""
        embeddings = self.vision_model.embeddings
        ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
        embeddings.register_buffer("position_ids", ids, persistent=False)


class ImageEmbedding(nn.Module):
    """`model.vision_embed_tokens`: text embeddings with image features written in."""

    def __init__(self, config: Phi3VConfig, wte: nn.Embedding, attn_implementation: str) -> None:
        super().__init__()
        width = config.image.image_dim_out * 4
        # The original module holds the text embedding as `wte`; it is the very same
        # module as `model.embed_tokens`, so the checkpoint has no key of its own for it.
        self.wte = wte
        self.img_processor = ClipTower(config.vision, attn_implementation)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.img_projection = nn.Sequential(
            nn.Linear(width, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.layer_idx = config.image.layer_idx
        self.order = config.image.hd_transform_order
        self.grid = config.vision.grid

    def image_features(
        self, crops: torch.Tensor, grids: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Projected features per image, [tokens, hidden].

        `crops` holds every image's crops in order, [sum of (1 + rows*cols), 3, S, S], on
        any device: moved (and cast) here in one copy, none when already in place. Every
        crop of every image goes through CLIP in one batch.
        """
        return self.project(self.crop_features(crops), grids)

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP patch features of crops, [n, patches, C]; any split of the crops works."""
        weight = self.glb_GN
        batch = crops.to(device=weight.device, dtype=weight.dtype, non_blocking=True)
        return self.img_processor.patch_features(batch, self.layer_idx)

    def project(
        self, features: torch.Tensor, grids: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Every image's crop features stitched in the original's layout and projected."""
        per_image = torch.split(features, [1 + rows * cols for rows, cols in grids])
        stitched = [
            self._stitch(f, rows, cols) for f, (rows, cols) in zip(per_image, grids, strict=True)
        ]
        projected = self.img_projection(torch.cat(stitched))
        return list(torch.split(projected, [int(s.shape[0]) for s in stitched]))

    def forward(
        self,
        input_ids: torch.Tensor,
        crops: torch.Tensor | None = None,
        grids: Sequence[tuple[int, int]] = (),
        spans: Sequence[tuple[int, int]] = (),
    ) -> torch.Tensor:
        """[1, L, hidden]; image i's features fill spans[i] = (start, length) (negative ids)."""
        features = self.image_features(crops, grids) if crops is not None and grids else []
        return self.place(input_ids, features, spans)

    def place(
        self,
        input_ids: torch.Tensor,
        features_per_image: Sequence[torch.Tensor],
        spans: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Text embeddings [1, L, hidden] with image i's features written into spans[i]."""
        embeds: torch.Tensor = self.wte(input_ids.clamp(min=0))
        for (start, length), features in zip(spans, features_per_image, strict=True):
            if features.shape[0] != length:
                raise ValueError(f"image gives {features.shape[0]} features for {length} slots")
            embeds[0, start : start + length] = features.to(embeds.dtype)
        return embeds

    def _merge(self, features: torch.Tensor) -> torch.Tensor:
        """[n, grid*grid, C] -> [n, grid/2, grid/2, 4C]: each 2x2 patch block into one token."""
        n, _, channels = features.shape
        half = self.grid // 2
        return (
            features.reshape(n, half, 2, half, 2, channels)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n, half, half, 4 * channels)
        )

    def _stitch(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[1 + rows*cols, patches, C] -> [tokens, 4C] in the original's layout."""
        half = self.grid // 2
        width = self.sub_GN.shape[-1]
        newline = self.sub_GN.reshape(1, 1, width)

        glb = self._merge(features[:1])[0]  # [half, half, 4C]
        glb = torch.cat([glb, newline.expand(half, 1, width)], dim=1).reshape(-1, width)

        tiles = self._merge(features[1 : 1 + rows * cols])  # [rows*cols, half, half, 4C]
        grid = tiles.reshape(rows, cols, half, half, width).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * half, cols * half, width)
        sub = torch.cat([grid, newline.expand(rows * half, 1, width)], dim=1).reshape(-1, width)

        separator = self.glb_GN.reshape(1, width)
        parts = [sub, separator, glb] if self.order == "sub_glb" else [glb, separator, sub]
        return torch.cat(parts)
