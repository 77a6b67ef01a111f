"""Benchmarks. One subcommand per thing measured; each prints JSON lines.

    python bench.py data [--workers 2] [--batch-size 8] [--batches 40]
    python bench.py infer [--device cpu] [--dtype float32] [--compile] [--fast [MODE]] [--batch 1 8]
    python bench.py train [--device cpu] [--batch-size 2]
    python bench.py sim [--ticks 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import flow
from cli import HelpFormatter, Parser, integer


def emit(record: dict) -> None:
    """One JSON line of results, flushed at once (runs take minutes)."""
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# data: random-access items/s of a 2-camera 480x640 AV1 dataset through a DataLoader


def synthetic_episodes(num_episodes: int, length: int, height: int, width: int, seed: int = 0):
    """Camera-like frames: a textured scene panning and a moving block, plus sensor noise, so the
    AV1 stream carries a realistic amount of detail (flat frames would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : 2 * height, 0 : 2 * width].astype(np.float32)
    scenes = []
    for camera in range(2):
        texture = (
            128
            + 60 * np.sin(x / (17 + 5 * camera)) * np.cos(y / 23)
            + 40 * np.sin((x + y) / 41)
        )
        colour = np.stack([texture, np.roll(texture, 31, axis=1), np.roll(texture, 57, axis=0)], axis=-1)
        scenes.append(colour)
    for episode in range(num_episodes):
        frames = {0: [], 1: []}
        for t in range(length):
            for camera, scene in enumerate(scenes):
                dy, dx = (t * (2 + camera) + 13 * episode) % height, (t * 3 + 7 * episode) % width
                image = scene[dy : dy + height, dx : dx + width].copy()
                by, bx = (5 * t) % (height - 64), (7 * t + 50 * camera) % (width - 64)
                image[by : by + 64, bx : bx + 64] = (200, 40 + 30 * camera, 40)
                image += rng.normal(0, 4, size=image.shape).astype(np.float32)
                frames[camera].append(np.clip(image, 0, 255).astype(np.uint8))
        state = rng.normal(size=(length, 6)).cumsum(0).astype(np.float32)
        yield {
            "task": "Pick up the cube and place it in the box.",
            "observation.state": state,
            "action": np.roll(state, -1, axis=0),
            "observation.images.top": frames[0],
            "observation.images.wrist": frames[1],
        }


def with_progress(episodes, total: int):
    for number, episode in enumerate(episodes, start=1):
        print(f"writing episode {number}/{total}", file=sys.stderr, flush=True)
        yield episode


def build_bench_dataset(cache_dir: Path, num_episodes: int, length: int) -> Path:
    root = cache_dir / f"bench-data-480x640-{num_episodes}x{length}-av1-g2-crf30"
    if root.exists():
        return root
    emit({"bench": "data", "event": "building dataset", "root": str(root)})
    start = time.perf_counter()
    data.write_dataset(root, with_progress(synthetic_episodes(num_episodes, length, 480, 640), num_episodes),
                       fps=30, crf=30, gop=2)
    emit({"bench": "data", "event": "built", "seconds": round(time.perf_counter() - start, 1)})
    return root


