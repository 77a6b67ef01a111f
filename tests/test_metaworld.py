"""Meta-World MT50 (sim_metaworld.py): LeRobot's tasks and groups, the world's 80 Hz stepping, a camera
right side up as LeRobot sees it, success from Meta-World's info["success"] alone, the scripted experts
succeeding through the control loop, and their demonstrations reading back through data.py."""

import os

import json

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before metaworld imports mujoco, as sim_metaworld does
pytest.importorskip("metaworld")
import mujoco  # noqa: E402
import metaworld.env_dict  # noqa: E402
import metaworld.policies  # noqa: E402

import data  # noqa: E402
import infer_async  # noqa: E402
import policy_io  # noqa: E402
import sim  # noqa: E402
import sim_metaworld as mw  # noqa: E402
from cli import UserError  # noqa: E402

# The experts' gains overshoot [-1, 1] and Meta-World warns each time; sim_metaworld clips them.
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")


@pytest.fixture(scope="module")
def pick_place():
    with mw.MetaWorldEnv("pick-place-v3") as env:
        yield env


# The benchmark


def test_the_groups_are_lerobots_and_cover_mt50_exactly():
    sizes = {group: len(tasks) for group, tasks in mw.GROUPS.items()}
    assert sizes == {"easy": 28, "medium": 11, "hard": 6, "very_hard": 5}
    assert len(mw.MT50) == len(set(mw.MT50)) == 50  # no task in two groups
    assert set(mw.MT50) == set(metaworld.env_dict.MT50_V3) == set(mw.INSTRUCTIONS)  # Meta-World's own MT50
    assert all(mw.INSTRUCTIONS[task].strip() for task in mw.MT50)
    assert mw.INSTRUCTIONS["assembly-v3"] == "Pick up a nut and place it onto a peg"  # the example
    assert "pick-place-v3" in mw.GROUPS["hard"] and "reach-v3" in mw.GROUPS["easy"]


def test_a_task_value_names_a_task_a_group_or_mt50_and_a_typo_is_a_user_error():
    assert mw.tasks_for("pick-place-v3") == ["pick-place-v3"]
    assert len(mw.tasks_for("very_hard")) == 5 and len(mw.tasks_for("mt50")) == 50
    with pytest.raises(UserError, match="pick-place-v3"):  # the closest task, named
        mw.tasks_for("pick-place-v2")
    with pytest.raises(UserError, match="one task"):
        mw.MetaWorldEnv("hard")


# The world


def test_the_world_steps_meta_world_at_80_hz_and_stops_at_500_steps(pick_place):
    env = pick_place
    assert env.sawyer.frame_skip * env.sawyer.model.opt.timestep == pytest.approx(1 / 80)  # Meta-World's own step
    assert env.fps == 80 and env.max_steps == env.sawyer.max_path_length == 500
    assert env.time_limit_s == pytest.approx(6.25)
    env.reset(0)
    for _ in range(2):
        env.step(0.006)  # 12 ms: not yet a step
    assert env.sawyer.curr_path_length == 0
    env.step(0.006)  # 18 ms: one step
    assert env.sawyer.curr_path_length == 1
    for _ in range(79):  # the control loop's ticks, summed
        env.step(1 / 80)
    assert env.sawyer.curr_path_length == 80
    env.step(10.0)  # past the episode's end: Meta-World would raise; the world holds at 500 steps
    assert env.sawyer.curr_path_length == 500 and not env.task_done()


def test_reset_draws_the_layout_from_the_seed_and_returns_the_instruction(pick_place):
    env = pick_place
    assert env.reset(5) == "Pick and place a puck to a goal"
    first = env.observation[4:7].copy(), env.observation[36:39].copy()  # the puck, the goal
    env.reset(6)
    other = env.observation[4:7].copy(), env.observation[36:39].copy()
    env.reset(5)
    np.testing.assert_array_equal(env.observation[4:7], first[0])
    np.testing.assert_array_equal(env.observation[36:39], first[1])
    assert np.linalg.norm(other[0] - first[0]) > 1e-3 and np.linalg.norm(other[1] - first[1]) > 1e-3


