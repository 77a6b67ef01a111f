"""experiments.py writes each experiment's table (CSV and JSON) and plot (PNG) from evaluation rows."""

import csv
import json

from PIL import Image

import cli
import experiments


def row(setting: str, successes: int, completion: float | None) -> dict:
    return {"setting": setting, "success_rate": successes / 10, "successes": successes, "episodes": 10,
            "ci95": [0.1, 0.9], "mean_completion_s": completion, "idle_ticks": 3, "ticks": 100,
            "latency_ms_mean": 30.0, "control_period_ms": 100.0, "mode": "async", "threshold": 0.7,
            "added_latency_s": 0.0, "cube_speed": 0.0, "seeds": [20000, 20009], "wall_s": 1.0, "extra": "kept"}


def test_table_and_plot_are_written(tmp_path):
    rows = [row("a", 7, 8.5), row("b", 0, None)]  # a setting with no success has no completion time
    experiments.write_table(tmp_path, "demo", rows)
    experiments.plot_rows(tmp_path / "demo.png", rows, [0.0, 1.0], "x", {"async": [0, 1]}, "title")
    assert json.loads((tmp_path / "demo.json").read_text()) == rows
    with open(tmp_path / "demo.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == ["a", "b"] and table[0]["success_rate"] == "0.7"
    assert table[0]["ci95"] == "[0.1, 0.9]" and table[1]["mean_completion_s"] == "" and table[0]["extra"] == "kept"
    assert Image.open(tmp_path / "demo.png").size == (800, 700)


def test_missing_policy_is_one_line(tmp_path, capsys):
    assert experiments.main(["async", "--policy", str(tmp_path / "none")]) == cli.USER_ERROR
    assert "no policy at" in capsys.readouterr().err


def test_a_stopped_training_stops_the_experiment_and_the_next_run_resumes_it(tmp_path, monkeypatch, capsys):
    import train

    demos = tmp_path / "demos"
    for part in ("dataset", "vlm"):
        (demos / part).mkdir(parents=True)
    calls = []

    def stopped_at_step_40(argv):
        calls.append(argv)
        run = tmp_path / "runs" / "v"
        (run / "checkpoints" / "000040").mkdir(parents=True, exist_ok=True)
        if not (run / "checkpoints" / "last").exists():
            (run / "checkpoints" / "last").symlink_to("000040")
        return {"step": 40, "stopped": True}

    monkeypatch.setattr(train, "main", stopped_at_step_40)
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"steps": lambda args: [experiments.train_variant(
        tmp_path, "v", ["--chunk-size", "50"], 100, 7, demos)]})
    monkeypatch.setattr(experiments, "DEMO_DIR", demos)
    assert experiments.main(["steps", "--out", str(tmp_path)]) == 130  # not evaluated half trained
    assert "interrupted; the same command resumes it" in capsys.readouterr().err
    assert "--resume" not in calls[0] and (tmp_path / "runs" / "v" / "dataset").resolve() == (demos / "dataset").resolve()
    experiments.main(["steps", "--out", str(tmp_path)])
    assert "--resume" in calls[1] and calls[1][calls[1].index("--steps") + 1] == "100"


def test_each_setting_reaches_the_client_the_evaluation_or_the_scene(monkeypatch):
    """A setting names fields of three configurations; each must take effect where it belongs, and
    everything it does not name stays at the fixed own latency and the defaults."""
    import numpy as np

    import policy_io

    spec = policy_io.PolicySpec({"observation.images.top": (24, 32)}, 6, 6, 10, 10)
    tasks = []

    def hold_still(observation):
        tasks.append(observation.task)
        return np.tile(observation.state, (10, 1))

    monkeypatch.setattr(policy_io, "prepare_policy", lambda path: (None, hold_still, spec))
    settings = [("sync", {"sync": True, "latency_s": 0.5, "time_limit_s": 1.0}),
                ("two cubes", {"threshold": 0.2, "instruction": "empty", "cube_speed": 0.02, "time_limit_s": 0.5})]
    sync, other = experiments.run_settings("no/such/policy", settings, 1, 20_000, lambda line: None, cubes=2)
    assert (sync["mode"], sync["threshold"], sync["added_latency_s"], sync["latency_ms_mean"]) == ("sync", 0.0, 0.5, 500.0)
    # 1 s and 0.5 s at 30 fps (no policy files: the default); the last tick may land a physics step short
    assert sync["ticks"] in (30, 31) and other["ticks"] in (15, 16)
    assert sync["instruction"] == "named" and sync["cube_speed"] == 0.0 and sync["ease_in"] == 3
    assert (other["mode"], other["threshold"], other["added_latency_s"]) == ("async", 0.2, experiments.OWN_LATENCY_S)
    assert (other["instruction"], other["cube_speed"]) == ("empty", 0.02)
    assert other["setting"] == "two cubes" and other["time_limit_s"] == 0.5
    assert tasks[0].startswith("Pick up the") and tasks[-1] == ""  # the scene's instruction, then none


