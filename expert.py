"""The action expert: a narrower Llama-style decoder over the action tokens.

Expert layer i is a `lm.DecoderLayer` paired with VLM layer i, and reads that layer's prefix
keys/values in one of two ways:
- self-attention layers (i % self_attn_every_n_layers == 0): the action tokens attend to the prefix
  keys/values followed by their own (causal among themselves), held in a `lm.KVCache`;
- cross-attention layers (the others): the action tokens attend only to the prefix, through the
  expert's own k/v projections applied to the VLM's (post-RoPE) keys and values.

Everything derived from the prefix is the same at each of the denoising steps, so `prepare` computes
it once per chunk (the reference recomputes the cross-attention projections at every step): the
projected cross-attention keys/values, the prefix part of each self-attention layer's cache, the
masks and the rotary tables. `forward` is then one denoising step's pass over the action tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lm import DecoderLayer, KVCache, RMSNorm, Rope, additive_mask, rope_cos_sin


@dataclass
class ExpertConfig:
    hidden_size: int = 720  # int(960 * expert_width_multiplier 0.75)
    intermediate_size: int = 2048
    num_layers: int = 16  # one per kept VLM layer
    num_attention_heads: int = 15
    num_key_value_heads: int = 5
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    vlm_kv_width: int = 320  # num_key_value_heads * head_dim of the VLM: input of cross-attention k/v
    attention_mode: str = "cross_attn"
    self_attn_every_n_layers: int = 2
    rope_base: float = 10000.0

    def is_cross(self, layer: int) -> bool:
        if "cross" not in self.attention_mode:
            return False
        n = self.self_attn_every_n_layers
        return not (n > 0 and layer % n == 0)


@dataclass
class ExpertCache:
    """What the expert needs from one prefix, computed once per action chunk."""

    # Per layer: the self-attention layer's KVCache (prefix part filled), or the cross-attention
    # layer's projected prefix keys and values, each (B, kv_heads, P, D).
    kv: list[KVCache | tuple[torch.Tensor, torch.Tensor]]
    self_mask: torch.Tensor  # (B, 1, S, P+S) additive
    cross_mask: torch.Tensor  # (B, 1, S, P) additive
    self_rope: Rope  # positions continue after the valid prefix tokens
    cross_rope: Rope  # positions restart at 0


class ActionExpert(nn.Module):
    def __init__(self, cfg: ExpertConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.rms_norm_eps, kv_in=cfg.vlm_kv_width if cfg.is_cross(i) else None)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The self-attention layers' static caches at inference, reused from chunk to chunk (see
        # `self_attention_cache`); not part of the checkpoint.
        self.static_caches: dict[int, KVCache] = {}

    def forward(self, x: torch.Tensor, cache: ExpertCache) -> torch.Tensor:
        """Action tokens (B, S, hidden) -> final-normed hidden states (B, S, hidden)."""
        for i, (layer, kv) in enumerate(zip(self.layers, cache.kv)):
            if self.cfg.is_cross(i):
                x = layer(x, cache.cross_rope, cache.cross_mask, cross_kv=kv)
            else:
                x = layer(x, cache.self_rope, cache.self_mask, cache=kv)
        return self.norm(x)

    def prepare(self, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_pad_mask: torch.Tensor,
                chunk_size: int) -> ExpertCache:
        """Build the per-chunk cache from the VLM's prefix keys/values (B, kv_heads, P, D) per layer."""
        batch, prefix_len = prefix_pad_mask.shape
        dtype, device = prefix_kv[0][0].dtype, prefix_pad_mask.device
        kv = []
        for i, (layer, (k, v)) in enumerate(zip(self.layers, prefix_kv)):
            attn = layer.self_attn
            if self.cfg.is_cross(i):
                # The expert's k/v projections read the VLM's keys/values flattened over heads.
                # The official checkpoints keep these projections in float32 (the rest is bf16).
                proj_dtype = weight_dtype(attn.k_proj)
                k = attn.k_proj(k.transpose(1, 2).flatten(2).to(proj_dtype)).to(dtype)
                v = attn.v_proj(v.transpose(1, 2).flatten(2).to(proj_dtype)).to(dtype)
                kv.append((attn.split_heads(k, attn.kv_heads), attn.split_heads(v, attn.kv_heads)))
            else:
                layer_cache = self.self_attention_cache(i, batch, prefix_len, chunk_size, dtype, device)
                layer_cache.write_prefix(k, v)
                kv.append(layer_cache)

        # Action token j sees every valid prefix token and the action tokens 0..j.
        prefix_allowed = prefix_pad_mask[:, None, :].expand(batch, chunk_size, prefix_len)
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()
        self_allowed = torch.cat([prefix_allowed, causal.expand(batch, -1, -1)], dim=2)

        steps = torch.arange(chunk_size, device=device)[None, :]
        num_valid = prefix_pad_mask.sum(dim=1, keepdim=True)
        rope = lambda pos: rope_cos_sin(pos.expand(batch, -1), self.cfg.head_dim, self.cfg.rope_base)  # noqa: E731
        return ExpertCache(kv=kv, self_mask=additive_mask(self_allowed, dtype),
                           cross_mask=additive_mask(prefix_allowed, dtype),
                           self_rope=rope(num_valid + steps), cross_rope=rope(steps))

    def self_attention_cache(self, layer: int, batch: int, prefix_len: int, chunk_size: int, dtype: torch.dtype,
                             device: torch.device) -> KVCache:
        """The [prefix | actions] key/value cache of a self-attention layer.

        At inference (no autograd) it is kept in `static_caches` and reallocated only when the sizes
        change: a compiled denoising step writes into the same tensors at every chunk, which CUDA-graph
        capture needs. So a policy serves one chunk at a time. With autograd on (training) it is a
        fresh cache, since the step's graph keeps its tensors.
        """
        sizes = (batch, self.cfg.num_key_value_heads, prefix_len, chunk_size, self.cfg.head_dim, dtype, device)
        if torch.is_grad_enabled():
            return KVCache(*sizes)
        shape = (batch, self.cfg.num_key_value_heads, prefix_len + chunk_size, self.cfg.head_dim)
        cache = self.static_caches.get(layer)
        if cache is None or not cache.fits(shape, prefix_len, dtype, device):
            cache = self.static_caches[layer] = KVCache(*sizes, static=True)
        return cache


def weight_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes its input in (float32 for an int8 dynamically quantised one,
    whose `weight` is a method)."""
    weight = linear.weight
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def expert_intermediate_size(hidden: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """MLP width of the expert: 2/3 of 4x hidden, rounded up to a multiple of 256 (720 -> 2048)."""
    size = int(multiplier * int(2 * hidden / 3))
    return multiple_of * ((size + multiple_of - 1) // multiple_of)
