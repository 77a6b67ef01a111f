"""Fine-tune SmolVLA on a LeRobot dataset: resumable, multi-GPU (torchrun), with an offline demo.

    python train.py                                          # offline demo: pick-and-place in MuJoCo (sim.py)
    python train.py --data lerobot/svla_so100_pickplace      # fine-tune lerobot/smolvla_base
    python train.py --data DATA --from-vlm HuggingFaceTB/SmolVLM2-500M-Video-Instruct   # new policy
    python train.py --output-dir outputs/train --resume      # continue from checkpoints/last
    torchrun --nproc_per_node=4 train.py --data DATA         # DistributedDataParallel, batch per GPU

One training step: a batch of frames (camera images, state, the next chunk_size actions, the task
string) -> flow-matching loss -> backward through the action expert and projections (vision encoder
and VLM frozen) -> clip -> AdamW -> learning-rate schedule (LeRobot's: linear warm-up, then cosine,
both fitted to --steps when it is shorter than --decay-steps).

Layout under --output-dir:
    checkpoints/<step:06d>/pretrained_model/   the policy (flow.SmolVLA.save_pretrained: LeRobot layout)
    checkpoints/<step:06d>/training_state.pt   optimizer, scheduler, step, RNG states, sampler position
    checkpoints/last -> <step:06d>             symlink to the newest complete checkpoint
    metrics.jsonl, loss.png                    one JSON line per log interval / validation; the curves
    vision_cache/                              --cache-vision: frozen image embeddings, float16
    (demo only) dataset/, vlm/                 the demo dataset (recorded in sim.py) and the tiny VLM
    (demo only) eval.json, eval.mp4            closed-loop success on held-out scenes, and a video
"""
# The file reads top down: the configuration, the training loop, one step, a run's set-up (resume,
# checkpoints, progress), then the parts they use: the policy for a dataset, the schedule, the data,
# the demo, distributed set-up, and last the command line.

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import hashlib
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

import cli
import data
import flow
import policy_io
from flow import ACTION, IMAGE_PREFIX, STATE, SmolVLA, SmolVLAConfig

# ----------------------------------------------------------------------------------------------
# Configuration. The flags (build_parser, at the end) default to SmolVLA's fine-tuning recipe.

DEFAULT_POLICY = "lerobot/smolvla_base"

# The demo's recipe: a tiny model learns faster with a higher learning rate and a short schedule. Its
# VLM is random (there is no pretrained VLM this small), so it is trained too: then the policy really
# reads the cube's position from the images (frozen random features carry it only weakly).
DEMO_DEFAULTS = dict(chunk_size=10, steps=3_000, batch_size=32, lr=1e-3, warmup_steps=100, decay_steps=3_000, decay_lr=2e-5,
                     train_vision=True, train_vlm=True,
                     save_every=500, log_every=25, eval_every=250, val_episodes="2", val_samples=128,
                     num_workers=0, preload=True, output_dir="outputs/demo")
DEMO_IMAGE = 96  # the tiny vision encoder's input side, the cameras' size: 12-pixel patches, 8x8 of them
DEMO_FPS = 10
DEMO_NOISE = 0.04  # radians of wandering offset while recording (DART): demonstrations of recovering
DEMO_EVAL_SEED = 10_000  # recording uses scene seeds 0, 1, ...; evaluation starts here, far above

# What --resume takes from the command line rather than from the checkpoint's saved arguments.
RUN_ONLY = {"resume", "output_dir", "device", "num_workers", "param_checksum_file", "preload",
            "demo_eval_episodes"}

# The action expert's attention (SmolVLA config fields): every other layer self-attention (the
# paper's choice), or one kind throughout.
EXPERT_ATTENTION = {
    "interleaved": {"attention_mode": "cross_attn", "self_attn_every_n_layers": 2},
    "cross": {"attention_mode": "cross_attn", "self_attn_every_n_layers": 0},
    "self": {"attention_mode": "self_attn", "self_attn_every_n_layers": 0},
}


class TrainError(cli.UserError):
    """A problem with the user's input or environment, reported as one message (no traceback)."""


