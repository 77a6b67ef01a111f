"""LeRobot datasets: a reader (v3.0 and v2.1 layouts) and, at the end of the file, a v3.0 writer.

Reading:
    ds = LeRobotDataset("lerobot/svla_so100_pickplace", chunk_size=50)   # hub id
    ds = LeRobotDataset("path/to/dataset", episodes=[0, 1, 2])           # local dir, 3 episodes
    item = ds[0]  # {"observation.images.top": (3,H,W) float in [0,1], "observation.state": (S,),
                  #  "action": (chunk_size, A), "action_is_pad": (chunk_size,), "task": str, ...}

Writing (the real v3.0 layout, AV1 video):
    write_dataset("out/demo", episodes, fps=30)   # see write_dataset's docstring

v3.0 layout: meta/info.json (fps, features, data_path and video_path templates), meta/stats.json,
meta/tasks.parquet (task strings and their task_index), meta/episodes/chunk-*/file-*.parquet (one row
per episode: length, data file, per camera the video file and the episode's from/to_timestamp in it),
data/chunk-*/file-*.parquet (one row per frame) and videos/<camera>/chunk-*/file-*.mp4 (several
episodes back to back). v2.1: one parquet and one mp4 per camera for each episode, jsonl metadata.
Nothing here comes from LeRobot itself: the parquet files are read with pyarrow and the videos
decoded with PyAV (libdav1d for AV1).

The file reads top down: the dataset (an item is a frame: its images, state, the next chunk of
actions, the task) and a copy of it decoded once into memory (PreloadedDataset, train.py --preload),
then the metadata and parquet readers it uses, the video decoder, and the writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import cli

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
# LeRobot accepts a decoded frame whose presentation time is this close to the requested time.
TIMESTAMP_TOLERANCE_S = 1e-4
# Columns every data parquet has, whatever the robot.
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# The keys an item gains with future_state_max_offset > 0 (LeRobotDataset's docstring).
WINDOW_KEYS = ("action_window", "action_window_is_pad")
# Video files a dataset keeps open per process (the least recently used is closed first): a v2.1
# dataset has one file per episode and camera, and a shuffled DataLoader visits them all.
MAX_OPEN_VIDEOS = 16


class DatasetError(cli.UserError):
    """A dataset that cannot be read as asked: missing file or column, bad metadata, bad index."""


class DatasetExistsError(cli.UserError, FileExistsError):
    """The writer's output directory exists: a dataset is never overwritten."""


class VideoDecodeError(DatasetError):
    """A video that cannot be opened or has no frame at the requested time."""


# ---------------------------------------------------------------------------------------------
# The dataset