def test_metaworld_records_trains_and_evaluates_each_phase_once(tmp_path, capsys):
    """The whole pipeline at a toy size: demonstrations of one task (with DART noise), a few training
    steps of the chosen size and batch, an evaluation per checkpoint of the curve judged by Meta-World,
    the table beside the paper's rows; a second run reuses every phase (no recording, training or
    evaluation again)."""
    import pytest

    pytest.importorskip("metaworld")
    argv = ["metaworld", "--metaworld-tasks", "reach-v3", "--metaworld-episodes", "3", "--steps", "4",
            "--metaworld-vlm", "small", "--metaworld-batch", "8", "--metaworld-noise", "0.3",
            "--episodes", "1", "--seed", "500", "--out", str(tmp_path)]
    assert experiments.main(argv) == 0
    name = "metaworld-interleaved-4-small-b8-noise0.3"
    demos = tmp_path / "runs" / "metaworld_demos-reach-v3-3-noise0.3"
    assert (demos / "dataset" / "meta" / "info.json").is_file()
    vlm = json.loads((tmp_path / "runs" / name / "vlm" / "config.json").read_text())
    assert vlm["vision_config"]["image_size"] == 96 and vlm["text_config"]["hidden_size"] == 64  # the demo's size
    rows = json.loads((tmp_path / f"{name}.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, 4]
    final = rows[-1]
    assert final["episodes"] == 1 and final["per_task"]["reach-v3"]["group"] == "easy" and final["seeds"] == [500, 500]
    assert set(final["per_group"]) == {"easy"} and 0.0 <= final["success_rate"] <= 1.0
    table = (tmp_path / f"{name}.md").read_text()
    assert "| SmolVLA (0.45B, paper) | 82.5 | 41.8 | 45.0 | 60.0 | 57.3 |" in table
    assert "--metaworld-tasks reach-v3" in table and "--metaworld-batch 8 --metaworld-noise 0.3" in table
    capsys.readouterr()
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert "recording" not in out and "reach-v3:" not in out  # nothing recorded or evaluated again
    # two tasks: one process each (spawned), the summary in the tasks' order
    policy = tmp_path / "runs" / name / "checkpoints" / "000004" / "pretrained_model"
    both = experiments.evaluate_metaworld(policy, ["reach-v3", "drawer-close-v3"], 1, 500, tmp_path / "two.json")
    assert list(both["per_task"]) == ["reach-v3", "drawer-close-v3"] and both["episodes"] == 2
    assert both["per_task"]["reach-v3"]["successes"] == final["per_task"]["reach-v3"]["successes"]


def test_realtime_runs_each_way_on_its_own_policy_at_every_latency_and_resumes(tmp_path, monkeypatch):
    """Eight ways x five latencies on four policies trained with opposite flags (one with 20-action
    chunks), then the 30-fps, 50-action setting; each mode's rows are cached, so a second run
    evaluates nothing again."""
    import demo
    import sim

    trained, evaluated = {}, []

    def fake_train(out, name, flags, steps, seed, demos=experiments.DEMO_DIR):
        trained[name] = (flags, demos)
        return f"policy/{name}"

    def fake_run(policy, settings, episodes, seed, log, cubes=1):
        evaluated.append((policy, settings))
        return [{**row(name, 5, 9.0), "episodes": episodes, "added_latency_s": fields["latency_s"], **fields}
                for name, fields in settings]

    def fake_record(env, out, episodes, seed=0, fps=None, noise=0.0, log=print):
        assert (episodes, fps, noise) == (experiments.REALTIME_30FPS_EPISODES, 30, demo.NOISE)
        out.mkdir(parents=True)

    monkeypatch.setattr(experiments, "train_variant", fake_train)
    monkeypatch.setattr(experiments, "run_settings", fake_run)
    monkeypatch.setattr(sim, "record", fake_record)
    monkeypatch.setattr(demo, "write_vlm", lambda path, tasks: path.mkdir(parents=True))
    args = experiments.build_parser().parse_args(["realtime", "--episodes", "4", "--out", str(tmp_path)])
    rows = experiments.realtime(args)
    assert trained["realtime-prefix-3000"][0] == ["--rtc-prefix-max", "9", "--future-state-max-offset", "0"]
    assert trained["realtime-future-3000"][0] == ["--rtc-prefix-max", "0", "--future-state-max-offset", "20"]
    assert trained["realtime-long-3000"][0][:2] == ["--chunk-size", "20"]
    assert trained["realtime-30fps-3000"][0][:2] == ["--chunk-size", "50"]
    assert trained["realtime-30fps-3000"][1] == tmp_path / "runs" / "realtime_demos30-100"
    assert len(rows) == 8 * 5 + 3 * 2
    by_setting = {r["setting"]: r for r in rows}
    sync = by_setting["sync +0.6s"]
    assert sync["sync"] is True and sync["policy_variant"] == "plain" and abs(sync["latency_s"] - 0.64) < 1e-9
    future = by_setting["future state +2s"]
    assert future["rtc"] is True and future["policy_variant"] == "future" and future["time_limit_s"] == 60.0
    assert by_setting["async +1s"]["time_limit_s"] == 25.0 and "rtc" not in by_setting["async +1s"]
    assert by_setting["long rtc +1s"]["policy_variant"] == "long" and by_setting["long rtc +1s"]["chunk_size"] == 20
    assert by_setting["long sync +1s"]["sync"] is True and by_setting["sync +1s"]["chunk_size"] == 10
    policies = {policy for policy, _ in evaluated}
    assert policies == {"policy/realtime-plain-3000", "policy/realtime-prefix-3000", "policy/realtime-future-3000",
                        "policy/realtime-long-3000", "policy/realtime-30fps-3000"}
    assert (tmp_path / "realtime.png").is_file()
    evaluated.clear()
    assert experiments.realtime(args) == rows and evaluated == []  # every mode read back from its cache