# ----------------------------------------------------------------------------------------------
# The training loop


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) a training run; returns a summary (steps, final loss, checkpoint path, ...)."""
    rank, world_size, device = setup_device(args.device)
    try:
        checkpoint, resume_state = None, None
        if args.resume:
            args, checkpoint, resume_state = load_resume(args)
            if args.steps == resume_state["step"]:
                return nothing_to_do(args, args.steps, rank, f"{Path(args.output_dir)} holds a finished run "
                                     f"({args.steps} of {args.steps} steps; pass a larger --steps to train it further)")
        else:
            args.demo = args.data is None  # saved with the run's arguments
            if (Path(args.output_dir) / "checkpoints").exists():
                return finished_run(args, rank)  # a run is never overwritten
        return train_loop(start_run(args, checkpoint, resume_state, rank, world_size, device))
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
            batch = next(batches)
            noise, flow_time = flow_noise_and_time(args.seed, 0, step, run.rank, args.batch_size, policy, run.device)
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


def flow_noise_and_time(seed: int, stream: int, step: int, rank: int, batch_size: int, policy: SmolVLA,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching noise and times of one batch, from a generator seeded by (seed, stream, step,
    rank), so a resumed run draws exactly what an uninterrupted one would and validation is repeatable.
    The times are the model's training distribution (flow.sample_time), drawn after the noise."""
    state = np.random.SeedSequence([seed, stream, step, rank]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    noise = torch.randn(batch_size, policy.cfg.chunk_size, policy.cfg.max_action_dim, generator=generator)
    return noise.to(device), flow.sample_time(batch_size, generator, device)


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
    """Mean loss over the fixed validation batches with fixed noise and times (comparable across steps)."""
    device = policy.device
    total, count = 0.0, 0
    for j, batch in enumerate(batches):
        size = len(batch["task"])
        noise, time = flow_noise_and_time(seed, 1, j, 0, size, policy, device)
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

    args: argparse.Namespace
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
        if args.param_checksum_file:
            Path(args.param_checksum_file.format(rank=self.rank)).write_text(parameter_digest(self.policy) + "\n")
        last = output_dir / "checkpoints" / "last"
        summary = {"step": step, "stopped": stopped, "seconds": seconds,
                   "loss": last_result["loss"] if last_result else None,
                   "checkpoint": str(last.resolve()) if last.exists() else None}
        if args.demo and self.rank == 0 and not stopped and args.demo_eval_episodes > 0:
            summary["eval"] = evaluate_demo(self.policy, output_dir, args.demo_eval_episodes, self.fps)
        outputs = run_outputs(output_dir) if last.exists() else "no checkpoint was saved"
        log(self.rank, f"{'stopped' if stopped else 'done'} at step {step} in {duration(seconds)}: {outputs}")
        return summary


def start_run(args: argparse.Namespace, checkpoint: Path | None, resume_state: dict | None, rank: int,
              world_size: int, device: torch.device) -> Run:
    """Everything the loop needs: the demo's dataset and VLM (recorded the first time), the datasets, the
    policy (built, or the checkpoint's), the optimiser and schedule (restored when resuming), the data
    loaders and the metrics log (cut back to the checkpoint's step)."""
    if args.cache_vision and (args.train_vision or args.train_vlm):
        raise TrainError("--cache-vision needs a frozen vision encoder and connector: drop --train-vision/--train-vlm")
    output_dir = Path(args.output_dir)
    vlm_dir = prepare_demo(args, rank) if args.demo else None
    whole, train_eps, val_eps = open_datasets(args)
    if resume_state is None:
        policy = build_policy(args, whole, device, vlm_dir)
    else:
        policy = SmolVLA.from_pretrained(checkpoint / "pretrained_model", vlm=args.vlm, device=device)
        log(rank, f"resuming from {checkpoint} (step {resume_state['step']})")
    trained = set(freeze(policy, args.train_vision, args.train_vlm))
    chunk = policy.cfg.chunk_size
    train_set = data.LeRobotDataset(whole.root, chunk_size=chunk, episodes=train_eps)
    val_set = data.LeRobotDataset(whole.root, chunk_size=chunk, episodes=val_eps) if val_eps else None
    log(rank, f"data: {len(train_set)} training frames ({len(train_eps)} episodes), "
              f"{len(val_set) if val_set else 0} validation frames ({len(val_eps)} episodes); "
              f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters, "
              f"{sum(p.numel() for n, p in policy.named_parameters() if n in trained) / 1e6:.2f} M trained; "
              f"device {device}, {world_size} process(es)")
    if args.preload:
        train_set = PreloadedDataset(train_set, "training", rank == 0)
        val_set = PreloadedDataset(val_set, "validation", rank == 0) if val_set is not None else None
    if args.cache_vision:
        cache_root = Path(args.cache_dir) if args.cache_dir else output_dir / "vision_cache"
        cache = build_vision_cache(policy, data.LeRobotDataset(whole.root, chunk_size=chunk), cache_root,
                                   args.batch_size, args.num_workers, rank, world_size)
        train_set = CachedVisionDataset(train_set, cache)
        val_set = CachedVisionDataset(val_set, cache) if val_set is not None else None

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
    loader = make_loader(train_set, args.batch_size, sampler, args.num_workers, device.type == "cuda")
    val_batches = None
    if val_set is not None and rank == 0:  # rank 0 validates
        val_batches = validation_batches(val_set, args.val_samples, args.batch_size, args.num_workers)
    metrics_path = output_dir / "metrics.jsonl"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, step)
    progress = Progress(metrics_path, args.steps, args.batch_size * world_size, args.log_every, rank == 0)
    return Run(args=args, policy=policy, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
               val_batches=val_batches, progress=progress, fps=whole.fps, rank=rank, world_size=world_size,
               device=device, step=step, resumed=resume_state is not None)