def test_an_action_moves_the_hand_once_clipped_and_the_gripper_effort_is_held(pick_place):
    env = pick_place
    mocap = env.sawyer.data.mocap_pos[0]
    env.reset(0)
    start = mocap.copy()
    env.robot.write(np.array([5.0, 0.0, 0.0, -1.0]))  # clipped to 1: 1 cm
    for _ in range(10):  # no further write: the hand's target stays where the one action put it
        env.step(1 / 80)
    np.testing.assert_allclose(mocap - start, [0.01, 0.0, 0.0], atol=1e-9)
    state = env.robot.read()
    assert state.dtype == np.float32 and state.shape == (4,)
    np.testing.assert_allclose(state[:3], env.sawyer.data.body("hand").xpos, atol=1e-6)  # the hand, in metres

    def opening_after_closing(then: list) -> float:
        env.reset(0)
        env.robot.write(np.array([0.0, 0.0, 0.0, 1.0]))  # close
        env.step(1 / 80)
        for action in then:
            env.robot.write(np.array(action))
            env.step(1 / 80)
        for _ in range(30):
            env.step(1 / 80)
        return float(env.robot.read()[3])

    held = opening_after_closing([])
    zero_effort = opening_after_closing([[0.0, 0.0, 0.0, 0.0]])
    opened = opening_after_closing([[0.0, 0.0, 0.0, -1.0]])
    assert held < 0.5 and zero_effort > held + 0.3  # held closed; zero effort lets it open
    assert opened >= zero_effort
    with pytest.raises(ValueError):
        env.robot.write(np.array([np.nan, 0.0, 0.0, 0.0]))


def pixel_of(env, world: np.ndarray) -> np.ndarray:
    """(row, column) where a pinhole camera at corner2's pose sees `world`, in an image turned so that
    the world's up is up (a camera image rotated, never mirrored). Independent of the renderer."""
    model, data_ = env.sawyer.model, env.sawyer.data
    camera = model.camera(mw.CAMERA).id
    axes = data_.cam_xmat[camera].reshape(3, 3)  # columns: the camera's x (right), y (up), z (back)
    x, y, z = axes.T @ (world - data_.cam_xpos[camera])
    height, width = env.image_size
    focal = (height / 2) / np.tan(np.radians(model.cam_fovy[camera]) / 2)
    row, column = height / 2 - focal * y / -z, width / 2 + focal * x / -z
    if axes[2, 1] < 0:  # the camera is mounted upside down: turn its image half a turn
        row, column = height - row, width - column
    return np.array([row, column])


def test_the_camera_is_lerobots_corner2_right_side_up(pick_place):
    env = pick_place
    env.reset(0)
    camera = env.sawyer.model.camera(mw.CAMERA).id
    np.testing.assert_allclose(env.sawyer.data.cam_xpos[camera], [0.75, 0.075, 0.7])  # LeRobot's position
    assert env.sawyer.data.cam_xmat[camera].reshape(3, 3)[2, 1] < 0  # so its raw image is upside down
    puck = env.sawyer.data.joint("objjoint")

    def put_puck(where) -> np.ndarray:
        puck.qpos[:3] = where
        mujoco.mj_forward(env.sawyer.model, env.sawyer.data)
        return env.frame().astype(int)

    hidden = put_puck([0.0, 0.6, -1.0])  # under the table
    assert hidden.shape == (*mw.IMAGE_SIZE, 3) and hidden.std() > 10
    for where in ([0.0, 0.6, 0.02], [0.1, 0.65, 0.02], [0.05, 0.8, 0.25]):
        changed = np.abs(put_puck(where) - hidden).sum(-1) > 40
        assert changed.sum() >= 5, f"the puck at {where} is not seen"
        seen = np.array(np.nonzero(changed)).mean(axis=1)
        np.testing.assert_allclose(seen, pixel_of(env, np.array(where)), atol=3)
    # Higher in the world is higher in the image.
    low, high = (np.array(np.nonzero(np.abs(put_puck(w) - hidden).sum(-1) > 40)).mean(axis=1)
                 for w in ([0.05, 0.8, 0.02], [0.05, 0.8, 0.25]))
    assert high[0] < low[0] - 10


