"""data.py: LeRobot v3.0 (written by our writer) and v2.1 (written here by hand) datasets.

Frames carry their identity in flat grey blocks, robust to codec loss: the left half's grey level
encodes the frame index, the right half's the episode and camera. A decoded frame is then checked to
be exactly the frame the parquet row points at.
"""

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import cli
import data

FPS = 30
HEIGHT, WIDTH = 48, 64
CAMERAS = ["observation.images.top", "observation.images.wrist"]
LENGTHS = [7, 4, 9]
TASKS = ["pick the cube", "place the cube in the box", "pick the cube"]


def left_grey(frame_index: int) -> int:
    return 16 + 6 * frame_index


def right_grey(episode_index: int, camera: int) -> int:
    return 30 + 50 * episode_index + 20 * camera


def pattern_frame(episode_index: int, frame_index: int, camera: int) -> np.ndarray:
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:, : WIDTH // 2] = left_grey(frame_index)
    image[:, WIDTH // 2 :] = right_grey(episode_index, camera)
    return image


def assert_pattern(image: torch.Tensor, episode_index: int, frame_index: int, camera: int) -> None:
    """image: (3, H, W) float in [0, 1] as the dataset returns it."""
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    pixels = image.numpy() * 255.0
    left = pixels[:, 8:-8, 4 : WIDTH // 2 - 4].mean()
    right = pixels[:, 8:-8, WIDTH // 2 + 4 : -4].mean()
    # Neighbouring frames differ by 6 grey levels, so 2.5 tells them apart with codec loss to spare.
    assert abs(left - left_grey(frame_index)) < 2.5, f"got frame ~{(left - 16) / 6:.2f}, wanted {frame_index}"
    assert abs(right - right_grey(episode_index, camera)) < 2.5, (right, episode_index, camera)


def make_episodes() -> list[dict]:
    episodes = []
    for e, (length, task) in enumerate(zip(LENGTHS, TASKS)):
        t = np.arange(length, dtype=np.float32)[:, None]
        dims = np.arange(6, dtype=np.float32)[None, :]
        episodes.append({
            "task": task,
            "observation.state": 100 * e + t + dims / 10,
            "action": -(100 * e + t) - dims / 100 + 0.5,
            **{key: np.stack([pattern_frame(e, f, c) for f in range(length)]) for c, key in enumerate(CAMERAS)},
        })
    return episodes


@pytest.fixture(scope="module")
def tiny_v3_dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A 3-episode, 2-camera, 2-task v3.0 dataset written by data.write_dataset (AV1)."""
    episodes = make_episodes()
    root = data.write_dataset(tmp_path_factory.mktemp("v3") / "tiny", episodes, fps=FPS)
    return root, episodes


def encode_mp4(path: Path, frames, codec: str, faststart: bool = False) -> None:
    """An mp4 as a real recorder writes it: frame i at i/FPS seconds, yuv420p."""
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.codec_context.time_base = Fraction(1, FPS)
    stream.options = {"crf": "20"}  # x264 defaults otherwise: long GOP and B-frames
    for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, FPS)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def numpy_stats(values: np.ndarray) -> dict:
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [len(values)]}


def write_v21(root: Path, episodes: list[dict]) -> None:
    """LeRobot v2.1 by hand: data/chunk-000/episode_<i>.parquet and one H.264 mp4 per episode and camera
    under videos/chunk-000/<camera>/, meta/episodes.jsonl, meta/tasks.jsonl ({"task_index", "task"}
    lines), meta/episodes_stats.jsonl (per-episode stats) and, as in some real v2.1 datasets, no
    meta/stats.json."""
    tasks = list(dict.fromkeys(e["task"] for e in episodes))
    features = {
        "action": {"dtype": "float32", "shape": [6], "names": [f"a{i}" for i in range(6)]},
        "observation.state": {"dtype": "float32", "shape": [6], "names": [f"s{i}" for i in range(6)]},
        **{key: {"dtype": "video", "shape": [HEIGHT, WIDTH, 3], "names": ["height", "width", "channels"],
                 "info": {"video.codec": "h264", "video.pix_fmt": "yuv420p", "video.fps": FPS}} for key in CAMERAS},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        **{k: {"dtype": "int64", "shape": [1], "names": None} for k in ("frame_index", "episode_index", "index", "task_index")},
    }
    info = {
        "codebase_version": "v2.1", "robot_type": "so100", "total_episodes": len(episodes), "fps": FPS,
        "chunks_size": 1000, "total_frames": sum(len(e["action"]) for e in episodes),
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features,
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))
    episode_lines, stats_lines, start = [], [], 0
    for e, episode in enumerate(episodes):
        length = len(episode["action"])
        table = pa.table({
            "action": pa.array(episode["action"].tolist(), pa.list_(pa.float32())),
            "observation.state": pa.array(episode["observation.state"].tolist(), pa.list_(pa.float32())),
            "timestamp": pa.array(np.arange(length) / FPS, pa.float32()),
            "frame_index": pa.array(np.arange(length), pa.int64()),
            "episode_index": pa.array(np.full(length, e), pa.int64()),
            "index": pa.array(np.arange(start, start + length), pa.int64()),
            "task_index": pa.array(np.full(length, tasks.index(episode["task"])), pa.int64()),
        })
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for key in CAMERAS:
            encode_mp4(root / f"videos/chunk-000/{key}/episode_{e:06d}.mp4", episode[key], "libx264")
        episode_lines.append(json.dumps({"episode_index": e, "tasks": [episode["task"]], "length": length}) + "\n")
        stats = {k: numpy_stats(episode[k].astype(np.float64)) for k in ("observation.state", "action")}
        stats_lines.append(json.dumps({"episode_index": e, "stats": stats}) + "\n")
        start += length
    (root / "meta" / "episodes.jsonl").write_text("".join(episode_lines))
    (root / "meta" / "episodes_stats.jsonl").write_text("".join(stats_lines))


@pytest.fixture(scope="module")
def tiny_v21_dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    episodes = make_episodes()
    root = tmp_path_factory.mktemp("v21") / "tiny"
    write_v21(root, episodes)
    return root, episodes


def copy_dataset(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "copy"))


def expected_rows(episodes: list[dict], selected: list[int]):
    """(episode, frame) of every item, in item order."""
    return [(e, f) for e in selected for f in range(len(episodes[e]["action"]))]


def check_item(item: dict, episodes: list[dict], e: int, f: int, chunk_size: int, global_index: int) -> None:
    episode = episodes[e]
    length = len(episode["action"])
    np.testing.assert_array_equal(item["observation.state"].numpy(), episode["observation.state"][f])
    chunk = [min(f + k, length - 1) for k in range(chunk_size)]
    np.testing.assert_array_equal(item["action"].numpy(), episode["action"][chunk])
    assert item["action"].shape == (chunk_size, 6) and item["action"].dtype == torch.float32
    assert item["action_is_pad"].dtype == torch.bool
    assert item["action_is_pad"].tolist() == [f + k >= length for k in range(chunk_size)]
    assert item["task"] == episode["task"]
    assert item["episode_index"].item() == e and item["episode_index"].dtype == torch.int64
    assert item["frame_index"].item() == f and item["frame_index"].shape == ()
    assert item["index"].item() == global_index
    assert item["timestamp"].dtype == torch.float32 and item["timestamp"].item() == pytest.approx(f / FPS, abs=1e-6)
    for camera, key in enumerate(CAMERAS):
        assert_pattern(item[key], e, f, camera)


# ---------------------------------------------------------------------------------------------
# v3.0, written by our writer


def test_v3_layout_is_the_real_one(tiny_v3_dataset):
    root, episodes = tiny_v3_dataset
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(LENGTHS) and info["total_tasks"] == 2
    assert list(info["features"]) == ["action", "observation.state", *CAMERAS, "timestamp", "frame_index", "episode_index", "index", "task_index"]
    tasks = pq.read_table(root / "meta/tasks.parquet").to_pylist()
    assert [(t["task_index"], t["__index_level_0__"]) for t in tasks] == [(0, TASKS[0]), (1, TASKS[1])]
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [m["length"] for m in meta] == LENGTHS
    assert [m["dataset_from_index"] for m in meta] == [0, 7, 11]
    for key in CAMERAS:
        # Episodes follow each other in one file: 0-7, 7-11, 11-20 frames.
        assert [m[f"videos/{key}/from_timestamp"] for m in meta] == pytest.approx([0, 7 / FPS, 11 / FPS])
        assert [m[f"videos/{key}/to_timestamp"] for m in meta] == pytest.approx([7 / FPS, 11 / FPS, 20 / FPS])
        with av.open(str(root / f"videos/{key}/chunk-000/file-000.mp4")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name in ("libdav1d", "av1") and stream.codec_context.pix_fmt == "yuv420p"
            assert sum(1 for _ in container.decode(stream)) == sum(LENGTHS)
    rows = pq.read_table(root / "data/chunk-000/file-000.parquet").to_pylist()
    assert [r["episode_index"] for r in rows] == [0] * 7 + [1] * 4 + [2] * 9
    assert [r["task_index"] for r in rows] == [0] * 7 + [1] * 4 + [0] * 9


# What pandas 2.3.3 + pyarrow write for LeRobot's tasks frame, pandas.DataFrame({"task_index": [0, 1]},
# index=["pick the cube", "place the cube in the box"]).to_parquet(path), copied from such a file's
# b"pandas" schema metadata; only pyarrow's own version (creator) is filled in with the one installed.
PANDAS_TASKS_METADATA = (
    '{"index_columns": ["__index_level_0__"], "column_indexes": [{"name": null, "field_name": null, '
    '"pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}], "columns": '
    '[{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", '
    '"metadata": null}, {"name": null, "field_name": "__index_level_0__", "pandas_type": "unicode", '
    '"numpy_type": "object", "metadata": null}], "attributes": {}, "creator": {"library": "pyarrow", '
    '"version": "PYARROW_VERSION"}, "pandas_version": "2.3.3"}'
)


def test_v3_tasks_file_is_the_pandas_layout_lerobot_reads(tiny_v3_dataset):
    """LeRobot opens meta/tasks.parquet with pandas and takes a frame's instruction from the row name
    (tasks.iloc[task_index].name): the strings must be the frame's index, stored as pandas stores an
    unnamed index, or LeRobot gives every frame the task "0", "1", ..."""
    root, _ = tiny_v3_dataset
    path = root / "meta/tasks.parquet"
    schema = pq.read_schema(path)
    assert schema.names == ["task_index", "__index_level_0__"]
    assert [schema.field(n).type for n in schema.names] == [pa.int64(), pa.string()]
    assert all(schema.field(n).nullable for n in schema.names)  # as pandas writes them
    assert set(schema.metadata) == {b"pandas"}
    expected = PANDAS_TASKS_METADATA.replace("PYARROW_VERSION", pa.__version__).encode()
    assert schema.metadata[b"pandas"] == expected  # byte for byte: keys, order, spacing
    # the file's own key-value metadata (what pandas and LeRobot open): pandas' entry and pyarrow's schema
    assert set(pq.read_metadata(path).metadata) == {b"pandas", b"ARROW:schema"}
    table = pq.read_table(path)
    assert table.column("__index_level_0__").to_pylist() == TASKS[:2]  # row i is task_index i (iloc)
    assert table.column("task_index").to_pylist() == [0, 1]


def test_tasks_file_with_a_task_column_still_reads(tiny_v3_dataset, tmp_path):
    """LeRobot's v2.1 -> v3.0 converter names the index "task" (a "task" column); older writers wrote
    a plain "task" column. Both keep reading."""
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    pq.write_table(pa.table({"task_index": pa.array([1, 0], pa.int64()), "task": ["second", "first"]}),
                   root / "meta/tasks.parquet")
    dataset = data.LeRobotDataset(root)
    assert [dataset[i]["task"] for i in (0, 7, 11)] == ["first", "second", "first"]


def test_v3_every_item_in_order_and_shuffled(tiny_v3_dataset):
    root, episodes = tiny_v3_dataset
    dataset = data.LeRobotDataset(root, chunk_size=5)
    assert len(dataset) == sum(LENGTHS)
    assert dataset.fps == FPS and dataset.num_episodes == 3 and dataset.episodes == [0, 1, 2]
    assert dataset.camera_keys == CAMERAS and dataset.root == root.resolve()
    assert dataset.features["observation.state"]["shape"] == [6]
    rows = expected_rows(episodes, [0, 1, 2])
    parquet = pq.read_table(root / "data/chunk-000/file-000.parquet").to_pylist()
    order = list(range(len(dataset))) + list(np.random.default_rng(0).permutation(len(dataset)))
    for i in order:  # in order decodes forward; shuffled makes every read seek
        item = dataset[int(i)]
        e, f = rows[i]
        check_item(item, episodes, e, f, 5, global_index=i)
        assert item["observation.state"].tolist() == parquet[i]["observation.state"]
        assert item["action"][0].tolist() == parquet[i]["action"]


def test_action_chunk_clamps_at_episode_end_and_flags_padding(tiny_v3_dataset):
    root, episodes = tiny_v3_dataset
    dataset = data.LeRobotDataset(root, chunk_size=6)
    item = dataset[7 + 2]  # episode 1 (4 frames), frame 2: actions of frames 2, 3, then 3 repeated
    assert item["episode_index"].item() == 1 and item["frame_index"].item() == 2
    assert item["action_is_pad"].tolist() == [False, False, True, True, True, True]
    last = torch.tensor(episodes[1]["action"][3])
    assert torch.equal(item["action"][1], last) and torch.equal(item["action"][5], last)
    assert dataset[7 + 3]["action_is_pad"].tolist() == [False] + [True] * 5  # last frame
    assert not dataset[0]["action_is_pad"].any()  # episode 0 has 7 frames, room for 6


def test_v3_stats_match_numpy(tiny_v3_dataset):
    root, episodes = tiny_v3_dataset
    stats = data.LeRobotDataset(root).stats
    for key in ("observation.state", "action"):
        values = np.concatenate([e[key] for e in episodes]).astype(np.float64)
        assert set(stats[key]) >= {"min", "max", "mean", "std", "count"}
        assert all(v.dtype == torch.float32 for v in stats[key].values())
        np.testing.assert_allclose(stats[key]["mean"], values.mean(0), rtol=1e-5)
        np.testing.assert_allclose(stats[key]["std"], values.std(0), rtol=1e-4)
        np.testing.assert_allclose(stats[key]["min"], values.min(0))
        np.testing.assert_allclose(stats[key]["max"], values.max(0))
        assert stats[key]["count"].item() == sum(LENGTHS)
    for camera, key in enumerate(CAMERAS):
        pixels = np.concatenate([e[key] for e in episodes]).reshape(-1, 3) / 255.0
        assert stats[key]["mean"].shape == (3, 1, 1)
        np.testing.assert_allclose(stats[key]["mean"].flatten(), pixels.mean(0), rtol=1e-4)
        np.testing.assert_allclose(stats[key]["std"].flatten(), pixels.std(0), rtol=1e-4)
        np.testing.assert_allclose(stats[key]["max"].flatten(), pixels.max(0), rtol=1e-6)


def test_select_episodes(tiny_v3_dataset):
    root, episodes = tiny_v3_dataset
    dataset = data.LeRobotDataset(root, chunk_size=3, episodes=[2, 0])
    assert dataset.episodes == [2, 0] and dataset.num_episodes == 3
    assert len(dataset) == LENGTHS[2] + LENGTHS[0]
    first_index = {0: 0, 2: 11}
    for i, (e, f) in enumerate(expected_rows(episodes, [2, 0])):
        check_item(dataset[i], episodes, e, f, 3, global_index=first_index[e] + f)
    assert len(data.LeRobotDataset(root, episodes=[1])) == LENGTHS[1]


def test_items_without_video(tiny_v3_dataset, tmp_path):
    """decode_video=False (training from cached image features) opens no video at all."""
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    for video in (root / "videos").rglob("*.mp4"):
        video.write_bytes(b"not a video")
    item = data.LeRobotDataset(root, chunk_size=3, decode_video=False)[5]
    assert not any(key.startswith("observation.images.") for key in item)
    assert item["action"].shape == (3, 6) and item["frame_index"] == 5


def test_future_state_windows_are_the_next_frames_of_the_episode(tiny_v3_dataset):
    """future_state_max_offset D: item i also carries actions i..i+D+chunk-1 of its episode, the last
    frame repeated past the end with pad flags; the usual keys are unchanged."""
    root, episodes = tiny_v3_dataset
    plain = data.LeRobotDataset(root, chunk_size=3, decode_video=False)
    dataset = data.LeRobotDataset(root, chunk_size=3, decode_video=False, future_state_max_offset=2)
    assert set(dataset[0]) - set(plain[0]) == {"action_window", "action_window_is_pad"}
    for i, (e, f) in enumerate(expected_rows(episodes, [0, 1, 2])):
        item, length = dataset[i], LENGTHS[e]
        assert all(torch.equal(item[k], plain[i][k]) for k in plain[i] if k != "task")
        actions = [min(f + k, length - 1) for k in range(2 + 3)]
        np.testing.assert_array_equal(item["action_window"].numpy(), episodes[e]["action"][actions])
        assert item["action_window_is_pad"].tolist() == [f + k >= length for k in range(5)]
    # kept by the preloaded copy, as every other key
    decoded = data.LeRobotDataset(root, chunk_size=3, future_state_max_offset=2)
    preloaded = data.PreloadedDataset(decoded, "test", verbose=False)
    assert all(torch.equal(preloaded[9][k], dataset[9][k]) for k in data.WINDOW_KEYS)


@pytest.mark.parametrize("workers", [0, 2])
def test_preloaded_items_are_the_decoded_ones_bit_for_bit(tiny_v3_dataset, workers, monkeypatch):
    """Preloading keeps the images as uint8 (a quarter of float32's memory): a decoded frame is k/255,
    so every item comes back exactly as the dataset decodes it, decoded in one process or several."""
    monkeypatch.setattr(data, "PRELOAD_RUN", 5)  # several runs, split among the workers
    dataset = data.LeRobotDataset(tiny_v3_dataset[0], chunk_size=3)
    preloaded = data.PreloadedDataset(dataset, "test", verbose=False, workers=workers)
    assert len(preloaded) == len(dataset)
    for camera in CAMERAS:  # one uint8 tensor for all of a camera's frames, not one per item
        assert preloaded.columns[camera].dtype == torch.uint8
        assert preloaded.columns[camera].shape == (len(dataset), *dataset[0][camera].shape)
    for i in range(len(dataset)):
        decoded, kept = dataset[i], preloaded[i]
        assert list(kept) == list(decoded) and kept["task"] == decoded["task"]
        assert all(torch.equal(kept[k], decoded[k]) for k in decoded if k != "task")
    # without video (training from cached vision features) the items have no images to keep
    imageless = data.LeRobotDataset(tiny_v3_dataset[0], chunk_size=3, decode_video=False)
    kept = data.PreloadedDataset(imageless, "test", verbose=False)[0]
    assert not set(CAMERAS) & set(kept) and torch.equal(kept["action"], imageless[0]["action"])


def test_dataloader_workers_open_their_own_decoders(tiny_v3_dataset):
    root, episodes = tiny_v3_dataset
    dataset = data.LeRobotDataset(root, chunk_size=4)
    dataset[0]  # a decoder open in the parent must not be used by the forked workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    rows = expected_rows(episodes, [0, 1, 2])
    seen = []
    for batch in loader:
        assert batch[CAMERAS[0]].shape[1:] == (3, HEIGHT, WIDTH) and batch["action"].shape[1:] == (4, 6)
        for j, index in enumerate(batch["index"].tolist()):
            e, f = rows[index]
            assert batch["task"][j] == episodes[e]["task"]
            for camera, key in enumerate(CAMERAS):
                assert_pattern(batch[key][j], e, f, camera)
            seen.append(index)
    assert sorted(seen) == list(range(len(dataset)))


def test_hub_id_goes_through_snapshot_download(tiny_v3_dataset, monkeypatch):
    root, _ = tiny_v3_dataset
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, revision=None, **_):
        calls.append((repo_id, repo_type, revision))
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dataset = data.LeRobotDataset("lerobot/svla_so100_pickplace", revision="v3.0")
    assert calls == [("lerobot/svla_so100_pickplace", "dataset", "v3.0")]
    assert len(dataset) == sum(LENGTHS) and dataset.root == root


def test_unknown_hub_id_and_missing_directory_are_clear_errors(monkeypatch, tmp_path):
    def not_found(repo_id, repo_type=None, revision=None, **_):
        raise FileNotFoundError(f"Repository Not Found for url: https://huggingface.co/api/datasets/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(data.DatasetError, match="no such local directory.*nobody/nothing.*Repository Not Found"):
        data.LeRobotDataset("nobody/nothing")
    with pytest.raises(data.DatasetError, match="no such local directory"):
        data.LeRobotDataset(str(tmp_path / "no" / "such" / "dataset"))
    with pytest.raises(data.DatasetError, match="missing .*info.json"):
        data.LeRobotDataset(tmp_path)  # exists, but is not a dataset


def test_mistyped_local_path_says_no_such_directory_as_well_as_the_hub_error(monkeypatch, tmp_path):
    """'outputs/demo_datset' has the shape of a Hub id 'owner/name': the message must still say that
    no such local directory exists (and suggest the near one), not only that the download failed,
    and stay on one line when the Hub client's message does not."""
    def offline(repo_id, repo_type=None, revision=None, **_):
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying "
                      "to locate the files on the Hub.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "demo_dataset").mkdir(parents=True)
    with pytest.raises(data.DatasetError) as error:
        data.LeRobotDataset("outputs/demo_datset", revision="v3.0")
    message = str(error.value)
    assert f"no such local directory: {tmp_path / 'outputs' / 'demo_datset'}" in message
    assert "did you mean outputs/demo_dataset?" in message
    assert "revision v3.0" in message and "Name or service not known An error happened" in message
    assert "\n" not in message


def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path):
    episodes = make_episodes()
    episodes[1]["observation.images.wrist"] = episodes[1]["observation.images.wrist"][:2]  # 2 frames, 4 states
    with pytest.raises(ValueError, match="episode 1: observation.images.wrist has 2 frames"):
        data.write_dataset(tmp_path / "bad", episodes, fps=FPS)
    assert list(tmp_path.iterdir()) == []  # no half-written dataset, no .partial directory
    (tmp_path / "exists").mkdir()
    with pytest.raises(data.DatasetExistsError, match="already exists") as raised:
        data.write_dataset(tmp_path / "exists", make_episodes()[:1], fps=FPS)
    assert isinstance(raised.value, FileExistsError) and isinstance(raised.value, cli.UserError)


# ---------------------------------------------------------------------------------------------
# v2.1, written by hand, H.264 with x264's long GOP and B-frames


def test_v21_items_and_aggregated_stats(tiny_v21_dataset):
    root, episodes = tiny_v21_dataset
    dataset = data.LeRobotDataset(root, chunk_size=4)
    assert len(dataset) == sum(LENGTHS) and dataset.num_episodes == 3 and dataset.camera_keys == CAMERAS
    rows = expected_rows(episodes, [0, 1, 2])
    order = list(range(len(dataset))) + list(np.random.default_rng(1).permutation(len(dataset)))
    for i in order:
        e, f = rows[i]
        check_item(dataset[int(i)], episodes, e, f, 4, global_index=i)
        parquet = pq.read_table(root / f"data/chunk-000/episode_{e:06d}.parquet").to_pylist()[f]
        assert dataset[int(i)]["observation.state"].tolist() == pytest.approx(parquet["observation.state"])
    # No meta/stats.json: the per-episode stats are pooled.
    for key in ("observation.state", "action"):
        values = np.concatenate([e[key] for e in episodes]).astype(np.float64)
        np.testing.assert_allclose(dataset.stats[key]["mean"], values.mean(0), rtol=1e-5)
        np.testing.assert_allclose(dataset.stats[key]["std"], values.std(0), rtol=1e-4)
        np.testing.assert_allclose(dataset.stats[key]["min"], values.min(0))
        np.testing.assert_allclose(dataset.stats[key]["max"], values.max(0))
        assert dataset.stats[key]["count"].item() == sum(LENGTHS)


def test_v21_select_episodes(tiny_v21_dataset):
    root, episodes = tiny_v21_dataset
    dataset = data.LeRobotDataset(root, chunk_size=2, episodes=[1])
    assert len(dataset) == LENGTHS[1]
    for f in range(LENGTHS[1]):
        check_item(dataset[f], episodes, 1, f, 2, global_index=7 + f)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file (and episode, time), never a hang or a wrong sample


def test_unsupported_codebase_version(tiny_v3_dataset, tmp_path):
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v1.6"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(data.DatasetError, match=r"info.json: codebase_version 'v1.6' is not supported.*v2.1, v3.0"):
        data.LeRobotDataset(root)


def test_episode_index_out_of_range(tiny_v3_dataset):
    with pytest.raises(data.DatasetError, match=r"episode\(s\) \[3\] out of range.*3 episodes \(0..2\)"):
        data.LeRobotDataset(tiny_v3_dataset[0], episodes=[0, 3])
    with pytest.raises(IndexError):
        data.LeRobotDataset(tiny_v3_dataset[0])[sum(LENGTHS)]


@pytest.mark.parametrize("missing", ["data/chunk-000/file-000.parquet", "meta/tasks.parquet",
                                     "meta/episodes/chunk-000/file-000.parquet"])
def test_missing_metadata_or_data_file(tiny_v3_dataset, tmp_path, missing):
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    (root / missing).unlink()
    with pytest.raises(data.DatasetError, match="missing"):
        data.LeRobotDataset(root)


def test_data_file_that_is_not_parquet(tiny_v3_dataset, tmp_path):
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    (root / "data/chunk-000/file-000.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(data.DatasetError, match=r"data/chunk-000/file-000.parquet: not a readable parquet file"):
        data.LeRobotDataset(root)


def test_missing_video_file_names_file_and_episode(tiny_v21_dataset, tmp_path):
    root = copy_dataset(tiny_v21_dataset[0], tmp_path)
    (root / "videos/chunk-000/observation.images.wrist/episode_000001.mp4").unlink()
    with pytest.raises(data.DatasetError, match=r"missing video file: .*episode_000001.mp4 \(episode 1, camera observation.images.wrist\)"):
        data.LeRobotDataset(root)
    assert len(data.LeRobotDataset(root, episodes=[0, 2])) == LENGTHS[0] + LENGTHS[2]


def test_parquet_without_required_column(tiny_v3_dataset, tmp_path):
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["action"]), path)
    with pytest.raises(data.DatasetError, match=r"file-000.parquet: missing column\(s\) \['action'\]"):
        data.LeRobotDataset(root)


@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_corrupt_or_truncated_video_raises(tiny_v3_dataset, tmp_path, damage):
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    path = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    content = path.read_bytes()
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(content), dtype=np.uint8).tobytes())
    else:
        path.write_bytes(content[: len(content) // 2])
    dataset = data.LeRobotDataset(root)
    with pytest.raises(data.VideoDecodeError, match=r"episode 1, camera observation.images.top, frame time 0.0333 s: .*file-000.mp4"):
        dataset[8]


def test_truncated_streamable_video_raises_at_the_lost_frames(tiny_v21_dataset, tmp_path):
    """With the index at the front ("faststart") a truncated mp4 still opens: the frames before the
    cut decode, the lost ones must raise rather than hang or return another frame."""
    root, episodes = tiny_v21_dataset
    root = copy_dataset(root, tmp_path)
    path = root / "videos/chunk-000/observation.images.top/episode_000002.mp4"
    encode_mp4(path, episodes[2]["observation.images.top"], "libx264", faststart=True)
    with av.open(str(path)) as container:
        packet_starts = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
    path.write_bytes(path.read_bytes()[: packet_starts[5]])  # keep the first 5 packets (decode order)
    dataset = data.LeRobotDataset(root, episodes=[2])
    for f in (0, 4, 1):
        assert_pattern(dataset[f]["observation.images.top"], 2, f, 0)
    with pytest.raises(data.VideoDecodeError, match=r"episode 2, camera observation.images.top, frame time 0.2667 s: .*episode_000002.mp4: no frame at 0.2667 s"):
        dataset[8]


def test_v21_video_shorter_than_episode(tiny_v21_dataset, tmp_path):
    root, episodes = tiny_v21_dataset
    root = copy_dataset(root, tmp_path)
    path = root / "videos/chunk-000/observation.images.wrist/episode_000000.mp4"
    encode_mp4(path, episodes[0]["observation.images.wrist"][:3], "libx264")
    dataset = data.LeRobotDataset(root)
    assert_pattern(dataset[2]["observation.images.wrist"], 0, 2, 1)
    with pytest.raises(data.VideoDecodeError, match=r"episode 0, camera observation.images.wrist, frame time 0.1667 s: .*episode_000000.mp4: no frame at 0.1667 s: the video ends"):
        dataset[5]


def shift_timestamps(path: Path, rows: slice, seconds: float) -> None:
    """Rewrite a data parquet with the timestamps of `rows` moved by `seconds`."""
    table = pq.read_table(path)
    timestamps = table.column("timestamp").to_numpy().copy()
    timestamps[rows] += seconds
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(timestamps)), path)