def load_resume(args: argparse.Namespace) -> tuple[argparse.Namespace, Path, dict]:
    """--resume: the run's saved arguments (flags given now override them), the checkpoint, its state."""
    checkpoint = last_checkpoint(Path(args.output_dir))
    state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
    merged = flag_defaults(build_parser())  # flags added since the run was saved take their defaults
    merged.update(state["args"])
    merged.update({k: getattr(args, k) for k in args.explicit})
    merged.update({k: getattr(args, k) for k in RUN_ONLY | {"explicit"}})
    for key in ("batch_size", "seed", "lr", "betas", "warmup_steps", "decay_steps", "decay_lr"):
        if key in args.explicit and state["args"].get(key) != merged[key]:
            print(f"warning: --{key.replace('_', '-')} {merged[key]} differs from the run's {state['args'].get(key)}: "
                  "the curve will not match an uninterrupted run", flush=True)
    saved = state["args"]
    before = fitted_schedule(saved["steps"], saved["warmup_steps"], saved["decay_steps"])
    after = fitted_schedule(merged["steps"], merged["warmup_steps"], merged["decay_steps"])
    if "steps" in args.explicit and before != after:
        print(f"warning: --steps {merged['steps']} (the run's: {saved['steps']}) refits the learning-rate schedule "
              f"(warm-up {before[0]} -> {after[0]}, decay {before[1]} -> {after[1]} steps): the learning rate jumps "
              "here and the curve will not match an uninterrupted run", flush=True)
    merged["betas"] = tuple(merged["betas"])
    merged["demo"] = bool(merged.get("demo", False))  # what the run was, not what this command line says
    resumed = argparse.Namespace(**merged)
    if resumed.steps < state["step"]:
        raise TrainError(f"--steps {resumed.steps}: the run in {resumed.output_dir} is already at step "
                         f"{state['step']}; pass a larger --steps to train it further")
    return resumed, checkpoint, state


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


def saved_args(args: argparse.Namespace) -> dict:
    """The run's arguments as a checkpoint keeps them (what --resume restores)."""
    return {k: v for k, v in vars(args).items() if k not in RUN_ONLY | {"explicit"}}


def run_outputs(output_dir: Path) -> str:
    """Where a run's results are, for the messages that end or refuse a run."""
    return (f"policy {output_dir / 'checkpoints' / 'last' / 'pretrained_model'}, loss plot {output_dir / 'loss.png'}, "
            f"metrics {output_dir / 'metrics.jsonl'}")


def nothing_to_do(args: argparse.Namespace, step: int, rank: int, where: str) -> dict:
    """A finished run asked for again: nothing is trained or overwritten; the message says where it is."""
    log(rank, f"nothing to do: {where}: {run_outputs(Path(args.output_dir))}")
    last = Path(args.output_dir) / "checkpoints" / "last"
    return {"step": step, "stopped": False, "seconds": 0.0, "loss": None, "complete": True,
            "checkpoint": str(last.resolve())}