def test_the_frame_is_the_one_lerobot_renders_with_gymnasium(pick_place):
    """LeRobot renders with gymnasium's renderer (shadows, 4x multisampling) and flips both axes; ours
    skips the costly effects, so the frames differ in shading, not in what is where."""
    env = pick_place
    env.reset(1)
    ours = env.frame().astype(float)
    benchmark = metaworld.MT1("pick-place-v3", seed=42)
    reference_env = benchmark.train_classes["pick-place-v3"](render_mode="rgb_array", camera_name="corner2",
                                                            width=env.image_size[1], height=env.image_size[0])
    try:
        reference_env.set_task(benchmark.train_tasks[0])
        reference_env.model.cam_pos[reference_env.model.camera("corner2").id] = [0.75, 0.075, 0.7]
        reference_env.set_state(env.sawyer.data.qpos.copy(), env.sawyer.data.qvel.copy())
        reference_env.data.mocap_pos[:] = env.sawyer.data.mocap_pos
        mujoco.mj_forward(reference_env.model, reference_env.data)
        lerobots = np.flip(reference_env.render(), (0, 1)).astype(float)
    finally:
        reference_env.close()

    def correlation(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    same = correlation(ours, lerobots)
    assert same > 0.9
    assert all(same > correlation(ours, np.flip(lerobots, axes)) + 0.2 for axes in (0, 1, (0, 1)))


def test_closing_one_environment_leaves_another_rendering():
    with mw.MetaWorldEnv("reach-v3", image_size=(64, 64)) as first:
        before = first.frame()
        with mw.MetaWorldEnv("reach-v3", image_size=(64, 64)) as second:
            second.frame()
        after = first.frame()
    assert after.std() > 10
    np.testing.assert_array_equal(after, before)


def test_cameras_for_gives_the_sizes_asked_and_refuses_another_robots_policy(pick_place):
    spec = policy_io.PolicySpec({mw.TOP: (96, 80)}, 4, 4, 10, 10)
    image = pick_place.cameras_for(spec)[mw.TOP].read()
    assert image.shape == (96, 80, 3) and image.dtype == np.uint8
    with pytest.raises(UserError, match="4-D"):
        pick_place.cameras_for(policy_io.PolicySpec({mw.TOP: (96, 96)}, 6, 6, 10, 10))
    with pytest.raises(UserError, match="wrist"):
        pick_place.cameras_for(policy_io.PolicySpec({"observation.images.wrist": (96, 96)}, 4, 4, 10, 10))


# Success: Meta-World's info["success"], at any step, alone


def scripted_success(env, monkeypatch, success_at_step) -> None:
    """Meta-World's judgement replaced: info["success"] as success_at_step(step) says, all else as is."""
    judge = env.sawyer.evaluate_state

    def evaluate_state(obs, action):
        reward, info = judge(obs, action)
        return reward, {**info, "success": float(success_at_step(env.sawyer.curr_path_length))}

    monkeypatch.setattr(env.sawyer, "evaluate_state", evaluate_state)


def test_success_seen_at_one_step_is_done_even_if_later_steps_deny_it(pick_place, monkeypatch):
    env = pick_place
    scripted_success(env, monkeypatch, lambda step: step == 3)
    env.reset(0)
    env.step(2 / 80)
    assert not env.task_done() and env.completed_at is None
    env.step(10 / 80)
    assert env.task_done() and env.completed_at == pytest.approx(3 / 80)
    env.reset(1)  # a new episode starts undone
    assert not env.task_done()


def test_the_expert_does_not_succeed_where_meta_world_says_it_did_not(monkeypatch):
    with mw.MetaWorldEnv("reach-v3", image_size=(32, 32)) as env:
        env.clock = sim.SimClock(env)
        assert sim.expert_episode(env, 0, env.fps) is not None  # Meta-World's own judge: reached
        scripted_success(env, monkeypatch, lambda step: False)
        assert sim.expert_episode(env, 0, env.fps) is None
        assert env.steps == 500 and not env.task_done()


# The scripted experts


@pytest.mark.parametrize("task, seed", [("reach-v3", 0), ("drawer-open-v3", 1), ("pick-place-v3", 2),
                                        ("assembly-v3", 3)])
def test_the_expert_succeeds_through_the_control_loop(task, seed):
    """infer_async.RobotClient on the simulated clock, as sim.py's evaluation runs a policy."""
    with mw.MetaWorldEnv(task) as env:
        clock = sim.SimClock(env)
        policy_fn, spec = mw.expert_policy(env)
        instruction = env.reset(seed)
        client = infer_async.RobotClient(env.robot, env.cameras_for(spec), clock.timed(policy_fn, measure=False),
                                         spec, instruction, infer_async.ClientConfig(**env.client_defaults),
                                         clock=clock.now, sleep=clock.sleep)
        clock.attach(client.policy_thread)
        metrics = client.run(duration=env.time_limit_s, until=env.task_done)
        clock.attach(None)
        assert env.task_done(), f"{task} seed {seed}: no success in {env.steps} steps"
        assert 0 < env.completed_at < env.time_limit_s
        assert metrics.actions_executed >= env.completed_at * env.fps - 2  # an action every step
        assert metrics.idle_ticks == 0


def test_expert_actions_are_clipped_to_the_action_space():
    with mw.MetaWorldEnv("pick-place-v3") as env:
        env.reset(0)
        expert, raw = mw.ScriptedExpert("pick-place-v3"), metaworld.policies.ENV_POLICY_MAP["pick-place-v3"]()
        actions = []
        for _ in range(40):
            action = expert(env.observation)
            np.testing.assert_allclose(action, np.clip(raw.get_action(env.observation), -1, 1), atol=1e-6)
            actions.append(action)
            env.robot.write(action)
            env.step(1 / 80)
        actions = np.array(actions)
        assert np.abs(actions).max() <= 1.0 and np.abs(actions[:, :3]).max() == pytest.approx(1.0)


def test_dart_noise_perturbs_the_executed_hand_and_records_meta_worlds_own_action():
    """With noise, each step records Meta-World's own expert action for the observation the noise led
    to, and executes it with the xyz delta perturbed (clipped to the action space), the gripper as is."""
    raw = metaworld.policies.ENV_POLICY_MAP["pick-place-v3"]()
    with mw.MetaWorldEnv("pick-place-v3") as env:
        env.reset(0)
        demo = env.expert(0, env.fps, noise=0.5)
        moved = []
        for k in range(40):
            expected = np.clip(raw.get_action(env.observation), -1, 1)
            recorded, executed = demo.act(k / env.fps)
            np.testing.assert_allclose(recorded, expected, atol=1e-6)
            assert executed[3] == recorded[3] and np.abs(executed).max() <= 1.0
            moved.append(np.abs(executed[:3] - recorded[:3]).max())
            env.robot.write(executed)
            env.step(1 / env.fps)
        assert np.mean(np.array(moved) > 0) > 0.5  # perturbed at most steps (clipping hides a few)
        hand_with_noise = env.observation[:3].copy()
        env.reset(0)
        quiet = env.expert(0, env.fps)
        for k in range(40):
            recorded, executed = quiet.act(k / env.fps)
            assert np.array_equal(recorded, executed)
            env.robot.write(executed)
            env.step(1 / env.fps)
        assert np.abs(env.observation[:3] - hand_with_noise).max() > 1e-3  # the noise moved the hand


def test_recorded_demonstrations_read_back_through_data_py(tmp_path, capsys):
    """`sim.py record --env metaworld` over two tasks: one dataset, each episode its task's instruction."""
    tasks = ["reach-v3", "button-press-topdown-v3"]
    assert sim.main(["record", "--env", "metaworld", "--task", tasks[0], "--episodes", "1", "--size", "64x64",
                     "--out", str(tmp_path / "one")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["episodes"] == 1
    assert list(data.LeRobotDataset(tmp_path / "one").tasks.values()) == ["Reach a goal position"]
    worlds = sim.open_worlds("metaworld", tasks, (64, 64))
    summary = sim.record(worlds, tmp_path / "ds", episodes=1, seed=0, log=lambda m: None)
    assert summary["episodes"] == 2
    ds = data.LeRobotDataset(tmp_path / "ds", chunk_size=5)
    assert ds.fps == 80 and ds.num_episodes == 2 and ds.camera_keys == ["observation.images.top"]
    assert sorted(ds.tasks.values()) == sorted(mw.INSTRUCTIONS[t] for t in tasks)
    item = ds[0]
    assert item["task"] == "Reach a goal position"
    assert item["observation.state"].shape == (4,) and item["action"].shape == (5, 4)
    assert item["observation.images.top"].shape == (3, 64, 64)
    assert item["observation.images.top"].std() > 0.05  # a rendered scene, not a blank frame
    with mw.MetaWorldEnv("reach-v3") as env:
        env.reset(0)  # the first frame's state is the hand where seed 0 puts it
        np.testing.assert_allclose(item["observation.state"].numpy(), env.observation[:4], atol=1e-5)
    actions = np.stack([ds[i]["action"][0].numpy() for i in range(len(ds))])
    assert np.abs(actions).max() <= 1.0


# The command line: sim.py eval --env metaworld


def test_eval_of_the_expert_prints_a_table_and_a_json_line_per_task_and_group(capsys):
    assert sim.main(["eval", "--env", "metaworld", "--task", "drawer-close-v3", "--expert", "--episodes", "3",
                     "--seed", "100"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["episodes"] == 3 and summary["success_rate"] == 1.0 and summary["seeds"] == [100, 102]
    assert summary["per_task"]["drawer-close-v3"]["group"] == "easy"
    assert summary["per_group"] == {"easy": {"success_rate": 1.0, "successes": 3, "episodes": 3,
                                             "ci95": summary["ci95"], "tasks": 1}}
    assert summary["ci95"][0] == pytest.approx(0.4385, abs=1e-3)  # Wilson's lower bound for 3 of 3
    assert "drawer-close-v3" in captured.err and "[easy: 1 tasks]" in captured.err


def test_jobs_share_the_tasks_between_processes_and_judge_them_as_one_process_does(capsys):
    """--jobs 2: the group's five tasks run in two spawned processes; every task's outcome, the
    summary's task order and the groups are those of the same evaluation in one process."""
    argv = ["eval", "--env", "metaworld", "--task", "very_hard", "--expert", "--episodes", "1", "--seed", "300"]
    summaries = []
    for jobs in ("1", "2"):
        assert sim.main([*argv, "--jobs", jobs]) == 0
        summaries.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    serial, parallel = summaries
    assert list(parallel["per_task"]) == list(serial["per_task"]) == list(mw.GROUPS["very_hard"])
    for task, result in serial["per_task"].items():
        assert parallel["per_task"][task]["successes"] == result["successes"], task
    assert parallel["per_group"] == serial["per_group"] and parallel["episodes"] == 5
    assert sim.main([*argv, "--jobs", "2", "--video", "eval.mp4"]) == 2  # videos come from one process
    assert "--video with --jobs" in capsys.readouterr().err


def test_the_benchmark_average_is_the_mean_of_the_groups_as_in_the_paper():
    """The paper's 57.3% for SmolVLA is the mean of its four group rates (82.5, 41.8, 45.0, 60.0), not
    the rate over all 50 tasks' episodes (which would weigh the 28 easy tasks most)."""
    def task(successes):
        return {"successes": successes, "episodes": 10, "mean_completion_s": 1.0 + successes / 10 if successes else None,
                "idle_ticks": 0, "seeds": [0, 9], "mode": "async"}

    group_of = {"a": "easy", "b": "easy", "c": "easy", "d": "hard"}
    summary = sim.benchmark_summary({"a": task(10), "b": task(10), "c": task(10), "d": task(0)}, group_of)
    assert summary["success_rate"] == 0.75 and summary["episodes"] == 40
    assert summary["per_group"]["easy"]["success_rate"] == 1.0 and summary["per_group"]["hard"]["successes"] == 0
    assert summary["group_average"] == 0.5
    assert summary["mean_completion_s"] == 2.0  # over the 30 successes, each task's mean weighed by its successes


def test_a_task_with_the_so100_scene_or_metaworld_without_one_is_one_line(capsys):
    assert sim.main(["eval", "--task", "reach-v3", "--expert", "--episodes", "1"]) == 2
    assert sim.main(["eval", "--env", "metaworld", "--expert", "--episodes", "1"]) == 2
    assert sim.main(["eval", "--env", "metaworld", "--task", "reech-v3", "--expert", "--episodes", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "did you mean reach-v3" in err[2]
