"""Benchmarks. One subcommand per thing measured; each prints JSON lines.

    python bench.py data [--workers 2] [--batch-size 8] [--batches 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data


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
    print(json.dumps({"bench": "data", "event": "building dataset", "root": str(root)}), flush=True)
    start = time.perf_counter()
    data.write_dataset(root, with_progress(synthetic_episodes(num_episodes, length, 480, 640), num_episodes),
                       fps=30, crf=30, gop=2)
    print(json.dumps({"bench": "data", "event": "built", "seconds": round(time.perf_counter() - start, 1)}), flush=True)
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
    print(json.dumps({
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
    }), flush=True)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("data", help="DataLoader random-access items/s, 2 cameras 480x640 AV1")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=40, help="batches timed, after the warm-up")
    p.add_argument("--warmup", type=int, default=4, help="batches read before timing")
    p.add_argument("--episodes", type=int, default=8, help="episodes in the generated dataset")
    p.add_argument("--length", type=int, default=150, help="frames per episode")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "smolvla-bench"),
                   help="where the generated dataset is kept between runs")
    p.set_defaults(run=bench_data)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
