"""SigLIP vision encoder and the SmolVLM connector: one camera image -> 64 tokens for the language model.

image (B,3,512,512) in [-1,1] -> 16x16 patches -> 1024 tokens of width 768 -> 12 pre-norm transformer
blocks -> pixel shuffle (4x4 neighbouring tokens stacked: 64 tokens of width 12288) -> linear -> 960.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm import attention


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 512
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    scale_factor: int = 4  # connector pixel-shuffle factor
    text_hidden_size: int = 960  # connector output width = the language model's hidden size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches // self.scale_factor**2


def resize_with_pad(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fit (B,3,H,W) images into height x width keeping the aspect ratio, padding with 0.

    The padding goes on the left and the top, as the reference does: a 480x640 frame becomes 384x512
    with 128 rows of zeros above it.
    """
    cur_h, cur_w = images.shape[-2:]
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=0.0)


def preprocess_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float images in [0,1] (B,3,H,W) -> the encoder's input: resized with padding, scaled to [-1,1].

    `size` is the config's resize_imgs_with_padding, which LeRobot gives as (width, height).
    """
    width, height = size
    return resize_with_pad(images, height, width) * 2.0 - 1.0


def patch_position_ids(side: int, device: torch.device) -> torch.Tensor:
    """Position-embedding ids of a side x side patch grid, as the reference computes them.

    SmolVLM buckets each patch's fractional coordinate k/side against the boundaries j/side. The
    reference (transformers 4.57) scales the coordinates by (1 - 1e-6) first, which puts every row and
    column but the first into the bucket below: rows/columns use ids 0, 0, 1, ..., side-2. The golden
    fixture reproduces this, so we do too (a plain 0..N-1 would be off by a whole embedding row).
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    coords = torch.arange(side, dtype=torch.float32, device=device) / side * (1 - 1e-6)
    bucket = torch.bucketize(coords, boundaries, right=True)
    return (bucket[:, None] * side + bucket[None, :]).flatten()


class VisionAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return self.out_proj(attention(q, k, v, mask=None))  # every patch sees every patch


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) in [-1,1] -> (B, num_patches, hidden). Patches are flattened row-major."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = x + self.position_embedding(patch_position_ids(self.cfg.image_size // self.cfg.patch_size, x.device))
        for block in self.layers:
            x = block(x)
        return self.post_layernorm(x)


class Connector(nn.Module):
    """Pixel shuffle then a linear projection into the language model's width (no bias)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.scale = cfg.scale_factor
        self.proj = nn.Linear(cfg.hidden_size * cfg.scale_factor**2, cfg.text_hidden_size, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N/s^2, C*s^2): each output token stacks an s x s block of patches.

        The order of views and permutes is SmolVLM's; the projection weights depend on it.
        """
        b, n, c = x.shape
        side, s = int(n**0.5), self.scale
        x = x.reshape(b, side, side, c)
        x = x.reshape(b, side, side // s, c * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(b, side // s, side // s, c * s * s)
        x = x.permute(0, 2, 1, 3)
        return x.reshape(b, n // (s * s), c * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pixel_shuffle(x))