def finished_run(args: argparse.Namespace, rank: int) -> dict:
    """When --output-dir already holds a run and --resume is not given. A complete run asked for again
    with the same flags (the demo's `python train.py` run twice): nothing_to_do. Otherwise a
    TrainError: a stopped run points to --resume, flags that ask for a different run to another
    --output-dir."""
    output_dir = Path(args.output_dir)
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
    return nothing_to_do(args, step, rank, where)


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
            if dataset_info is not None:  # the control rate to run the policy at (sim.py eval, infer_async --sim)
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
            print("\r" + text + "    ", end="", flush=True)
        if len(self.window) >= self.log_every or step == self.total:
            self.rate = rate
            loss = sum(r["loss"] for r in self.window) / len(self.window)
            grad_norm = sum(r["grad_norm"] for r in self.window) / len(self.window)
            self.write({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": result["lr"],
                        "samples_per_s": round(rate, 2), "time": round(time.time(), 3)})
            print(("\r" if self.live else "") + self.line(step, loss, grad_norm, result["lr"], rate), flush=True)
            self.window, self.window_start = [], time.perf_counter()

    def say(self, message: str) -> None:
        """A message on its own line, also in the middle of a live line."""
        if self.enabled:
            print(("\r\033[K" if self.live else "") + message, flush=True)

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
        stats[key] = {k: v for k, v in found.items() if k in flow.STAT_NAMES}
    return stats


def build_policy(args: argparse.Namespace, dataset: data.LeRobotDataset, device: torch.device,
                 vlm_dir: Path | None = None) -> SmolVLA:
    """The policy to train on this dataset: the tiny demo configuration (vlm_dir given), a new policy
    from a pretrained VLM (--from-vlm), or a pretrained policy (--policy); adapted to the dataset's
    cameras and dims, with the dataset's normalisation stats, the camera mapping printed."""
    rename = parse_rename(args.rename)
    torch.manual_seed(args.seed)  # fresh weights (expert, projections) are the same on every rank
    if vlm_dir is not None or args.from_vlm:
        mapping = camera_mapping(dataset.camera_keys, None, rename)
        if vlm_dir is not None:
            cfg = SmolVLAConfig(chunk_size=args.chunk_size, n_action_steps=args.chunk_size, tokenizer_max_length=16,
                                num_vlm_layers=4, **EXPERT_ATTENTION[args.expert_attention],
                                resize_imgs_with_padding=(DEMO_IMAGE, DEMO_IMAGE), vlm_model_name=str(vlm_dir.resolve()))
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
        mapping = camera_mapping(dataset.camera_keys, policy.cfg.camera_keys, rename)
        unused = [slot for slot in policy.cfg.camera_keys if slot not in mapping.values()]
        adapt_to_dataset(policy.cfg, dataset, mapping)
        if unused:
            print(f"policy camera slot(s) {unused} have no camera in this dataset: removed from the policy's "
                  "input features", flush=True)
    policy.rename_map = {source: slot for source, slot in mapping.items() if source != slot}
    print("cameras: " + ", ".join(f"{s} -> {t}" for s, t in mapping.items()) + "  (override with --rename DATA=POLICY)",
          flush=True)
    policy.set_stats(dataset_stats(dataset), source=f"dataset {dataset.root}")
    return policy.to(device)


FROZEN_VISION = ("vision.",)
FROZEN_VLM = ("connector.", "lm.", "lm_head.")


def freeze(policy: SmolVLA, train_vision: bool = False, train_vlm: bool = False) -> list[str]:
    """Set requires_grad: the expert and the state/action/time projections train; the vision encoder
    and the VLM (connector, text layers) stay frozen unless asked. lm_head is never used: frozen.
    Returns the names of the trained parameters."""
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
# Data: the split, a resumable sampler, preloading, the vision cache


def open_datasets(args: argparse.Namespace, chunk_size_hint: int = 50):
    """(the whole dataset, training episodes, validation episodes), checking the split."""
    whole = data.LeRobotDataset(args.data, chunk_size=chunk_size_hint, revision=args.revision)
    train_eps, val_eps = split_episodes(args.val_episodes, whole.episodes)
    return whole, train_eps, val_eps


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


