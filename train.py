"""Fine-tune SmolVLA on a LeRobot dataset: resumable, multi-GPU (torchrun), with an offline demo.

    python train.py                                          # offline demo: pick-and-place in MuJoCo (demo.py)
    python train.py --data lerobot/svla_so100_pickplace      # fine-tune lerobot/smolvla_base
    python train.py --data DATA --from-vlm HuggingFaceTB/SmolVLM2-500M-Video-Instruct   # new policy
    python train.py --output-dir outputs/train --resume      # continue from checkpoints/last
    torchrun --nproc_per_node=4 train.py --data DATA         # DistributedDataParallel, batch per GPU
    python train.py --data DATA --rtc-prefix-max 5 --future-state-max-offset 5   # for delayed execution

One training step: a batch of frames (camera images, state, the next chunk_size actions, the task
string) -> flow-matching loss -> backward through the action expert and projections (vision encoder
and VLM frozen) -> clip -> AdamW -> learning-rate schedule (LeRobot's: linear warm-up, then cosine,
both fitted to --steps when it is shorter than --decay-steps).

Layout under --output-dir:
    checkpoints/<step:06d>/pretrained_model/   the policy (flow.SmolVLA.save_pretrained: LeRobot layout)
    checkpoints/<step:06d>/training_state.pt   optimizer, scheduler, step, RNG states, sampler position
    checkpoints/last -> <step:06d>             symlink to the newest complete checkpoint
    metrics.jsonl, loss.png                    one JSON line per log interval / validation; the curves
    vision_cache/                              --cache-vision: frozen image embeddings (vision_cache.py)
    (demo only) dataset/, vlm/, eval.*         the demo's recording, tiny VLM and verdict (demo.py)
"""
# The file reads top down: the configuration, the training loop, one step, a run's set-up, resume
# (what --output-dir already holds), then the parts they use: checkpoints, progress, the policy for a
# dataset, the schedule, the data, distributed set-up, and last the command line, where a run's
# settings are made once (parse_args; resumed_settings when resuming): nothing changes them after.

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import cli
import data
import demo
import flow
import policy_io
import vision_cache
from flow import ACTION, IMAGE_PREFIX, STATE, SmolVLA, SmolVLAConfig

# ----------------------------------------------------------------------------------------------
# Configuration. The flags (build_parser, at the end) default to SmolVLA's fine-tuning recipe; the
# offline demo (no --data) has its own recipe, demo.DEFAULTS.

DEFAULT_POLICY = "lerobot/smolvla_base"

# The action expert's attention (SmolVLA config fields): every other layer self-attention (the
# paper's choice), or one kind throughout.
EXPERT_ATTENTION = {
    "interleaved": {"attention_mode": "cross_attn", "self_attn_every_n_layers": 2},
    "cross": {"attention_mode": "cross_attn", "self_attn_every_n_layers": 0},
    "self": {"attention_mode": "self_attn", "self_attn_every_n_layers": 0},
}

# Training for delayed execution: flags that are SmolVLA config fields of the same names, saved in
# config.json so that inference knows what the policy expects (--rtc-prefix-max, --future-state-max-offset).
DELAY_TRAINING = ("rtc_prefix_max", "future_state_max_offset")


class TrainError(cli.UserError):
    """A problem with the user's input or environment, reported as one message (no traceback)."""


# ----------------------------------------------------------------------------------------------
# The training loop


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) the run `args` asks for (parse_args's); returns a summary (steps, final loss,
    checkpoint path, ...)."""
    rank, world_size, device = setup_device(args.device)
    try:
        start = resume_or_start(args)
        if start.done:
            return nothing_to_do(Path(args.output_dir), start.step, rank, start.done)
        return train_loop(start_run(start, rank, world_size, device))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(run: Run) -> dict:
    """Step until --steps (or Ctrl-C), logging every step, validating every --eval-every steps and
    saving a checkpoint every --save-every steps and at the end."""
    args, policy, step = run.args, run.policy, run.step
    last_saved, last_result, stopped = (step if run.resumed else None), None, False
    batches = iter(run.loader)
    start = time.perf_counter()
    with StopRequest() as stop:
        while step < args.steps:
            if stop.agreed():  # Ctrl-C on any rank: every rank stops here and saves
                stopped = True
                break
            batch, noise, flow_time = step_inputs(policy, next(batches), args.seed, 0, step, run.rank, run.device)
            result = train_step(policy, run.optimizer, run.scheduler, batch, noise, flow_time, args.grad_clip, run.model)
            if not (math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"])):
                raise run.not_finite(step + 1, result)  # the update was not applied; nothing is saved
            step += 1
            last_result = result
            run.progress.step(step, result)
            if run.val_batches is not None and (step % args.eval_every == 0 or step == args.steps):
                run.validate(step)
            if step % args.save_every == 0 or step == args.steps:
                with stop.saving():
                    run.save(step)
                last_saved = step
        if stopped and last_saved != step and step > 0:
            with stop.saving():
                run.save(step)
    return run.finish(step, stopped, time.perf_counter() - start, last_result)


# ----------------------------------------------------------------------------------------------
# One step


class FlowLoss(nn.Module):
    """policy.loss as forward(), so DistributedDataParallel can hook the backward pass."""

    def __init__(self, policy: SmolVLA):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, Any], noise: torch.Tensor | None, time: torch.Tensor | None) -> torch.Tensor:
        return self.policy.loss(batch, noise, time)


def step_generator(seed: int, stream: int, step: int, rank: int, *purpose: int) -> torch.Generator:
    """A generator seeded by (seed, stream, step, rank), so a resumed run draws exactly what an
    uninterrupted one would and validation is repeatable; `purpose` keeps independent draws apart."""
    state = np.random.SeedSequence([seed, stream, step, rank, *purpose]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def flow_noise_and_time(seed: int, stream: int, step: int, rank: int, batch_size: int, policy: SmolVLA,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching noise and times of one batch, from step_generator. The times are the model's
    training distribution (flow.sample_time), drawn after the noise: (batch,).

    With training-time real-time chunking (config.rtc_prefix_max D > 0) the times are per action token,
    (batch, chunk): each sample's first d tokens are given clean, at time 0 (flow.prefix_times), so the
    policy learns to continue a committed prefix of up to D actions. Half the samples get no prefix
    (d = 0) and the others d ~ U{1..D}: the loss leaves the prefix out, so with d ~ U{0..D} token k would
    be trained only when d <= k, the first one on 1/(D+1) of the samples, and the first actions are the
    ones a policy executes right after each chunk lands and with no queue (at start, --sync). The demo's
    policy so trained (D = 9) succeeded in 4 of 20 scenes (--rtc, the policy's own latency), against 13
    of 20 with half the samples free of a prefix. d is drawn after the rest, so the noise and times are
    those of a run without it."""
    generator = step_generator(seed, stream, step, rank)
    noise = torch.randn(batch_size, policy.config.chunk_size, policy.config.max_action_dim, generator=generator)
    time = flow.sample_time(batch_size, generator, device)
    if policy.config.rtc_prefix_max:
        prefix_length = torch.randint(1, policy.config.rtc_prefix_max + 1, (batch_size,), generator=generator)
        prefix_length *= torch.rand(batch_size, generator=generator) < PREFIX_SHARE
        time = flow.prefix_times(time, prefix_length, policy.config.chunk_size)
    return noise.to(device), time


