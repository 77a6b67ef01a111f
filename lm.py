"""SmolLM2, the language half of SmolVLM: a Llama decoder truncated to its first N layers.

SmolVLA never decodes text. It runs the prefix (image tokens, language tokens, state token) through
the first `num_layers` decoder layers once per action chunk and keeps each layer's keys and values:
that cache is all the action expert needs. So `prefix_kv` returns the per-layer keys/values and
skips the work whose result nobody reads (the last layer's attention output and MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LMConfig:
    hidden_size: int = 960
    intermediate_size: int = 2560
    num_layers: int = 16  # layers SmolVLA keeps (the VLM has 32)
    num_attention_heads: int = 15
    num_key_value_heads: int = 5
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    vocab_size: int = 49280
    # SmolVLA's own RoPE uses base 10000; the VLM config's rope_theta (100000) is not used.
    rope_base: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, then scale in the input dtype (Llama).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (B, L) -> two (B, 1, L, head_dim/2) float32 tensors.

    Angles are positions / base^(2i/head_dim), computed in float32 as a division (not a product with
    inverse frequencies) because that is how the reference rounds them.
    """
    half = head_dim // 2
    exponents = (2.0 / head_dim) * torch.arange(half, dtype=torch.float32, device=positions.device)
    timescale = base**exponents
    radians = positions[..., None].to(torch.float32) / timescale
    radians = radians[:, None]  # broadcast over heads
    return torch.cos(radians), torch.sin(radians)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-half rotary embedding of x (B, H, L, D): [x1*cos - x2*sin, x2*cos + x1*sin], in float32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) -> (B, Lq, H*D).

    `mask` is additive (0 where allowed, the dtype's most negative finite value where not), so a
    query that may attend to nothing (a padding token) gets uniform weights, as in the reference,
    instead of NaN. Softmax runs in float32 inside SDPA for low-precision inputs.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`attention` in the reference's order of operations (LeRobot's eager SmolVLA attention): scores
    q @ k^T in float32, then scaled by head_dim^-0.5, masked, softmax, cast back, @ v.

    Used for the VLM prefix pass: SDPA's fused kernel rounds differently, and after the expert's ten
    Euler steps that shows as 3 float32 ulp of a 40-degree action; in this order the chunk stays
    within 1e-5 of the reference in robot units. The prefix runs once per chunk, so it costs little.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores + mask, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Lq, Lk) -> additive (B, 1, Lq, Lk) mask for `attention`."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: (B, H_kv, L, D) -> (B, H_kv*groups, L, D); query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class SelfAttention(nn.Module):
    """Llama attention projections (no biases). The attention itself is done by the caller, which
    knows what the queries look at (the prefix alone, or the prefix plus the action tokens)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, kv_in: int | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        # kv_in differs from hidden only in the expert's cross-attention layers, whose k/v
        # projections read the VLM's keys/values (kv_heads*head_dim wide) instead of hidden states.
        self.k_proj = nn.Linear(kv_in or hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(kv_in or hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, L, heads*D) -> (B, heads, L, D)."""
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 kv_in: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = SelfAttention(hidden, heads, kv_heads, head_dim, kv_in)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = MLP(hidden, intermediate)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Second half of the block, after attention: output projection, residual, MLP, residual."""
        x = x + self.self_attn.o_proj(attn_out)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """The SmolLM2 decoder layers SmolVLA keeps, plus the token embedding and final norm.

    `norm` is never applied to the prefix (its outputs are not used) but is part of the checkpoint.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.rms_norm_eps)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def prefix_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the prefix embeddings x (B, L, hidden) through the layers.

        Returns per layer the post-RoPE keys and the values, each (B, kv_heads, L, head_dim).
        """
        groups = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        kv = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            k = apply_rope(attn.split_heads(attn.k_proj(h), attn.kv_heads), cos, sin)
            v = attn.split_heads(attn.v_proj(h), attn.kv_heads)
            kv.append((k, v))
            if i == len(self.layers) - 1:
                break  # the last layer's output feeds nothing: only its keys/values are used
            q = apply_rope(attn.split_heads(attn.q_proj(h), attn.heads), cos, sin)
            x = layer.finish(x, reference_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask))
        return kv
