"""SmolLM2, the language half of SmolVLM: a Llama decoder truncated to its first N layers.

The idea of this file is `DecoderLayer`, one Llama block: x + attention(norm(x)) with rotary
positions, then x + MLP(norm(x)). Two models are built from it:

- `TextModel`, the VLM's decoder. SmolVLA never decodes text: it runs the prefix (image tokens,
  language tokens, state token) through the layers once per action chunk and keeps each layer's keys
  and values (`prefix_kv`), which is all the action expert reads. The last layer therefore stops
  after its keys/values: its attention output and MLP would feed nothing.
- the action expert (expert.py), a narrower stack of the same layers over the action tokens, whose
  attention reads the VLM's keys/values: appended before its own (`KVCache`), or alone
  (cross-attention, through its own key/value projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor]  # the (cos, sin) tables of `rope_cos_sin`


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


class DecoderLayer(nn.Module):
    """One pre-norm Llama block, the unit of both the VLM and the action expert.

    What the queries attend to is the caller's choice, one of three:
    - nothing given: this layer's own keys/values of x (the VLM over its prefix);
    - `cache`: this layer's own keys/values, written after the prefix's in a `KVCache` (the VLM
      filling its cache, the expert's self-attention layers over [prefix | action tokens]);
    - `cross_kv`: given keys/values (the expert's cross-attention layers: the VLM's prefix keys and
      values, projected by this layer's k/v projections once per chunk).
    `reference_order` selects `reference_attention` (the VLM prefix, for exact parity) over SDPA.
    """

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 kv_in: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim, kv_in)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                reference_order: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cross_kv, reference_order)
        return x + self.mlp(self.post_attention_layernorm(x))


class Attention(nn.Module):
    """Llama attention with grouped-query heads (kv_heads < heads) and no biases.

    kv_in differs from hidden only in the expert's cross-attention layers, whose k/v projections
    read the VLM's keys/values (kv_heads*head_dim wide) instead of hidden states.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, kv_in: int | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(kv_in or hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(kv_in or hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, L, heads*D) -> (B, heads, L, D)."""
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, h: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed hidden states (B, L, hidden) -> rotated keys and values, each (B, kv_heads, L, D)."""
        k = apply_rope(self.split_heads(self.k_proj(h), self.kv_heads), *rope)
        return k, self.split_heads(self.v_proj(h), self.kv_heads)

    def forward(self, h: torch.Tensor, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                reference_order: bool = False) -> torch.Tensor:
        q = apply_rope(self.split_heads(self.q_proj(h), self.heads), *rope)
        if cross_kv is not None:
            k, v = cross_kv
        else:
            k, v = self.keys_values(h, rope)
            if cache is not None:
                k, v = cache.update(k, v)
        out = (reference_attention if reference_order else attention)(q, k, v, mask)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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


class KVCache:
    """The keys and values of one layer in preallocated buffers (B, kv_heads, prefix_len + new_len, D),
    as gpt-fast's static KV cache: the first prefix_len positions are written once (`write_prefix`),
    and each `update` overwrites the rest and returns the whole buffers.

    A `static` cache is marked as a static address for torch.compile: the expert's denoising step
    then reads and writes the same tensors at every step and every chunk, which CUDA-graph capture
    needs.
    """

    def __init__(self, batch: int, kv_heads: int, prefix_len: int, new_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, static: bool = False):
        shape = (batch, kv_heads, prefix_len + new_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.prefix_len = prefix_len
        if static:
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def fits(self, shape: tuple[int, ...], prefix_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can be reused for these sizes (else a new one is allocated)."""
        return (tuple(self.keys.shape) == tuple(shape) and self.prefix_len == prefix_len
                and self.keys.dtype == dtype and self.keys.device == device)

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[:, :, : self.prefix_len] = k
        self.values[:, :, : self.prefix_len] = v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[:, :, self.prefix_len:] = k
        self.values[:, :, self.prefix_len:] = v
        return self.keys, self.values


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

    def prefix_kv(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the prefix embeddings x (B, L, hidden) through the layers.

        Returns per layer the post-RoPE keys and the values, each (B, kv_heads, L, head_dim).
        """
        batch, length, _ = x.shape
        caches = [KVCache(batch, self.cfg.num_key_value_heads, 0, length, self.cfg.head_dim, x.dtype, x.device)
                  for _ in self.layers]
        for layer, cache in zip(self.layers[:-1], caches):
            x = layer(x, rope, mask, cache=cache, reference_order=True)
        last = self.layers[-1]  # its output feeds nothing: only its keys/values are used
        caches[-1].update(*last.self_attn.keys_values(last.input_layernorm(x), rope))
        return [(cache.keys, cache.values) for cache in caches]


# ----------------------------------------------------------------------------------------------
# Rotary positions and attention


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> Rope:
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
    """Multi-head attention of q (B, H, Lq, D) over k, v (B, H_kv, Lk, D) -> (B, Lq, H*D).

    Query head h reads key/value head h // (H / H_kv) (grouped-query attention, done by SDPA without
    copying the keys and values). `mask` is additive (0 where allowed, the dtype's most negative
    finite value where not), so a query that may attend to nothing (a padding token) gets uniform
    weights, as in the reference, instead of NaN. Softmax runs in float32 inside SDPA for
    low-precision inputs.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`attention` in the reference's order of operations (LeRobot's eager SmolVLA attention): scores
    q @ k^T in float32, then scaled by head_dim^-0.5, masked, softmax, cast back, @ v.

    Used for the VLM prefix pass: SDPA's fused kernel rounds differently, and after the expert's ten
    Euler steps that shows as 3 float32 ulp of a 40-degree action; in this order the chunk stays
    within 1e-5 of the reference in robot units. The prefix runs once per chunk, so it costs little.
    The keys/values are repeated to every query head, as the reference does, so that the matrix
    products have the reference's shapes (and so its blocking and rounding).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores + mask, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Lq, Lk) -> additive (B, 1, Lq, Lk) mask for `attention`."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
