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
        """Noisy actions (B, chunk, max_action_dim) and times (B,) -> action tokens (B, chunk, width)."""
        action_emb = self.action_in_proj(x_t)
        time_emb = time_embedding(t, self.expert_cfg.hidden_size, self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(action_emb.dtype)[:, None, :].expand_as(action_emb)
        fused = self.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=2))
        return self.action_time_mlp_out(F.silu(fused))

    def velocity(self, cache: ExpertCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow v(x_t, t) (B, chunk, max_action_dim), in float32: the denoising step."""
        tokens = self.embed_suffix(x_t.to(self.action_in_proj.weight.dtype), t)
        hidden = self.expert(tokens.to(self.expert.norm.weight.dtype), cache)
        return self.action_out_proj(hidden.to(self.action_out_proj.weight.dtype)).float()

    # -- flow matching --------------------------------------------------------------------------------

    def sample_actions(self, p: Prefix, noise: torch.Tensor | None = None, rtc: RealTimeChunking | None = None
                       ) -> torch.Tensor:
        """Euler integration of the flow from noise (t=1) to actions (t=0), normalised units. With
        `rtc`, each step's velocity is guided so that the chunk continues the previous one (below)."""
        batch = p.state.shape[0]
        if noise is None:
            noise = torch.randn(batch, self.config.chunk_size, self.config.max_action_dim, device=p.state.device)
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
            v = velocity(cache, x, t) if rtc is None else rtc.guided_velocity(lambda x_t: velocity(cache, x_t, t), x, times[k])
            x = x + dt * v
        return x

    def flow_losses(self, p: Prefix, actions: torch.Tensor, noise: torch.Tensor | None = None,
                    time: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element flow-matching loss (B, chunk, max_action_dim) for normalised padded actions."""
        batch = actions.shape[0]
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            time = sample_time(batch, device=actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        target = noise - actions
        cache = self.prefix_cache(p)
        return F.mse_loss(self.velocity(cache, x_t, time), target, reduction="none")

    # -- robot-facing API: batches in robot units -----------------------------------------------------

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any], noise: torch.Tensor | None = None,
                      rtc: RealTimeChunking | None = None) -> torch.Tensor:
        """One action chunk (B, chunk_size, action_dim) in robot units for one observation batch.
        With `rtc`, its prev_chunk_left_over is in robot units too (normalised here)."""
        if rtc is not None:
            left_over = torch.as_tensor(rtc.prev_chunk_left_over, dtype=torch.float32, device=self.device)
            rtc = dataclasses.replace(rtc, prev_chunk_left_over=self.normalizer.normalize(ACTION, left_over))
        actions = self.sample_actions(self.prepare(batch), noise, rtc)[:, :, : self.config.action_dim]
        return self.normalizer.unnormalize(ACTION, actions)

    def loss(self, batch: dict[str, Any], noise: torch.Tensor | None = None,
             time: torch.Tensor | None = None) -> torch.Tensor:
        """Mean flow-matching loss over the real action dims of the chunk steps inside the episode."""
        p = self.prepare(batch)
        actions = torch.as_tensor(batch[ACTION], dtype=torch.float32, device=self.device)
        actions = pad_last(self.normalizer.normalize(ACTION, actions), self.config.max_action_dim)
        losses = self.flow_losses(p, actions, noise, time)[:, :, : self.config.action_dim]
        valid = torch.ones(losses.shape[:2], dtype=torch.bool, device=losses.device)
        if batch.get("action_is_pad") is not None:
            valid = ~torch.as_tensor(batch["action_is_pad"], device=losses.device).bool()
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

    def quantize_int8(self) -> SmolVLA:
        """Real-time CPU mode: int8 dynamic quantisation (int8 weights, activations quantised on the
        fly) of the linear layers of the vision encoder, the connector, the VLM and the action expert.
        The expert is included because at batch 1 its products have only 50 rows, a shape where int8
        GEMM runs about 3x faster than float32 on a CPU. The small float32 projections
        (state, action, time) stay float32. Inference only: a quantised policy cannot be trained or
        saved. bench.py prints the speed-up and the action difference it costs."""
        import warnings

        # torch.ao.quantization is deprecated in favour of torchao, a dependency this project does not
        # take. torch's own int8 products are no replacement on a CPU: measured at the expert's and
        # the VLM's shapes (50x720x2048, 180x960x2560), torch._int_mm with per-row activation scales
        # ran 3-5x slower than fbgemm's dynamic Linear (slower than float32 too), and
        # aten._weight_int8pack_mm 40-130x slower. So this stays while PyTorch ships it.
        from torch.ao.quantization import quantize_dynamic

        if self.device.type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU only")
        with warnings.catch_warnings():  # PyTorch announces the move of this API to torchao
            warnings.simplefilter("ignore")
            for module in (self.vision, self.connector, self.lm, self.expert):
                quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
        self.quantized = True
        return self

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
                        revision: str | None = None, fast: bool = False) -> SmolVLA:
        """Load a LeRobot SmolVLA policy directory or Hub id (e.g. lerobot/smolvla_base).

        vlm: where the VLM config and tokenizer come from (default: config.json's vlm_model_name).
        dtype: float32 computes everything in float32 (the reference's CPU behaviour); bfloat16 or
        float16 keep the checkpoint's float32 tensors in float32 and cast the rest.
        rename: {data key: policy key} for cameras named differently in your data.
        stats: normalisation stats overriding the checkpoint's ({feature: {"mean", "std"}}).
        fast: the real-time CPU mode (see quantize_int8); set config.num_steps for fewer denoising steps.
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
        return model.quantize_int8() if fast else model

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
    """Sinusoidal embedding of flow times t (B,) -> (B, dim): [sin(2*pi*t/period), cos(...)] with periods
    spaced geometrically from min_period to max_period. float64 where the device has it (not MPS)."""
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def sample_time(batch: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Flow-matching times for training: t = Beta(1.5, 1) * 0.999 + 0.001, shape (batch,), float32.

    Beta(1.5, 1) leans towards t = 1 (noisier inputs, the harder part of the flow) as in the paper; the
    0.001 floor keeps t away from 0. Beta(a, 1) has CDF t^a, so t = u^(1/a) for u uniform: one uniform
    draw per sample from `generator` (on its device, else the CPU), so a seeded run is reproducible.
    """
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else "cpu")
    return (u ** (1 / 1.5) * 0.999 + 0.001).to(device if device is not None else u.device)


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
    extra: dict = field(default_factory=dict)

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
            if f.name != "extra":
                value = getattr(self, f.name)
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