PREFIX_SHARE = 0.5  # training-time RTC: the share of samples given a committed prefix (flow_noise_and_time)


def state_offsets(seed: int, stream: int, step: int, rank: int, batch_size: int, max_offset: int) -> torch.Tensor:
    """Future-state conditioning's offsets of one batch, (batch,) int64 uniform in 0..max_offset, from
    a step_generator of their own (the flow's draws stay as they are)."""
    generator = step_generator(seed, stream, step, rank, 1)
    return torch.randint(0, max_offset + 1, (batch_size,), generator=generator)


def at_state_offsets(batch: dict[str, Any], offsets: torch.Tensor, chunk_size: int) -> dict[str, Any]:
    """Future-state conditioning (VLASH, arXiv 2512.01031): sample b keeps the images of its frame i but
    is given the state the arm will be in at frame i + o (o = offsets[b]), and its targets become the
    actions from that frame on. The policy so learns to plan from where the arm will be when its chunk
    starts executing, not from the stale state at capture.

    That future state is estimated as the control loop can at capture (infer_async.RobotClient): the
    measured state of frame i plus the motion planned from then to frame i + o, action i + o - 1 minus
    action i (the actions are goal positions in the state's units). Trained on the true state of frame
    i + o, the policy met at inference a commanded pose instead, which differs most at the gripper
    (commanded shut past the object it closes on: 0.4 std apart on the demo's data, the joints 0.1); fed
    the commanded pose itself, in training and at inference, it lost the measured feedback (a gripper
    blocked by the cube) and repeated its own plan. Both failed nearly every scene; this estimate
    succeeds more often, still below a plain policy's (docs/experiments.md, section 8). At o = 0 and 1 the
    state is frame i's measured one. An offset past the episode's last frame is cut back to it. Needs
    the dataset's windows (LeRobotDataset future_state_max_offset) and actions that are goal positions
    of the state (check_state_like_actions)."""
    if "action_window" not in batch:
        raise TrainError("future-state conditioning needs batches with an action window: build the dataset "
                         "with LeRobotDataset(..., future_state_max_offset=D)")
    max_offset = batch["action_window"].shape[1] - chunk_size
    if int(offsets.max()) > max_offset:
        raise TrainError(f"a state offset of {int(offsets.max())} frames does not fit the dataset's window "
                         f"(future_state_max_offset {max_offset})")
    last_real = (~batch["action_window_is_pad"]).sum(dim=1) - 1  # frames i..i+last_real are the episode's
    offsets = torch.minimum(offsets.to(last_real.device), last_real)
    rows = torch.arange(len(offsets))
    steps = offsets[:, None] + torch.arange(chunk_size)
    planned = batch["action_window"][rows, (offsets - 1).clamp(min=0)] - batch["action_window"][:, 0]
    shifted = {k: v for k, v in batch.items() if k not in data.WINDOW_KEYS}
    shifted[STATE] = batch[STATE] + planned
    shifted[ACTION] = batch["action_window"][rows[:, None], steps]
    shifted["action_is_pad"] = batch["action_window_is_pad"][rows[:, None], steps]
    return shifted


def step_inputs(policy: SmolVLA, batch: dict[str, Any], seed: int, stream: int, step: int, rank: int,
                device: torch.device) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """What one step (or one validation batch) trains on: the batch, moved to its drawn state offsets
    when the policy is trained with future-state conditioning, and its flow noise and times. Every
    draw comes from step_generator: the same seed, stream, step and rank draw the same."""
    size = len(batch["task"])
    noise, time = flow_noise_and_time(seed, stream, step, rank, size, policy, device)
    max_offset = policy.config.future_state_max_offset
    if max_offset:
        batch = at_state_offsets(batch, state_offsets(seed, stream, step, rank, size, max_offset),
                                 policy.config.chunk_size)
    return batch, noise, time


def train_step(policy: SmolVLA, optimizer: torch.optim.Optimizer, scheduler, batch: dict[str, Any],
               noise: torch.Tensor | None = None, time: torch.Tensor | None = None, grad_clip: float = 10.0,
               model: nn.Module | None = None) -> dict[str, float]:
    """One optimisation step -> {"loss", "grad_norm", "lr"}. `model` is the DDP-wrapped FlowLoss when
    distributed; the loss reported is then the mean over ranks. bf16 autocast on CUDA, float32 elsewhere.
    A non-finite loss or gradient skips the update (the caller stops): the weights stay the last good ones."""
    device = policy.device
    model = model or FlowLoss(policy)
    lr = scheduler.get_last_lr()[0]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(batch, noise, time)
    loss.backward()
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip)
    report = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(report)
        report /= dist.get_world_size()  # the mean loss; the norm is the same on every rank
    loss_value, norm_value = report.tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
        scheduler.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_value, "grad_norm": norm_value, "lr": lr}