class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobot dataset (v3.0 or v2.1) from a hub id or a local directory.

    Item i is frame i of the selected episodes (in the order given), as a dict:
      each camera key          float32 (3, H, W) in [0, 1], the video frame at the frame's time
      "observation.state"      float32 (S,)
      "action"                 float32 (chunk_size, A): actions i..i+chunk_size-1 of the episode,
                               the last one repeated past the episode end
      "action_is_pad"          bool (chunk_size,): True where the action is such a repeat
      "task"                   str
      "episode_index", "frame_index", "index"   int64 0-dim;  "timestamp" float32 0-dim
    With future_state_max_offset D > 0 (future-state conditioning, train.py --future-state-max-offset),
    items also carry the actions a later frame needs, for the training step to pick an offset from
    (the state it plans from is estimated from frame i's state and these actions, train.at_state_offsets):
      "action_window"          float32 (D+chunk_size, A): actions i..i+D+chunk_size-1, the last one
                               repeated past the episode end
      "action_window_is_pad"   bool (D+chunk_size,): True where the action is such a repeat
    The offset itself is not drawn here: a worker's draws would depend on which worker read the item,
    and train.py draws it from a generator seeded by the step, so a resumed run draws the same.
    Video files are opened lazily in whichever process reads items, so DataLoader workers each keep
    their own decoders open.
    """

    def __init__(
        self,
        repo_id_or_dir: str | os.PathLike,
        chunk_size: int = 50,
        episodes: list[int] | None = None,
        revision: str | None = None,
        decode_video: bool = True,
        future_state_max_offset: int = 0,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if future_state_max_offset < 0:
            raise ValueError(f"future_state_max_offset must be >= 0, got {future_state_max_offset}")
        self.chunk_size = chunk_size
        self.future_state_max_offset = future_state_max_offset
        self.decode_video = decode_video  # False: items carry no images (training from cached features)
        # A local directory as is, else a Hub dataset id downloaded into (or found in) the HF cache.
        self.root = cli.resolve_dir(repo_id_or_dir, "dataset", repo_type="dataset", revision=revision,
                                    error=DatasetError).resolve()
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DatasetError(f"not a LeRobot dataset: missing {info_path}")
        self.info = read_json(info_path)
        self.version = self.info.get("codebase_version")
        if self.version not in SUPPORTED_VERSIONS:
            raise DatasetError(
                f"{info_path}: codebase_version {self.version!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})"
            )
        for key in ("fps", "features", "data_path"):
            if key not in self.info:
                raise DatasetError(f"{info_path}: missing key {key!r}")
        self.fps = self.info["fps"]
        self.features = self.info["features"]
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]
        images_in_parquet = [k for k, f in self.features.items() if f.get("dtype") == "image"]
        if images_in_parquet:
            raise DatasetError(f"{info_path}: image features stored in parquet are not supported: {images_in_parquet}")
        if self.camera_keys and "video_path" not in self.info:
            raise DatasetError(f"{info_path}: has video features but no 'video_path'")
        self.vector_keys = [k for k in ("observation.state", "action") if k in self.features]
        if "action" not in self.features:
            raise DatasetError(f"{info_path}: no 'action' feature")
        if future_state_max_offset and "observation.state" not in self.features:
            raise DatasetError(f"{info_path}: no 'observation.state' feature, which future_state_max_offset "
                               f"{future_state_max_offset} conditions on")

        read_episodes = read_episodes_v30 if self.version == "v3.0" else read_episodes_v21
        self.episode_info = read_episodes(self.root, self.info, self.camera_keys)
        self.num_episodes = len(self.episode_info)
        self.episodes = self._select(episodes)
        self.tasks = read_tasks(self.root, self.version)
        self.stats = read_stats(self.root, self.version)
        self._load_frames()
        self._check_videos()
        self._readers: OrderedDict[Path, VideoReader] = OrderedDict()  # this process's open videos
        self._readers_pid = os.getpid()
        self._inherited_readers: list[OrderedDict] = []  # see _reader

    # -- construction ---------------------------------------------------------------------------

    def _select(self, episodes: list[int] | None) -> list[int]:
        available = sorted(self.episode_info)
        if episodes is None:
            return available
        selected = [int(e) for e in episodes]
        if not selected:
            raise DatasetError("episodes is an empty list; pass None for all episodes")
        unknown = [e for e in selected if e not in self.episode_info]
        if unknown:
            span = f"{available[0]}..{available[-1]}" if available else "none"
            raise DatasetError(
                f"{self.root}: episode(s) {unknown} out of range: the dataset has {len(available)} episodes ({span})"
            )
        if len(set(selected)) != len(selected):
            raise DatasetError(f"episodes lists an episode more than once: {selected}")
        return selected

    def _load_frames(self) -> None:
        """Reads the frame table of the selected episodes into memory (small: no images in it)."""
        columns = list(INDEX_COLUMNS) + self.vector_keys
        by_file: dict[Path, list[int]] = {}
        for e in self.episodes:
            by_file.setdefault(self.episode_info[e].data_file, []).append(e)
        per_episode: dict[int, dict[str, np.ndarray]] = {}
        for path, wanted in by_file.items():
            table = read_parquet(path, columns)
            arrays = {
                c: column_to_numpy(table, c, np.float32 if c in self.vector_keys or c == "timestamp" else np.int64, path)
                for c in columns
            }
            for e in wanted:
                rows = np.flatnonzero(arrays["episode_index"] == e)
                rows = rows[np.argsort(arrays["frame_index"][rows], kind="stable")]
                length = self.episode_info[e].length
                if len(rows) != length:
                    raise DatasetError(f"{path}: episode {e} has {len(rows)} rows, its metadata says {length}")
                if not np.array_equal(arrays["frame_index"][rows], np.arange(length)):
                    raise DatasetError(f"{path}: episode {e} frame_index is not 0..{length - 1}")
                per_episode[e] = {c: a[rows] for c, a in arrays.items()}
                unknown_tasks = set(per_episode[e]["task_index"].tolist()) - set(self.tasks)
                if unknown_tasks:
                    raise DatasetError(f"{path}: episode {e} uses task_index {sorted(unknown_tasks)} missing from the tasks file")
        self._columns = {c: np.concatenate([per_episode[e][c] for e in self.episodes]) for c in columns}
        lengths = np.array([self.episode_info[e].length for e in self.episodes], dtype=np.int64)
        ends = np.cumsum(lengths)
        self._episode_start = ends - lengths  # first row of each selected episode
        self._episode_end = ends
        self._row_episode = np.repeat(np.arange(len(self.episodes)), lengths)  # row -> selection position

    def _check_videos(self) -> None:
        """Fails early on missing video files and on frame times outside an episode's video span."""
        for position, e in enumerate(self.episodes):
            episode = self.episode_info[e]
            timestamps = self._columns["timestamp"][self._episode_start[position] : self._episode_end[position]]
            for key in self.camera_keys:
                path = episode.video_files[key]
                if not path.is_file():
                    raise DatasetError(f"missing video file: {path} (episode {e}, camera {key})")
                if key not in episode.to_timestamp or len(timestamps) == 0:
                    continue
                start, end = episode.from_timestamp[key], episode.to_timestamp[key]
                first, last = start + float(timestamps.min()), start + float(timestamps.max())
                if first < start - TIMESTAMP_TOLERANCE_S or last > end + TIMESTAMP_TOLERANCE_S:
                    bad = first if first < start - TIMESTAMP_TOLERANCE_S else last
                    raise DatasetError(
                        f"{path}: episode {e}, camera {key}: frame time {bad:.4f} s is outside the "
                        f"episode's video span [{start:.4f}, {end:.4f}] s"
                    )

    # -- items ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._row_episode)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} frames")
        i = int(i) % len(self)
        position = self._row_episode[i]
        end = self._episode_end[position]
        episode_index = self.episodes[position]
        columns = self._columns
        chunk = np.arange(i, i + self.chunk_size)
        item: dict[str, Any] = {}
        timestamp = float(columns["timestamp"][i])
        for key in self.camera_keys if self.decode_video else []:
            image = self._frame(episode_index, key, timestamp)
            item[key] = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if "observation.state" in columns:
            item["observation.state"] = torch.from_numpy(columns["observation.state"][i].copy())
        item["action"] = torch.from_numpy(columns["action"][np.minimum(chunk, end - 1)])
        item["action_is_pad"] = torch.from_numpy(chunk >= end)
        if self.future_state_max_offset:
            window = np.arange(i, i + self.future_state_max_offset + self.chunk_size)
            item["action_window"] = torch.from_numpy(columns["action"][np.minimum(window, end - 1)])
            item["action_window_is_pad"] = torch.from_numpy(window >= end)
        item["task"] = self.tasks[int(columns["task_index"][i])]
        item["episode_index"] = torch.tensor(episode_index, dtype=torch.int64)
        item["frame_index"] = torch.tensor(int(columns["frame_index"][i]), dtype=torch.int64)
        item["index"] = torch.tensor(int(columns["index"][i]), dtype=torch.int64)
        item["timestamp"] = torch.tensor(timestamp, dtype=torch.float32)
        return item

    def _frame(self, episode_index: int, key: str, timestamp: float) -> np.ndarray:
        episode = self.episode_info[episode_index]
        path = episode.video_files[key]
        time_s = episode.from_timestamp[key] + timestamp
        try:
            return self._reader(path).frame_at(time_s)
        except VideoDecodeError as e:
            self._drop_reader(path)
            raise VideoDecodeError(f"episode {episode_index}, camera {key}, frame time {timestamp:.4f} s: {e}") from e

    def _reader(self, path: Path) -> VideoReader:
        if self._readers_pid != os.getpid():
            # A forked DataLoader worker inherited the parent's decoders. It must neither use them nor
            # free them (freeing FFmpeg objects whose threads stayed in the parent blocks forever), so
            # they are parked here, alive as long as the dataset, which in a forked worker is until
            # the process exits: the parent's references to the dataset were forked with it.
            self._inherited_readers.append(self._readers)
            self._readers = OrderedDict()
            self._readers_pid = os.getpid()
        reader = self._readers.get(path)
        if reader is None:
            reader = VideoReader(path)
            self._readers[path] = reader
            while len(self._readers) > MAX_OPEN_VIDEOS:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(path)
        return reader

    def _drop_reader(self, path: Path) -> None:
        reader = self._readers.pop(path, None)
        if reader is not None:
            reader.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # open decoders do not travel to spawned workers
        state["_inherited_readers"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._readers_pid = os.getpid()

    def __repr__(self) -> str:
        return (
            f"LeRobotDataset({self.root}, {self.version}, {len(self.episodes)}/{self.num_episodes} episodes, "
            f"{len(self)} frames, fps={self.fps}, cameras={self.camera_keys})"
        )


PRELOAD_RUN = 256  # consecutive frames decoded as one piece of work by PreloadedDataset


class PreloadedDataset(torch.utils.data.Dataset):
    """Every item of a dataset decoded once and kept in memory, images as uint8 (a decoded frame is
    k/255 exactly, so nothing is lost). For datasets small enough to fit, like the demo's ~9,000
    frames (~500 MB) or Meta-World's 77,000 at 128 px (~4 GB), where decoding video for every
    sample would cost more than the step itself.

    Each field lives in one preallocated tensor for all frames (images (frames, 3, H, W) uint8):
    kept as tensors per item, the small ones landed in the holes the decoder's freed buffers left,
    glibc's heap grew by ~570 KB a frame against the 49 KB a 128-pixel frame holds, and MT50
    outgrew a 24 GB machine."""

    def __init__(self, dataset: LeRobotDataset, name: str, verbose: bool = True, workers: int = 0):
        # the cameras its items carry: none from a dataset read with decode_video=False (cached features)
        self.camera_keys = list(dataset.camera_keys) if dataset.decode_video else []
        self.length = len(dataset)
        self.columns: dict[str, torch.Tensor] = {}  # every tensor field, stacked over frames
        self.values: dict[str, list] = {}  # the rest (the task string)
        self.keys: list[str] = []  # the items' keys in the dataset's order
        # Runs of consecutive frames, so that each decoder reads forward; `workers` processes decode
        # runs side by side (the frames are independent, and nothing else runs yet).
        runs = torch.utils.data.DataLoader(dataset, batch_size=PRELOAD_RUN, num_workers=workers)
        start, done = time.perf_counter(), 0
        for run in runs:
            if not self.keys:
                self._allocate(run)
            if list(run) != self.keys:
                raise DatasetError(f"{dataset.root}: frames {done}.. have fields {sorted(run)}, the first {sorted(self.keys)}")
            n = len(run[self.keys[0]])
            for key, column in self.columns.items():
                value = run[key]
                column[done:done + n].copy_(value.mul_(255).round_() if key in self.camera_keys else value)
            for key, values in self.values.items():
                values.extend(run[key])
            done += n
            if verbose and done // 20_000 != (done - n) // 20_000:
                print(f"preloading {name} frames: {done}/{self.length}", flush=True)
        if verbose:
            print(f"preloaded {self.length} {name} frames in {time.perf_counter() - start:.0f} s", flush=True)

    def _allocate(self, run: dict[str, Any]) -> None:
        self.keys = list(run)
        for key, value in run.items():
            if torch.is_tensor(value):
                dtype = torch.uint8 if key in self.camera_keys else value.dtype
                self.columns[key] = torch.empty((self.length, *value.shape[1:]), dtype=dtype)
            else:
                self.values[key] = []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for key in self.keys:
            if key in self.camera_keys:
                item[key] = self.columns[key][i].float() / 255
            elif key in self.columns:
                item[key] = self.columns[key][i].clone()  # a copy: a consumer may change it in place
            else:
                item[key] = self.values[key][i]
        return item


# ---------------------------------------------------------------------------------------------
# Metadata, normalised across versions


@dataclass
class EpisodeInfo:
    """Where one episode lives. Video times are `from_timestamp[key] + frame timestamp`."""

    index: int
    length: int
    data_file: Path
    video_files: dict[str, Path] = field(default_factory=dict)
    from_timestamp: dict[str, float] = field(default_factory=dict)
    to_timestamp: dict[str, float] = field(default_factory=dict)  # absent in v2.1


def read_episodes_v30(root: Path, info: dict, camera_keys: list[str]) -> dict[int, EpisodeInfo]:
    """meta/episodes/chunk-*/file-*.parquet: one row per episode, pointing into data and videos."""
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DatasetError(f"missing episode metadata: no {root}/meta/episodes/chunk-*/file-*.parquet")
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in camera_keys:
        columns += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    episodes = {}
    for path in files:
        table = read_parquet(path, columns)
        col = {c: column_to_numpy(table, c, np.float64 if c.endswith("timestamp") else np.int64, path) for c in columns}
        for row in range(table.num_rows):
            index = int(col["episode_index"][row])
            data_file = root / info["data_path"].format(
                chunk_index=int(col["data/chunk_index"][row]), file_index=int(col["data/file_index"][row])
            )
            episode = EpisodeInfo(index, int(col["length"][row]), data_file)
            for key in camera_keys:
                episode.video_files[key] = root / info["video_path"].format(
                    video_key=key,
                    chunk_index=int(col[f"videos/{key}/chunk_index"][row]),
                    file_index=int(col[f"videos/{key}/file_index"][row]),
                )
                episode.from_timestamp[key] = float(col[f"videos/{key}/from_timestamp"][row])
                episode.to_timestamp[key] = float(col[f"videos/{key}/to_timestamp"][row])
            episodes[index] = episode
    return episodes


def read_episodes_v21(root: Path, info: dict, camera_keys: list[str]) -> dict[int, EpisodeInfo]:
    """meta/episodes.jsonl: one line per episode; one parquet and one mp4 per camera each."""
    path = root / "meta" / "episodes.jsonl"
    chunks_size = int(info.get("chunks_size", 1000))
    episodes = {}
    for row in read_jsonl(path):
        if "episode_index" not in row or "length" not in row:
            raise DatasetError(f"{path}: a line lacks 'episode_index' or 'length': {row}")
        index = int(row["episode_index"])
        chunk = index // chunks_size
        data_file = root / info["data_path"].format(episode_chunk=chunk, episode_index=index)
        episode = EpisodeInfo(index, int(row["length"]), data_file)
        for key in camera_keys:
            episode.video_files[key] = root / info["video_path"].format(
                episode_chunk=chunk, video_key=key, episode_index=index
            )
            episode.from_timestamp[key] = 0.0
        episodes[index] = episode
    return episodes


def read_tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v2.1":
        path = root / "meta" / "tasks.jsonl"
        rows = read_jsonl(path)
        bad = [row for row in rows if "task_index" not in row or "task" not in row]
        if bad:
            raise DatasetError(f"{path}: a line lacks 'task_index' or 'task': {bad[0]}")
        return {int(row["task_index"]): str(row["task"]) for row in rows}
    path = root / "meta" / "tasks.parquet"
    names = parquet_columns(path)
    # LeRobot writes this file from a pandas frame indexed by the task string: the strings land in
    # a column named "task" (named index, or a plain column) or "__index_level_0__" (unnamed index).
    task_column = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if task_column is None:
        raise DatasetError(f"{path}: no task string column ('task' or '__index_level_0__'); it has {names}")
    table = read_parquet(path, ["task_index", task_column])
    indices = column_to_numpy(table, "task_index", np.int64, path)
    return dict(zip(indices.tolist(), table.column(task_column).to_pylist()))


def aggregate_stats(per_episode: list[dict[str, dict]]) -> dict[str, dict[str, np.ndarray]]:
    """Whole-dataset stats from per-episode ones: count-weighted mean, pooled variance."""
    stats = {}
    for key in per_episode[0] if per_episode else []:
        parts = [s[key] for s in per_episode if key in s]
        counts = [np.asarray(p["count"], np.float64).reshape(-1)[0] for p in parts]
        means = [np.asarray(p["mean"], np.float64) for p in parts]
        stds = [np.asarray(p["std"], np.float64) for p in parts]
        total = sum(counts)
        mean = sum(c * m for c, m in zip(counts, means)) / total
        variance = sum(c * (s**2 + (m - mean) ** 2) for c, m, s in zip(counts, means, stds)) / total
        stats[key] = {
            "min": np.min([np.asarray(p["min"], np.float64) for p in parts], axis=0),
            "max": np.max([np.asarray(p["max"], np.float64) for p in parts], axis=0),
            "mean": mean,
            "std": np.sqrt(variance),
            "count": np.asarray([total]),
        }
    return stats


def read_stats(root: Path, version: str) -> dict[str, dict[str, torch.Tensor]]:
    """meta/stats.json; for v2.1 without it, aggregated from meta/episodes_stats.jsonl."""
    path = root / "meta" / "stats.json"
    if path.is_file():
        raw = read_json(path)
    elif version == "v2.1" and (root / "meta" / "episodes_stats.jsonl").is_file():
        raw = aggregate_stats([row["stats"] for row in read_jsonl(root / "meta" / "episodes_stats.jsonl")])
    else:
        return {}
    stats = {}
    for key, values in raw.items():
        stats[key] = {}
        for name, value in values.items():
            try:
                stats[key][name] = torch.as_tensor(np.asarray(value, dtype=np.float32))
            except (TypeError, ValueError):
                continue  # a non-numeric entry (none in known datasets); not a statistic we can use
    return stats


# ---------------------------------------------------------------------------------------------
# Small file readers with errors that name the file


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{line_number}: not valid JSON: {e}") from e
    return rows


def parquet_columns(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable parquet file: {e}") from e


def read_parquet(path: Path, columns: Iterable[str]) -> pa.Table:
    columns = list(columns)
    names = parquet_columns(path)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; it has {names}")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot read parquet: {e}") from e


def column_to_numpy(table: pa.Table, name: str, dtype: type, path: Path) -> np.ndarray:
    """A scalar column as (N,), a list column (variable or fixed size) as (N, D)."""
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise DatasetError(f"{path}: column {name!r} has {column.null_count} null value(s)")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False)
        n = len(column)
        if n and len(values) % n:
            raise DatasetError(f"{path}: column {name!r} has rows of different lengths")
        return values.reshape(n, len(values) // n if n else 0).astype(dtype)
    return column.to_numpy(zero_copy_only=False).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Video decoding


class VideoReader:
    """One open video file, decoding forward from where it stopped when it can, seeking when it must.

    Random access into an AV1 file written with a short GOP costs one seek plus at most a GOP of
    decoding; reading consecutive frames costs one decode each.
    """

    def __init__(self, path: Path, tolerance_s: float = TIMESTAMP_TOLERANCE_S, max_forward_s: float = 0.25):
        self.path = path
        self.tolerance_s = tolerance_s
        self.max_forward_s = max_forward_s  # decode forward up to this far instead of seeking
        if not path.is_file():
            raise VideoDecodeError(f"missing video file: {path}")
        try:
            self.container = av.open(str(path))
        except (av.FFmpegError, OSError) as e:
            raise VideoDecodeError(f"{path}: cannot open video: {e}") from e
        if not self.container.streams.video:
            self.container.close()
            raise VideoDecodeError(f"{path}: no video stream found (truncated file, or not a video)")
        self.stream = self.container.streams.video[0]
        # Random access decodes one or two frames per request: decoder threads only add start-up
        # and hand-off cost there, and DataLoader workers already keep every core busy.
        self.stream.codec_context.thread_count = 1
        self.time_base = float(self.stream.time_base)
        # One converter for the file: a frame's own to_ndarray(format=...) builds a fresh swscale
        # context every call, which costs more than the conversion itself. One thread, as above.
        self._to_rgb = VideoReformatter()
        self._frames: Iterator[av.VideoFrame] | None = None  # decoded frames after the last seek
        self._position_s = -math.inf  # time of the last frame taken from self._frames
        self._last_time_s = None  # the last frame returned, kept for repeated requests
        self._last_image = None

    def close(self) -> None:
        self._frames = None
        self.container.close()

    def frame_at(self, time_s: float) -> np.ndarray:
        """The RGB frame (H, W, 3) uint8 whose presentation time is within tolerance of time_s."""
        if self._last_time_s is not None and abs(self._last_time_s - time_s) <= self.tolerance_s:
            return self._last_image
        ahead = time_s - self._position_s
        if self._frames is None or not (self.tolerance_s < ahead <= self.max_forward_s):
            return self._seek_and_find(time_s)
        frame = self._decode_until(time_s)
        return self._accept(frame, time_s)

    def _seek_and_find(self, time_s: float) -> np.ndarray:
        # A demuxer may land after the wanted frame (it seeks by decode time, and B-frames reorder),
        # so fall back to seeking a second earlier, then to the start: bounded, never a loop.
        for seek_s in (time_s, time_s - 1.0, 0.0):
            self._seek(max(seek_s, 0.0))
            frame = self._decode_until(time_s)
            if frame is not None and self._time_of(frame) - time_s > self.tolerance_s and seek_s > 0.0:
                continue
            return self._accept(frame, time_s)
        raise AssertionError("unreachable")

    def _seek(self, time_s: float) -> None:
        target = int((time_s + self.tolerance_s) / self.time_base)
        try:
            self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
        except (av.FFmpegError, OSError) as e:
            raise VideoDecodeError(f"{self.path}: cannot seek to {time_s:.4f} s: {e}") from e
        self._frames = self.container.decode(self.stream)
        self._position_s = -math.inf

    def _time_of(self, frame: av.VideoFrame) -> float:
        if frame.pts is None:
            raise VideoDecodeError(f"{self.path}: a decoded frame has no presentation time")
        return frame.pts * self.time_base

    def _decode_until(self, time_s: float) -> av.VideoFrame | None:
        """The first frame not earlier than time_s - tolerance, or None at the end of the video."""
        try:
            for frame in self._frames:
                self._position_s = self._time_of(frame)
                if self._position_s >= time_s - self.tolerance_s:
                    return frame
        except (av.FFmpegError, OSError) as e:
            self._frames = None
            raise VideoDecodeError(f"{self.path}: decoding failed before {time_s:.4f} s: {e}") from e
        self._frames = None
        return None

    def _accept(self, frame: av.VideoFrame | None, time_s: float) -> np.ndarray:
        if frame is None:
            raise VideoDecodeError(
                f"{self.path}: no frame at {time_s:.4f} s: the video ends before it "
                f"(last frame decoded at {self._position_s:.4f} s)"
            )
        frame_time_s = self._time_of(frame)
        if abs(frame_time_s - time_s) > self.tolerance_s:
            raise VideoDecodeError(
                f"{self.path}: no frame at {time_s:.4f} s (nearest later frame at {frame_time_s:.4f} s, "
                f"tolerance {self.tolerance_s} s)"
            )
        self._last_time_s = frame_time_s
        self._last_image = self._to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
        return self._last_image


# ---------------------------------------------------------------------------------------------
# Writing a v3.0 dataset


def write_dataset(
    root: str | os.PathLike,
    episodes: Iterable[dict[str, Any]],
    fps: int,
    robot_type: str = "unknown",
    state_names: list[str] | None = None,
    action_names: list[str] | None = None,
    crf: int = 30,
    gop: int = 2,
) -> Path:
    """Writes episodes as a LeRobot v3.0 dataset at `root` (which must not exist) and returns it.

    episodes: an iterable (a generator keeps memory low) of dicts, one per episode:
        "task": str                                   the language instruction
        "observation.state": float array (T, S)
        "action": float array (T, A)
        "observation.images.<name>": uint8 (T, H, W, 3) array or a sequence of T (H, W, 3) arrays,
                                      one entry per camera; every episode has the same cameras/sizes
    fps: frames per second of every stream. state_names/action_names: the feature "names" (default
    "state_0".., "action_0"..). crf/gop: the AV1 encoder's settings (LeRobot records with g=2, crf=30).

    Layout written: meta/info.json, meta/stats.json (min, max, mean, std, count per feature; cameras
    per channel in [0, 1], estimated on every 4th pixel row and column), meta/tasks.parquet,
    meta/episodes/chunk-000/file-000.parquet, data/chunk-000/file-000.parquet and
    videos/<camera>/chunk-000/file-000.mp4 (yuv420p, all episodes back to back; each episode's
    from/to_timestamp in the episodes parquet). The files are first written to a sibling
    ".partial" directory, renamed into place at the end, so an interrupted run leaves no dataset
    that looks complete.
    """
    root = Path(root)
    if root.exists():
        raise DatasetExistsError(f"{root} already exists; the writer does not overwrite datasets")
    with cli.writing_dir(root) as partial:
        _write_v30(partial, iter(episodes), fps, robot_type, state_names, action_names, crf, gop)
    return root


def _write_v30(root, episodes, fps, robot_type, state_names, action_names, crf, gop) -> None:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per stream at its default level
    first = next(episodes, None)
    if first is None:
        raise ValueError("write_dataset needs at least one episode")
    camera_keys = [k for k in first if k.startswith("observation.images.")]
    shapes = {k: np.asarray(first[k][0]).shape for k in camera_keys}
    for key, shape in shapes.items():
        if len(shape) != 3 or shape[2] != 3 or shape[0] % 2 or shape[1] % 2:
            raise ValueError(f"{key}: frames must be (H, W, 3) with even H and W for yuv420p, got {shape}")
    state_dim = np.asarray(first["observation.state"]).shape[1]
    action_dim = np.asarray(first["action"]).shape[1]
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    videos = {
        key: VideoEncoder(root / video_path.format(video_key=key, chunk_index=0, file_index=0),
                          shapes[key][0], shapes[key][1], fps, crf, gop)
        for key in camera_keys
    }
    tasks: dict[str, int] = {}
    numeric_keys = ("observation.state", "action", *INDEX_COLUMNS)
    rows: dict[str, list[np.ndarray]] = {c: [] for c in numeric_keys}
    episode_rows: list[dict[str, Any]] = []
    dataset_stats = {k: RunningStats() for k in (*numeric_keys, *camera_keys)}
    total = 0
    try:
        for episode_index, episode in enumerate(_chain(first, episodes)):
            state = np.asarray(episode["observation.state"], dtype=np.float32)
            action = np.asarray(episode["action"], dtype=np.float32)
            length = len(state)
            where = f"episode {episode_index}"
            if state.shape != (length, state_dim) or action.shape != (length, action_dim):
                raise ValueError(f"{where}: state {state.shape} and action {action.shape} must be (T, {state_dim}) and (T, {action_dim}) with the same T")
            if length == 0:
                raise ValueError(f"{where}: an episode needs at least one frame")
            cameras = sorted(k for k in episode if k.startswith("observation.images."))
            if cameras != sorted(camera_keys):
                raise ValueError(f"{where}: cameras {cameras} differ from the first episode's {sorted(camera_keys)}")
            task = str(episode["task"])
            task_index = tasks.setdefault(task, len(tasks))
            columns = {
                "observation.state": state,
                "action": action,
                "timestamp": (np.arange(length) / fps).astype(np.float32),
                "frame_index": np.arange(length, dtype=np.int64),
                "episode_index": np.full(length, episode_index, dtype=np.int64),
                "index": np.arange(total, total + length, dtype=np.int64),
                "task_index": np.full(length, task_index, dtype=np.int64),
            }
            episode_stats = {k: RunningStats() for k in (*numeric_keys, *camera_keys)}
            for name, values in columns.items():
                rows[name].append(values)
                as_rows = values.reshape(length, -1).astype(np.float64)
                episode_stats[name].add(as_rows, length)
                dataset_stats[name].add(as_rows, length)
            row = {
                "episode_index": episode_index,
                "tasks": [task],
                "length": length,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": total,
                "dataset_to_index": total + length,
            }
            for key in camera_keys:
                frames = episode[key]
                if len(frames) != length:
                    raise ValueError(f"{where}: {key} has {len(frames)} frames, state has {length}")
                for frame_index, image in enumerate(frames):
                    image = np.asarray(image)
                    if image.shape != shapes[key] or image.dtype != np.uint8:
                        raise ValueError(f"{where}: {key} frame {frame_index} is {image.dtype} {image.shape}, expected uint8 {shapes[key]}")
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts, frame.time_base = total + frame_index, Fraction(1, fps)
                    videos[key].encode(frame)
                    pixels = _image_rows(image)
                    episode_stats[key].add(pixels, 1)
                    dataset_stats[key].add(pixels, 1)
                row.update({
                    f"videos/{key}/chunk_index": 0,
                    f"videos/{key}/file_index": 0,
                    f"videos/{key}/from_timestamp": total / fps,
                    f"videos/{key}/to_timestamp": (total + length) / fps,
                })
            for name, stats in episode_stats.items():
                shape = (3, 1, 1) if name in camera_keys else (-1,)
                for stat, value in stats.result(shape).items():
                    row[f"stats/{name}/{stat}"] = np.asarray(value, dtype=np.float64).reshape(-1).tolist()
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
            episode_rows.append(row)
            total += length
        for video in videos.values():
            video.encode(None)  # flush the encoder's delayed frames
    finally:
        for video in videos.values():
            video.close()

    data = {name: np.concatenate(parts) for name, parts in rows.items()}
    table = pa.table({
        "action": pa.FixedSizeListArray.from_arrays(pa.array(data["action"].reshape(-1)), action_dim),
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(data["observation.state"].reshape(-1)), state_dim),
        **{name: pa.array(data[name]) for name in INDEX_COLUMNS},
    })
    (root / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(table, root / data_path.format(chunk_index=0, file_index=0))
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(tasks_table(list(tasks)), root / "meta" / "tasks.parquet")
    stats = {name: s.result((3, 1, 1) if name in camera_keys else (-1,)) for name, s in dataset_stats.items()}
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))

    info = _info_json(fps, robot_type, len(episode_rows), total, len(tasks), data_path, video_path, shapes,
                      state_dim, action_dim, state_names, action_names)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))