class PreloadedDataset(torch.utils.data.Dataset):
    """Every item of a dataset decoded once and kept in memory, images as uint8 (a decoded frame is
    k/255 exactly, so nothing is lost). For datasets small enough to fit, like the demo's ~9,000
    frames (~500 MB), where decoding video for every sample would cost more than the step itself."""

    def __init__(self, dataset: data.LeRobotDataset, name: str, verbose: bool = True):
        self.camera_keys = list(dataset.camera_keys)
        start, self.items = time.perf_counter(), []
        for i in range(len(dataset)):
            item = dataset[i]
            for key in self.camera_keys:
                item[key] = (item[key] * 255).round().to(torch.uint8)
            self.items.append(item)
        if verbose:
            print(f"preloaded {len(self.items)} {name} frames in {time.perf_counter() - start:.0f} s", flush=True)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        for key in self.camera_keys:
            item[key] = item[key].float() / 255
        return item


def without_video(dataset: data.LeRobotDataset) -> data.LeRobotDataset:
    """A view of the dataset whose items lack the camera images: no video is opened or decoded."""
    view = copy.copy(dataset)
    view.decode_video = False
    return view


class CachedVisionDataset(torch.utils.data.Dataset):
    """Items of `dataset` without decoding video, with `image_embeddings` {policy camera: (tokens, hidden)
    float16} read from the cache's memory-mapped arrays (rows follow the global frame `index`)."""

    def __init__(self, dataset: data.LeRobotDataset, cache_dir: Path):
        self.dataset = without_video(dataset)
        meta = json.loads((cache_dir / "meta.json").read_text())
        self.cameras = meta["cameras"]
        frame_index = np.load(cache_dir / "index.npy")
        self.order = np.argsort(frame_index, kind="stable")
        self.sorted_index = frame_index[self.order]
        self.cache_dir = cache_dir
        self.arrays: dict[str, np.ndarray] | None = None  # opened lazily: once per worker process

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, frame_index: int) -> int:
        position = int(np.searchsorted(self.sorted_index, frame_index))
        if position >= len(self.sorted_index) or self.sorted_index[position] != frame_index:
            raise TrainError(f"frame {frame_index} is not in the vision cache {self.cache_dir}")
        return int(self.order[position])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.arrays is None:
            self.arrays = {key: np.load(self.cache_dir / f"{n}.npy", mmap_mode="r") for n, key in enumerate(self.cameras)}
        item = self.dataset[i]
        row = self.row(int(item["index"]))
        item["image_embeddings"] = {key: torch.from_numpy(np.array(a[row])) for key, a in self.arrays.items()}
        return item