def children_cpu_seconds() -> float:
    """User+system CPU time of this process's children (the DataLoader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        if int(fields[1]) == os.getpid():  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def bench_data(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # the main process only collects batches; leave the cores to the workers
    root = build_bench_dataset(Path(args.cache_dir), args.episodes, args.length)
    dataset = data.LeRobotDataset(root, chunk_size=50)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                               generator=torch.Generator().manual_seed(0)),
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    batches = iter(loader)
    load_before = os.getloadavg()[0]  # other processes on the machine slow the workers down
    for _ in range(args.warmup):
        next(batches)
    start, cpu_start = time.perf_counter(), time.process_time() + children_cpu_seconds()
    for _ in range(args.batches):
        batch = next(batches)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() + children_cpu_seconds() - cpu_start
    items = args.batches * args.batch_size
    emit({
        "bench": "data",
        "items_per_s": round(items / seconds, 1),
        "frames_per_s": round(items * len(dataset.camera_keys) / seconds, 1),
        "items": items,
        "seconds": round(seconds, 2),
        # CPU time per item of the main process and its workers together; unlike items/s this
        # barely depends on what else runs on the machine.
        "cpu_ms_per_item": round(1000 * cpu_seconds / items, 2),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "image_shape": list(batch[dataset.camera_keys[0]].shape[1:]),
        "cpus": os.cpu_count(),
        "load_average_1min_before": round(load_before, 2),
    })


# ---------------------------------------------------------------------------------------------
# infer: one action chunk of the smolvla_base architecture (random weights, no Hub)


def timed(fn, repeats: int, sync) -> float:
    """Median wall time of fn() after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def device_sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 4096) -> float:
    """This machine's dense matrix-multiply throughput (printed): the ceiling the model's FLOPs are held to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, 5, device_sync(device))
    gflops = 2 * size**3 / seconds / 1e9
    emit({"bench": "matmul", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
          "threads": torch.get_num_threads(), "gflops": round(gflops, 1)})
    return gflops


def int8_linear_gops(size: int = 4096) -> float:
    """The same ceiling for the int8 fast modes: a size x size int8 dynamic linear layer (fbgemm: the
    activations quantised on the fly, int32 accumulation, float32 out) on size rows, in GOP/s."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # the API's announced move to torchao
        warnings.simplefilter("ignore")
        layer = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)),
                                 {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(size, size)
    with torch.no_grad():
        seconds = timed(lambda: layer(x), 5, lambda: None)
    gops = 2 * size**3 / seconds / 1e9
    emit({"bench": "matmul", "device": "cpu", "dtype": "int8 dynamic linear", "threads": torch.get_num_threads(),
          "gflops": round(gops, 1)})
    return gops


# The ceiling each fast mode's efficiency is held to: the dtype its bulk of FLOPs runs in (in
# "int8+bf16" the linears, 87% of the chunk, are int8; only the vision attention is bfloat16).
FAST_MODE_CEILING = {"int8": "int8", "int8+bf16": "int8", "bf16": "bfloat16", "fp32": "float32"}


def gemm_ceiling(dtype: str, size: int = 4096) -> float:
    """This machine's GEMM throughput for a FAST_MODE_CEILING dtype (printed)."""
    if dtype == "int8":
        return int8_linear_gops(size)
    return matmul_gflops(torch.device("cpu"), getattr(torch, dtype), size)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stand_in_vlm_dir(root: Path) -> Path:
    """SmolVLM2-500M's config with the demo's small tokenizer (demo.py): language is padded to 48
    tokens either way, so the vocabulary does not change the work, and the real one needs the Hub."""
    import demo

    demo.write_vlm(root, ["Pick up the cube and place it in the box."])
    (root / "config.json").write_text(json.dumps(flow.SMOLVLM2_500M_CONFIG))
    return root


def smolvla_base(device: torch.device, dtype: torch.dtype, cameras: int, height: int, width: int) -> flow.SmolVLA:
    """The smolvla_base architecture with random weights, seen through `cameras` cameras."""
    features = {f"observation.images.camera{i + 1}": {"type": "VISUAL", "shape": [3, height, width]}
                for i in range(cameras)}
    features["observation.state"] = {"type": "STATE", "shape": [6]}
    cfg = flow.SmolVLAConfig(input_features=features)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="smolvla-bench-") as tmp:  # the tokenizer is read at once
        tokenizer = flow.Tokenizer(stand_in_vlm_dir(Path(tmp) / "vlm"), cfg.tokenizer_max_length, True)
    policy = flow.SmolVLA(cfg, flow.SMOLVLM2_500M_CONFIG, tokenizer)
    # Random weights in the official precision mix: float32 projections, the rest in `dtype`.
    for name, param in policy.named_parameters():
        keep = not name.startswith(("vision.", "connector.", "lm.", "lm_head.", "expert.")) or (
            name.startswith("expert.layers.") and policy.expert_cfg.is_cross(int(name.split(".")[2]))
            and ("k_proj" in name or "v_proj" in name))
        param.data = param.data.to(torch.float32 if keep else dtype)
    policy.set_stats({k: {"mean": torch.zeros(6), "std": torch.ones(6)} for k in ("observation.state", "action")})
    return policy.to(device).eval()


