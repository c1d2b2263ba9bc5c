"""Vision transformer: one class per image, or per-pixel classes with a dense head (segmentation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.models.backbone import Backbone
from qkvlab.models.init import draw_seed, init_weights


class ViT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = None):
        super().__init__()
        seed = draw_seed() if seed is None else seed  # before any module draws from the global generator
        self.config = config
        p = config.patch_size
        self.patch_emb = nn.Conv2d(config.in_channels, config.d_model, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.backbone = Backbone(config)
        out = config.n_classes * p * p if config.dense_head else config.n_classes
        self.head = nn.Linear(config.d_model, out, bias=config.bias)
        init_weights(self, config, seed)

    def forward(self, images: torch.Tensor, return_attention: bool = False, per_patch: bool = False):
        """images (B, C, H, W) -> logits (B, n_classes), or (B, n_classes, H, W) with a dense head; with
        `per_patch`, a dense head's logits stay in patch order, (B, N, n_classes, p*p) (see `patch_order`),
        which a per-pixel loss reads without the strided copy back to image layout."""
        B, _, H, W = images.shape
        p = self.config.patch_size
        gh, gw = H // p, W // p
        # (B, N, C_in*p*p): each patch's pixels in the conv weight's (C_in, p, p) order
        pixels = images.reshape(B, -1, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)
        patches = F.linear(pixels, self.patch_emb.weight.flatten(1), self.patch_emb.bias)  # (B, N, C): conv as matmul
        h = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, 1+N, C)
        out = self.backbone(h, need_weights=return_attention)
        h, weights = out if return_attention else (out, None)
        if self.config.dense_head:
            patch_logits = self.head(h[:, 1:])  # (B, N, n_classes*p*p)
            if per_patch:
                logits = patch_logits.view(B, gh * gw, -1, p * p)  # (B, N, K, p*p)
            else:
                logits = (patch_logits.reshape(B, gh, gw, -1, p, p).permute(0, 3, 1, 4, 2, 5)
                          .reshape(B, -1, H, W))  # (B, K, H, W): each patch's p*p pixels in place
        else:
            logits = self.head(h[:, 0])  # (B, n_classes)
        return (logits, weights) if return_attention else logits


def patch_order(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-pixel values (B, H, W) -> (B, N, p*p) in the order of `ViT(..., per_patch=True)`'s logits:
    patches row by row, each patch's pixels row by row."""
    B, H, W = pixels.shape
    p = patch_size
    return pixels.view(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)