def vision_cache_key(policy: SmolVLA, dataset: data.LeRobotDataset, dtype: torch.dtype) -> str:
    """A digest of everything the embeddings depend on: the vision encoder and connector weights, the
    image preprocessing, the camera mapping, the dataset's files and the compute dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        if name.startswith(("vision.", "connector.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    info = (dataset.root / "meta" / "info.json").read_bytes()
    episodes = sorted((dataset.root / "meta").glob("episodes/**/*.parquet")) + [dataset.root / "meta" / "episodes.jsonl"]
    stamp = [(str(p.relative_to(dataset.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in episodes if p.is_file()]
    digest.update(json.dumps([str(dataset.root), info.decode(), stamp, policy.rename_map, policy.camera_keys,
                              list(policy.cfg.resize_imgs_with_padding), str(dtype)]).encode())
    return digest.hexdigest()[:16]


def build_vision_cache(policy: SmolVLA, dataset: data.LeRobotDataset, cache_root: Path, batch_size: int = 64,
                       num_workers: int = 0, rank: int = 0, world_size: int = 1) -> Path:
    """Encode every frame of `dataset` (all its episodes) once: `<cache_root>/<key>/<n>.npy` float16
    (frames, tokens, hidden) per policy camera n, `index.npy` (the frames' global index), meta.json.
    Reused when the key (see vision_cache_key) matches; built in a temporary directory and renamed, so
    a half-built cache is never used. Ranks each encode a share of the frames."""
    autocast = policy.device.type == "cuda"
    key = vision_cache_key(policy, dataset, torch.bfloat16 if autocast else torch.float32)
    final = cache_root / key
    if final.is_dir():
        log(rank, f"vision cache: reusing {final}")
        return final
    cameras = list(policy.camera_keys)
    frames = len(dataset)
    with torch.no_grad():
        probe = policy.encode_images({source: dataset[0][source][None] for source in dataset.camera_keys
                                      if policy.rename_map.get(source, source) in cameras})
    # Rank 0 owns the directory being built (renamed into place once complete, removed on an error);
    # every rank writes its share of the rows into it between the barriers.
    partial = cache_root / f"{key}.partial"
    with cli.writing_dir(final, partial) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            for n, camera in enumerate(cameras):
                np.lib.format.open_memmap(partial / f"{n}.npy", mode="w+", dtype=np.float16,
                                          shape=(frames, *probe[camera].shape[1:])).flush()
            log(rank, f"vision cache: encoding {frames} frames x {len(cameras)} cameras into {final}")
        barrier()
        index = encode_frames(policy, dataset, partial, cameras, batch_size, num_workers, rank, world_size)
        np.save(partial / f"index.{rank}.npy", index)
        barrier()
        if rank == 0:
            index = sum(np.load(partial / f"index.{r}.npy") for r in range(world_size))
            np.save(partial / "index.npy", index)
            (partial / "meta.json").write_text(json.dumps({"cameras": cameras, "frames": frames,
                                                           "dataset": str(dataset.root), "dtype": "float16"}, indent=2))
    barrier()
    return final


def encode_frames(policy: SmolVLA, dataset: data.LeRobotDataset, cache_dir: Path, cameras: list[str],
                  batch_size: int, num_workers: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's share of the frames (every world_size-th) encoded into the cache's arrays; returns
    the frames' global index at the rows written (zero elsewhere)."""
    autocast = policy.device.type == "cuda"
    arrays = [np.load(cache_dir / f"{n}.npy", mmap_mode="r+") for n in range(len(cameras))]
    index = np.zeros(len(dataset), np.int64)
    mine = list(range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers, worker_init_fn=ignore_sigint)
    live = rank == 0 and sys.stdout.isatty()
    done = 0
    start = shown = time.perf_counter()
    for batch in loader:
        rows = mine[done:done + len(batch["index"])]
        with torch.autocast(policy.device.type, torch.bfloat16, enabled=autocast):
            embeddings = policy.encode_images(batch)
        for n, camera in enumerate(cameras):
            arrays[n][rows] = embeddings[camera].float().cpu().numpy().astype(np.float16)
        index[rows] = batch["index"].numpy()
        done += len(rows)
        if rank == 0 and (live or done == len(mine) or time.perf_counter() - shown > 30):
            shown = time.perf_counter()
            rate = done * world_size / max(shown - start, 1e-9)
            text = f"vision cache: ~{done * world_size}/{len(dataset)} frames, {rate:.1f} frames/s"
            print(("\r" + text) if live else text, end="" if live else "\n", flush=True)
    for array in arrays:
        array.flush()
    if live:
        print(flush=True)
    return index


# ----------------------------------------------------------------------------------------------
# Offline demo: pick-and-place in the MuJoCo SO-100 (sim.py). Scripted demonstrations are recorded
# as a LeRobot dataset, a tiny SmolVLA with a random VLM learns them from scratch, and the policy is
# then judged closed loop on scenes never used for recording.


def prepare_demo(args: argparse.Namespace, rank: int) -> Path:
    """Records the demo's dataset and writes its VLM the first time (rank 0; the others wait), points
    --data at the dataset; returns the VLM's directory."""
    output_dir = Path(args.output_dir)
    if rank == 0:
        ensure_demo(output_dir, args.demo_episodes)
    barrier()
    dataset_dir, vlm_dir = output_dir / "dataset", output_dir / "vlm"
    args.data = str(dataset_dir)
    log(rank, f"demo: training a tiny SmolVLA on {dataset_dir} (pass --data to train on your dataset)")
    return vlm_dir


def demo_vlm_config(vocab_size: int) -> dict:
    """A SmolVLM-shaped config small enough to train on a laptop CPU in minutes (~0.5 M parameters)."""
    return {
        "model_type": "smolvlm", "scale_factor": 2,
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "rms_norm_eps": 1e-5, "vocab_size": vocab_size},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": DEMO_IMAGE, "patch_size": DEMO_IMAGE // 8,
                          "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"},
    }