def observation_batch(policy, batch_size: int, height: int, width: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(1)
    batch = {key: torch.rand(batch_size, 3, height, width, generator=generator).to(device)
             for key in policy.camera_keys}
    batch["observation.state"] = torch.randn(batch_size, 6, generator=generator).to(device)
    batch["task"] = ["Pick up the cube and place it in the box."] * batch_size
    return batch


# PyTorch's FLOP counter knows the CUDA attention kernels but not the CPU one, which SDPA runs on a
# CPU: without these formulas it misses the vision encoder's attention (77 GFLOP of smolvla_base's
# chunk) and the expert's. Both count 2 FLOPs per multiply-add, as the counter does for products.


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward: the scores q @ k^T and the weighted sum of values, for (B, H, L, D) shapes."""
    batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (dim + value_dim)


def cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    """Backward: the scores recomputed, then the gradients of the weights, values, queries and keys
    (five products of the forward's sizes, as the counter's formula for the CUDA kernels has)."""
    batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (3 * dim + 2 * value_dim)


def count_flops(fn) -> tuple[Any, int]:
    """Run fn() under PyTorch's FLOP counter -> (its result, the FLOPs of its matrix products,
    convolutions and attention, forward and backward)."""
    aten = torch.ops.aten
    attention = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=attention) as counter:
        result = fn()
    return result, counter.get_total_flops()


def bench_infer(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    sync = device_sync(device)
    peak = matmul_gflops(device, dtype)
    policy = smolvla_base(device, dtype, args.cameras, args.height, args.width)
    inputs, gflop_per_chunk = {}, {}
    for batch_size in args.batch:
        batch = observation_batch(policy, batch_size, args.height, args.width, device)
        noise = torch.randn(batch_size, policy.config.chunk_size, policy.config.max_action_dim,
                            generator=torch.Generator().manual_seed(2)).to(device)
        inputs[batch_size] = batch, noise
        # Counted on one real chunk, before compiling (the counter sees the eager operations).
        gflop_per_chunk[batch_size] = count_flops(lambda: policy.predict_chunk(batch, noise))[1] / 1e9
    if args.compile:
        policy.compile_denoise()
    exact = {}
    for batch_size in args.batch:
        batch, noise = inputs[batch_size]
        seconds = timed(lambda: policy.predict_chunk(batch, noise), args.repeats, sync)
        exact[batch_size] = (seconds, policy.predict_chunk(batch, noise), batch, noise)
        gflop = gflop_per_chunk[batch_size]
        emit({"bench": "infer", "mode": "exact", "device": str(device), "dtype": args.dtype,
              "compile": args.compile, "batch": batch_size, "ms_per_chunk": round(seconds * 1e3, 1),
              "gflop_per_chunk": round(gflop, 1), "gflops": round(gflop / seconds, 1),
              "efficiency": round(gflop / seconds / peak, 3), "peak_memory_mb": round(peak_memory_mb(device))})
    if args.dtype != "float32":
        reference = smolvla_base(device, torch.float32, args.cameras, args.height, args.width)
        seconds, actions, batch, noise = exact[args.batch[0]]
        difference = (reference.predict_chunk(batch, noise) - actions).abs()
        emit({"bench": "infer", "compare": f"{args.dtype} vs float32", "batch": args.batch[0],
              "mean_abs_action_diff_std": round(difference.mean().item(), 5),
              "max_abs_action_diff_std": round(difference.max().item(), 5)})
    if args.fast:
        chosen = flow.choose_fast_mode()
        modes = [chosen] if args.fast == "auto" else list(flow.FAST_MODES[:3]) if args.fast == "all" else [args.fast]
        ceilings = {"float32": peak}
        for mode in modes:
            # The same random weights (smolvla_base seeds them), made fast; the exact policy stays as it is.
            fast = smolvla_base(device, torch.float32, args.cameras, args.height, args.width).make_fast(mode)
            dtype = FAST_MODE_CEILING[mode]
            if dtype not in ceilings:
                ceilings[dtype] = gemm_ceiling(dtype)
            for batch_size in args.batch:
                _, exact_actions, batch, noise = exact[batch_size]
                emit(compare_fast(policy, fast, batch, noise, exact_actions, gflop_per_chunk[batch_size],
                                  ceilings[dtype], args.repeats, chosen=mode == chosen))
            del fast


def compare_fast(exact: flow.SmolVLA, fast: flow.SmolVLA, batch: dict, noise: torch.Tensor,
                 exact_actions: torch.Tensor, gflop: float, ceiling: float, repeats: int, chosen: bool) -> dict:
    """Time a fast policy against the exact one, interleaved (exact, fast, exact, fast, ... after a
    warm-up of each), so that both see the same machine: on a shared machine absolute timings drift
    by 10-30% between minutes, the ratio much less. The actions' difference is in units of the action
    std (the stand-in stats have std 1). Efficiency: the exact chunk's FLOPs per second of the fast
    one, over the measured ceiling of the dtype the mode computes in."""
    fast.predict_chunk(batch, noise)
    exact.predict_chunk(batch, noise)
    exact_times, fast_times = [], []
    for _ in range(repeats):
        for policy, times in ((exact, exact_times), (fast, fast_times)):
            start = time.perf_counter()
            policy.predict_chunk(batch, noise)
            times.append(time.perf_counter() - start)
    exact_seconds, seconds = float(np.median(exact_times)), float(np.median(fast_times))
    difference = (fast.predict_chunk(batch, noise) - exact_actions).abs()
    return {"bench": "infer", "mode": f"fast-{fast.fast_mode}", "chosen_for_this_cpu": chosen,
            "batch": exact_actions.shape[0], "ms_per_chunk": round(seconds * 1e3, 1),
            "exact_ms_same_run": round(exact_seconds * 1e3, 1), "speedup_vs_exact": round(exact_seconds / seconds, 2),
            "mean_abs_action_diff_std": round(difference.mean().item(), 5),
            "max_abs_action_diff_std": round(difference.max().item(), 5),
            "fidelity_bound_std": flow.INT8_FIDELITY_BOUND,
            "within_bound": difference.mean().item() < flow.INT8_FIDELITY_BOUND,
            "gflops": round(gflop / seconds, 1), "ceiling_dtype": FAST_MODE_CEILING[fast.fast_mode],
            "ceiling_gflops": round(ceiling, 1), "efficiency": round(gflop / seconds / ceiling, 3),
            "peak_memory_mb": round(peak_memory_mb(torch.device("cpu")))}


# ---------------------------------------------------------------------------------------------
# train: one optimisation step of the smolvla_base architecture, with and without cached vision


def bench_train(args: argparse.Namespace) -> None:
    import train

    device = torch.device(args.device)
    sync = device_sync(device)
    peak = matmul_gflops(device, torch.float32)
    policy = smolvla_base(device, torch.float32, args.cameras, args.height, args.width)
    trained = train.set_trainable(policy)  # the fine-tuning recipe: vision encoder and VLM frozen
    recipe = train.parse_args(["--data", "unused"])  # the fine-tuning optimiser and schedule (no --data: the demo's)
    optimizer = train.make_optimizer(policy, recipe)
    scheduler = train.make_scheduler(optimizer, recipe)
    policy.train()

    batch = observation_batch(policy, args.batch_size, args.height, args.width, device)
    generator = torch.Generator().manual_seed(3)
    batch["action"] = torch.randn(args.batch_size, policy.config.chunk_size, 6, generator=generator).to(device)
    batch["action_is_pad"] = torch.zeros(args.batch_size, policy.config.chunk_size, dtype=torch.bool, device=device)
    noise, time_ = train.flow_noise_and_time(0, 0, 0, 0, args.batch_size, policy, device)
    # What --cache-vision feeds instead of the images: embed_image outputs stored as float16.
    cached = {k: v for k, v in batch.items() if k not in policy.camera_keys}
    cached["image_embeddings"] = {k: v.half() for k, v in policy.encode_images(batch).items()}

    results = {}
    for mode, step_batch in (("uncached", batch), ("cache-vision", cached)):
        step = lambda: train.train_step(policy, optimizer, scheduler, step_batch, noise, time_)  # noqa: E731
        gflop = count_flops(step)[1] / 1e9  # one step, forward and backward
        seconds = timed(step, args.repeats, sync)
        results[mode] = args.batch_size / seconds
        emit({"bench": "train", "mode": mode, "device": str(device), "batch": args.batch_size,
              "ms_per_step": round(seconds * 1e3, 1), "samples_per_s": round(results[mode], 2),
              "gflop_per_step": round(gflop, 1), "gflops": round(gflop / seconds, 1),
              "efficiency": round(gflop / seconds / peak, 3),
              "trained_parameters": sum(p.numel() for n, p in policy.named_parameters() if n in set(trained)),
              "peak_memory_mb": round(peak_memory_mb(device))})
    emit({"bench": "train", "cache_vision_speedup": round(results["cache-vision"] / results["uncached"], 2),
          "note": "model step only; the cache also skips video decoding (see bench.py data)"})


# ---------------------------------------------------------------------------------------------
# sim: control ticks per second of the MuJoCo SO-100 with both cameras, through the servo bus


def bench_sim(args: argparse.Namespace) -> None:
    """A recording-like loop at 30 fps of simulated time, as fast as the CPU allows: each tick reads
    the joints through the driver, renders both cameras, sends goals (the scripted expert's) and
    steps the physics by one control period. Also each part alone."""
    import sim

    with sim.SO100Env() as sim_robot:
        sim_robot.reset(0)
        expert = sim.ScriptedExpert(sim_robot.scene, np.random.default_rng(0))
        robot, cameras, clock = sim_robot.robot, list(sim_robot.cameras.values()), sim_robot.clock
        parts = {"driver_read_write_ms": 0.0, "render_both_ms": 0.0, "physics_ms": 0.0}
        start = time.perf_counter()
        for k in range(args.ticks):
            t0 = time.perf_counter()
            robot.read()
            t1 = time.perf_counter()
            for camera in cameras:
                camera.read()
            t2 = time.perf_counter()
            robot.write(sim_robot.units(expert.goal(k / sim.FPS)))
            t3 = time.perf_counter()
            clock.sleep(1.0 / sim.FPS)
            t4 = time.perf_counter()
            parts["driver_read_write_ms"] += (t1 - t0) + (t3 - t2)
            parts["render_both_ms"] += t2 - t1
            parts["physics_ms"] += t4 - t3
        seconds = time.perf_counter() - start
    emit({"bench": "sim", "ticks": args.ticks, "ticks_per_s": round(args.ticks / seconds, 1),
          "realtime_factor_at_30fps": round(args.ticks / seconds / sim.FPS, 2),
          "image_size": list(sim.IMAGE_SIZE), "cameras": len(cameras),
          **{k: round(v / args.ticks * 1000, 2) for k, v in parts.items()}})


def torch_device(text: str) -> str:
    """An argparse type: a device this machine has (cpu, cuda, cuda:N, mps)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (use cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has CUDA devices 0 to {torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine (use cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


# Frame sizes the benchmarks accept: a frame must keep at least one row and column after the resize
# to the encoder's 512x512, and anything larger than 4096 is not a camera frame.
FRAME_SIDE = integer(16, 4096)


def add_model_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The flags infer and train share: where the smolvla_base-sized model runs and what it sees."""
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--repeats", type=integer(1), default=3, help=f"timed {what} after one warm-up; the median is printed")
    p.add_argument("--cameras", type=integer(1), default=2, help="camera images per observation")
    p.add_argument("--height", type=FRAME_SIDE, default=480, help="camera frame height, 16 to 4096")
    p.add_argument("--width", type=FRAME_SIDE, default=640, help="camera frame width, 16 to 4096")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("data", help="DataLoader random-access items/s, 2 cameras 480x640 AV1",
                            formatter_class=HelpFormatter)
    p.add_argument("--workers", type=integer(0), default=2, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=integer(1), default=8, help="items per batch")
    p.add_argument("--batches", type=integer(1), default=40, help="batches timed, after the warm-up")
    p.add_argument("--warmup", type=integer(0), default=4, help="batches read before timing")
    p.add_argument("--episodes", type=integer(1), default=8, help="episodes in the generated dataset")
    p.add_argument("--length", type=integer(1), default=150, help="frames per episode")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "smolvla-bench"),
                   help="where the generated dataset is kept between runs")
    p.set_defaults(run=bench_data)

    infer = commands.add_parser("infer", help="one action chunk of the smolvla_base architecture (random weights)",
                                formatter_class=HelpFormatter)
    add_model_arguments(infer, "runs")
    infer.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weights and activations (the checkpoint's float32 tensors stay float32)")
    infer.add_argument("--compile", action="store_true", help="torch.compile the denoising step")
    infer.add_argument("--fast", nargs="?", const="auto", default=None, metavar="MODE",
                       choices=["auto", "all", *flow.FAST_MODES],
                       help="also time a CPU fast mode against the exact chunk, interleaved: bare --fast the one "
                       f"chosen for this CPU, or one of {', '.join(flow.FAST_MODES)}, or all (the first three); "
                       "--device cpu and --dtype float32 only")
    infer.add_argument("--batch", type=integer(1), nargs="+", default=[1, 8], help="batch sizes timed")
    infer.set_defaults(run=bench_infer)

    p = commands.add_parser("train", help="training samples/s of the smolvla_base architecture, with/without "
                            "cached vision", formatter_class=HelpFormatter)
    add_model_arguments(p, "steps")
    p.add_argument("--batch-size", type=integer(1), default=2, help="samples per optimisation step")
    p.set_defaults(run=bench_train)

    p = commands.add_parser("sim", help="control ticks/s of the MuJoCo SO-100 with both cameras (sim.py)",
                            formatter_class=HelpFormatter)
    p.add_argument("--ticks", type=integer(1), default=300, help="control ticks timed (default 300: 10 s at 30 fps)")
    p.set_defaults(run=bench_sim)

    args = parser.parse_args(argv)
    if args.command == "infer" and args.fast and torch.device(args.device).type != "cpu":
        infer.error(f"argument --fast: the fast modes run on the CPU only, not on --device {args.device}")
    if args.command == "infer" and args.fast and args.dtype != "float32":
        infer.error(f"argument --fast: a fast mode is made from the float32 policy, not --dtype {args.dtype}")
    return args


# The packages whose releases move the figures (a fresh install takes the newest allowed by
# requirements.txt): printed first, so every set of figures says what it was measured with.
PACKAGES = ("torch", "numpy", "av", "pyarrow", "mujoco", "metaworld", "safetensors", "tokenizers")


def environment() -> dict[str, Any]:
    """The versions of PACKAGES (None: not installed), Python, and the CPU with the instruction-set
    extensions that choose the fast kernels."""
    from importlib import metadata
    import platform

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return {"bench": "environment", "python": platform.python_version(), **versions, "cpu": cpu,
            "cpu_extensions": extensions, "cpus": os.cpu_count(), "fast_mode_for_this_cpu": flow.choose_fast_mode()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    emit(environment())
    args.run(args)


if __name__ == "__main__":
    main()