@torch.no_grad()
def validation_loss(policy: SmolVLA, batches: list[dict[str, Any]] | torch.utils.data.DataLoader, seed: int) -> float:
    """Mean loss over the fixed validation batches with fixed draws (noise, times, state offsets), so
    that it is comparable across steps."""
    device = policy.device
    total, count = 0.0, 0
    for j, batch in enumerate(batches):
        size = len(batch["task"])
        batch, noise, time = step_inputs(policy, batch, seed, 1, j, 0, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += policy.loss(batch, noise, time).item() * size
        count += size
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# A run: setting it up (new or resumed), and what the loop does besides stepping


@dataclass
class Run:
    """What the loop works with, made by start_run: the policy and its optimiser, the data, where the
    run writes; and the loop's other duties: validate, save, stop on a non-finite loss, report."""

    args: argparse.Namespace  # the run's settings (parse_args, or resume_or_start when resuming)
    policy: SmolVLA
    model: nn.Module  # FlowLoss(policy), wrapped in DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: torch.utils.data.DataLoader
    val_batches: torch.utils.data.DataLoader | None  # on rank 0, with --val-episodes
    progress: Progress
    fps: float  # the dataset's: saved beside the policy, the rate to run it at
    rank: int
    world_size: int
    device: torch.device
    step: int = 0  # steps done: the checkpoint's when resuming
    resumed: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def validate(self, step: int) -> None:
        value = validation_loss(self.policy, self.val_batches, self.args.seed)
        self.progress.write({"step": step, "val_loss": value})
        self.progress.say(f"step {step}: validation loss {value:.4f}")

    def save(self, step: int) -> Path | None:
        """Rank 0 saves; every rank learns whether that failed (then all stop)."""
        failure, path = None, None
        if self.rank == 0:
            state = {"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng_states(), "world_size": self.world_size, "samples_per_rank": step * self.args.batch_size,
                     "args": saved_args(self.args), "format": 1}
            try:
                path = save_checkpoint(self.output_dir, step, self.policy, state,
                                       {"dataset": self.args.data, "revision": self.args.revision, "fps": self.fps})
                plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")
                self.progress.say(f"saved {path}")
            except TrainError as err:
                failure = err
        if self.world_size > 1:
            flag = torch.tensor([1.0 if failure else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag)
            if flag.item() and failure is None:
                raise TrainError("rank 0 could not save a checkpoint; stopping")
        if failure:
            raise failure
        return path

    def not_finite(self, step: int, result: dict) -> TrainError:
        kept = self.output_dir / "checkpoints" / "last"
        where = f"the last good checkpoint is {kept.resolve()}" if kept.exists() else "no checkpoint was saved"
        return TrainError(f"the loss is not finite at step {step} (loss {result['loss']}, grad norm "
                          f"{result['grad_norm']}); stopping without saving it: {where}")

    def finish(self, step: int, stopped: bool, seconds: float, last_result: dict | None) -> dict:
        """The summary; the demo's closed-loop evaluation; the last line, naming the outputs."""
        args, output_dir = self.args, self.output_dir
        last = output_dir / "checkpoints" / "last"
        summary = {"step": step, "stopped": stopped, "seconds": seconds,
                   "loss": last_result["loss"] if last_result else None,
                   "checkpoint": str(last.resolve()) if last.exists() else None}
        if args.demo and self.rank == 0 and not stopped and args.demo_eval_episodes > 0:
            summary["eval"] = demo.evaluate(self.policy, output_dir, args.demo_eval_episodes, self.fps)
        outputs = run_outputs(output_dir) if last.exists() else "no checkpoint was saved"
        log(self.rank, f"{'stopped' if stopped else 'done'} at step {step} in {duration(seconds)}: {outputs}")
        return summary


def start_run(start: RunStart, rank: int, world_size: int, device: torch.device) -> Run:
    """Everything the loop needs: the demo's dataset and VLM (recorded the first time), the datasets, the
    policy (built, or the checkpoint's), the optimiser and schedule (restored when resuming), the data
    loaders and the metrics log (cut back to the checkpoint's step)."""
    args, resume_state = start.args, start.state
    if args.cache_vision and (args.train_vision or args.train_vlm):
        raise TrainError("--cache-vision needs a frozen vision encoder and connector: drop --train-vision/--train-vlm")
    output_dir = Path(args.output_dir)
    if args.demo:
        if rank == 0:  # the others wait for the recording
            demo.ensure(output_dir, args.demo_episodes)
        barrier()
        log(rank, f"demo: training a tiny SmolVLA on {args.data} (pass --data to train on your dataset)")
    whole = data.LeRobotDataset(args.data, revision=args.revision)  # its metadata: cameras, dims, stats, fps
    train_eps, val_eps = split_episodes(args.val_episodes, whole.episodes)
    if resume_state is None:
        policy = build_policy(args, whole, device)
    else:
        policy = SmolVLA.from_pretrained(start.checkpoint / "pretrained_model", vlm=args.vlm, device=device)
        log(rank, f"resuming from {start.checkpoint} (step {resume_state['step']})")
        for key in DELAY_TRAINING:  # the checkpoint's config.json says what the run trains for
            if key in args.explicit and getattr(args, key) != getattr(policy.config, key):
                raise TrainError(f"--{key.replace('_', '-')} {getattr(args, key)}: the run being resumed trains with "
                                 f"{key} {getattr(policy.config, key)} (its config.json), and a resumed run keeps it; "
                                 "start a new run (another --output-dir, --policy the checkpoint) to change it")
    trained = set(set_trainable(policy, args.train_vision, args.train_vlm))
    chunk, max_offset = policy.config.chunk_size, policy.config.future_state_max_offset
    train_set = data.LeRobotDataset(whole.root, chunk_size=chunk, episodes=train_eps, future_state_max_offset=max_offset)
    val_set = (data.LeRobotDataset(whole.root, chunk_size=chunk, episodes=val_eps, future_state_max_offset=max_offset)
               if val_eps else None)
    log(rank, f"data: {len(train_set)} training frames ({len(train_eps)} episodes), "
              f"{len(val_set) if val_set else 0} validation frames ({len(val_eps)} episodes); "
              f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters, "
              f"{sum(p.numel() for n, p in policy.named_parameters() if n in trained) / 1e6:.2f} M trained; "
              f"device {device}, {world_size} process(es)")
    if args.preload:
        train_set = data.PreloadedDataset(train_set, "training", rank == 0, args.num_workers)
        val_set = data.PreloadedDataset(val_set, "validation", rank == 0, args.num_workers) if val_set is not None else None
    if args.cache_vision:
        cache_root = Path(args.cache_dir) if args.cache_dir else output_dir / "vision_cache"
        cache = vision_cache.build(policy, data.LeRobotDataset(whole.root, chunk_size=chunk), cache_root,
                                   args.batch_size, args.num_workers, rank, world_size)
        train_set = vision_cache.CachedVisionDataset(train_set, cache)
        val_set = vision_cache.CachedVisionDataset(val_set, cache) if val_set is not None else None

    optimizer = make_optimizer(policy, args)
    scheduler = make_scheduler(optimizer, args)
    step = 0
    if resume_state is not None:
        step = restore_training_state(resume_state, optimizer, scheduler, rank, world_size)
    model: nn.Module = FlowLoss(policy)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=args.train_vlm)
    sampler = ResumableSampler(len(train_set), args.seed, rank, world_size, start=step * args.batch_size)
    # From memory an item costs next to nothing: worker processes would only add hand-off costs.
    loader_workers = 0 if args.preload else args.num_workers
    loader = make_loader(train_set, args.batch_size, sampler, loader_workers, device.type == "cuda")
    val_batches = None
    if val_set is not None and rank == 0:  # rank 0 validates
        val_batches = validation_batches(val_set, args.val_samples, args.batch_size, loader_workers)
    metrics_path = output_dir / "metrics.jsonl"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, step)
    progress = Progress(metrics_path, args.steps, args.batch_size * world_size, args.log_every, rank == 0)
    return Run(args=args, policy=policy, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
               val_batches=val_batches, progress=progress, fps=whole.fps, rank=rank, world_size=world_size,
               device=device, step=step, resumed=resume_state is not None)