def write_demo_vlm(vlm_dir: Path, tasks: list[str]) -> None:
    """config.json and a byte-level BPE tokenizer.json trained on the demo's task strings, with
    SmolVLM's special tokens (<|im_end|> is the padding token), so flow.Tokenizer reads it as the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([t + "\n" for t in tasks], trainer=trainer)
    with cli.writing_dir(vlm_dir) as partial:
        tokenizer.save(str(partial / "tokenizer.json"))
        (partial / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_end|>"}, indent=2))
        (partial / "config.json").write_text(json.dumps(demo_vlm_config(tokenizer.get_vocab_size()), indent=2))


def ensure_demo(out_dir: Path, episodes: int) -> tuple[Path, Path]:
    """The demo dataset (recorded in the simulator) and tiny VLM under out_dir, written the first
    time (both atomically)."""
    import sim  # MuJoCo: needed by the demo only

    dataset_dir, vlm_dir = out_dir / "dataset", out_dir / "vlm"
    if not vlm_dir.is_dir():
        write_demo_vlm(vlm_dir, [sim.TASK])
    if not dataset_dir.is_dir():
        print(f"recording {episodes} scripted demonstrations in the simulator to {dataset_dir} "
              f"(LeRobot v3.0, {DEMO_FPS} fps) ...", flush=True)
        sim.record(dataset_dir, episodes, seed=0, fps=DEMO_FPS, noise=DEMO_NOISE,
                   log=lambda line: print("  " + line, flush=True))
    return dataset_dir, vlm_dir


def evaluate_demo(policy: SmolVLA, output_dir: Path, episodes: int, fps: float) -> dict:
    """The trained policy closed loop in the simulator on held-out scenes: success rate, its 95%
    interval, completion time; eval.json and a video of the first episodes beside the run."""
    import sim

    policy.eval()
    config = sim.EvalConfig(episodes=episodes, seed=DEMO_EVAL_SEED, fps=fps, video=str(output_dir / "eval.mp4"))
    print(f"evaluating closed loop on {episodes} held-out scenes (seeds {DEMO_EVAL_SEED}.."
          f"{DEMO_EVAL_SEED + episodes - 1}) ...", flush=True)
    with sim.SimRobot() as sim_robot:
        summary = sim.evaluate(sim_robot, policy_io.make_policy_fn(policy), policy_io.policy_spec(policy),
                               config, log=lambda line: print("  " + line, flush=True))
    (output_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    low, high = summary["ci95"]
    completion = summary["mean_completion_s"]
    print(f"success {summary['successes']}/{episodes} = {summary['success_rate']:.0%} (95% CI {low:.0%}-{high:.0%})"
          + (f", mean completion {completion:.1f} s" if completion is not None else "")
          + f", idle ticks {summary['idle_ticks']}; {output_dir / 'eval.json'}, video {config.video}", flush=True)
    return summary


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


def parameter_digest(policy: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in policy.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


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
    g.add_argument("--num-workers", type=cli.integer(0), default=4, help="DataLoader worker processes")
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
                   help=f"closed-loop evaluation episodes after training, on held-out scene seeds from {DEMO_EVAL_SEED}; "
                        "0 skips it")
    p.add_argument("--param-checksum-file", help=argparse.SUPPRESS)  # tests: each rank writes a digest
    return p


def flag_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every flag's default, by name (the fine-tuning recipe)."""
    return {action.dest: action.default for action in parser._actions if action.default is not argparse.SUPPRESS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the demo's defaults when --data is absent. `args.explicit` names the flags given
    on the command line: they override the demo's defaults and, on --resume, the run's saved arguments."""
    parser = build_parser()
    defaults = flag_defaults(parser)
    # argparse fills in a flag's default only where the namespace lacks it: starting from None for
    # every flag, one parse sets exactly the flags given (none of them can be given as None).
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults)))
    args.explicit = sorted(key for key, value in vars(args).items() if value is not None)
    if args.data is None:  # the demo (also when resuming it)
        defaults.update(DEMO_DEFAULTS)
    for key, value in defaults.items():
        if key not in args.explicit:
            setattr(args, key, value)
    args.betas = tuple(args.betas)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (cli.UserError, FileNotFoundError) as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says why
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ntrain.py: aborted without saving", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