def _info_json(fps: int, robot_type: str, episodes: int, frames: int, tasks: int, data_path: str, video_path: str,
               shapes: dict[str, tuple], state_dim: int, action_dim: int,
               state_names: list[str] | None, action_names: list[str] | None) -> dict[str, Any]:
    """meta/info.json: the features (cameras as LeRobot describes its videos) and the file templates."""
    features: dict[str, Any] = {
        "action": {"dtype": "float32", "shape": [action_dim], "names": action_names or [f"action_{i}" for i in range(action_dim)]},
        "observation.state": {"dtype": "float32", "shape": [state_dim], "names": state_names or [f"state_{i}" for i in range(state_dim)]},
    }
    for key in shapes:
        height, width, _ = shapes[key]
        features[key] = {
            "dtype": "video",
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": height, "video.width": width, "video.codec": "av1",
                "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                "video.channels": 3, "has_audio": False,
            },
        }
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for name in ("frame_index", "episode_index", "index", "task_index"):
        features[name] = {"dtype": "int64", "shape": [1], "names": None}
    return {
        "codebase_version": "v3.0",
        "robot_type": robot_type,
        "total_episodes": episodes,
        "total_frames": frames,
        "total_tasks": tasks,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": fps,
        "splits": {"train": f"0:{episodes}"},
        "data_path": data_path,
        "video_path": video_path if shapes else None,
        "features": features,
    }


def tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as LeRobot writes it: `pandas.DataFrame({"task_index": range(n)}, index=tasks)
    .to_parquet()`. LeRobot reads it back with pandas and takes a frame's instruction from the row name,
    `tasks.iloc[task_index].name`: the strings must be the pandas index, which pyarrow stores as a
    column "__index_level_0__" after the data columns, named in the b"pandas" schema metadata; rows in
    task_index order. A plain "task" column reads back as data, and every frame's task becomes its
    row number ("0", "1", ...). pandas is not a dependency here: the metadata is written as pandas 2.x
    writes it through pyarrow (same keys, order and JSON spacing; readers use index_columns, columns
    and column_indexes and ignore the version fields)."""
    index = "__index_level_0__"
    pandas_metadata = {
        "index_columns": [index],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": index, "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.3.3",  # the pandas release whose output this reproduces
    }
    schema = pa.schema([("task_index", pa.int64()), (index, pa.string())],
                       metadata={b"pandas": json.dumps(pandas_metadata).encode()})
    return pa.table([pa.array(range(len(tasks)), pa.int64()), pa.array(tasks, pa.string())], schema=schema)


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


class RunningStats:
    """min, max, mean, std, count over rows (vectors) or over pixels per channel (images)."""

    def __init__(self) -> None:
        self.count = 0  # rows, or frames for images
        self.n = 0  # values per component, for the moments
        self.sum = self.sum_sq = self.min = self.max = None

    def add(self, values: np.ndarray, count: int) -> None:
        """values: (n, D) float64, summarised per column D; count: what counts as one sample."""
        low, high = values.min(axis=0), values.max(axis=0)
        if self.sum is None:
            self.sum, self.sum_sq, self.min, self.max = values.sum(0), (values**2).sum(0), low, high
        else:
            self.sum += values.sum(0)
            self.sum_sq += (values**2).sum(0)
            self.min, self.max = np.minimum(self.min, low), np.maximum(self.max, high)
        self.n += len(values)
        self.count += count

    def result(self, shape: tuple[int, ...]) -> dict[str, list]:
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sum_sq / self.n - mean**2, 0.0))
        stat = {"min": self.min, "max": self.max, "mean": mean, "std": std}
        out = {name: value.reshape(shape).tolist() for name, value in stat.items()}
        out["count"] = [self.count]
        return out


def _image_rows(frame: np.ndarray) -> np.ndarray:
    # Every 4th row and column is plenty for per-channel image statistics and 16x cheaper.
    return frame[::4, ::4].reshape(-1, 3).astype(np.float64) / 255.0


# An encoder call that has not returned after this long has deadlocked: SVT-AV1 4.1 (PyAV 18) was seen
# to stop for good inside avcodec_send_frame, every one of its threads waiting, while its process ran
# at nice 19 on a 2-core machine saturated by other work (a frame of 96-480 px takes milliseconds).
ENCODER_STALL_S = 120.0
ENCODER_CLOSE_S = 10.0  # ending a stream of a write already failed or interrupted (VideoEncoder.close)


class VideoEncodeError(DatasetError):
    """The AV1 encoder failed or stopped answering."""


class VideoEncoder:
    """One AV1 video file (SVT-AV1 at its fastest preset, 12, as LeRobot records its videos), its
    encoder called from a thread of its own. The writer waits for each call at most ENCODER_STALL_S,
    so a deadlocked encoder becomes a VideoEncodeError that names the file, not a recording that hangs
    for ever; and since the writer waits in Python, not inside the encoder, Ctrl-C stops it. A stuck
    encoder is left as it is (ending or closing it would block too); its thread is a daemon and goes
    with the process."""

    def __init__(self, path: Path, height: int, width: int, fps: int, crf: int, gop: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.frames, self.stuck, self.ended = path, 0, False, False
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libsvtav1", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = Fraction(1, fps)
        self.stream.options = {"crf": str(crf), "g": str(gop), "preset": "12"}
        self._calls: queue.Queue = queue.Queue()  # (frame, the queue its outcome goes to)
        self._thread = threading.Thread(target=self._serve, name=f"encode {path.parent.parent.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            frame, outcome = self._calls.get()
            try:
                _encode(self.container, self.stream, frame)
                outcome.put(None)
            except BaseException as err:  # handed to the writer's thread, which raises it
                outcome.put(err)
            if frame is None:
                return

    def encode(self, frame: av.VideoFrame | None, wait_s: float | None = None) -> None:
        """Encode one frame (None: end the stream, flushing the encoder's delayed frames), waiting at
        most `wait_s` (default ENCODER_STALL_S). Calls run in order: after one interrupted by Ctrl-C,
        the next waits for it to end first."""
        wait_s = ENCODER_STALL_S if wait_s is None else wait_s
        what = "the end of the stream" if frame is None else f"frame {self.frames}"
        if self.stuck or self.ended:
            raise VideoEncodeError(f"{self.path}: the encoder is {'stuck' if self.stuck else 'ended'}; cannot take {what}")
        outcome: queue.Queue = queue.Queue(maxsize=1)
        self._calls.put((frame, outcome))
        try:
            error = outcome.get(timeout=wait_s)
        except queue.Empty:
            self.stuck = True
            raise VideoEncodeError(
                f"{self.path}: the AV1 encoder (libsvtav1) has not returned from {what} in "
                f"{wait_s:.0f} s: it has deadlocked (seen with SVT-AV1 4.1 on a saturated machine); "
                "nothing was written; record again, with fewer other jobs on the CPU") from None
        if frame is None:
            self.ended = True
        else:
            self.frames += 1
        if isinstance(error, av.error.FFmpegError):
            raise VideoEncodeError(f"{self.path}: the AV1 encoder failed at {what}: {error}") from error
        if error is not None:
            raise error

    def close(self) -> None:
        """Close the file. A stream not ended (the writer stopped by an error or Ctrl-C) is ended
        first, or SVT-AV1 is torn down mid-stream (it then complained from C, and once never exited);
        what was written is discarded then, so that waits ENCODER_CLOSE_S at most, not a full stall."""
        if self.stuck:
            return
        if not self.ended:
            try:
                self.encode(None, wait_s=ENCODER_CLOSE_S)
            except VideoEncodeError:
                if self.stuck:
                    return
        with scheduling_kept():
            self.container.close()


def _encode(container, stream, frame: av.VideoFrame | None) -> None:
    with scheduling_kept():  # the encoder starts at the first frame
        for packet in stream.encode(frame):
            container.mux(packet)


@contextlib.contextmanager
def scheduling_kept() -> Iterator[None]:
    """Puts back the scheduling policy of every thread of this process as it was before the block.

    SVT-AV1 (libsvtav1, as bundled with PyAV 18), started by a process that may raise priorities (root,
    or CAP_SYS_NICE), switches the thread that opens the encoder to real-time SCHED_FIFO 99, and its
    own threads with it; every thread and process started afterwards inherits that. On a robot
    computer that would put the control loop, the policy thread and the torch threads at a priority
    that starves the rest of the machine, and a spinning FIFO thread can hang a 2-core one. So each
    call into the encoder is wrapped: threads that existed keep their policy, new ones (the encoder's)
    get the calling thread's. A caller that chose a real-time policy itself keeps it."""
    tasks = "/proc/self/task"
    if not hasattr(os, "sched_setscheduler") or not os.path.isdir(tasks):
        yield
        return

    def policies() -> dict[int, tuple[int, int]]:
        found = {}
        for name in os.listdir(tasks):
            try:
                found[int(name)] = (os.sched_getscheduler(int(name)), os.sched_getparam(int(name)).sched_priority)
            except OSError:  # the thread ended meanwhile
                pass
        return found

    before = policies()
    caller = before.get(threading.get_native_id(), (os.SCHED_OTHER, 0))
    try:
        yield
    finally:
        for tid, policy in policies().items():
            wanted = before.get(tid, caller)
            if policy != wanted:
                try:
                    os.sched_setscheduler(tid, wanted[0], os.sched_param(wanted[1]))
                except OSError:  # ended, or (unprivileged) not allowed: nothing was raised then either
                    pass