def restore_training_state(state: dict, optimizer: torch.optim.Optimizer, scheduler, rank: int,
                           world_size: int) -> int:
    """The optimiser, schedule and random number generators as they were at the checkpoint; its step."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    if state["world_size"] != world_size:
        log(rank, f"warning: the run used {state['world_size']} process(es), now {world_size}: "
                  "the data order changes from here")
    return int(state["step"])

# ----------------------------------------------------------------------------------------------
# Resume: what --output-dir already holds decides what a command does. A run is never overwritten.
# --resume continues it with its saved arguments (the flags given now on top); without --resume, a
# finished run asked for again with the same flags trains nothing and says where its results are
# (the demo's `python train.py` run twice), and anything else is an error saying what to do instead.

# What --resume takes from the command line (or its default) rather than from the saved arguments;
# a checkpoint does not save these, and asking for a finished run again does not compare them.
RUN_ONLY = {"resume", "output_dir", "device", "num_workers", "preload", "demo_eval_episodes"}


@dataclass
class RunStart:
    """Where a command starts, by what --output-dir holds: a new run, a resumed one, or nothing to do."""

    args: argparse.Namespace  # the run's settings: when resuming, its saved arguments with the flags given on top
    checkpoint: Path | None = None  # resuming from this checkpoint ...
    state: dict | None = None  # ... and its training_state.pt
    step: int = 0  # the steps the run has done
    done: str | None = None  # nothing to train: says which finished run, for the message naming its outputs


def resume_or_start(args: argparse.Namespace) -> RunStart:
    """The run that `args` (parse_args's) asks for, given what --output-dir holds. Raises a TrainError
    for a run that cannot start: --resume without a checkpoint, or with fewer --steps than done; or,
    without --resume, a run already there that is unfinished, stopped, or asked for with other flags."""
    output_dir = Path(args.output_dir)
    if args.resume:
        checkpoint = last_checkpoint(output_dir)
        state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
        resumed, step = resumed_settings(args, state["args"]), int(state["step"])
        if resumed.steps < step:
            raise TrainError(f"--steps {resumed.steps}: the run in {resumed.output_dir} is already at step "
                             f"{step}; pass a larger --steps to train it further")
        done = None
        if resumed.steps == step:
            done = (f"{output_dir} holds a finished run ({step} of {step} steps; pass a larger --steps to train "
                    "it further)")
        return RunStart(resumed, checkpoint, state, step, done)
    if not (output_dir / "checkpoints").exists():
        return RunStart(args)  # a new run
    last = output_dir / "checkpoints" / "last"
    if not last.exists():
        raise TrainError(f"{output_dir} holds an unfinished training run without a checkpoint: delete "
                         f"{output_dir / 'checkpoints'} or choose another --output-dir")
    # mmap: the step and arguments are read without loading the optimizer state (GBs at full size)
    state = torch.load(last / "training_state.pt", map_location="cpu", weights_only=True, mmap=True)
    step, saved = int(state["step"]), state["args"]
    if step < saved["steps"]:
        raise TrainError(f"{output_dir} holds a training run stopped at step {step} of {saved['steps']}: pass "
                         "--resume to continue it, or choose another --output-dir")
    different = [k for k in args.explicit if k not in RUN_ONLY and k in saved and getattr(args, k) != saved[k]
                 and not (k == "betas" and tuple(saved[k]) == tuple(args.betas))]
    where = f"{output_dir} holds a finished run ({step} of {saved['steps']} steps)"
    if different:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})" for k in different)
        raise TrainError(f"{where}: {run_outputs(output_dir)}. The flags given ask for another run ({flags}): choose "
                         f"another --output-dir, or to train this run for longer pass --resume --steps N with N > {step}")
    return RunStart(args, step=step, done=where)


def resumed_settings(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    """A resumed run's settings: the recipe of its kind (the demo's or the fine-tuning one: what the
    run was, not what this command line says), its saved arguments, the flags given now, and the
    directory it was found in. Warns where a flag given changes the curve an uninterrupted run draws."""
    given = {k: getattr(args, k) for k in args.explicit} | {"output_dir": args.output_dir}
    resumed = run_settings(bool(saved.get("demo", False)), given, args.explicit, saved)
    for key in ("batch_size", "seed", "lr", "betas", "warmup_steps", "decay_steps", "decay_lr"):
        if key in args.explicit and saved.get(key) != getattr(resumed, key):
            print(f"warning: --{key.replace('_', '-')} {getattr(resumed, key)} differs from the run's {saved.get(key)}: "
                  "the curve will not match an uninterrupted run", flush=True)
    before = fitted_schedule(saved["steps"], saved["warmup_steps"], saved["decay_steps"])
    after = fitted_schedule(resumed.steps, resumed.warmup_steps, resumed.decay_steps)
    if "steps" in args.explicit and before != after:
        print(f"warning: --steps {resumed.steps} (the run's: {saved['steps']}) refits the learning-rate schedule "
              f"(warm-up {before[0]} -> {after[0]}, decay {before[1]} -> {after[1]} steps): the learning rate jumps "
              "here and the curve will not match an uninterrupted run", flush=True)
    return resumed


def saved_args(args: argparse.Namespace) -> dict:
    """The run's settings as a checkpoint keeps them (what --resume restores)."""
    return {k: v for k, v in vars(args).items() if k not in RUN_ONLY | {"explicit"}}


def run_outputs(output_dir: Path) -> str:
    """Where a run's results are, for the messages that end or refuse a run."""
    return (f"policy {output_dir / 'checkpoints' / 'last' / 'pretrained_model'}, loss plot {output_dir / 'loss.png'}, "
            f"metrics {output_dir / 'metrics.jsonl'}")


def nothing_to_do(output_dir: Path, step: int, rank: int, where: str) -> dict:
    """A finished run asked for again: nothing is trained or overwritten; the message says where it is."""
    log(rank, f"nothing to do: {where}: {run_outputs(output_dir)}")
    return {"step": step, "stopped": False, "seconds": 0.0, "loss": None, "complete": True,
            "checkpoint": str((output_dir / "checkpoints" / "last").resolve())}

# ----------------------------------------------------------------------------------------------
# Checkpoints


def rng_states() -> dict:
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [state[0], torch.from_numpy(state[1].copy()), int(state[2]), int(state[3]), float(state[4])],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))


def save_checkpoint(output_dir: Path, step: int, policy: SmolVLA, training_state: dict,
                    dataset_info: dict | None = None) -> Path:
    """checkpoints/<step>/{pretrained_model/, training_state.pt}, written into a temporary directory,
    flushed to disk, renamed into place (replacing the same step saved before, e.g. by a Ctrl-C right
    after resuming); then `last` is re-pointed by renaming a new symlink over it. Any failure (a full
    disk) removes the temporary directory and leaves `last` as it was."""
    checkpoints = output_dir / "checkpoints"
    final = checkpoints / f"{step:06d}"
    try:
        with cli.writing_dir(final, checkpoints / f".partial-{step:06d}-{os.getpid()}", durable=True) as partial:
            policy.save_pretrained(partial / "pretrained_model")
            if dataset_info is not None:  # the control rate to run the policy at (sim.py, infer_async.py)
                (partial / "pretrained_model" / policy_io.DATASET_INFO).write_text(json.dumps(dataset_info, indent=2) + "\n")
            torch.save(training_state, partial / "training_state.pt")
        link = checkpoints / f".last-{os.getpid()}"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(final.name, link)
        os.replace(link, checkpoints / "last")
    except OSError as err:
        last = checkpoints / "last"
        kept = f"{last} -> {os.readlink(last)} is intact" if last.is_symlink() else "there is no earlier checkpoint"
        reason = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        raise TrainError(f"could not save the checkpoint of step {step} to {final}: {reason} ({err}); {kept}") from err
    return final


