"""train.py on tiny configurations and tiny datasets written with data.write_dataset.

The policy is the tiny fixture checkpoint (tests/fixtures/tiny: vision 32 wide / 2 layers / 64 px,
text 64 wide / 4 layers, chunk 10, state and action padded to 8). The dataset is a reaching task:
each episode shows a bright target somewhere in the top camera's image, and the arm's joints move
from a rest pose to angles that are a fixed function of the target's position.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors import safe_open

import data
import policy_io
import train
import vision_cache
from flow import SmolVLA

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"
POLICY, VLM = FIXTURE / "policy", FIXTURE / "vlm"
TASK = "pick the cube"
SIZE = 32
LENGTH = 20
JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos", "gripper.pos"]


def reaching_episodes(num_episodes: int, state_dim: int = 6, cameras=("top", "wrist"), seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(num_episodes):
        x, y = rng.uniform(0.2, 0.8, size=2)
        goal = np.array([60 * x - 30, 40 * y - 20, 10 * x + 10 * y, 20 * x, 5.0, 50 * y, 0, 0, 0][:state_dim], np.float32)
        ramp = np.linspace(0.0, 1.0, LENGTH + 1, dtype=np.float32)[:, None]
        path = goal * ramp  # from the zero pose to the goal
        top = np.full((LENGTH, SIZE, SIZE, 3), 30, np.uint8)
        cx, cy = int(x * SIZE), int(y * SIZE)
        top[:, cy - 3:cy + 3, cx - 3:cx + 3] = (240, 200, 40)
        episode = {"task": TASK, "observation.state": path[:LENGTH], "action": path[1:, :6]}
        for n, camera in enumerate(cameras):
            episode[f"observation.images.{camera}"] = top if n == 0 else np.full_like(top, 90)
        yield episode


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    # the actions are the next frame's pose: goal positions of the state, named alike (as LeRobot's SO-100)
    return data.write_dataset(tmp_path_factory.mktemp("data") / "reach", reaching_episodes(8), fps=10,
                              state_names=JOINTS, action_names=JOINTS)


def args_for(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(dataset), "--policy", str(POLICY), "--vlm", str(VLM), "--output-dir", str(out),
            "--num-workers", "0", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "10",
            "--decay-steps", "300", "--log-every", "1", *extra]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in train.read_metrics(out / "metrics.jsonl") if "loss" in m]


# -- the recipe, the schedule, the camera mapping --------------------------------------------------


def test_defaults_are_the_smolvla_fine_tuning_recipe():
    args = train.parse_args(["--data", "lerobot/svla_so100_pickplace"])
    assert args.policy == "lerobot/smolvla_base" and args.from_vlm is None
    assert (args.batch_size, args.steps, args.lr, args.betas, args.eps, args.weight_decay) == \
        (64, 20_000, 1e-4, (0.9, 0.95), 1e-8, 1e-10)
    assert (args.warmup_steps, args.decay_steps, args.decay_lr, args.grad_clip) == (1_000, 30_000, 2.5e-6, 10.0)
    assert args.output_dir == "outputs/train" and not args.train_vision and not args.train_vlm


def test_flags_given_override_the_demo_defaults_even_at_the_recipe_value():
    """One parse tells the flags given from defaults: a flag given with the recipe's own value still
    overrides the demo's (and, on --resume, the run's saved value)."""
    args = train.parse_args(["--steps", "20000", "--num-workers", "4", "--no-train-vlm"])
    assert (args.steps, args.num_workers, args.train_vlm) == (20_000, 4, False)
    assert (args.batch_size, args.lr, args.output_dir, args.train_vision) == (32, 1e-3, "outputs/demo", True)
    assert args.explicit == ["num_workers", "steps", "train_vlm"]
    assert train.parse_args(["--data", "x"]).explicit == ["data"]


def test_learning_rate_schedule_is_lerobots_cosine_decay_with_warmup():
    """LeRobot's cosine_decay_with_warmup with the default flags (peak 1e-4, floor 2.5e-6, warm-up
    1,000, decay 30,000). The values were worked out by hand from its formula: warm-up factor
    (s + 1) / (w + 1); then 0.025 + 0.975 * (1 + cos(pi * s / d)) / 2 with the absolute step s; when
    --steps n < d, w becomes int(w * n / d) and d becomes n."""
    def lr(steps: int):
        scheduler = train.make_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]),
                                         train.parse_args(["--data", "x", "--steps", str(steps)]))
        return lambda step: 1e-4 * scheduler.lr_lambdas[0](step)

    full = lr(30_000)  # as long as the decay: nothing is fitted
    assert full(0) == pytest.approx(1e-4 / 1001, rel=1e-12)
    assert full(999) == pytest.approx(1e-4 * 1000 / 1001, rel=1e-12)
    assert full(1_000) == pytest.approx(9.973294239920334e-05, rel=1e-12)  # the cosine at pi/30, not 1
    assert full(15_000) == pytest.approx(5.125e-05, rel=1e-12)  # cos(pi/2) = 0: halfway to the floor
    assert full(30_000) == pytest.approx(2.5e-6, rel=1e-12) and full(40_000) == pytest.approx(2.5e-6, rel=1e-12)

    usual = lr(20_000)  # the usual fine-tuning run: warm-up int(1000 * 2/3) = 666, decay over 20,000
    assert usual(0) == pytest.approx(1e-4 / 667, rel=1e-12)
    assert usual(665) == pytest.approx(1e-4 * 666 / 667, rel=1e-12)
    assert usual(666) == pytest.approx(9.973347576037485e-05, rel=1e-12)  # cos(pi * 666 / 20000)
    assert usual(15_000) == pytest.approx(1.677854441715581e-05, rel=1e-12)  # cos(3 pi / 4)
    assert usual(19_999) == pytest.approx(2.50000060142902e-06, rel=1e-9)  # the last step: at the floor

    short = lr(10)  # int(1000 * 10 / 30000) = 0: no warm-up at all
    assert short(0) == pytest.approx(1e-4, rel=1e-12) and short(5) == pytest.approx(5.125e-05, rel=1e-12)


def test_scheduler_applies_the_fitted_schedule_step_by_step():
    """--steps 6 of a 12-step decay: warm-up int(6 * 6 / 12) = 3 steps, decay over 6. By hand with
    peak 1, floor 0.5: 1/4, 2/4, 3/4, then 0.5 + 0.25 * (1 + cos(pi * s / 6)) for s = 3, 4, 5."""
    args = train.parse_args(["--data", "x", "--steps", "6", "--warmup-steps", "6", "--decay-steps", "12",
                             "--lr", "1.0", "--decay-lr", "0.5"])
    optimizer = train.make_optimizer(torch.nn.Linear(1, 1), args)
    scheduler = train.make_scheduler(optimizer, args)
    seen = []
    for _ in range(7):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 0.75, 0.625, 0.5 + 0.25 * (1 - 3 ** 0.5 / 2), 0.5], rel=1e-12)


SMOLVLA_BASE_SLOTS = [f"observation.images.camera{i}" for i in (1, 2, 3)]


def test_pickplace_cameras_map_onto_smolvla_base_slots():
    top, wrist = "observation.images.top", "observation.images.wrist"
    expected = {top: SMOLVLA_BASE_SLOTS[0], wrist: SMOLVLA_BASE_SLOTS[1]}
    assert train.camera_mapping([top, wrist], SMOLVLA_BASE_SLOTS, {}) == expected
    assert train.camera_mapping([wrist, top], SMOLVLA_BASE_SLOTS, {}) == expected  # third-person views first
    swapped = train.parse_rename(["wrist=camera1"])
    assert train.camera_mapping([top, wrist], SMOLVLA_BASE_SLOTS, swapped) == {wrist: SMOLVLA_BASE_SLOTS[0],
                                                                               top: SMOLVLA_BASE_SLOTS[1]}
    left_out = train.parse_rename(["wrist="])
    assert train.camera_mapping([top, wrist], SMOLVLA_BASE_SLOTS, left_out) == {top: SMOLVLA_BASE_SLOTS[0]}
    # names that already are slots keep them
    assert train.camera_mapping(SMOLVLA_BASE_SLOTS[::-1], SMOLVLA_BASE_SLOTS, {}) == {k: k for k in SMOLVLA_BASE_SLOTS}


def test_camera_mapping_errors_name_the_cameras():
    cams = [f"observation.images.c{i}" for i in range(4)]
    with pytest.raises(train.TrainError, match="only 3 slots"):
        train.camera_mapping(cams, SMOLVLA_BASE_SLOTS, {})
    with pytest.raises(train.TrainError, match="observation.images.side"):
        train.camera_mapping(cams[:2], SMOLVLA_BASE_SLOTS, train.parse_rename(["side=camera1"]))
    with pytest.raises(train.TrainError, match="not camera slots"):
        train.camera_mapping(cams[:2], SMOLVLA_BASE_SLOTS, train.parse_rename(["c0=camera9"]))
    with pytest.raises(train.TrainError, match="same policy slot"):
        train.camera_mapping(cams[:2], SMOLVLA_BASE_SLOTS, train.parse_rename(["c0=camera1", "c1=camera1"]))


def test_sampler_resumes_mid_stream_and_splits_ranks():
    stream = train.ResumableSampler(10, seed=3)
    first = [i for _, i in zip(range(35), stream)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # a new order each epoch
    resumed = [i for _, i in zip(range(22), train.ResumableSampler(10, seed=3, start=13))]
    assert resumed == first[13:35]
    ranks = [[i for _, i in zip(range(5), train.ResumableSampler(10, seed=3, rank=r, world_size=2))] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


# -- a real run: learning, checkpoint layout, frozen parts -----------------------------------------


@pytest.fixture(scope="module")
def trained(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = train.main(args_for(dataset_dir, out, "--steps", "300", "--batch-size", "16", "--log-every", "10",
                                  "--save-every", "150", "--val-episodes", "1", "--eval-every", "100",
                                  "--lr", "3e-3", "--decay-steps", "3000"))
    return out, summary


def test_loss_falls_five_fold_in_300_steps(trained):
    out, summary = trained
    curve = losses(out)
    assert summary["step"] == 300 and len(curve) == 30
    assert curve[0] / curve[-1] >= 5, curve
    val = [m["val_loss"] for m in train.read_metrics(out / "metrics.jsonl") if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_layout_and_official_keys(trained):
    out, _ = trained
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["000150", "000300", "last"]
    assert os.readlink(checkpoints / "last") == "000300"
    assert (checkpoints / "000150" / "training_state.pt").is_file()
    saved = read_weights(checkpoints / "last" / "pretrained_model" / "model.safetensors")
    fixture = read_weights(POLICY / "model.safetensors")
    assert set(saved) == set(fixture)
    assert all(k.startswith("model.") for k in saved)
    state = torch.load(checkpoints / "000300" / "training_state.pt", weights_only=True)
    assert state["step"] == 300 and state["samples_per_rank"] == 300 * 16
    assert {"torch", "numpy", "python", "cuda"} <= set(state["rng"])


def test_frozen_parameters_unchanged_and_trained_ones_moved(trained):
    out, _ = trained
    saved = read_weights(out / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    fixture = read_weights(POLICY / "model.safetensors")
    frozen = [k for k in fixture if k.startswith("model.vlm_with_expert.vlm.")]
    trained_keys = [k for k in fixture if k.startswith(("model.vlm_with_expert.lm_expert.", "model.state_proj",
                                                        "model.action_"))]
    assert len(frozen) > 50 and len(trained_keys) > 30
    assert all(torch.equal(saved[k], fixture[k]) for k in frozen)
    assert all(not torch.equal(saved[k], fixture[k]) for k in trained_keys)


def test_one_real_step_leaves_frozen_parameters_untouched(dataset_dir, tmp_path):
    """train_step on the tiny policy: the vision encoder, connector, VLM text layers and lm_head get
    no gradient and keep every bit; every parameter the optimiser holds gets one, and those with a
    non-zero gradient move."""
    args = train.parse_args(args_for(dataset_dir, tmp_path / "out"))
    dataset = data.LeRobotDataset(dataset_dir, chunk_size=10)
    policy = train.build_policy(args, dataset, torch.device("cpu"))
    trained_names = set(train.set_trainable(policy))
    optimizer = train.make_optimizer(policy, args)
    scheduler = train.make_scheduler(optimizer, args)
    before = {name: param.detach().clone() for name, param in policy.named_parameters()}
    batch = torch.utils.data.default_collate([dataset[i] for i in (0, 25, 50, 75)])
    noise, flow_time = train.flow_noise_and_time(0, 0, 0, 0, 4, policy, torch.device("cpu"))
    result = train.train_step(policy, optimizer, scheduler, batch, noise, flow_time)
    assert result["loss"] > 0 and result["grad_norm"] > 0

    params = dict(policy.named_parameters())
    frozen = [n for n in params if n.startswith(("vision.", "connector.", "lm.", "lm_head."))]
    assert len(frozen) > 50 and not trained_names & set(frozen)
    assert all(params[n].grad is None and torch.equal(params[n], before[n]) for n in frozen)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(params[n]) for n in trained_names} and len(trained_names) > 30
    assert all(params[n].grad is not None for n in trained_names)
    moving = [n for n in trained_names if params[n].grad.abs().sum() > 0]
    assert len(moving) > 30 and all(not torch.equal(params[n], before[n]) for n in moving)


def test_trained_policy_samples_the_demonstrated_actions(trained, dataset_dir):
    out, _ = trained
    dataset = data.LeRobotDataset(dataset_dir, chunk_size=10, episodes=[0, 3, 6])
    items = [dataset[i] for i in range(0, len(dataset), 7)]
    batch = torch.utils.data.default_collate(items)
    std = dataset.stats["action"]["std"]
    noise = torch.randn(len(items), 10, 8, generator=torch.Generator().manual_seed(0))

    def error(policy):
        actions = policy.predict_chunk(batch, noise=noise)
        return ((actions - batch["action"]).abs() / std)[~batch["action_is_pad"]].mean().item()

    before = SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu", stats=dataset.stats)
    after = SmolVLA.from_pretrained(out / "checkpoints" / "last" / "pretrained_model", vlm=VLM, device="cpu")
    torch.testing.assert_close(after.normalizer.stats["action"]["mean"], dataset.stats["action"]["mean"])
    assert error(after) < 0.3 and error(after) < error(before) / 3, (error(after), error(before))


# -- resume, interruption, failures -----------------------------------------------------------------


def stop_after(monkeypatch, steps: int) -> None:
    """Ask the training loop to stop (as Ctrl-C does) once `steps` steps are done."""
    asked = {"n": 0}

    def agreed(self):
        asked["n"] += 1
        return asked["n"] > steps

    monkeypatch.setattr(train.StopRequest, "agreed", agreed)


def test_resume_reproduces_the_uninterrupted_run(dataset_dir, tmp_path, monkeypatch):
    """An 8-step run stopped after 4 steps and resumed ends as the straight run: same weights, losses,
    optimizer moments, and the same learning rates (the schedule is fitted to the run's 8 steps)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(args_for(dataset_dir, straight, "--steps", "8", "--val-episodes", "1", "--eval-every", "2"))
    with monkeypatch.context() as patch:
        stop_after(patch, 4)
        assert train.main(args_for(dataset_dir, split, "--steps", "8", "--val-episodes", "1", "--eval-every", "2"))["stopped"]
    train.main(["--output-dir", str(split), "--resume", "--num-workers", "0"])
    a = read_weights(straight / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    b = read_weights(split / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(split) and len(losses(split)) == 8
    learning_rates = lambda out: [m["lr"] for m in train.read_metrics(out / "metrics.jsonl") if "lr" in m]  # noqa: E731
    assert learning_rates(straight) == learning_rates(split)
    sa = torch.load(straight / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    sb = torch.load(split / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    exp_avg = lambda s: [v["exp_avg"] for v in s["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(exp_avg(sa), exp_avg(sb)))
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["000004", "000008", "last"]


def test_ctrl_c_saves_a_checkpoint_before_exiting(dataset_dir, tmp_path, spawn):
    out = tmp_path / "out"
    process = spawn([sys.executable, str(ROOT / "train.py"), *args_for(dataset_dir, out, "--steps", "100000")],
                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(losses(out)) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert len(losses(out)) >= 3, process.stdout.read() if process.poll() is not None else "no progress"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGINT" in output
    last = out / "checkpoints" / "last"
    step = torch.load(last / "training_state.pt", weights_only=True)["step"]
    assert step >= 3 and last.resolve().name == f"{step:06d}"
    assert losses(out)[-1] and len(losses(out)) == step
    SmolVLA.from_pretrained(last / "pretrained_model", vlm=VLM, device="cpu")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(dataset_dir, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = train.FlowLoss.forward

    def poisoned(self, batch, noise, time):
        calls["n"] += 1
        loss = forward(self, batch, noise, time)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train.FlowLoss, "forward", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args_for(dataset_dir, out, "--steps", "10", "--save-every", "2"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "not finite at step 5" in message and "000004" in message
    assert os.readlink(out / "checkpoints" / "last") == "000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000004", "last"]
    weights = read_weights(out / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(dataset_dir, tmp_path, monkeypatch, capsys):
    save = SmolVLA.save_pretrained
    calls = {"n": 0}

    def disk_fills_up(self, out_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(out_dir) / "partial-file").parent.mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "partial-file").write_bytes(b"x" * 100)
            raise OSError(28, "No space left on device")
        save(self, out_dir)

    monkeypatch.setattr(SmolVLA, "save_pretrained", disk_fills_up)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args_for(dataset_dir, out, "--steps", "6", "--save-every", "2"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "step 4" in message and "disk is full" in message and "000002 is intact" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "last"]  # no half-written dir
    monkeypatch.setattr(SmolVLA, "save_pretrained", save)
    SmolVLA.from_pretrained(out / "checkpoints" / "last" / "pretrained_model", vlm=VLM, device="cpu")
    train.main(["--output-dir", str(out), "--resume", "--steps", "3", "--num-workers", "0"])  # and it continues
    assert os.readlink(out / "checkpoints" / "last") == "000003"


def test_bad_inputs_are_clear_errors(dataset_dir, tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "no-such-dataset" in error(args_for(tmp_path / "no-such-dataset", tmp_path / "a", "--steps", "1"))
    message = error(["--data", str(dataset_dir), "--policy", str(tmp_path / "no-such-policy"),
                     "--output-dir", str(tmp_path / "b")])
    assert "policy" in message and "no-such-policy" in message
    wide = data.write_dataset(tmp_path / "wide", reaching_episodes(1, state_dim=9), fps=10)
    assert "state has 9 dims" in error(args_for(wide, tmp_path / "c", "--steps", "1"))
    blind = data.write_dataset(tmp_path / "blind", [{k: v for k, v in e.items() if "images" not in k}
                                                    for e in reaching_episodes(1)], fps=10)
    assert "no camera" in error(args_for(blind, tmp_path / "d", "--steps", "1"))
    assert "--val-episodes" in error(args_for(dataset_dir, tmp_path / "e", "--val-episodes", "8"))
    assert "no checkpoint" in error(["--output-dir", str(tmp_path / "g"), "--resume"])


@pytest.mark.parametrize("flag, value, allowed", [
    ("--steps", "0", "integer >= 1"), ("--steps", "-5", "integer >= 1"), ("--batch-size", "0", "integer >= 1"),
    ("--batch-size", "-3", "integer >= 1"), ("--lr", "-1", "number > 0"), ("--lr", "0", "number > 0"),
    ("--lr", "nan", "number > 0"), ("--num-workers", "-1", "integer >= 0"), ("--eps", "-0.1", "number >= 0"),
    ("--weight-decay", "-0.1", "number >= 0"), ("--warmup-steps", "-1", "integer >= 0"),
    ("--decay-steps", "0", "integer >= 1"), ("--decay-lr", "-0.5", "number >= 0"), ("--grad-clip", "0", "number > 0"),
    ("--seed", "-1", "integer from 0 to 4294967295"), ("--save-every", "0", "integer >= 1"),
    ("--log-every", "0", "integer >= 1"), ("--eval-every", "0", "integer >= 1"), ("--val-samples", "0", "integer >= 1"),
    ("--num-vlm-layers", "0", "integer >= 1"), ("--chunk-size", "0", "integer >= 1"),
    ("--batch-size", "two", "integer >= 1"), ("--val-episodes", "-1", "count N >= 0 or a list"),
    ("--val-episodes", "3,x", "count N >= 0 or a list"),
])
def test_numeric_flag_out_of_range_is_one_line_naming_it(flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "x", flag, value])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message, message
    assert f"argument {flag}" in message and allowed in message and value in message, message


def test_betas_must_lie_in_0_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--betas", "0.9", "1.0"])
    assert exit_info.value.code == 2 and "--betas" in capsys.readouterr().err


def test_a_run_ends_naming_its_outputs_and_a_rerun_says_it_is_complete(dataset_dir, tmp_path, capsys):
    out = tmp_path / "out"
    command = args_for(dataset_dir, out, "--steps", "2")
    train.main(command)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    named = [out / "checkpoints" / "last" / "pretrained_model", out / "loss.png", out / "metrics.jsonl"]
    assert last_line.startswith("done at step 2") and all(str(path) in last_line for path in named), last_line
    assert all(path.exists() for path in named)

    # the same command again: nothing to train, and it says where the results are (exit 0)
    stamp = (out / "checkpoints" / "last").resolve()
    summary = train.main(command)
    message = capsys.readouterr().out
    assert summary["complete"] and summary["step"] == 2 and (out / "checkpoints" / "last").resolve() == stamp
    assert "finished run (2 of 2 steps)" in message and all(str(path) in message for path in named), message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "last"]
    # another run asked for in the same directory: an error naming the flag and the outputs
    with pytest.raises(SystemExit) as exit_info:
        train.main(args_for(dataset_dir, out, "--steps", "2", "--lr", "5e-4"))
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--lr 0.0005 (the run's: 0.001)" in message and str(named[1]) in message
    # resuming a finished run without more steps: nothing to do; with fewer: an error
    assert train.main(["--output-dir", str(out), "--resume"])["complete"]
    assert "finished run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["--output-dir", str(out), "--resume", "--steps", "1"])
    assert "already at step 2" in capsys.readouterr().err


def test_resuming_a_dataset_run_without_data_is_resumed_as_one(trained, dataset_dir):
    """`--output-dir RUN --resume` without --data reads the command line with the demo's recipe, but
    the run is a fine-tune: it continues with its own saved flags, and the flags --resume takes from
    the command line (workers, preloading) get the fine-tuning defaults (4 workers, no preloading),
    not the demo's (0 workers, and every frame decoded into memory)."""
    out, _ = trained
    start = train.resume_or_start(train.parse_args(["--output-dir", str(out), "--resume"]))
    assert start.done and start.step == 300  # 300 of its 300 steps: nothing to train
    settings = start.args
    assert (settings.data, settings.lr, settings.batch_size, settings.steps) == (str(dataset_dir), 3e-3, 16, 300)
    assert (settings.num_workers, settings.preload, settings.demo, settings.output_dir) == (4, False, False, str(out))


def test_a_rerun_of_a_stopped_run_points_to_resume(dataset_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        stop_after(patch, 1)
        train.main(args_for(dataset_dir, out, "--steps", "3"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(args_for(dataset_dir, out, "--steps", "3"))  # never overwrites a run
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "stopped at step 1 of 3" in message and "--resume" in message


def test_revision_reaches_the_hub_download(dataset_dir, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, revision=None, **_):
        calls.append((repo_id, repo_type, revision))
        return str(dataset_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    argv = args_for(dataset_dir, tmp_path / "out", "--steps", "1")
    argv[argv.index("--data") + 1] = "someone/reach"
    train.main(argv + ["--revision", "v3.0"])
    assert calls == [("someone/reach", "dataset", "v3.0")]


def test_unused_policy_camera_slot_is_dropped_and_the_rename_saved(tmp_path):
    """One dataset camera ('front') for a policy with two slots (top, wrist): front -> top, and the
    saved policy lists only the slot it was trained with; the rename map travels with it."""
    dataset = data.write_dataset(tmp_path / "front", reaching_episodes(2, cameras=("front",)), fps=10)
    train.main(args_for(dataset, tmp_path / "out", "--steps", "2"))
    saved = tmp_path / "out" / "checkpoints" / "last" / "pretrained_model"
    config = json.loads((saved / "config.json").read_text())
    assert sorted(config["input_features"]) == ["observation.images.top", "observation.state"]
    assert config["input_features"]["observation.images.top"]["shape"] == [3, SIZE, SIZE]
    # trained without them: config.json keeps to LeRobot's keys (which refuses others)
    assert "rtc_prefix_max" not in config and "future_state_max_offset" not in config
    policy = SmolVLA.from_pretrained(saved, vlm=VLM, device="cpu")
    assert policy.rename_map == {"observation.images.front": "observation.images.top"}
    item = data.LeRobotDataset(dataset, chunk_size=10)[0]
    assert policy.predict_chunk({k: v for k, v in item.items() if k != "action"}).shape == (1, 10, 6)


def test_new_policy_from_a_pretrained_vlm(dataset_dir, tmp_path):
    """--from-vlm: a VLM directory (config, tokenizer, weights with the VLM's own key names)."""
    import shutil

    from safetensors.torch import save_file

    vlm_dir = tmp_path / "vlm"
    shutil.copytree(VLM, vlm_dir)
    fixture = read_weights(POLICY / "model.safetensors")
    prefix = "model.vlm_with_expert.vlm."
    save_file({k[len(prefix):]: v for k, v in fixture.items() if k.startswith(prefix)}, str(vlm_dir / "model.safetensors"))
    out = tmp_path / "out"
    train.main(["--data", str(dataset_dir), "--from-vlm", str(vlm_dir), "--num-vlm-layers", "4", "--chunk-size", "10",
                "--output-dir", str(out), "--steps", "2", "--batch-size", "4", "--num-workers", "0"])
    saved = out / "checkpoints" / "last" / "pretrained_model"
    config = json.loads((saved / "config.json").read_text())
    assert config["resize_imgs_with_padding"] == [64, 64] and config["chunk_size"] == 10
    assert config["input_features"]["observation.state"]["shape"] == [6]
    assert sorted(config["input_features"]) == ["observation.images.top", "observation.images.wrist", "observation.state"]
    weights = read_weights(saved / "model.safetensors")
    name = "model.vlm_with_expert.vlm.model.text_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(weights[name], fixture[name])
    SmolVLA.from_pretrained(saved, vlm=vlm_dir, device="cpu")


# -- the offline demo ----------------------------------------------------------------------------------


def test_demo_writes_a_v30_dataset_and_a_checkpoint_that_loads(tmp_path):
    import sim  # MuJoCo: this test only

    out = tmp_path / "demo"
    summary = train.main(["--output-dir", str(out), "--steps", "6", "--save-every", "3", "--eval-every", "3",
                          "--demo-episodes", "3", "--demo-eval-episodes", "1"])
    # recorded in the simulator, evaluated closed loop on a held-out scene after training
    # the first and last scene seed evaluated: held out (the recording used seeds 0, 1, 2)
    assert summary["eval"]["episodes"] == 1 and summary["eval"]["seeds"] == [10_000] * 2
    assert json.loads((out / "eval.json").read_text())["episodes"] == 1 and (out / "eval.mp4").stat().st_size > 0
    saved_info = out / "checkpoints" / "last" / "pretrained_model" / policy_io.DATASET_INFO
    assert json.loads(saved_info.read_text())["fps"] == 10  # the demo records at 10 fps
    info = json.loads((out / "dataset" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["features"]["action"]["shape"] == [6]
    dataset = data.LeRobotDataset(out / "dataset", chunk_size=10)
    assert dataset.camera_keys == ["observation.images.top", "observation.images.wrist"]
    # loads by path alone: the tiny VLM (config + tokenizer) is found through the config's vlm_model_name
    policy = SmolVLA.from_pretrained(out / "checkpoints" / "last" / "pretrained_model", device="cpu")
    assert policy.tokenizer([sim.TASK])[1].sum() > 3
    item = dataset[5]
    actions = policy.predict_chunk({k: v for k, v in item.items() if k != "action"})
    assert actions.shape == (1, 10, 6) and torch.isfinite(actions).all()
    # the dataset is written once: resuming the demo reuses it
    stamp = (out / "dataset" / "meta" / "info.json").stat().st_mtime_ns
    train.main(["--output-dir", str(out), "--resume", "--steps", "8", "--demo-eval-episodes", "0"])
    assert (out / "dataset" / "meta" / "info.json").stat().st_mtime_ns == stamp
    assert os.readlink(out / "checkpoints" / "last") == "000008"


# -- multi-process ---------------------------------------------------------------------------------------


# train.py under torchrun, each rank keeping its parameters at the end of the run (in the file named
# by $KEEP_PARAMETERS, {rank} filled in): what the ranks hold is not visible from outside otherwise.
KEEPING_PARAMETERS = """
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import train

finish = train.Run.finish


def finish_keeping_parameters(run, *args):
    parameters = {name: p.detach().cpu() for name, p in run.policy.named_parameters()}
    torch.save(parameters, os.environ["KEEP_PARAMETERS"].format(rank=run.rank))
    return finish(run, *args)


train.Run.finish = finish_keeping_parameters
train.main(sys.argv[1:])
"""


def test_two_process_gloo_torchrun_ends_with_identical_parameters(dataset_dir, tmp_path):
    out = tmp_path / "out"
    launcher = tmp_path / "train_keeping_parameters.py"
    launcher.write_text(KEEPING_PARAMETERS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(launcher), *args_for(dataset_dir, out, "--steps", "4", "--device", "cpu", "--batch-size", "4",
                                        "--val-episodes", "1", "--eval-every", "2", "--cache-vision")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "KEEP_PARAMETERS": str(tmp_path / "rank{rank}.pt")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert list(ranks[0]) == list(ranks[1]) and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    saved = dict(SmolVLA.from_pretrained(out / "checkpoints" / "last" / "pretrained_model", vlm=VLM,
                                         device="cpu").named_parameters())
    assert set(saved) == set(ranks[0])  # rank 0 saved what both ranks hold
    assert all(torch.equal(saved[k].float(), ranks[0][k].float()) for k in saved)
    start = dict(SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu").named_parameters())
    assert not all(torch.equal(start[k].float(), ranks[0][k].float()) for k in start)  # and they trained
    metrics = train.read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]  # logged once (rank 0), not per rank
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]
    cache = next((out / "vision_cache").iterdir())  # encoded by both ranks, each a share of the frames
    index = np.load(cache / "index.npy")
    assert sorted(index.tolist()) == list(range(8 * LENGTH))
    assert all(np.abs(np.load(cache / "0.npy")[row]).sum() > 0 for row in range(len(index)))


# -- --cache-vision ---------------------------------------------------------------------------------------


def test_cached_vision_step_gives_the_uncached_loss(dataset_dir, tmp_path):
    args = train.parse_args(args_for(dataset_dir, tmp_path / "out"))
    dataset = data.LeRobotDataset(dataset_dir, chunk_size=10)
    policy = train.build_policy(args, dataset, torch.device("cpu"))
    train.set_trainable(policy)
    cache = vision_cache.build(policy, dataset, tmp_path / "cache", batch_size=16)
    cached = vision_cache.CachedVisionDataset(dataset, cache)
    picks = [0, 7, 33, 150]
    plain = torch.utils.data.default_collate([dataset[i] for i in picks])
    fast = torch.utils.data.default_collate([cached[i] for i in picks])
    assert not any(k.startswith("observation.images.") for k in fast)  # no video decoded
    assert all(v.dtype == torch.float16 for v in fast["image_embeddings"].values())
    assert torch.equal(fast["action"], plain["action"]) and fast["task"] == plain["task"]
    noise, time_ = train.flow_noise_and_time(0, 0, 0, 0, len(picks), policy, torch.device("cpu"))
    with torch.no_grad():
        reference = policy.loss(plain, noise, time_)
        from_cache = policy.loss(fast, noise, time_)
    torch.testing.assert_close(from_cache, reference, rtol=2e-3, atol=0)
    # a cache is reused for the same policy and dataset, and another policy's vision weights get another
    assert vision_cache.build(policy, dataset, tmp_path / "cache") == cache
    with torch.no_grad():
        policy.vision.post_layernorm.weight.add_(0.1)
    assert vision_cache.cache_key(policy, dataset, torch.float32) != cache.name


def test_cache_vision_training_run_matches_the_uncached_curve(dataset_dir, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    train.main(args_for(dataset_dir, plain, "--steps", "5", "--val-episodes", "1", "--eval-every", "5"))
    train.main(args_for(dataset_dir, cached, "--steps", "5", "--val-episodes", "1", "--eval-every", "5", "--cache-vision"))
    assert len(list((cached / "vision_cache").iterdir())) == 1
    np.testing.assert_allclose(losses(cached), losses(plain), rtol=5e-3)
    with pytest.raises(SystemExit):
        train.main(args_for(dataset_dir, tmp_path / "x", "--steps", "1", "--cache-vision", "--train-vision"))


# -- training for delayed execution: --rtc-prefix-max, --future-state-max-offset ----------------------


def stub_policy(**config):
    """What the step's draws read of a policy: its config."""
    from types import SimpleNamespace

    from flow import SmolVLAConfig

    return SimpleNamespace(config=SmolVLAConfig(chunk_size=10, max_action_dim=8, **config))


def test_delay_draws_are_fixed_by_seed_stream_step_and_rank():
    cpu = torch.device("cpu")
    offsets = train.state_offsets(7, 0, 5, 0, 256, 3)
    assert torch.equal(offsets, train.state_offsets(7, 0, 5, 0, 256, 3))
    assert sorted(set(offsets.tolist())) == [0, 1, 2, 3]
    assert not torch.equal(offsets, train.state_offsets(7, 0, 6, 0, 256, 3))
    assert not torch.equal(offsets, train.state_offsets(7, 1, 5, 0, 256, 3))
    assert not torch.equal(offsets, train.state_offsets(7, 0, 5, 1, 256, 3))

    plain_noise, plain_time = train.flow_noise_and_time(7, 0, 5, 0, 256, stub_policy(), cpu)
    noise, time = train.flow_noise_and_time(7, 0, 5, 0, 256, stub_policy(rtc_prefix_max=3), cpu)
    again = train.flow_noise_and_time(7, 0, 5, 0, 256, stub_policy(rtc_prefix_max=3), cpu)[1]
    assert torch.equal(time, again) and plain_time.shape == (256,) and time.shape == (256, 10)
    # the prefix is drawn after the rest: the noise and the times after the prefix are the plain run's
    assert torch.equal(noise, plain_noise)
    lengths = (time == 0).sum(dim=1)
    assert sorted(set(lengths.tolist())) == [0, 1, 2, 3]
    # half the samples get no prefix, so that the first tokens are trained on (about) half the batch
    assert 0.4 < (lengths == 0).float().mean() < 0.6
    assert 0.4 < (lengths == 1).sum() / (lengths == 3).sum() < 2.5
    for row, d in zip(time, lengths.tolist()):
        assert torch.equal(row[:d], torch.zeros(d)) and (row[d:] > 0).all()
    assert torch.equal(time[:, -1], plain_time)


def test_state_offsets_give_the_planned_state_and_the_later_frames_actions(dataset_dir):
    """Against the dataset's own items: sample i at offset o is frame i's images with the action chunk
    of frame j = i + o, cut back to the episode's last frame (episodes of 20 frames), and as its state
    frame i's measured one moved by the plan up to frame j (action j - 1 minus action i: what the
    control loop knows at capture), frame i's measured state at o = 0 and 1."""
    windowed = data.LeRobotDataset(dataset_dir, chunk_size=10, decode_video=False, future_state_max_offset=4)
    plain = data.LeRobotDataset(dataset_dir, chunk_size=10, decode_video=False)
    picks, offsets = [0, 5, 17, 18, 19, 40], torch.tensor([0, 4, 4, 2, 3, 1])
    expected = [0, 9, 19, 19, 19, 41]  # 17 + 4 and 18 + 2 are past frame 19, the episode's last
    batch = torch.utils.data.default_collate([windowed[i] for i in picks])
    shifted = train.at_state_offsets(batch, offsets, 10)
    assert not set(data.WINDOW_KEYS) & set(shifted)
    assert shifted["index"].tolist() == picks  # still frame i (its images, its task)
    for b, j in enumerate(expected):
        i = picks[b]
        state = plain[i]["observation.state"] + plain[max(j - 1, i)]["action"][0] - plain[i]["action"][0]
        torch.testing.assert_close(shifted["observation.state"][b], state, rtol=0, atol=1e-5)
        assert torch.equal(shifted["action"][b], plain[j]["action"])
        assert torch.equal(shifted["action_is_pad"][b], plain[j]["action_is_pad"])
    with pytest.raises(train.TrainError, match="future_state_max_offset"):
        train.at_state_offsets(torch.utils.data.default_collate([plain[0]]), torch.tensor([1]), 10)


def test_a_run_for_delayed_execution_trains_on_its_draws_and_saves_them(dataset_dir, tmp_path, monkeypatch):
    """Both options on a tiny run with --cache-vision, a DataLoader worker and validation: every step
    trains on the state and actions of frame i + delta and the per-token times of its own draws; the
    options land in config.json and come back with the policy."""
    recorded = []
    train_step = train.train_step

    def recording(policy, optimizer, scheduler, batch, noise, time, *args):
        recorded.append((batch, time))
        return train_step(policy, optimizer, scheduler, batch, noise, time, *args)

    monkeypatch.setattr(train, "train_step", recording)
    out = tmp_path / "out"
    train.main(args_for(dataset_dir, out, "--steps", "2", "--rtc-prefix-max", "3", "--future-state-max-offset", "2",
                        "--val-episodes", "1", "--eval-every", "2", "--cache-vision", "--num-workers", "1",
                        "--seed", "5"))
    saved = out / "checkpoints" / "last" / "pretrained_model"
    config = json.loads((saved / "config.json").read_text())
    assert (config["rtc_prefix_max"], config["future_state_max_offset"]) == (3, 2)
    policy = SmolVLA.from_pretrained(saved, vlm=VLM, device="cpu")
    assert (policy.config.rtc_prefix_max, policy.config.future_state_max_offset) == (3, 2)

    plain = data.LeRobotDataset(dataset_dir, chunk_size=10, decode_video=False)
    assert len(recorded) == 2
    for step, (batch, time) in enumerate(recorded):
        offsets = train.state_offsets(5, 0, step, 0, 8, 2)
        for b, i in enumerate(batch["index"].tolist()):
            j = min(i + int(offsets[b]), (i // LENGTH + 1) * LENGTH - 1)
            state = plain[i]["observation.state"] + plain[max(j - 1, i)]["action"][0] - plain[i]["action"][0]
            torch.testing.assert_close(batch["observation.state"][b], state, rtol=0, atol=1e-5)
            assert torch.equal(batch["action"][b], plain[j]["action"])
        assert torch.equal(time, train.flow_noise_and_time(5, 0, step, 0, 8, policy, torch.device("cpu"))[1])
        assert time.shape == (8, 10) and ((time == 0).sum(dim=1) <= 3).all()
    assert [m["step"] for m in train.read_metrics(out / "metrics.jsonl") if "val_loss" in m] == [2]
    # validation draws are fixed: the same loss every time
    val_set = data.LeRobotDataset(dataset_dir, chunk_size=10, episodes=[7], future_state_max_offset=2)
    batches = train.validation_batches(val_set, 16, 8, 0)
    first = train.validation_loss(policy, batches, 5)
    assert math.isfinite(first) and train.validation_loss(policy, batches, 5) == first


def test_future_state_training_needs_actions_named_as_the_state(tmp_path, capsys):
    """Meta-World's actions are hand deltas and a gripper effort: a commanded pose is no state there."""
    deltas = data.write_dataset(tmp_path / "deltas", reaching_episodes(2), fps=10, state_names=JOINTS,
                                action_names=[f"{joint}.delta" for joint in JOINTS])
    with pytest.raises(SystemExit):
        train.main(args_for(deltas, tmp_path / "out", "--steps", "1", "--future-state-max-offset", "2"))
    err = capsys.readouterr().err
    assert "actions that are goal positions of the state" in err and "'shoulder_pan.pos.delta'" in err


def test_a_resumed_run_keeps_its_delay_training(dataset_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        train.main(args_for(dataset_dir, out, "--steps", "4", "--rtc-prefix-max", "2", "--future-state-max-offset", "1"))
    with pytest.raises(SystemExit):
        train.main(["--output-dir", str(out), "--resume", "--num-workers", "0", "--rtc-prefix-max", "1"])
    assert "--rtc-prefix-max 1: the run being resumed trains with rtc_prefix_max 2" in capsys.readouterr().err
    train.main(["--output-dir", str(out), "--resume", "--num-workers", "0"])
    config = json.loads((out / "checkpoints" / "000004" / "pretrained_model" / "config.json").read_text())
    assert (config["rtc_prefix_max"], config["future_state_max_offset"]) == (2, 1)
    with pytest.raises(SystemExit):
        train.main(args_for(dataset_dir, tmp_path / "long", "--steps", "1", "--rtc-prefix-max", "10"))
    assert "--rtc-prefix-max 10 must be below the policy's chunk size 10" in capsys.readouterr().err