def test_timestamp_between_frames_is_an_error_not_a_neighbour(tiny_v21_dataset, tmp_path):
    root = copy_dataset(tiny_v21_dataset[0], tmp_path)
    shift_timestamps(root / "data/chunk-000/episode_000001.parquet", slice(2, 3), 0.5 / FPS)
    dataset = data.LeRobotDataset(root, episodes=[1])
    assert_pattern(dataset[1]["observation.images.top"], 1, 1, 0)
    with pytest.raises(data.VideoDecodeError, match=r"episode 1, .*frame time 0.0833 s: .*no frame at 0.0833 s"):
        dataset[2]


def test_v3_timestamps_outside_the_episode_video_span(tiny_v3_dataset, tmp_path):
    root = copy_dataset(tiny_v3_dataset[0], tmp_path)
    shift_timestamps(root / "data/chunk-000/file-000.parquet", slice(7, 11), 10.0)  # episode 1
    with pytest.raises(data.DatasetError, match=r"file-000.mp4: episode 1, camera observation.images.top: frame time 10.3333 s is outside"):
        data.LeRobotDataset(root)
    assert len(data.LeRobotDataset(root, episodes=[0, 2])) == LENGTHS[0] + LENGTHS[2]


def _scheduling_of_main_new_thread_and_child() -> list[int]:
    import subprocess
    import sys
    import threading

    seen = [os.sched_getscheduler(0)]
    thread = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
    thread.start()
    thread.join()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                           capture_output=True, text=True, timeout=60, check=True)
    return [*seen, int(child.stdout)]


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="POSIX scheduling policies (Linux)")
def test_writing_av1_leaves_threads_and_children_at_normal_priority(tmp_path):
    """SVT-AV1 run as root switches the encoding thread to SCHED_FIFO 99, inherited by every later
    thread and process (checked by hand: 0 before an encode, 1 after, without the guard)."""
    assert _scheduling_of_main_new_thread_and_child() == [os.SCHED_OTHER] * 3
    # Threads that other libraries started earlier in this process keep their own policy (Mesa's
    # shader-cache thread "disk$0", started by an earlier test's rendering, runs at SCHED_BATCH);
    # every other thread, the encoder's own included, must be at the normal one afterwards.
    before = thread_policies()
    rng = np.random.default_rng(0)
    episode = {"task": "t", "observation.state": np.zeros((6, 2), np.float32), "action": np.zeros((6, 2), np.float32),
               "observation.images.top": rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)}
    data.write_dataset(tmp_path / "ds", [episode, episode], fps=10)
    assert _scheduling_of_main_new_thread_and_child() == [os.SCHED_OTHER] * 3
    for task, policy in thread_policies().items():
        assert policy == before.get(task, os.SCHED_OTHER), f"thread {task}"