def last_checkpoint(output_dir: Path) -> Path:
    last = output_dir / "checkpoints" / "last"
    if not last.exists():
        raise TrainError(f"--resume: no checkpoint at {last}")
    return last.resolve()


# ----------------------------------------------------------------------------------------------
# Progress and metrics


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
    if path.is_file():
        kept = [m for m in read_metrics(path) if m["step"] <= step]
        cli.write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    from plot import Panel, save_panels

    metrics = read_metrics(metrics_path)
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    if not train:
        return
    losses = {"train": ([m["step"] for m in train], [m["loss"] for m in train])}
    if val:
        losses["validation"] = ([m["step"] for m in val], [m["val_loss"] for m in val])
    log_losses = {name: (xs, [math.log10(y) if y > 0 else float("nan") for y in ys]) for name, (xs, ys) in losses.items()}
    lr = {"lr": ([m["step"] for m in train], [m["lr"] for m in train])}
    save_panels(str(png_path), [Panel(losses, "flow-matching loss", "step", "loss"),
                                Panel(log_losses, "log10 loss", "step", "log10 loss"),
                                Panel(lr, "learning rate", "step", "lr")], size=(800, 900))


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """The live line (rewritten in place on a terminal) and metrics.jsonl, one line per log interval."""

    def __init__(self, metrics_path: Path, total_steps: int, samples_per_step: int, log_every: int, enabled: bool):
        self.metrics_path, self.total, self.samples_per_step = metrics_path, total_steps, samples_per_step
        self.log_every, self.enabled = log_every, enabled
        self.live = enabled and sys.stdout.isatty()
        self.window: list[dict] = []
        self.window_start = time.perf_counter()
        self.rate: float | None = None  # samples/s over the last complete interval

    def line(self, step: int, loss: float, grad_norm: float, lr: float, rate: float) -> str:
        eta = (self.total - step) * self.samples_per_step / max(rate, 1e-9)
        return (f"step {step}/{self.total} | loss {loss:.4f} | grad {grad_norm:.3f} | lr {lr:.2e} | "
                f"{rate:.1f} samples/s | ETA {duration(eta)}")

    def step(self, step: int, result: dict) -> None:
        """`step` counts completed steps; `result` is train_step's report."""
        if not self.enabled:
            return
        self.window.append(result)
        rate = len(self.window) * self.samples_per_step / max(time.perf_counter() - self.window_start, 1e-9)
        if self.live:
            text = self.line(step, result["loss"], result["grad_norm"], result["lr"], self.rate or rate)
            cli.print_live(text, stream=sys.stdout)
        if len(self.window) >= self.log_every or step == self.total:
            self.rate = rate
            loss = sum(r["loss"] for r in self.window) / len(self.window)
            grad_norm = sum(r["grad_norm"] for r in self.window) / len(self.window)
            self.write({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": result["lr"],
                        "samples_per_s": round(rate, 2), "time": round(time.time(), 3)})
            cli.print_live(self.line(step, loss, grad_norm, result["lr"], rate), end=True, stream=sys.stdout)
            self.window, self.window_start = [], time.perf_counter()

    def say(self, message: str) -> None:
        """A message on its own line, also in the middle of a live line."""
        if self.enabled:
            cli.print_live(message, end=True, stream=sys.stdout)

    def write(self, entry: dict) -> None:
        if self.enabled:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------------
# The policy for a dataset: camera slots, dims, stats, what is trained


def parse_rename(pairs: list[str]) -> dict[str, str]:
    """['top=camera1', ...] -> {'observation.images.top': 'observation.images.camera1'}; '' = leave out."""
    def full(name: str) -> str:
        return name if not name or "." in name else IMAGE_PREFIX + name

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TrainError(f"--rename {pair!r}: expected DATA=POLICY, e.g. top=camera1")
        source, target = (s.strip() for s in pair.split("=", 1))
        out[full(source)] = full(target)
    return out


def camera_mapping(dataset_cameras: list[str], policy_cameras: list[str] | None,
                   rename: dict[str, str]) -> dict[str, str]:
    """Dataset camera -> policy camera slot.

    policy_cameras None (a new policy): the slots are the dataset's cameras, renamed by `rename`.
    Otherwise: explicit `rename` entries first, then cameras whose names already are a slot, then the
    rest in order onto the free slots in order, third-person views before wrist views (so
    lerobot/svla_so100_pickplace maps top -> camera1 and wrist -> camera2, as its fine-tunes do).
    A camera renamed to '' is left out. Slots left without a camera are dropped from the policy.
    """
    unknown = [k for k in rename if k not in dataset_cameras]
    if unknown:
        raise TrainError(f"--rename names camera(s) {unknown} that the dataset does not have; "
                         f"it has {dataset_cameras}")
    if policy_cameras is None:
        mapping = {k: rename.get(k, k) for k in dataset_cameras if rename.get(k, k)}
    else:
        bad = [v for v in rename.values() if v and v not in policy_cameras]
        if bad:
            raise TrainError(f"--rename targets {bad} are not camera slots of the policy; its slots are {policy_cameras}")
        mapping = {k: v for k, v in rename.items() if v}
        rest = [k for k in dataset_cameras if k not in rename]
        for key in list(rest):
            if key in policy_cameras and key not in mapping.values():
                mapping[key] = key
                rest.remove(key)
        free = [slot for slot in policy_cameras if slot not in mapping.values()]
        rest.sort(key=lambda k: "wrist" in k.lower())  # stable: dataset order within each group
        if len(rest) > len(free):
            raise TrainError(
                f"the dataset has cameras {dataset_cameras} but the policy has only {len(policy_cameras)} slots "
                f"{policy_cameras}; leave cameras out with --rename NAME= or map them explicitly")
        mapping.update(zip(rest, free))
    if len(set(mapping.values())) != len(mapping):
        raise TrainError(f"two dataset cameras map onto the same policy slot: {mapping}")
    if not mapping:
        raise TrainError(f"no camera to train on: the dataset has {dataset_cameras or 'no cameras'}")
    return mapping


def feature_shape_chw(feature: dict) -> list[int]:
    """LeRobot stores video shapes as (height, width, channels); the policy config wants (3, H, W)."""
    shape, names = list(feature["shape"]), feature.get("names") or []
    if names and names[0] in ("channels", "channel", "c"):
        return shape
    return [shape[2], shape[0], shape[1]]


