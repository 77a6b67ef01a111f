"""SmolVLA: a flow-matching action head on a truncated SmolVLM (arXiv 2506.01844).

  prefix = [64 image tokens per camera | language tokens | state token]  --VLM layers-->  keys/values
  suffix = [chunk_size action tokens, each the noisy action x_t fused with the flow time t]
  expert(suffix | prefix keys/values) -> velocity v(x_t, t)

Training regresses v onto u = noise - action at x_t = t*noise + (1-t)*action (flow matching).
Sampling starts from noise at t=1 and takes num_steps Euler steps x <- x + dt*v to t=0; the prefix
goes through the VLM once per chunk and only the small expert runs at every step.

The policy, `SmolVLA`, comes first. After it, in marked sections: the normalisation of state and
actions, the configuration (LeRobot's config.json and the VLM's) and the tokenizer. The files a
policy is saved as (LeRobot's layout) are checkpoint.py's; from_pretrained and save_pretrained
build the policy from them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from expert import ActionExpert, ExpertCache, ExpertConfig, expert_intermediate_size
from lm import LMConfig, TextModel, additive_mask, rope_cos_sin
from vision import Connector, VisionConfig, VisionEncoder, preprocess_images

# The policy's input and output features (LeRobot's names); cameras are IMAGE_PREFIX + a name.
STATE = "observation.state"
ACTION = "action"
IMAGE_PREFIX = "observation.images."
DEFAULT_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"


@dataclass
class Prefix:
    """The model inputs of one observation, after preprocessing (all on the model's device)."""

    images: list[torch.Tensor | None]  # per camera (B,3,S,S) in [-1,1]; None where image_embeddings has it
    image_masks: list[torch.Tensor]  # per camera (B,) bool: False for an empty camera slot
    tokens: torch.Tensor  # (B, L) int64
    token_mask: torch.Tensor  # (B, L) bool
    state: torch.Tensor  # (B, max_state_dim) normalised, zero-padded
    # Optional, per camera: the output of `embed_image` for that camera, computed earlier, used
    # instead of running the vision encoder. A frozen encoder's output depends on the image alone,
    # so train.py --cache-vision computes it once per frame and feeds it back at every epoch.
    image_embeddings: list[torch.Tensor | None] | None = None


class SmolVLA(nn.Module):
    """The policy. Reading order: the prefix (embed_prefix, prefix_kv), the suffix and the flow
    (embed_suffix, velocity), flow matching (sample_actions, flow_losses); then the robot-facing API
    in robot units (predict_chunk, loss, prepare), the speed modes and checkpoints."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config: dict, tokenizer: Tokenizer | None = None,
                 stats: Normalizer | None = None):
        super().__init__()
        self.config = cfg
        self.vision_cfg, self.lm_cfg, self.expert_cfg = vlm_configs(vlm_config, cfg)
        self.vision = VisionEncoder(self.vision_cfg)
        self.connector = Connector(self.vision_cfg)
        self.lm = TextModel(self.lm_cfg)
        self.lm_head = nn.Linear(self.lm_cfg.hidden_size, self.lm_cfg.vocab_size, bias=False)  # unused, kept
        self.expert = ActionExpert(self.expert_cfg)
        width = self.expert_cfg.hidden_size
        self.state_proj = nn.Linear(cfg.max_state_dim, self.lm_cfg.hidden_size)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)
        self.tokenizer = tokenizer
        self.normalizer = stats or Normalizer()
        self.rename_map: dict[str, str] = {}  # data key -> policy key (cameras named differently)
        self.quantized = False
        self.fast_mode = "off"  # or the CPU speed mode make_fast applied (FAST_MODES)
        self.compiled_velocity = None  # torch.compile(self.velocity) once compile_denoise() is called
        # The local directory the VLM config and tokenizer were read from (None: the Hub, or unknown).
        self.vlm_dir: Path | None = None

    # -- prefix: images, language, state ------------------------------------------------------------

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B,3,S,S) -> (B, tokens_per_image, lm_hidden): vision encoder + connector."""
        return self.connector(self.vision(pixels.to(self.dtype)))

    def embed_prefix(self, p: Prefix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> embeddings (B, P, hidden), pad mask (B, P) and ar-flags (B, P).

        Image and language embeddings are scaled by sqrt(hidden) as SmolVLM does for its token
        embeddings. Flags: 0 for images and language (one bidirectional block), 1 for the state token.
        """
        scale = math.sqrt(self.lm_cfg.hidden_size)
        embs, pads = [], []
        given = p.image_embeddings or [None] * len(p.images)
        # All cameras go through the vision encoder as one batch: one pass, larger matrix products.
        to_encode = [image for image, cached in zip(p.images, given) if cached is None]
        encoded = iter(self.embed_image(torch.cat(to_encode)).chunk(len(to_encode)) if to_encode else [])
        for present, cached in zip(p.image_masks, given):
            emb = (next(encoded) if cached is None else cached.to(self.dtype)) * scale
            embs.append(emb)
            pads.append(present[:, None].expand(-1, emb.shape[1]))
        embs.append(self.lm.embed_tokens(p.tokens) * scale)
        pads.append(p.token_mask)
        embs.append(self.state_proj(p.state.to(self.state_proj.weight.dtype))[:, None].to(self.dtype))
        batch = p.state.shape[0]
        pads.append(torch.ones(batch, 1, dtype=torch.bool, device=p.state.device))
        emb, pad = torch.cat(embs, dim=1), torch.cat(pads, dim=1)
        flags = torch.zeros_like(pad, dtype=torch.long)
        flags[:, -1] = 1
        if self.config.prefix_length > emb.shape[1]:  # static-length prefix: pad with masked zeros
            extra = self.config.prefix_length - emb.shape[1]
            emb = F.pad(emb, (0, 0, 0, extra))
            pad, flags = F.pad(pad, (0, extra)), F.pad(flags, (0, extra))
        return emb, pad, flags

    def prefix_kv(self, p: Prefix) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Run the prefix through the VLM once -> per-layer keys/values and the prefix pad mask."""
        emb, pad, flags = self.embed_prefix(p)
        positions = torch.cumsum(pad, dim=1) - 1
        rope = rope_cos_sin(positions, self.lm_cfg.head_dim, self.lm_cfg.rope_base)
        mask = additive_mask(attention_allowed(pad, flags), emb.dtype)
        return self.lm.prefix_kv(emb, rope, mask), pad

    def prefix_cache(self, p: Prefix) -> ExpertCache:
        """Everything the expert reads from the prefix, computed once per chunk."""
        return self.expert.prepare(*self.prefix_kv(p), self.config.chunk_size)

    # -- suffix: noisy actions and time ---------------------------------------------------------------

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy actions (B, chunk, max_action_dim) and flow times -> action tokens (B, chunk, width).

        t is (B,), one time for the whole chunk, or (B, chunk), a time per action token: training-time
        real-time chunking gives the committed prefix at time 0 (clean) and the rest at the sampled t.
        """
        if t.shape != x_t.shape[:1] and t.shape != x_t.shape[:2]:
            raise ValueError(f"flow times of shape {tuple(t.shape)} for actions {tuple(x_t.shape)}: "
                             "expected (batch,) or (batch, chunk)")
        action_emb = self.action_in_proj(x_t)
        time_emb = time_embedding(t, self.expert_cfg.hidden_size, self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(action_emb.dtype)
        if t.ndim == 1:  # one time per sample, shared by its action tokens
            time_emb = time_emb[:, None, :].expand_as(action_emb)
        fused = self.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=2))
        return self.action_time_mlp_out(F.silu(fused))

    def velocity(self, cache: ExpertCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow v(x_t, t) (B, chunk, max_action_dim), in float32: the denoising step."""
        tokens = self.embed_suffix(x_t.to(self.action_in_proj.weight.dtype), t)
        hidden = self.expert(tokens.to(self.expert.norm.weight.dtype), cache)
        return self.action_out_proj(hidden.to(self.action_out_proj.weight.dtype)).float()

    # -- flow matching --------------------------------------------------------------------------------

    def sample_actions(self, p: Prefix, noise: torch.Tensor | None = None, rtc: RealTimeChunking | None = None,
                       prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Euler integration of the flow from noise (t=1) to actions (t=0), normalised units. With
        `rtc`, each step's velocity is guided so that the chunk continues the previous one (below).

        With `prefix` (B, d, max_action_dim or action_dim), normalised: training-time real-time
        chunking (arXiv 2512.05964). The first d actions are already committed (the robot executes
        them from the previous chunk while this one is computed), so they are given, not sampled: at
        every step their tokens hold the prefix at flow time 0, as in training (flow_losses with
        per-token times), and the later tokens, which attend to them, integrate as usual. No guidance,
        no extra cost. The chunk returned starts with the prefix. A d above config.rtc_prefix_max
        (the largest the policy was trained with; 0: not trained for it) runs, but outside what the
        policy has seen; d >= chunk_size is an error. d = 0 or None: the plain sampler.
        """
        batch = p.state.shape[0]
        if noise is None:
            noise = torch.randn(batch, self.config.chunk_size, self.config.max_action_dim, device=p.state.device)
        held = self.committed_prefix(prefix, batch, p.state.device)
        committed = held.shape[1]
        cache = self.prefix_cache(p)
        velocity = self.compiled_velocity or self.velocity
        dt = -1.0 / self.config.num_steps
        # t_k = 1 + k*dt in float64, then rounded once to float32 (an accumulated float32 t drifts by
        # ulps, and the time embedding's 4 ms period turns that into visible action differences).
        times = torch.tensor([1.0 + k * dt for k in range(self.config.num_steps)], dtype=torch.float32,
                             device=p.state.device)
        x = noise.float()
        for k in range(self.config.num_steps):
            t = times[k].expand(batch)
            if committed:
                x = torch.cat([held, x[:, committed:]], dim=1)
                t = prefix_times(t, torch.full((batch,), committed, device=t.device), self.config.chunk_size)
            v = velocity(cache, x, t) if rtc is None else rtc.guided_velocity(lambda x_t: velocity(cache, x_t, t), x, times[k])
            x = x + dt * v
        if committed:
            x = torch.cat([held, x[:, committed:]], dim=1)
        return x

    def committed_prefix(self, prefix: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """sample_actions' `prefix` checked and shaped: (batch, d, max_action_dim) float32, d = 0 for None."""
        chunk, width = self.config.chunk_size, self.config.max_action_dim
        if prefix is None:
            return torch.zeros(batch, 0, width, device=device)
        prefix = torch.as_tensor(prefix, dtype=torch.float32, device=device)
        if prefix.ndim == 2:
            prefix = prefix[None]
        if prefix.ndim != 3 or prefix.shape[0] not in (1, batch):
            raise ValueError(f"prefix of shape {tuple(prefix.shape)}: expected (batch={batch}, d, action_dim) or "
                             "(d, action_dim)")
        if prefix.shape[-1] not in (self.config.action_dim, width):
            raise ValueError(f"prefix actions have {prefix.shape[-1]} dims, the policy's have {self.config.action_dim} "
                             f"(or {width} padded)")
        if prefix.shape[1] >= chunk:
            raise ValueError(f"a prefix of {prefix.shape[1]} committed actions leaves nothing to sample in a chunk of "
                             f"{chunk}: give at most {chunk - 1}")
        return pad_last(prefix, width).expand(batch, -1, -1)

    def flow_losses(self, p: Prefix, actions: torch.Tensor, noise: torch.Tensor | None = None,
                    time: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element flow-matching loss (B, chunk, max_action_dim) for normalised padded actions.

        `time` is (B,), or (B, chunk) for a time per action token (prefix_times): a token at time 0 is
        the action itself, given clean, the committed prefix of training-time real-time chunking. Its
        target (noise - action) cannot be inferred from its input, so `loss` leaves such tokens out.
        """
        batch = actions.shape[0]
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            time = sample_time(batch, device=actions.device)
        t = time[:, None, None] if time.ndim == 1 else time[:, :, None]
        x_t = t * noise + (1 - t) * actions
        target = noise - actions
        cache = self.prefix_cache(p)
        return F.mse_loss(self.velocity(cache, x_t, time), target, reduction="none")

    # -- robot-facing API: batches in robot units -----------------------------------------------------

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any], noise: torch.Tensor | None = None,
                      rtc: RealTimeChunking | None = None, prefix_actions: Any = None) -> torch.Tensor:
        """One action chunk (B, chunk_size, action_dim) in robot units for one observation batch.
        With `rtc`, its prev_chunk_left_over is in robot units too (normalised here).

        prefix_actions (B, d, action_dim) or (d, action_dim), robot units: the d actions already
        committed, which the chunk must start with (training-time real-time chunking: see
        sample_actions). The chunk returned holds exactly these values in its first d rows."""
        if rtc is not None:
            left_over = torch.as_tensor(rtc.prev_chunk_left_over, dtype=torch.float32, device=self.device)
            rtc = dataclasses.replace(rtc, prev_chunk_left_over=self.normalizer.normalize(ACTION, left_over))
        given = None
        if prefix_actions is not None:
            given = torch.as_tensor(prefix_actions, dtype=torch.float32, device=self.device)
            if given.shape[-1] != self.config.action_dim:
                raise ValueError(f"prefix_actions have {given.shape[-1]} dims, the policy's actions "
                                 f"{self.config.action_dim} (robot units, unpadded)")
        prefix = self.normalizer.normalize(ACTION, given) if given is not None else None
        actions = self.sample_actions(self.prepare(batch), noise, rtc, prefix)[:, :, : self.config.action_dim]
        actions = self.normalizer.unnormalize(ACTION, actions)
        if given is not None:
            # unnormalize(normalize(a)) gives back a only up to rounding; the committed actions are the
            # caller's own, so they are returned as given
            actions[:, : given.shape[-2]] = given
        return actions

    def loss(self, batch: dict[str, Any], noise: torch.Tensor | None = None,
             time: torch.Tensor | None = None) -> torch.Tensor:
        """Mean flow-matching loss over the real action dims of the chunk steps inside the episode.
        With per-token times (B, chunk), over the tokens at a time above 0 (see flow_losses)."""
        p = self.prepare(batch)
        actions = torch.as_tensor(batch[ACTION], dtype=torch.float32, device=self.device)
        actions = pad_last(self.normalizer.normalize(ACTION, actions), self.config.max_action_dim)
        losses = self.flow_losses(p, actions, noise, time)[:, :, : self.config.action_dim]
        valid = torch.ones(losses.shape[:2], dtype=torch.bool, device=losses.device)
        if batch.get("action_is_pad") is not None:
            valid = ~torch.as_tensor(batch["action_is_pad"], device=losses.device).bool()
        if time is not None and time.ndim == 2:  # the given (clean) prefix is input, not target
            valid = valid & (time.to(losses.device) > 0)
        weights = valid[:, :, None].to(losses.dtype).expand_as(losses)
        return (losses * weights).sum() / weights.sum().clamp(min=1)

    def prepare(self, batch: dict[str, Any]) -> Prefix:
        """A LeRobot-style batch (robot units; images uint8 in 0..255 or float in [0,1]) -> normalised
        model inputs.

        A camera may be given as `batch["image_embeddings"][camera]` (an `encode_images` output)
        instead of its images: it then becomes Prefix.image_embeddings, and the vision encoder skips it.
        """
        batch = {self.rename_map.get(k, k): v for k, v in batch.items()}
        device = self.device
        if STATE not in batch:
            raise KeyError(f"the batch has no {STATE!r} (keys: {sorted(batch)})")
        state = torch.as_tensor(batch[STATE], dtype=torch.float32, device=device)
        if state.ndim == 1:
            state = state[None]
        if state.shape[-1] != self.config.state_dim:
            raise ValueError(f"{STATE} has {state.shape[-1]} dims, the policy expects {self.config.state_dim}")
        state = pad_last(self.normalizer.normalize(STATE, state), self.config.max_state_dim)

        cached = batch.get("image_embeddings", {})  # {policy camera key: embed_image output}
        present = [k for k in self.camera_keys if k in batch or k in cached]
        missing = [k for k in self.camera_keys if k not in present]
        if not present or len(missing) > self.config.empty_cameras:
            given = sorted(k for k in batch if k.startswith(IMAGE_PREFIX))
            raise KeyError(f"camera mismatch: the policy expects {self.camera_keys}, the batch has {given}; "
                           "map names with rename={data_key: policy_key}")
        batch_size = state.shape[0]
        images, embeddings = [], []
        for key in present:
            if key in cached:
                images.append(None)
                embeddings.append(torch.as_tensor(cached[key], device=device))
                continue
            images.append(self.camera_pixels(batch[key], key))
            embeddings.append(None)
        masks = [torch.ones(batch_size, dtype=torch.bool, device=device) for _ in present]
        for _ in missing:  # empty camera slots: a blank image whose tokens are masked out
            width, height = self.config.resize_imgs_with_padding
            images.append(torch.full((batch_size, 3, height, width), -1.0, device=device))
            embeddings.append(None)
            masks.append(torch.zeros(batch_size, dtype=torch.bool, device=device))

        tasks = batch.get("task", "")
        tasks = [tasks] * state.shape[0] if isinstance(tasks, str) else list(tasks)
        if self.tokenizer is None:
            raise RuntimeError("this policy has no tokenizer (build it with from_pretrained or from_vlm)")
        tokens, token_mask = self.tokenizer(tasks, device)
        return Prefix(images, masks, tokens, token_mask, state, embeddings if cached else None)

    @torch.no_grad()
    def encode_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """embed_image outputs per camera for a batch: what `batch["image_embeddings"]` may carry
        instead of the images, so a frozen vision encoder's work can be cached across epochs."""
        batch = {self.rename_map.get(k, k): v for k, v in batch.items()}
        return {key: self.embed_image(self.camera_pixels(batch[key], key))
                for key in self.camera_keys if key in batch}

    def camera_pixels(self, images: Any, key: str = "camera") -> torch.Tensor:
        """A camera's images (B,3,H,W) or (3,H,W), uint8 in 0..255 or float in [0,1] -> the vision
        encoder's input. Anything else is refused: the model would silently see a different image."""
        images = torch.as_tensor(images, device=self.device)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif images.is_floating_point():
            images = images.float()
            low, high = (value.item() for value in torch.aminmax(images))
            if not (-IMAGE_RANGE_SLACK <= low and high <= 1 + IMAGE_RANGE_SLACK):  # also false for NaN
                raise ValueError(f"{key}: float images must be in [0, 1], these range over [{low:.4g}, {high:.4g}] "
                                 "(images in 0..255 should be uint8 or divided by 255)")
        else:
            raise ValueError(f"{key}: images of dtype {str(images.dtype).removeprefix('torch.')} are not "
                             "supported; give uint8 in 0..255 or float in [0, 1]")
        return preprocess_images(images[None] if images.ndim == 3 else images, self.config.resize_imgs_with_padding)

    # -- conveniences used across the project ---------------------------------------------------

    @property
    def camera_keys(self) -> list[str]:
        return self.config.camera_keys

    @property
    def device(self) -> torch.device:
        return self.state_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.embed_tokens.weight.dtype

    def set_stats(self, stats: dict[str, dict[str, Any]], source: str = "given stats") -> None:
        """Use these normalisation stats ({feature: {"mean": ..., "std": ...}}, e.g. dataset.stats)."""
        self.normalizer = Normalizer(stats, [source]).to(self.device)

    # -- speed modes --------------------------------------------------------------------------------

    def make_fast(self, mode: bool | str = True) -> SmolVLA:
        """Put this CPU policy in a fast inference mode, in place: `mode` is one of FAST_MODES, or True
        or "auto" for the one `choose_fast_mode` picks from the CPU's instruction sets (the reasons,
        with the numbers measured, are there and in docs/performance.md). `fast_mode` then names it.

        Every mode fuses the vision encoder's q/k/v projections into one product, computes the
        encoder's GELU and residual sums in place, lays the patch embedding out so its tokens come
        out contiguous, and has malloc keep freed memory (see FusedVisionAttention,
        InPlaceVisionBlock, contiguous_patches, keep_freed_memory); every mode but "fp32" also
        takes the encoder's GELU in its exact erf form, which the tanh form approximates closer than
        bfloat16 or int8 rounding can tell (and PyTorch computes 5x faster); then
        - "int8": int8 dynamic quantisation (int8 weights, activations quantised on the fly) of the
          linear layers of the vision encoder, the connector, the VLM and the action expert;
        - "int8+bf16": the same, with the vision encoder's attention (1024 patches, 13% of the
          chunk's FLOPs) in bfloat16;
        - "bf16": the vision encoder, connector, VLM and expert in bfloat16, as dtype=torch.bfloat16
          loads them (the expert's cross-attention k/v projections stay float32, as in the official
          checkpoints);
        - "fp32": nothing else (the fallback on a CPU without AVX2, where neither pays).
        The small float32 projections (state, action, time) stay float32 in every mode. Each mode is
        held to INT8_FIDELITY_BOUND (tests/test_fast.py; bench.py infer --fast measures it on the full
        model). Inference only: a fast policy cannot be trained or saved, nor made fast twice."""
        import warnings

        # torch.ao.quantization is deprecated in favour of torchao, a dependency this project does not
        # take. torch's own int8 products are no replacement on a CPU: measured at the expert's and
        # the VLM's shapes (50x720x2048, 180x960x2560), torch._int_mm with per-row activation scales
        # ran 3-5x slower than fbgemm's dynamic Linear (slower than float32 too), and
        # aten._weight_int8pack_mm 40-130x slower. So this stays while PyTorch ships it.
        from torch.ao.quantization import quantize_dynamic

        if mode is True or mode == "auto":
            mode = choose_fast_mode()
        if mode not in FAST_MODES:
            raise ValueError(f"unknown fast mode {mode!r}: expected auto or one of {', '.join(FAST_MODES)}")
        if self.device.type != "cpu":
            raise ValueError(f"the fast modes run on the CPU only, not on {self.device.type}")
        if self.fast_mode != "off":
            raise RuntimeError(f"this policy is already in the fast mode {self.fast_mode!r}")
        for i, block in enumerate(self.vision.layers):
            block.self_attn = FusedVisionAttention(block.self_attn)
            if mode == "int8+bf16":
                block.self_attn.attention_dtype = torch.bfloat16
            self.vision.layers[i] = InPlaceVisionBlock(block)
            if mode != "fp32":  # the erf GELU where activations are rounded to bfloat16 or int8 anyway
                self.vision.layers[i].gelu_approximate = "none"
        contiguous_patches(self.vision)
        if mode == "bf16":
            for module in (self.vision, self.connector, self.lm, self.expert):
                module.to(torch.bfloat16)
            for i, layer in enumerate(self.expert.layers):
                if self.expert_cfg.is_cross(i):
                    layer.self_attn.k_proj.float()
                    layer.self_attn.v_proj.float()
        if mode.startswith("int8"):
            with warnings.catch_warnings():  # PyTorch announces the move of this API to torchao
                warnings.simplefilter("ignore")
                for module in (self.vision, self.connector, self.lm, self.expert):
                    quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
        keep_freed_memory()
        self.quantized = True  # the layers are no longer the checkpoint's: no saving, no training
        self.fast_mode = mode
        return self

    def quantize_int8(self) -> SmolVLA:
        """The "int8" fast mode (make_fast("int8")), whatever the CPU."""
        return self.make_fast("int8")

    def compile_denoise(self, mode: str | None = None) -> None:
        """torch.compile the denoising step (suffix embedding + expert + velocity head), the part that
        runs num_steps times per chunk; sample_actions then calls `compiled_velocity`. Shapes are
        static (language padded to tokenizer_max_length), so one compilation serves every chunk; on
        CUDA the default mode also captures CUDA graphs."""
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.compiled_velocity = torch.compile(self.velocity, mode=mode, dynamic=False)

    # -- checkpoints (LeRobot's layout: the files are checkpoint.py's) ------------------------------

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, vlm: str | Path | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                        rename: dict[str, str] | None = None, stats: dict | None = None,
                        revision: str | None = None, fast: bool | str = False) -> SmolVLA:
        """Load a LeRobot SmolVLA policy directory or Hub id (e.g. lerobot/smolvla_base).

        vlm: where the VLM config and tokenizer come from (default: config.json's vlm_model_name).
        dtype: float32 computes everything in float32 (the reference's CPU behaviour); bfloat16 or
        float16 keep the checkpoint's float32 tensors in float32 and cast the rest.
        rename: {data key: policy key} for cameras named differently in your data.
        stats: normalisation stats overriding the checkpoint's ({feature: {"mean", "std"}}).
        fast: a CPU speed mode (make_fast): True or "auto" picks it from the CPU, or name one of
        FAST_MODES; set config.num_steps for fewer denoising steps.
        """
        policy_dir = checkpoint.find_policy(repo_id_or_dir, revision)
        config_path = policy_dir / checkpoint.CONFIG
        try:
            cfg = SmolVLAConfig.from_dict(checkpoint.read_json_object(config_path))
        except (TypeError, ValueError) as err:  # another policy type, a field of the wrong type
            raise ValueError(f"{config_path}: {err}") from err
        try:
            vlm_dir, vlm_config, tokenizer = load_vlm_files(
                vlm or checkpoint.vlm_location(policy_dir, cfg.vlm_model_name), cfg, weights=False)
        except FileNotFoundError as err:
            if vlm is not None:
                raise
            raise FileNotFoundError(f"{err} (the VLM named by vlm_model_name in {config_path}; pass where it "
                                    "is: vlm=<directory or Hub id>, --vlm on the command line)") from err
        weights, stats_buffers = checkpoint.read_weights(policy_dir)

        with torch.device("meta"):  # no memory for weights about to be replaced
            model = cls(cfg, vlm_config, tokenizer)
        shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
        source = str(policy_dir / checkpoint.WEIGHTS)
        model.load_state_dict(checkpoint.from_official(weights, shapes, source, dtype), assign=True)
        found, sources, renames = checkpoint.read_processor_files(policy_dir, stats_buffers)
        model.normalizer = Normalizer(found, sources)
        model.rename_map.update(renames)
        model.vlm_dir = vlm_dir
        if stats is not None:
            model.set_stats(stats)
        model.rename_map.update(rename or {})
        model = model.to(device or default_device()).eval()
        return model.make_fast(fast) if fast else model

    @classmethod
    def from_vlm(cls, vlm: str | Path = DEFAULT_VLM, cfg: SmolVLAConfig | None = None,
                 device: str | torch.device | None = None, stats: dict | None = None) -> SmolVLA:
        """A new policy from the pretrained VLM alone: its vision encoder, connector and first
        num_vlm_layers text layers; the expert and the projections freshly initialised. `cfg` is
        copied (its vlm_model_name set to `vlm`), never changed."""
        cfg = copy.deepcopy(cfg) if cfg is not None else SmolVLAConfig()
        cfg.vlm_model_name = str(vlm)
        vlm_dir, vlm_config, tokenizer = load_vlm_files(vlm, cfg, weights=True)
        model = cls(cfg, vlm_config, tokenizer)
        model.vlm_dir = vlm_dir
        model.init_expert()
        state = model.state_dict()
        for name, tensor in checkpoint.read_vlm_weights(vlm_dir, {n: t.shape for n, t in state.items()}).items():
            state[name].copy_(tensor)
        if stats is not None:
            model.set_stats(stats)
        return model.to(device or default_device())

    def init_expert(self) -> None:
        """Fresh weights for what the VLM does not provide: the expert as a Hugging Face Llama is
        initialised (normal(0, 0.02), unit norms), the projections with PyTorch's Linear default."""
        for module in self.expert.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
            elif hasattr(module, "weight") and module.weight is not None and module.weight.ndim == 1:
                nn.init.ones_(module.weight)
        for proj in (self.state_proj, self.action_in_proj, self.action_out_proj, self.action_time_mlp_in,
                     self.action_time_mlp_out):
            proj.reset_parameters()

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write config.json, model.safetensors (official key names) and the normaliser files; a VLM
        from a local directory has its config and tokenizer copied beside them (checkpoint.save)."""
        if self.quantized:
            raise RuntimeError("an int8-quantised policy cannot be saved; save the float policy instead")
        checkpoint.save(Path(out_dir), self.config.to_dict(), self.state_dict(), stats=self.normalizer.stats,
                        eps=Normalizer.eps, rename_map=self.rename_map, device=str(self.device),
                        vlm_dir=self.vlm_dir)


# What the int8 CPU mode is held to: mean |fast action - exact action| in units of the action std
# (checked on the golden fixture by the tests, measured on the full-size model by bench.py).
INT8_FIDELITY_BOUND = 0.02


# ---------------------------------------------------------------------------------------------
# Speed modes (SmolVLA.make_fast): which one this CPU runs fastest, and the layers they swap in
# ---------------------------------------------------------------------------------------------

# The CPU modes make_fast applies; choose_fast_mode picks one from the CPU's instruction sets.
FAST_MODES = ("int8", "int8+bf16", "bf16", "fp32")


def cpu_flags() -> set[str]:
    """The CPU's instruction-set extensions as Linux names them in /proc/cpuinfo (avx2, avx512f,
    avx512_bf16, avx512_vnni, amx_bf16, ...). Where there is no /proc (macOS, Windows), only what
    PyTorch's own kernel dispatch found: avx2, plus avx512f for its AVX512 kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86; arm64 names its extensions "Features"
                return set(value.split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return {"avx2", "avx512f"} if capability.startswith("AVX512") else {"avx2"} if capability == "AVX2" else set()


def choose_fast_mode(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The fast mode for a CPU with these extensions (default: this one's, cpu_flags) and this
    architecture (platform.machine()). Measured on 2 cores of an AMD EPYC Zen 4 (AVX-512 with BF16
    and VNNI, no AMX): GEMM float32 165-181 GFLOP/s, bfloat16 376-402, int8 dynamic linear ~540;
    at the model's own shapes int8 ran 1.6-1.8x bfloat16 and bfloat16 SDPA was no faster than
    float32 over the encoder's 1024 patches (55 vs 55 ms a layer). Hence:
    - AMX (Sapphire Rapids and later): "bf16". oneDNN runs bfloat16 linears and PyTorch's bfloat16
      attention on the AMX tiles, which fbgemm's int8 does not use. Measured on 2 cores of such a
      Xeon: GEMM bfloat16 1833 GFLOP/s, int8 dynamic linear 773-959, float32 296-300; a chunk in
      0.33-0.34x the exact time in bf16, 0.51 in int8, 0.44 in int8+bf16.
    - AVX2 or AVX-512, with or without VNNI or AVX512-BF16 (Zen 4, Zen 2/3, Ice Lake, Skylake):
      "int8". VNNI's int8 dot products do 2x the work of AVX512-BF16's per instruction, and without
      VNNI fbgemm's AVX2 int8 kernels still run ~2x float32, while bfloat16 has no hardware at all.
    - arm64 (Apple silicon, Graviton): "int8", through PyTorch's qnnpack kernels.
    - anything else (an x86 without AVX2): "fp32", since fbgemm needs AVX2 and bfloat16 would be
      emulated."""
    import platform

    flags = cpu_flags() if flags is None else set(flags)
    machine = (platform.machine() if machine is None else machine).lower()
    if "amx_bf16" in flags:
        return "bf16"
    if "avx2" in flags:
        return "int8"
    if machine in ("arm64", "aarch64") and "qnnpack" in torch.backends.quantized.supported_engines:
        return "int8"
    return "fp32"


class FusedVisionAttention(nn.Module):
    """vision.VisionAttention with its q, k and v projections as one product, for the fast modes:
    2048 patch tokens (two cameras) by a 768x2304 matrix instead of three 768x768 ones, and under
    int8 the activations quantised once instead of three times: 16.4 vs 21.2 ms a layer measured.
    `attention_dtype` (None: the activations') is what SDPA runs in ("int8+bf16")."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.heads = attention.heads
        parts = (attention.q_proj, attention.k_proj, attention.v_proj)
        weight = torch.cat([p.weight.detach() for p in parts])
        self.qkv = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(weight)
            self.qkv.bias.copy_(torch.cat([p.bias.detach() for p in parts]))
        self.out_proj = attention.out_proj
        self.attention_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
        dtype = self.attention_dtype or q.dtype
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))  # every patch sees every patch
        batch, heads, length, dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, heads * dim).to(x.dtype))


class InPlaceVisionBlock(nn.Module):
    """vision.VisionBlock for inference (the fast modes): the same sums, each written into the tensor
    just computed (the attention's and the MLP's outputs, the GELU's input) instead of a new one. The
    values are bit-identical; what goes is a fresh (2, 1024, 3072) or (2, 1024, 768) float32 block per
    operation, whose pages the kernel then faults in: the tanh GELU took 10.8 ms a layer out of place
    and 5.5 ms in place (smolvla_base under int8, 2 cores), 64 ms a chunk. Not for training: autograd
    needs the GELU's input, which this overwrites.

    `gelu_approximate` ("tanh", the checkpoint's) may be set to "none", the exact erf GELU, where the
    activations are rounded more coarsely than the two differ: they differ by 4.7e-4 at most (at
    x = 2.7), under one bfloat16 step for |x| >= 0.125 and far under int8's activation step. PyTorch's
    CPU kernel for the erf form is 5x faster: 1.3 vs 6.3 ms a layer in bfloat16 on an AMX Xeon (2
    cores), 60 ms a chunk."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layer_norm1, self.self_attn = block.layer_norm1, block.self_attn
        self.layer_norm2, self.mlp = block.layer_norm2, block.mlp
        self.gelu_approximate = "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.layer_norm1(x)).add_(x)
        hidden = torch.ops.aten.gelu_(self.mlp.fc1(self.layer_norm2(x)), approximate=self.gelu_approximate)
        return self.mlp.fc2(hidden).add_(x)


def contiguous_patches(vision: VisionEncoder) -> None:
    """Lay the patch embedding's weights out channels-last, so that its output (B, C, H, W) is too:
    the encoder's flatten(2).transpose(1, 2) of it is then a contiguous (B, patches, C) instead of a
    transposed view, whose layout every residual sum kept, so that each of the 25 layer norms copied
    it first (4.4 ms each, 0.12 s a chunk, measured) and each linear read it strided."""
    vision.patch_embedding.to(memory_format=torch.channels_last)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than return it to the system (Linux).
    A chunk allocates about 1.3 GB of activations in blocks up to 25 MB (the vision MLP's): by
    default glibc maps each large block afresh and unmaps it when freed, so every one is page-faulted
    in again, 0.36 ms per MB here (a 100 MB empty+fill: 36 ms, 3.9 ms once memory is kept). On a
    whole chunk the gain was within the noise of the shared 2-core machine it was measured on.
    Process-wide; the peak memory is unchanged, it is only held. Returns whether it applied (False:
    another C library or system)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))

# How far float camera images may stray outside [0, 1] (overshoot of a user's own bicubic or
# antialiased resize) before they are refused as being in another range (0..255, [-1, 1]).
IMAGE_RANGE_SLACK = 0.01


@dataclass(frozen=True)
class RealTimeChunking:
    """Inference-time real-time chunking (Black, Galliker, Levine 2025, arXiv 2506.07339): the new chunk
    is generated as an inpainting of what is left of the previous one, so the two agree where they
    overlap and the seam is smooth. The arguments are LeRobot's (policies/rtc, 0.4.4):

    prev_chunk_left_over  (B, T_prev, A) the previous chunk's actions not yet executed when the
                          observation was taken, aligned with the new chunk's first action (normalised
                          in sample_actions, robot units in predict_chunk); zero-padded to the chunk
    inference_delay       d: actions that will have been executed by the time this chunk arrives
    execution_horizon     where the soft overlap ends (LeRobot's default 10; capped at T_prev)
    max_guidance_weight   beta, the guidance's cap (10.0)
    schedule              the weight of action i: 1 for i < d, then "linear" (default) decaying to 0 at
                          the horizon, "exp" (the same decay bent by w (e^w - 1) / (e - 1)), "ones"
                          (1 up to the horizon) or "zeros" (only the first d)

    At each Euler step, with tau = 1 - t (the paper's time runs the other way), the clean chunk the
    step points at is x1 = x_t - t v; the guidance pulls it toward the left-over actions by their
    weights, v <- v - min(beta, (1 - tau) / tau / r^2) * (weights * (left_over - x1)) back-propagated
    to x_t, with r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2). LeRobot 0.4.4 computes v before x_t is
    made to require gradients, so its back-propagation through x1 = x_t - t v sees v as a constant:
    the correction is the weighted error itself. backprop=False (the default) does exactly that, to
    give LeRobot's chunk; backprop=True takes the paper's vector-Jacobian product through the
    expert (one backward pass per step)."""

    prev_chunk_left_over: torch.Tensor
    inference_delay: int
    execution_horizon: int = 10
    max_guidance_weight: float = 10.0
    schedule: str = "linear"
    backprop: bool = False

    def __post_init__(self):
        if self.schedule not in ("zeros", "ones", "linear", "exp"):
            raise ValueError(f"schedule must be zeros, ones, linear or exp, got {self.schedule!r}")
        if self.inference_delay < 0 or self.execution_horizon < 0:
            raise ValueError("inference_delay and execution_horizon are counts of actions (>= 0)")

    def weights(self, chunk_size: int) -> torch.Tensor:
        """(chunk_size,) how strongly each action of the new chunk is held to the left-over one."""
        horizon = min(self.execution_horizon, self.prev_chunk_left_over.shape[-2])
        delay = min(self.inference_delay, horizon)
        weights = torch.zeros(chunk_size)
        weights[:delay] = 1.0
        if self.schedule == "ones":
            weights[:horizon] = 1.0
        elif self.schedule in ("linear", "exp"):
            soft = max(min(horizon, chunk_size) - delay, 0)
            decay = torch.linspace(1, 0, soft + 2)[1:-1]  # strictly between 1 and 0
            if self.schedule == "exp":
                decay = decay * (torch.expm1(decay) / (math.e - 1))
            weights[delay:delay + soft] = decay
        return weights

    def guidance_weight(self, t: torch.Tensor) -> torch.Tensor:
        """min(beta, (1 - tau) / tau / r^2) at tau = 1 - t, infinities (t = 1 or 0) taken as beta."""
        tau, beta = 1 - t, torch.as_tensor(self.max_guidance_weight)
        inv_r2 = ((1 - tau) ** 2 + tau ** 2) / (1 - tau) ** 2
        weight = torch.nan_to_num(torch.nan_to_num((1 - tau) / tau, posinf=beta) * inv_r2, posinf=beta)
        return torch.minimum(weight, beta)

    def guided_velocity(self, velocity, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """velocity(x_t) corrected toward the left-over chunk; t is this step's scalar time."""
        left = self.prev_chunk_left_over.to(x_t)
        if left.dim() == 2:
            left = left[None]
        target = torch.zeros_like(x_t)  # padded with zeros to the chunk and the padded action width
        target[:, : left.shape[1], : left.shape[2]] = left[:, : x_t.shape[1], : x_t.shape[2]]
        weights = self.weights(x_t.shape[1]).to(x_t)[None, :, None]
        if self.backprop:
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                v = velocity(x)
                x1 = x - t * v
                correction = torch.autograd.grad(x1, x, (target - x1).detach() * weights)[0]
            v = v.detach()
        else:
            v = velocity(x_t)
            correction = (target - (x_t - t * v)) * weights
        return v - self.guidance_weight(t) * correction


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding of flow times t of any shape (B,) or (B, chunk) -> (..., dim):
    [sin(2*pi*t/period), cos(...)] with periods spaced geometrically from min_period to max_period.
    float64 where the device has it (not MPS)."""
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi) * t[..., None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def sample_time(batch: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Flow-matching times for training: t = Beta(1.5, 1) * 0.999 + 0.001, shape (batch,), float32.

    Beta(1.5, 1) leans towards t = 1 (noisier inputs, the harder part of the flow) as in the paper; the
    0.001 floor keeps t away from 0. Beta(a, 1) has CDF t^a, so t = u^(1/a) for u uniform: one uniform
    draw per sample from `generator` (on its device, else the CPU), so a seeded run is reproducible.
    """
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else "cpu")
    return (u ** (1 / 1.5) * 0.999 + 0.001).to(device if device is not None else u.device)


def prefix_times(time: torch.Tensor, prefix_length: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per-token flow times (B, chunk_size) for training-time real-time chunking: 0 (clean, given)
    for the first prefix_length[b] action tokens of sample b, time[b] for the others."""
    in_prefix = torch.arange(chunk_size, device=time.device)[None, :] < prefix_length.to(time.device)[:, None]
    return time[:, None].expand(-1, chunk_size).masked_fill(in_prefix, 0.0)


def attention_allowed(pad_mask: torch.Tensor, ar_flags: torch.Tensor) -> torch.Tensor:
    """The ar-flag rule: token i may attend to non-padding token j iff cumsum(flags)[j] <= cumsum(flags)[i].

    (B, L) pad mask and flags -> (B, L, L) bool. Tokens with flag 0 after a 1 join the same block.
    """
    cum = torch.cumsum(ar_flags, dim=1)
    allowed = cum[:, None, :] <= cum[:, :, None]
    return allowed & pad_mask[:, None, :] & pad_mask[:, :, None]


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension to `size` (state and action are padded to max_state/action_dim)."""
    if x.shape[-1] > size:
        raise ValueError(f"a vector of size {x.shape[-1]} does not fit the model's {size} dimensions")
    return F.pad(x, (0, size - x.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Normalisation of state and actions


class Normalizer(nn.Module):
    """MEAN_STD normalisation of the state and the actions: (x - mean) / (std + 1e-8), and back
    x * std + mean.

    The means and stds are buffers, so they move with the policy's `.to()`; they are not in its
    state dict, since LeRobot keeps them in the processor files (checkpoint.write_processor_files).
    The other statistics a checkpoint or dataset carries (min, max, count; other features) are kept
    as given, to be written back unchanged. Missing stats are an error on use that says where they were looked
    for: the policy never runs unnormalised.
    """

    eps = 1e-8
    FEATURES = {STATE: "state", ACTION: "action"}  # feature -> buffer name prefix

    def __init__(self, stats: dict[str, dict[str, Any]] | None = None, sources: list[str] | None = None):
        super().__init__()
        stats = {feature: {name: torch.as_tensor(value, dtype=torch.float32) for name, value in found.items()}
                 for feature, found in (stats or {}).items()}
        for feature, prefix in self.FEATURES.items():
            found = stats.get(feature, {})
            self.register_buffer(f"{prefix}_mean", found.pop("mean", None), persistent=False)
            self.register_buffer(f"{prefix}_std", found.pop("std", None), persistent=False)
        self.other_stats = {feature: found for feature, found in stats.items() if found}
        self.sources = list(sources or [])  # where stats were looked for, for the error message

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every statistic as {feature: {stat: tensor}} (the means and stds on the policy's device)."""
        out = {feature: dict(found) for feature, found in self.other_stats.items()}
        for feature, prefix in self.FEATURES.items():
            for stat in ("mean", "std"):
                value = getattr(self, f"{prefix}_{stat}")
                if value is not None:
                    out.setdefault(feature, {})[stat] = value
        return out

    def mean_std(self, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.FEATURES.get(feature)
        mean = getattr(self, f"{prefix}_mean") if prefix else None
        std = getattr(self, f"{prefix}_std") if prefix else None
        if mean is None or std is None:
            where = ", ".join(self.sources) or "nowhere (no checkpoint files)"
            raise KeyError(
                f"no normalisation stats (mean, std) for {feature!r}; looked in: {where}. Supply them from "
                "the dataset the policy was trained on: policy.set_stats(dataset.stats) or "
                "SmolVLA.from_pretrained(..., stats=...). Refusing to run unnormalised.")
        return mean, std

    def normalize(self, feature: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean_std(feature)
        return (x - mean) / (std + self.eps)

    def unnormalize(self, feature: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean_std(feature)
        return x * std + mean


# ----------------------------------------------------------------------------------------------
# Configuration: LeRobot's config.json and the VLM's


@dataclass
class SmolVLAConfig:
    """The fields of LeRobot's smolvla config.json that the model uses (defaults: smolvla_base).

    Other keys of a loaded config.json are kept in `extra` and written back unchanged.
    """

    input_features: dict = field(default_factory=lambda: {
        **{f"{IMAGE_PREFIX}camera{i}": {"type": "VISUAL", "shape": [3, 256, 256]} for i in (1, 2, 3)},
        STATE: {"type": "STATE", "shape": [6]},
    })
    output_features: dict = field(default_factory=lambda: {ACTION: {"type": "ACTION", "shape": [6]}})
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize_imgs_with_padding: tuple = (512, 512)  # (width, height)
    empty_cameras: int = 0
    tokenizer_max_length: int = 48
    pad_language_to: str = "max_length"
    num_steps: int = 10
    vlm_model_name: str = DEFAULT_VLM
    attention_mode: str = "cross_attn"
    prefix_length: int = -1
    num_expert_layers: int = -1
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3
    max_period: float = 4.0
    normalization_mapping: dict = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    # How the policy was trained for delayed execution (ours, not LeRobot's: written to config.json
    # only when above 0, since LeRobot refuses keys it does not know). rtc_prefix_max: training-time
    # real-time chunking, the longest committed prefix given (sample_actions' `prefix`; 0: not
    # trained for it). future_state_max_offset: the largest offset, in frames, between the images
    # and the state the chunk was conditioned on (future-state conditioning; 0: the state at capture).
    rtc_prefix_max: int = 0
    future_state_max_offset: int = 0
    extra: dict = field(default_factory=dict)

    # Fields written to config.json only when they differ from 0 (see above).
    OWN_FIELDS = ("rtc_prefix_max", "future_state_max_offset")

    def __post_init__(self):
        for name in self.OWN_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.rtc_prefix_max >= self.chunk_size:
            raise ValueError(f"rtc_prefix_max {self.rtc_prefix_max} must be below chunk_size {self.chunk_size}")

    @classmethod
    def from_dict(cls, raw: dict) -> SmolVLAConfig:
        if raw.get("type", "smolvla") != "smolvla":
            raise ValueError(f"this is the config of a {raw.get('type')!r} policy, not of a smolvla one")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        if "resize_imgs_with_padding" in known and known["resize_imgs_with_padding"] is not None:
            known["resize_imgs_with_padding"] = tuple(known["resize_imgs_with_padding"])
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    def to_dict(self) -> dict:
        out = {"type": "smolvla", **self.extra}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or f.name in self.OWN_FIELDS and value == 0:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, v in self.input_features.items() if v.get("type") == "VISUAL"]

    @property
    def state_dim(self) -> int:
        return int(self.input_features[STATE]["shape"][0])

    @property
    def action_dim(self) -> int:
        return int(self.output_features[ACTION]["shape"][0])


# The fields of HuggingFaceTB/SmolVLM2-500M-Video-Instruct's config.json that the model reads: the
# architecture of lerobot/smolvla_base, for building it without the Hub (benchmarks, tests).
SMOLVLM2_500M_CONFIG = {
    "model_type": "smolvlm", "scale_factor": 4,
    "text_config": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "rms_norm_eps": 1e-5,
                    "vocab_size": 49280},
    "vision_config": {"hidden_size": 768, "image_size": 512, "patch_size": 16, "num_attention_heads": 12},
}

# transformers' SmolVLMVisionConfig defaults: the VLM's config.json omits fields left at these.
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 16, "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-6,
                   "hidden_act": "gelu_pytorch_tanh"}


def vlm_configs(vlm_config: dict, cfg: SmolVLAConfig) -> tuple[VisionConfig, LMConfig, ExpertConfig]:
    """Model sizes from the VLM's config.json and the policy config."""
    vision = {**VISION_DEFAULTS, **vlm_config.get("vision_config", {})}
    if vision["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"VLM vision_config.hidden_act {vision['hidden_act']!r} is not supported (gelu tanh only)")
    text = vlm_config["text_config"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    num_layers = cfg.num_vlm_layers if cfg.num_vlm_layers > 0 else text["num_hidden_layers"]
    if num_layers > text["num_hidden_layers"]:
        raise ValueError(f"num_vlm_layers={num_layers} but the VLM has {text['num_hidden_layers']} layers")
    lm = LMConfig(hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
                  num_layers=num_layers, num_attention_heads=heads,
                  num_key_value_heads=text.get("num_key_value_heads", heads), head_dim=head_dim,
                  rms_norm_eps=text.get("rms_norm_eps", 1e-6), vocab_size=text["vocab_size"])
    vis = VisionConfig(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                       num_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
                       image_size=vision["image_size"], patch_size=vision["patch_size"],
                       layer_norm_eps=vision["layer_norm_eps"], scale_factor=vlm_config.get("scale_factor", 2),
                       text_hidden_size=lm.hidden_size)
    if cfg.num_expert_layers > 0 and cfg.num_expert_layers != num_layers:
        raise ValueError(f"num_expert_layers={cfg.num_expert_layers} differs from num_vlm_layers={num_layers}; "
                         "only one expert layer per VLM layer is supported (use -1 or 0 for the default)")
    expert_hidden = int(lm.hidden_size * cfg.expert_width_multiplier)
    expert = ExpertConfig(hidden_size=expert_hidden, intermediate_size=expert_intermediate_size(expert_hidden),
                          num_layers=num_layers, num_attention_heads=heads,
                          num_key_value_heads=lm.num_key_value_heads, head_dim=head_dim,
                          rms_norm_eps=lm.rms_norm_eps, vlm_kv_width=lm.num_key_value_heads * head_dim,
                          attention_mode=cfg.attention_mode, self_attn_every_n_layers=cfg.self_attn_every_n_layers)
    return vis, lm, expert


# ----------------------------------------------------------------------------------------------
# The tokenizer, and the VLM files a policy reads


class Tokenizer:
    """The VLM's byte-level BPE (`tokenizer.json`), used the way SmolVLA uses it: task + newline, no
    special tokens, truncated and right-padded with `<|im_end|>`."""

    def __init__(self, vlm_dir: Path, max_length: int, pad_to_max_length: bool):
        from tokenizers import Tokenizer as HFTokenizer

        path = vlm_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in the VLM directory {vlm_dir}")
        self.tokenizer = HFTokenizer.from_file(str(path))
        pad_token = "<|im_end|>"
        config_path = vlm_dir / "tokenizer_config.json"
        if config_path.is_file():
            pad_token = checkpoint.read_json_object(config_path).get("pad_token") or pad_token
        pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
        self.pad_id = self.tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in {path}")
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length

    def __call__(self, tasks: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """-> token ids (B, L) int64 and the mask of real tokens (B, L) bool."""
        texts = [t if t.endswith("\n") else t + "\n" for t in tasks]
        ids = [e.ids[: self.max_length] for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        length = self.max_length if self.pad_to_max_length else max(len(i) for i in ids)
        tokens = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for row, seq in enumerate(ids):
            tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return tokens.to(device), mask.to(device)


def load_vlm_files(vlm: str | Path, cfg: SmolVLAConfig, weights: bool) -> tuple[Path, dict, Tokenizer]:
    """The VLM's local directory, config.json and tokenizer (and, when `weights`, its safetensors
    downloaded too) from a directory or Hub id."""
    vlm_dir, vlm_config = checkpoint.read_vlm_files(vlm, weights)
    return vlm_dir, vlm_config, Tokenizer(vlm_dir, cfg.tokenizer_max_length, cfg.pad_language_to == "max_length")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