def thread_policies() -> dict[int, int]:
    """Each thread of this process: its scheduling policy (threads that end meanwhile are left out)."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        try:
            found[int(task)] = os.sched_getscheduler(int(task))
        except ProcessLookupError:
            pass
    return found


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="POSIX scheduling policies (Linux)")
def test_scheduling_kept_puts_back_what_a_library_changed():
    import threading

    try:  # what the encoder does, done by hand: needs the right to raise priorities (root)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except PermissionError:
        pytest.skip("not allowed to set a real-time policy here")
    started, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), release.wait(10)))
    with data.scheduling_kept():
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(5))
        worker.start()  # inherits FIFO, as the encoder's threads do
        started.wait(10)
        assert os.sched_getscheduler(worker.native_id) == os.SCHED_FIFO
    try:
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        assert os.sched_getscheduler(worker.native_id) == os.SCHED_OTHER
    finally:
        release.set()
        worker.join()


def test_a_write_stopped_by_bad_input_still_ends_the_encoders_stream(tmp_path):
    """SVT-AV1 torn down mid-stream complains ("deinit called without sending EOS") from its own C
    code, outside Python's reach: the writer ends each encoder's stream on the way out of an error."""
    import subprocess
    import sys

    code = (
        "import numpy as np, data\n"
        "frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)\n"
        "good = {'task': 't', 'observation.state': np.zeros((6, 2), np.float32),\n"
        "        'action': np.zeros((6, 2), np.float32), 'observation.images.top': frames}\n"
        "bad = dict(good, **{'observation.images.top': frames[:, :16]})\n"
        f"try:\n    data.write_dataset({str(tmp_path / 'ds')!r}, [good, good, bad], fps=10)\n"
        "except ValueError as err:\n    print('refused')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(data.__file__).parent, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "refused\n"), done.stderr
    assert "EOS" not in done.stderr and not (tmp_path / "ds").exists()


def test_an_encoder_that_stops_answering_is_an_error_naming_its_file(tmp_path, monkeypatch):
    """A deadlocked encoder call (SVT-AV1 4.1 once stopped for good inside avcodec_send_frame, every
    thread of it waiting) must end the write with an error after data.ENCODER_STALL_S, not hang it."""
    import threading
    import time

    real_encode, release = data._encode, threading.Event()
    calls = {"n": 0}

    def deadlocks_at_the_wrist_cameras_third_frame(container, stream, frame):
        if frame is not None and "wrist" in container.name:
            calls["n"] += 1
            if calls["n"] == 3:
                release.wait(30)  # stands for the deadlock; released at the end of the test
                return
        real_encode(container, stream, frame)

    monkeypatch.setattr(data, "_encode", deadlocks_at_the_wrist_cameras_third_frame)
    monkeypatch.setattr(data, "ENCODER_STALL_S", 1.0)
    start = time.monotonic()
    try:
        with pytest.raises(data.VideoEncodeError, match=r"observation\.images\.wrist.*frame 2 in 1 s: it has deadlocked"):
            data.write_dataset(tmp_path / "ds", make_episodes(), fps=FPS)
        assert time.monotonic() - start < 20
        assert list(tmp_path.iterdir()) == []  # no dataset, no .partial directory
    finally:
        release.set()


def test_ctrl_c_stops_a_write_whose_encoder_is_stuck_in_c(tmp_path, spawn):
    """The writer waits for the encoder in Python, so Ctrl-C works even while a call into the encoder
    never returns. The stuck call stands in C here as it did in SVT-AV1: pthread_join on a thread that
    never ends, which no signal interrupts (made from the writer's thread, it would block Ctrl-C too)."""
    import signal
    import subprocess
    import sys

    code = (
        "import ctypes, sys, threading, numpy as np, data\n"
        "data.ENCODER_CLOSE_S = 1.0\n"
        "forever = threading.Thread(target=threading.Event().wait, daemon=True); forever.start()\n"
        "real, calls = data._encode, []\n"
        "def stuck(container, stream, frame):\n"
        "    calls.append(frame)\n"
        "    if len(calls) == 3:\n"
        "        print('stuck', flush=True)\n"
        "        ctypes.CDLL(None).pthread_join(ctypes.c_ulong(forever.ident), None)\n"
        "    real(container, stream, frame)\n"
        "data._encode = stuck\n"
        "ep = {'task': 't', 'observation.state': np.zeros((8, 2), np.float32),\n"
        "      'action': np.zeros((8, 2), np.float32), 'observation.images.top': np.zeros((8, 32, 32, 3), np.uint8)}\n"
        f"try:\n    data.write_dataset({str(tmp_path / 'ds')!r}, [ep], fps=10)\n"
        "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
    process = spawn([sys.executable, "-c", code], cwd=Path(data.__file__).parent, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline() == "stuck\n"
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    assert out == "interrupted\n" and process.returncode == 0
    assert list(tmp_path.iterdir()) == []