def adapt_to_dataset(cfg: SmolVLAConfig, dataset: data.LeRobotDataset, mapping: dict[str, str]) -> None:
    """Make the policy config describe this dataset: its cameras (in slot order, unused slots dropped),
    its state and action dims (the model pads them to max_state_dim / max_action_dim)."""
    for key in (STATE, ACTION):
        if key not in dataset.features:
            raise TrainError(f"the dataset {dataset.root} has no {key!r} feature; SmolVLA needs state and action")
    state_dim = int(dataset.features[STATE]["shape"][0])
    action_dim = int(dataset.features[ACTION]["shape"][0])
    if state_dim > cfg.max_state_dim:
        raise TrainError(f"the dataset's state has {state_dim} dims, more than the policy's "
                         f"max_state_dim {cfg.max_state_dim}")
    if action_dim > cfg.max_action_dim:
        raise TrainError(f"the dataset's action has {action_dim} dims, more than the policy's "
                         f"max_action_dim {cfg.max_action_dim}")
    slots = cfg.camera_keys if set(mapping.values()) <= set(cfg.camera_keys) else list(mapping.values())
    by_slot = {slot: source for source, slot in mapping.items()}
    features = {slot: {"type": "VISUAL", "shape": feature_shape_chw(dataset.features[by_slot[slot]])}
                for slot in slots if slot in by_slot}
    features[STATE] = {"type": "STATE", "shape": [state_dim]}
    cfg.input_features = features
    cfg.output_features = {ACTION: {"type": "ACTION", "shape": [action_dim]}}
    cfg.empty_cameras = 0


def dataset_stats(dataset: data.LeRobotDataset) -> dict[str, dict[str, torch.Tensor]]:
    stats = {}
    for key in (STATE, ACTION):
        found = dataset.stats.get(key, {})
        if "mean" not in found or "std" not in found:
            raise TrainError(f"the dataset {dataset.root} has no mean/std for {key!r} in meta/stats.json; "
                             "normalisation needs them")
        stats[key] = {k: v for k, v in found.items() if k in checkpoint.STAT_NAMES}
    return stats


def build_policy(args: argparse.Namespace, dataset: data.LeRobotDataset, device: torch.device) -> SmolVLA:
    """The policy to train on this dataset: the demo's tiny one (demo.policy_config), a new policy from
    a pretrained VLM (--from-vlm), or a pretrained policy (--policy); adapted to the dataset's cameras
    and dims, with the dataset's normalisation stats, the camera mapping printed."""
    rename = parse_rename(args.rename)
    torch.manual_seed(args.seed)  # fresh weights (expert, projections) are the same on every rank
    if args.demo or args.from_vlm:
        mapping = camera_mapping(dataset.camera_keys, None, rename)
        if args.demo:
            vlm_dir = demo.vlm_dir(Path(args.output_dir))
            cfg = demo.policy_config(vlm_dir, args.chunk_size, EXPERT_ATTENTION[args.expert_attention])
            adapt_to_dataset(cfg, dataset, mapping)
            _, vlm_config, tokenizer = flow.load_vlm_files(vlm_dir, cfg, weights=False)
            policy = SmolVLA(cfg, vlm_config, tokenizer)
            policy.init_expert()
        else:
            vlm_config = json.loads((cli.resolve_dir(args.from_vlm, "VLM", allow_patterns=["*.json"], error=TrainError) / "config.json").read_text())
            side = {**flow.VISION_DEFAULTS, **vlm_config.get("vision_config", {})}["image_size"]
            cfg = SmolVLAConfig(chunk_size=args.chunk_size, n_action_steps=args.chunk_size,
                                num_vlm_layers=args.num_vlm_layers, resize_imgs_with_padding=(side, side),
                                **EXPERT_ATTENTION[args.expert_attention])
            adapt_to_dataset(cfg, dataset, mapping)
            try:
                policy = SmolVLA.from_vlm(args.from_vlm, cfg, device="cpu")
            except (ValueError, KeyError) as err:
                raise TrainError(f"cannot build a policy from the VLM {args.from_vlm}: {err}") from err
    else:
        try:
            policy = SmolVLA.from_pretrained(args.policy, vlm=args.vlm, device="cpu")
        except (ValueError, KeyError) as err:
            raise TrainError(f"cannot load the policy {args.policy}: {err}") from err
        mapping = camera_mapping(dataset.camera_keys, policy.config.camera_keys, rename)
        unused = [slot for slot in policy.config.camera_keys if slot not in mapping.values()]
        adapt_to_dataset(policy.config, dataset, mapping)
        if unused:
            print(f"policy camera slot(s) {unused} have no camera in this dataset: removed from the policy's "
                  "input features", flush=True)
    for key in DELAY_TRAINING:  # what this run trains for, whatever the policy started from was trained for
        before, value = getattr(policy.config, key), getattr(args, key)
        if before and before != value:  # a new policy starts at 0
            print(f"{key}: {before} in the policy being fine-tuned, {value} in this run (--{key.replace('_', '-')})",
                  flush=True)
        setattr(policy.config, key, value)
    if policy.config.rtc_prefix_max >= policy.config.chunk_size:
        raise TrainError(f"--rtc-prefix-max {policy.config.rtc_prefix_max} must be below the policy's chunk size "
                         f"{policy.config.chunk_size} (a chunk needs actions left to predict)")
    if policy.config.future_state_max_offset:
        check_state_like_actions(dataset)
    policy.rename_map = {source: slot for source, slot in mapping.items() if source != slot}
    print("cameras: " + ", ".join(f"{s} -> {t}" for s, t in mapping.items()) + "  (override with --rename DATA=POLICY)",
          flush=True)
    policy.set_stats(dataset_stats(dataset), source=f"dataset {dataset.root}")
    return policy.to(device)


def check_state_like_actions(dataset: data.LeRobotDataset) -> None:
    """Future-state conditioning moves the measured state by the planned actions' motion (at_state_offsets),
    which only means something where the actions are goal positions of the state's own values: the dataset
    names them alike (LeRobot's SO-100: "shoulder_pan.pos" in both). Meta-World's actions are hand
    deltas and a gripper effort, not a state."""
    state, action = (policy_io.feature_names(dataset.features.get(key, {})) for key in (STATE, ACTION))
    if state and action and state != action:
        raise TrainError(f"--future-state-max-offset needs actions that are goal positions of the state, and this "
                         f"dataset's differ: {STATE} {state}, {ACTION} {action}")


FROZEN_VISION = ("vision.",)
FROZEN_VLM = ("connector.", "lm.", "lm_head.")


def set_trainable(policy: SmolVLA, train_vision: bool = False, train_vlm: bool = False) -> list[str]:
    """Choose what trains (requires_grad) and return those parameters' names: the expert and the
    state/action/time projections; the vision encoder and the VLM (connector, text layers) only when
    asked, frozen otherwise. lm_head is never used: always frozen."""
    frozen = () if train_vision else FROZEN_VISION
    frozen += ("lm_head.",) + (() if train_vlm else FROZEN_VLM)
    trained = []
    for name, param in policy.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
        if param.requires_grad:
            trained.append(name)
    return trained


