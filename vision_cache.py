"""The frozen vision encoder's image embeddings, computed once per frame and trained from (--cache-vision).

With the vision encoder and connector frozen and no image augmentation, a frame's image embeddings
never change, so train.py can compute them once for the whole dataset and then train without
decoding any video or running the vision encoder. This file is the cache's format, its writer and
its reader:

    <cache_root>/<key>/<n>.npy      float16 (frames, tokens, hidden) per policy camera n, memory-mapped
    <cache_root>/<key>/index.npy    the frames' global dataset index at each row
    <cache_root>/<key>/meta.json    the cameras, the frame count, the dataset

The key is a digest of everything the embeddings depend on (cache_key), so a different policy or
dataset gets a new cache; a cache is built in a temporary directory and renamed into place, so a
half-built one is never used. Under torchrun each rank encodes a share of the frames.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import cli
import data
from flow import SmolVLA


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
            raise data.DatasetError(f"frame {frame_index} is not in the vision cache {self.cache_dir}")
        return int(self.order[position])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.arrays is None:
            self.arrays = {key: np.load(self.cache_dir / f"{n}.npy", mmap_mode="r") for n, key in enumerate(self.cameras)}
        item = self.dataset[i]
        row = self.row(int(item["index"]))
        item["image_embeddings"] = {key: torch.from_numpy(np.array(a[row])) for key, a in self.arrays.items()}
        return item


def without_video(dataset: data.LeRobotDataset) -> data.LeRobotDataset:
    """A view of the dataset whose items lack the camera images: no video is opened or decoded."""
    view = copy.copy(dataset)
    view.decode_video = False
    return view


def cache_key(policy: SmolVLA, dataset: data.LeRobotDataset, dtype: torch.dtype) -> str:
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
                              list(policy.config.resize_imgs_with_padding), str(dtype)]).encode())
    return digest.hexdigest()[:16]


def build(policy: SmolVLA, dataset: data.LeRobotDataset, cache_root: Path, batch_size: int = 64,
          num_workers: int = 0, rank: int = 0, world_size: int = 1) -> Path:
    """Encode every frame of `dataset` (all its episodes) once into `<cache_root>/<key>/`; returns that
    directory. Reused when the key matches. Ranks each encode a share of the frames."""
    autocast = policy.device.type == "cuda"
    key = cache_key(policy, dataset, torch.bfloat16 if autocast else torch.float32)
    final = cache_root / key
    if final.is_dir():
        _say(rank, f"vision cache: reusing {final}")
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
            _say(rank, f"vision cache: encoding {frames} frames x {len(cameras)} cameras into {final}")
        _barrier()
        index = encode_frames(policy, dataset, partial, cameras, batch_size, num_workers, rank, world_size)
        np.save(partial / f"index.{rank}.npy", index)
        _barrier()
        if rank == 0:
            index = sum(np.load(partial / f"index.{r}.npy") for r in range(world_size))
            np.save(partial / "index.npy", index)
            (partial / "meta.json").write_text(json.dumps({"cameras": cameras, "frames": frames,
                                                           "dataset": str(dataset.root), "dtype": "float16"}, indent=2))
    _barrier()
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
                                         num_workers=num_workers, worker_init_fn=_ignore_sigint)
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
            cli.print_live(text, stream=sys.stdout)
    for array in arrays:
        array.flush()
    if live:
        print(flush=True)
    return index


# ----------------------------------------------------------------------------------------------
# train.py's conventions, one line each (train.py imports this file, so they are repeated here, not
# imported): rank 0 speaks, ranks meet at barriers, DataLoader workers outlive a Ctrl-C


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint, so the DataLoader
    # workers must live on instead of dying under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