# ----------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule


def make_optimizer(policy: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay)


# The schedule is LeRobot's "cosine_decay_with_warmup" (lerobot-train's for SmolVLA), so that the same
# flags give the same learning rate at every step. Two of its properties are easy to get wrong:
#   - it is fitted to the run: when the run is shorter than the decay, the warm-up shrinks in
#     proportion, int(warmup * (steps / decay)) with LeRobot's order of operations, and the decay ends
#     at the last step (so --steps 20000 ends at --decay-lr, not part-way down the cosine);
#   - the cosine's phase is the absolute step over the decay steps, not the step since the warm-up:
#     after a 1,000-step warm-up of a 30,000-step decay it starts at 0.9973, not 1.


def fitted_schedule(steps: int, warmup_steps: int, decay_steps: int) -> tuple[int, int]:
    """(warm-up steps, decay steps) of a run of `steps` steps: as given, or shrunk to the run."""
    if steps < decay_steps:
        return int(warmup_steps * (steps / decay_steps)), steps
    return warmup_steps, decay_steps


def lr_factor(step: int, warmup_steps: int, decay_steps: int, peak_lr: float, decay_lr: float) -> float:
    """Multiplier of the peak lr at `step` (0-based) for an already fitted warm-up and decay: linear
    from 1/(warmup+1) towards 1 over the warm-up steps, then floor + (1 - floor) * (1 + cos(pi * step /
    decay)) / 2 with floor = decay_lr / peak_lr, constant from step `decay_steps` on."""
    if step < warmup_steps:
        if step <= 0:
            return 1 / (warmup_steps + 1)
        return (1 / (warmup_steps + 1) - 1) * (1 - step / warmup_steps) + 1
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, decay_steps) / decay_steps))
    floor = decay_lr / peak_lr
    return (1 - floor) * cosine + floor


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps, decay_steps = fitted_schedule(args.steps, args.warmup_steps, args.decay_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, decay_steps, args.lr, args.decay_lr))


# ----------------------------------------------------------------------------------------------
# Data: the split, a resumable sampler, the loaders (preloading: data.PreloadedDataset; the vision
# cache: vision_cache.py)


def split_episodes(spec: str, episodes: list[int]) -> tuple[list[int], list[int]]:
    """--val-episodes '2' (the last 2) or '3,17' (those) -> (train episodes, validation episodes)."""
    spec = str(spec).strip()
    if "," in spec:
        val = [int(e) for e in spec.split(",") if e.strip()]
        unknown = [e for e in val if e not in episodes]
        if unknown:
            raise TrainError(f"--val-episodes {unknown} not in the dataset (episodes {episodes[0]}..{episodes[-1]})")
    else:
        count = int(spec or 0)
        if count >= len(episodes):
            raise TrainError(f"--val-episodes {count} leaves no training episodes (the dataset has {len(episodes)})")
        val = episodes[len(episodes) - count:] if count else []
    return [e for e in episodes if e not in val], val


class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled epochs split across ranks as DistributedSampler splits them, starting at any
    sample: after k batches of b, a resumed run starts at sample k*b of the same stream."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self):
        epochs = torch.utils.data.DistributedSampler(range(self.size), num_replicas=self.world_size,
                                                     rank=self.rank, shuffle=True, seed=self.seed)
        epoch, offset = divmod(self.start, len(epochs))
        while True:
            epochs.set_epoch(epoch)
            yield from itertools.islice(iter(epochs), offset, None)
            epoch, offset = epoch + 1, 0


def ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint, so the DataLoader
    # workers must live on instead of dying under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def validation_batches(val_set: torch.utils.data.Dataset, samples: int, batch_size: int,
                       num_workers: int) -> torch.utils.data.DataLoader:
    """A fixed set of up to `samples` validation frames, evenly spread, in a fixed order."""
    picks = np.linspace(0, len(val_set) - 1, min(samples, len(val_set))).round().astype(int)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, sorted(set(picks.tolist()))),
                                       batch_size=batch_size, num_workers=num_workers, worker_init_fn=ignore_sigint)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, sampler: torch.utils.data.Sampler,
                num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, drop_last=True, worker_init_fn=ignore_sigint,
                                       prefetch_factor=4 if num_workers else None)


# ----------------------------------------------------------------------------------------------
# Distributed setup and Ctrl-C


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup_device(requested: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK/WORLD_SIZE set) joins the process group:
    NCCL on CUDA, gloo on CPU; each process takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = requested is None and torch.cuda.is_available() or (requested or "").startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise TrainError(f"--device {requested}: CUDA is not available on this machine")
    if world_size > 1:
        device = torch.device("cuda", local_rank) if wants_cuda else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        device = torch.device(requested) if requested else flow.default_device()
    return rank, world_size, device


class StopRequest:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary and save; a second
    Ctrl-C outside a save aborts at once."""

    def __init__(self):
        self.requested = False
        self.writing = False  # a checkpoint is being written: a second Ctrl-C waits for it
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.requested and not self.writing and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(press Ctrl-C again to abort without saving)", flush=True)
        self.requested = True

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------
# Command line


def episode_spec(text: str) -> str:
    """--val-episodes: a count N >= 0, or a comma-separated list of episode indices (3,17,42)."""
    parts = [part.strip() for part in text.split(",")]
    listed = [part for part in parts if part]
    if not listed and "," in text or not all(part.isdecimal() for part in listed):
        raise argparse.ArgumentTypeError(f"expected a count N >= 0 or a list of episode indices like 3,17,42, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("data and policy")
    g.add_argument("--data", help="LeRobot dataset: Hub id or local directory (omit for the offline demo)")
    g.add_argument("--revision", help="--data from the Hub: the branch, tag or commit to download (default: main)")
    g.add_argument("--policy", default=DEFAULT_POLICY, help="policy to fine-tune: Hub id or local directory")
    g.add_argument("--from-vlm", metavar="VLM", help="start a new policy from this pretrained VLM instead of --policy")
    g.add_argument("--vlm", help="where the VLM config/tokenizer live when the policy's vlm_model_name is not reachable")
    g.add_argument("--rename", action="append", default=[], metavar="DATA=POLICY",
                   help="map a dataset camera onto a policy camera slot (repeatable; 'top=camera1' is short for "
                        "observation.images.top=observation.images.camera1; 'DATA=' leaves a camera out)")
    g.add_argument("--num-vlm-layers", type=cli.integer(1), default=16, help="--from-vlm: VLM layers kept")
    g.add_argument("--chunk-size", type=cli.integer(1), default=50, help="a new policy (--from-vlm, the demo): actions per chunk")
    g.add_argument("--expert-attention", choices=sorted(EXPERT_ATTENTION), default="interleaved",
                   help="a new policy: the action expert's layers: interleaved cross- and self-attention (SmolVLA), "
                        "cross-attention only, or self-attention only (the paper's ablation)")
    g.add_argument("--train-vision", action=argparse.BooleanOptionalAction, default=False,
                   help="also train the vision encoder (frozen by default; trained in the demo)")
    g.add_argument("--train-vlm", action=argparse.BooleanOptionalAction, default=False,
                   help="also train the VLM layers and connector (frozen by default; trained in the demo)")
    g.add_argument("--rtc-prefix-max", type=cli.integer(0), default=0, metavar="D",
                   help="training-time real-time chunking (arXiv 2512.05964): a random first 0..D actions of each "
                        "chunk are given clean and not trained on, so that at inference the actions the robot "
                        "executes while the next chunk is computed can be given and the chunk continues them "
                        "smoothly at no extra cost. D: the largest inference delay expected, in control ticks; "
                        "saved in config.json (0: off)")
    g.add_argument("--future-state-max-offset", type=cli.integer(0), default=0, metavar="D",
                   help="future-state conditioning (VLASH, arXiv 2512.01031): frame i's images are paired with the "
                        "state of frame i+delta, delta random in 0..D, and the actions from there, so that at "
                        "inference the policy can be given the state the robot will be in when the chunk starts "
                        "rather than the stale one at capture; saved in config.json (0: off)")
    g = p.add_argument_group("optimisation (SmolVLA fine-tuning recipe)")
    g.add_argument("--steps", type=cli.integer(1), default=20_000,
                   help="training steps (the learning-rate schedule is fitted to them, see --decay-steps)")
    g.add_argument("--batch-size", type=cli.integer(1), default=64, help="per process; the global batch is this times the GPUs")
    g.add_argument("--lr", type=cli.number(above=0), default=1e-4, help="peak learning rate")
    g.add_argument("--betas", type=cli.number(0, below=1), nargs=2, default=(0.9, 0.95), help="AdamW betas")
    g.add_argument("--eps", type=cli.number(0), default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=cli.number(0), default=1e-10, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=cli.integer(0), default=1_000,
                   help="linear warm-up to --lr (shrunk when --steps < --decay-steps, see below)")
    g.add_argument("--decay-steps", type=cli.integer(1), default=30_000,
                   help="cosine decay ends at this step; when --steps is smaller, the schedule is fitted to the run: "
                        "warm-up int(warmup * steps / decay) steps and the decay ends at the last step, as LeRobot's "
                        "cosine_decay_with_warmup (the same flags give lerobot-train's learning rates). The cosine "
                        "counts from step 0, not from the end of the warm-up")
    g.add_argument("--decay-lr", type=cli.number(0), default=2.5e-6, help="learning rate at the end of the decay")
    g.add_argument("--grad-clip", type=cli.number(above=0), default=10.0, help="gradient norm clipping")
    g.add_argument("--seed", type=cli.integer(0, 2**32 - 1), default=1000, help="new weights, data order, flow noise")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="outputs/train", help="where the run writes (outputs/demo in the demo)")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/last")
    g.add_argument("--save-every", type=cli.integer(1), default=5_000, help="checkpoint interval in steps (and at the end)")
    g.add_argument("--log-every", type=cli.integer(1), default=50, help="steps per metrics.jsonl line")
    g.add_argument("--val-episodes", type=episode_spec, default="0",
                   help="episodes held out for validation: a count N (the last N) or a list like 3,17,42")
    g.add_argument("--eval-every", type=cli.integer(1), default=1_000, help="validation loss interval in steps")
    g.add_argument("--val-samples", type=cli.integer(1), default=256, help="frames in the (fixed) validation set")
    g.add_argument("--num-workers", type=cli.integer(0), default=4,
                   help="DataLoader worker processes decoding video (with --preload: decoding it once, before training)")
    g.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda if available)")
    g.add_argument("--cache-vision", action="store_true",
                   help="compute the frozen vision encoder's image embeddings once (float16, memory-mapped) "
                        "and train from them: no video decoding or vision encoder afterwards")
    g.add_argument("--cache-dir", help="--cache-vision location (default: <output-dir>/vision_cache)")
    g.add_argument("--preload", action=argparse.BooleanOptionalAction, default=False,
                   help="decode every frame once and train from memory (small datasets, such as the demo's, whose "
                        "video decoding would cost more than the training step; on in the demo)")
    g = p.add_argument_group("the offline demo (no --data)")
    g.add_argument("--demo-episodes", type=cli.integer(1), default=100,
                   help="scripted demonstrations to record in the simulator (scene seeds 0, 1, ...)")
    g.add_argument("--demo-eval-episodes", type=cli.integer(0), default=50,
                   help=f"closed-loop evaluation episodes after training, on held-out scene seeds from {demo.EVAL_SEED}; "
                        "0 skips it")
    return p


def recipe(is_demo: bool) -> dict[str, Any]:
    """Every flag's default for a run of this kind: the fine-tuning recipe, or the demo's on top of it."""
    defaults = {action.dest: action.default for action in build_parser()._actions
                if action.default is not argparse.SUPPRESS}
    return {**defaults, **demo.DEFAULTS} if is_demo else defaults


def run_settings(is_demo: bool, given: dict[str, Any], explicit: list[str],
                 saved: dict | None = None) -> argparse.Namespace:
    """A run's settings, made once: its kind's recipe, then (resuming) its saved arguments but for the
    RUN_ONLY ones, then the flags `given`. Besides the flags: `demo`, whether the run is the offline
    demo, which trains on its recording under --output-dir (`data`), and `explicit`, the flags given."""
    settings = recipe(is_demo)
    settings.update({k: v for k, v in (saved or {}).items() if k not in RUN_ONLY})
    settings.update(given)
    settings["betas"] = tuple(settings["betas"])
    settings["demo"] = is_demo  # saved with the run: what it was decides what --resume continues
    if is_demo:
        settings["data"] = str(demo.dataset_dir(Path(settings["output_dir"])))
    return argparse.Namespace(**settings, explicit=explicit)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings of the run a command line asks for: the flags given, over the demo's recipe when
    --data is absent (also to resume a demo), over the fine-tuning recipe. `explicit` names the flags
    given: they override the demo's defaults and, on --resume, the run's saved arguments."""
    parser = build_parser()
    # argparse fills in a flag's default only where the namespace lacks it: starting from None for
    # every flag, one parse sets exactly the flags given (none of them can be given as None).
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(recipe(False))))
    explicit = sorted(key for key, value in vars(given).items() if value is not None)
    return run_settings(given.data is None, {key: getattr(given, key) for key in explicit}, explicit)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (cli.UserError, FileNotFoundError) as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says why
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(cli.USER_ERROR) from None
    except KeyboardInterrupt:
        print("\ntrain.py: aborted without saving", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
