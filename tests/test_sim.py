"""The MuJoCo SO-100 (sim_so100.py, sim.py): the scene renders, the expert succeeds, the judge reads
physics, datasets read back through data.py, evaluation scores a perfect policy 1 and a random one 0,
and the real-time rig of `sim.py live` serves the driver.

MuJoCo is a requirement (requirements.txt pins it), so these tests import it rather than skip: a
machine where it cannot load or render fails here, loudly, instead of passing with nothing run."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

import cli
import data
import policy_io
import infer_async
import sim
import sim_bus
import sim_so100
import so100
from sim_so100 import BOX_CENTRE, BOX_INNER_HALF, CUBE_AREA, CUBE_GAP, CUBE_HALF, JOINT_RANGES


@pytest.fixture(scope="module")
def sim_robot():
    with sim.SO100Env() as env:
        yield env


def config_at(fps: float, **fields) -> sim.EvalConfig:
    return sim.EvalConfig(client=infer_async.ClientConfig(fps=fps), **fields)


def cube_pixels(scene, camera: str, where) -> int:
    """Pixels that turn red when the cube is put at `where` (against the cube far out of view)."""
    scene.set_cube(where)
    with_cube = scene.render(camera).astype(int)
    scene.set_cube((0.5, 0.5, CUBE_HALF))
    without = scene.render(camera).astype(int)
    changed = np.abs(with_cube - without).sum(-1) > 30
    red = (with_cube[..., 0] > with_cube[..., 1] + 50) & (with_cube[..., 0] > with_cube[..., 2] + 50)
    return int(np.sum(changed & red))


def test_scene_renders_both_cameras_and_the_cube_is_seen():
    scene = sim_so100.Scene()
    scene.reset(3)
    top, wrist = scene.render("top"), scene.render("wrist")
    assert top.shape == wrist.shape == (*sim_so100.IMAGE_SIZE, 3) and top.dtype == np.uint8
    assert top.std() > 10 and wrist.std() > 10
    assert cube_pixels(scene, "top", scene.cube_position()) > 5  # the red cube where it was placed
    x, y, _ = scene.data.site("grasp").xpos
    assert cube_pixels(scene, "wrist", (x, y, CUBE_HALF)) > 20  # right below the jaws
    scene.close()


def test_kinematics_reach_matches_the_arm():
    """Arm straight out (all joints 0): the grasp point lies ~0.40 m in front of the shoulder, the
    sum of the SO-100's link lengths (0.11 + 0.135 + 0.06 + 0.08 m), at shoulder height."""
    scene = sim_so100.Scene()
    scene.data.qpos[scene.joint_qpos] = 0.0
    import mujoco

    mujoco.mj_kinematics(scene.model, scene.data)
    grasp, shoulder = scene.data.site("grasp").xpos, scene.data.body("upper_arm").xpos
    assert abs(grasp[2] - shoulder[2]) < 0.03
    assert 0.38 < shoulder[1] - grasp[1] < 0.42


def test_driver_reads_joint_angles_in_degrees(sim_robot):
    """Through the servo bus and so100.SO100: a joint at 0.5 rad from the middle of its range reads
    0.5 rad in degrees (28.65), to the encoder's resolution (360/4096 degrees)."""
    scene = sim_robot.scene
    sim_robot.reset(0)
    low, high = JOINT_RANGES["shoulder_pan"]
    with scene.lock:
        scene.data.qpos[scene.joint_qpos[0]] = (low + high) / 2 + 0.5
        scene.data.qpos[scene.joint_qpos[5]] = JOINT_RANGES["gripper"][1]  # fully open: 100 %
    state = sim_robot.robot.read()
    assert state[0] == pytest.approx(math.degrees(0.5), abs=2 * 360 / 4096)
    assert state[5] == pytest.approx(100.0, abs=0.2)


def test_servo_speed_is_the_sts3215s(sim_robot):
    """A 90-degree goal step takes about 0.33 s (0.22 s per 60 degrees), not one tick."""
    sim_robot.reset(1)
    robot, clock = sim_robot.robot, sim_robot.clock
    start = robot.read()
    for _ in range(40):  # past the driver's start-up ramp
        robot.write(start)
        clock.sleep(0.01)
    goal = start.copy()
    goal[0] += 90.0
    robot.write(goal)
    clock.sleep(0.2)
    # after 0.2 s the servo's set point is at 54.5 degrees (0.22 s per 60); the joint follows a little behind
    assert 30 < robot.read()[0] - start[0] < 55
    clock.sleep(0.3)
    assert robot.read()[0] - start[0] == pytest.approx(90.0, abs=2.0)


def test_expert_succeeds_on_fixed_seeds():
    scene = sim_so100.Scene()
    for seed in (0, 7, 21):
        scene.reset(seed)
        expert = sim_so100.ScriptedExpert(scene, np.random.default_rng(seed))
        t = 0.0
        while t < expert.duration + 1.0:
            scene.goal = expert.goal(t)
            scene.step(0.05)
            t += 0.05
        assert scene.success(), f"seed {seed}: cube at {scene.cube_position()}"


def test_judge_reads_the_physics_only():
    scene = sim_so100.Scene()
    scene.reset(5)
    assert not scene.success()  # the cube starts on the table, outside the box
    scene.set_cube((BOX_CENTRE[0], BOX_CENTRE[1], CUBE_HALF + 0.002))
    scene.step(0.3)
    assert scene.success()
    with scene.lock:  # in the box but sliding: not at rest
        scene.data.qvel[scene.cube_dof] = 0.2
    assert not scene.success()
    scene.set_cube((BOX_CENTRE[0], BOX_CENTRE[1], 0.2))  # above the box, not in it
    assert not scene.success()
    scene.set_cube((BOX_CENTRE[0] + BOX_INNER_HALF + 0.03, BOX_CENTRE[1], CUBE_HALF))
    scene.step(0.3)
    assert not scene.success()  # beside the box


def test_recorded_dataset_reads_back_through_data_py(tmp_path, sim_robot):
    summary = sim.record(sim_robot, tmp_path / "ds", episodes=2, seed=0, fps=10, log=lambda m: None)
    assert summary["episodes"] == 2
    ds = data.LeRobotDataset(tmp_path / "ds", chunk_size=5)
    assert ds.fps == 10
    assert sorted(ds.camera_keys) == ["observation.images.top", "observation.images.wrist"]
    item = ds[0]
    assert item["task"] == "Pick up the cube and place it in the box."
    assert item["observation.images.top"].shape == (3, *sim_so100.IMAGE_SIZE)
    assert item["observation.state"].shape == (6,) and item["action"].shape == (5, 6)
    info = data.read_json(tmp_path / "ds" / "meta" / "info.json")
    assert info["robot_type"] == "so100_follower"
    assert info["features"]["observation.state"]["names"][0] == "shoulder_pan.pos"
    states = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
    assert 0.0 <= states[:, 5].min() and states[:, 5].max() <= 100.0  # gripper in percent
    assert states[:, 0].max() - states[:, 0].min() > 20  # the arm really moved (degrees)


def test_evaluation_scores_the_expert_one_and_random_goals_zero(sim_robot):
    config = config_at(30, episodes=2, seed=500, time_limit_s=12, measure_latency=False)
    policy, spec = sim_robot.expert_policy(config.client.fps)
    expert = sim.evaluate(sim_robot, policy, spec, config, log=lambda m: None)
    assert expert["success_rate"] == 1.0 and expert["idle_ticks"] == 0
    assert 3.0 < expert["mean_completion_s"] < 12.0
    policy, spec = sim.random_policy(sim_robot)
    random = sim.evaluate(sim_robot, policy, spec, config_at(30, episodes=2, seed=500, time_limit_s=6),
                          log=lambda m: None)
    assert random["success_rate"] == 0.0
    assert random["ci95"][1] == pytest.approx(0.6576, abs=1e-3)  # Wilson, 0 of 2: 3.84 / 5.84


def test_latency_passes_in_simulated_time(sim_robot):
    """A policy that costs 0.3 s (9 ticks at 30 fps), with 30-action chunks, for 4 s (120 ticks).
    Synchronous: the first chunk arrives at tick 9; its 30 actions run on ticks 9..38; the next
    observation is sent on tick 38 with the last action and its chunk arrives at tick 47, so ticks
    39..46 are idle (8), again on 77..84 (8), and from 115 to the end. Asynchronous with g = 0.5,
    above the bound 0.3 s / (30 x 1/30 s) = 0.3: never idle; with g = 0.2, below it: idle."""
    base, spec = sim_robot.expert_policy(30)
    config = sim.EvalConfig(episodes=1, seed=600, time_limit_s=4, latency_s=0.3, measure_latency=False,
                            client=infer_async.ClientConfig(fps=30, sync=True))
    sync = sim.evaluate(sim_robot, base, spec, config, log=lambda m: None)
    assert sync["latency_ms_mean"] == pytest.approx(300.0, abs=1e-6)  # simulated time, whatever the wall clock did
    assert sync["ticks"] in (120, 121)  # the last tick may land a physics step (2 ms) short of 4 s
    assert sync["idle_ticks"] == 8 + 8 + (sync["ticks"] - 115)
    config.client.sync, config.client.threshold = False, 0.5
    assert sim.evaluate(sim_robot, base, spec, config, log=lambda m: None)["idle_ticks"] == 0
    config.client.threshold = 0.2
    assert sim.evaluate(sim_robot, base, spec, config, log=lambda m: None)["idle_ticks"] > 0


def test_each_episode_seeds_the_flow_noise_with_its_scene_seed(sim_robot):
    """A policy drawing its noise as flow.SmolVLA does (torch's global generator): episode i's first
    draw is what torch gives after manual_seed(seed + i), whatever was drawn before the evaluation."""
    import torch

    base, spec = sim_robot.expert_policy(30)
    draws: list[torch.Tensor] = []

    def policy(observation):
        draws.append(torch.randn(3))
        return base(observation)

    config = sim.EvalConfig(episodes=2, seed=600, time_limit_s=0.5, measure_latency=False,
                            client=infer_async.ClientConfig(fps=30, sync=True, n_action_steps=30))
    torch.randn(5)  # whatever ran before
    sim.evaluate(sim_robot, policy, spec, config, log=lambda m: None)
    assert len(draws) == 2  # one chunk of 30 actions covers each 0.5 s episode
    for seed, draw in zip((600, 601), draws):
        assert torch.equal(draw, torch.randn(3, generator=torch.Generator().manual_seed(seed)))


def test_wilson_interval_by_hand():
    low, high = sim.wilson_interval(8, 10)  # p = 0.8, n = 10, z = 1.96
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert sim.wilson_interval(0, 0) == (0.0, 1.0)


def test_bus_calibration_is_a_valid_lerobot_file():
    with sim_bus.SimulatedBus(scene=sim_so100.Scene()) as bus:
        calibration = so100.validate_calibration(bus.calibration, "sim")
        assert calibration["gripper"]["range_min"] < calibration["gripper"]["range_max"]


def test_a_moving_cube_slides_at_its_speed_turns_at_the_edge_and_stops_when_lifted():
    scene = sim_so100.Scene()
    scene.reset(2)
    start = scene.cube_position()
    scene.cube_velocity = np.array([0.05, 0.0])
    scene.step(0.4)
    moved = scene.cube_position() - start
    assert moved[0] == pytest.approx(0.02, abs=0.002) and abs(moved[1]) < 0.002  # 5 cm/s for 0.4 s
    scene.set_cube((CUBE_AREA[0][1] + 0.01, start[1], CUBE_HALF))  # past the area's edge: turns back
    scene.step(0.2)
    assert scene.cube_velocity[0] < 0
    scene.set_cube((0.0, -0.2, 0.08))  # off the table (as if lifted by the gripper): no longer carried
    scene.step(0.01)
    assert not scene.cube_velocity.any()


def test_a_missing_gl_back_end_is_one_line_naming_what_to_install(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MUJOCO_GL": "no-such-gl"}
    result = subprocess.run([sys.executable, str(Path(sim.__file__)), "view", "--out", str(tmp_path / "v.png")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == cli.USER_ERROR and not (tmp_path / "v.png").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "MUJOCO_GL=no-such-gl" in lines[0] and "install libEGL" in lines[0]


def test_two_cube_scene_names_the_cube_to_move_and_judges_that_one():
    one, two = sim_so100.Scene(), sim_so100.Scene(cubes=2)
    targets = set()
    for seed in range(12):
        one.reset(seed)
        two.reset(seed)
        red, green = (two.data.body(name).xpos[:2] for name in ("cube", "cube_green"))
        assert np.hypot(*(red - green)) >= CUBE_GAP
        np.testing.assert_allclose(red, one.cube_position()[:2])  # one-cube scenes keep their seeds
        targets.add(two.target_cube)
        named = two.task().split()[3]  # "Pick up the <colour> cube ..."
        rgba = two.model.geom(two.cubes[two.target_cube]).rgba
        assert named == ("red" if rgba[0] > rgba[1] else "green")  # the words name the cube of that colour
        np.testing.assert_allclose(two.cube_position()[:2], two.data.body(two.cubes[two.target_cube]).xpos[:2])
    assert targets == {0, 1}
    assert sim.instruct(two, "empty") == "" and sim.instruct(two, "named") == two.task()
    before = two.target_cube
    assert sim.instruct(two, "other") == sim_so100.task_for(two.colours[1 - before]) and two.target_cube == 1 - before
    with pytest.raises(sim.SimError, match="two-cube"):
        sim.instruct(one, "other")


def test_expert_moves_the_named_cube_and_leaves_the_other():
    scene = sim_so100.Scene(cubes=2)
    scene.reset(4)
    other = 1 - scene.target_cube
    expert = sim_so100.ScriptedExpert(scene, np.random.default_rng(4))
    t = 0.0
    while t < expert.duration + 1.0:
        scene.goal = expert.goal(t)
        scene.step(0.05)
        t += 0.05
    assert scene.success() and scene.cube_in_box(scene.target_cube) and not scene.cube_in_box(other)


def test_two_cube_recording_gives_each_episode_the_task_of_its_scene(tmp_path):
    with sim.SO100Env(cubes=2) as env:
        summary = sim.record(env, tmp_path / "ds", episodes=3, seed=0, fps=10, log=lambda m: None)
    ds = data.LeRobotDataset(tmp_path / "ds")
    scene = sim_so100.Scene(cubes=2)
    seeds = range(summary["seeds"][0], summary["seeds"][1] + 1)
    expected = []
    for seed in seeds:
        if seed not in summary["expert_failures"]:
            scene.reset(seed)
            expected.append(sim_so100.task_for(scene.colours[scene.target_cube]))
    starts = [i for i in range(len(ds)) if ds[i]["frame_index"] == 0]
    assert [ds[i]["task"] for i in starts] == expected


def test_the_evaluation_runs_the_client_settings_it_holds(sim_robot):
    """EvalConfig.client is the control loop's whole configuration: observation skipping (similarity)
    is one of the settings the evaluation once dropped. 3 s at 30 fps are ticks 0..90; with 30-action
    chunks and g = 0.7 an observation goes out whenever the queue is down to 21 actions (every 9
    ticks). With every observation within 1000 degrees of the last, those are skipped, and the policy
    is asked only when the queue has run dry (every 30 ticks)."""
    base, spec = sim_robot.expert_policy(30)

    def asked_at(similarity: float) -> list[int]:
        timesteps = []

        def policy(observation):
            timesteps.append(observation.timestep)
            return base(observation)

        config = sim.EvalConfig(episodes=1, seed=600, time_limit_s=3, measure_latency=False,
                                client=infer_async.ClientConfig(fps=30, similarity=similarity))
        summary = sim.evaluate(sim_robot, policy, spec, config, log=lambda m: None)
        assert summary["similarity"] == similarity and summary["ticks"] == 91
        return timesteps

    assert asked_at(0.0) == list(range(0, 91, 9))
    assert asked_at(1000.0) == [0, 30, 60, 90]


def test_command_line_settings_and_mistakes(tmp_path, capsys):
    summary_path = tmp_path / "eval.json"
    assert sim.main(["eval", "--expert", "--episodes", "1", "--time-limit", "1", "--ease-in", "0", "--similarity", "0",
                     "--aggregate", "latest", "--threshold", "0.5", "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert (summary["ease_in"], summary["similarity"], summary["aggregate"], summary["threshold"]) == (0, 0.0, "latest", 0.5)
    assert summary["control_period_ms"] == pytest.approx(1000 / 30, abs=0.05)  # no policy: the SO-100's 30 fps
    capsys.readouterr()
    assert sim.main(["eval", "--expert", "--episodes", "1", "--instruction", "other"]) == cli.USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the two-cube scene (--cubes 2)" in err[0]
    with pytest.raises(SystemExit) as exit_:
        sim.main(["eval", "--env", "nowhere", "--expert"])
    assert exit_.value.code == cli.USER_ERROR and "--env" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert sim.main(["record", "--episodes", "1", "--out", str(tmp_path / "taken")]) == cli.USER_ERROR
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'taken'} already exists: a recording never overwrites a dataset"
    assert not any((tmp_path / "taken").iterdir())


def test_live_rig_serves_the_driver_and_paces_the_physics_to_the_wall_clock():
    """What `sim.py live` gives infer_async.run_client: a bus the driver connects to as to a real arm,
    the scene of --scene-seed, and sleep() that takes as long on the wall clock as in the physics."""
    rig = sim.LiveSO100(scene_seed=7)
    try:
        port, calibration = rig.open_bus()
        scene = sim_so100.Scene()
        scene.reset(7)
        np.testing.assert_allclose(rig.env.scene.cube_position(), scene.cube_position())  # the seed's scene
        with so100.SO100(port, calibration=calibration) as arm:
            assert arm.read().shape == (6,)
            start_sim, start_wall = rig.now(), time.monotonic()
            for _ in range(10):
                rig.sleep(0.05)
            assert rig.now() - start_sim == pytest.approx(0.5, abs=0.01)
            assert time.monotonic() - start_wall >= 0.45
        assert not rig.task_done() and rig.outcome() == "simulation: the cube is not in the box"
    finally:
        rig.close()


class PointWorld:
    """The smallest world behind sim.Environment: a point on a line that should reach 0, its velocity
    the action (clipped to [-1, 1]), a camera whose brightness shows where it is. Recording and
    evaluation must run it with no SO-100 in sight."""

    fps, image_size, robot_type, state_names, action_names = 10, (64, 64), "point", ["x"], ["v"]
    client_defaults = {"ease_in": 0, "similarity": 0.0}  # its own, as Meta-World's deltas need
    settings: dict = {}

    def __init__(self):
        self.time, self.x, self.v, self.completed_at, self.start = 0.0, 0.0, 0.0, None, 0.0
        self.clock = sim.SimClock(self)
        self.robot, self.cameras = self, {"observation.images.top": PointCamera(self)}

    def step(self, seconds: float) -> None:  # the physics
        self.x += self.v * seconds
        self.time += seconds

    def read(self) -> np.ndarray:  # the robot's state
        return np.array([self.x], np.float32)

    def write(self, action) -> None:
        self.v = float(np.clip(action[0], -1, 1))

    def render(self) -> np.ndarray:
        return np.full((*self.image_size, 3), int(np.clip(128 + 100 * self.x, 0, 255)), np.uint8)

    def reset(self, seed: int) -> str:
        self.x, self.v = np.random.default_rng(seed).uniform(0.5, 1.0), 0.0
        self.start, self.completed_at = self.time, None
        return "go to zero"

    def task_done(self) -> bool:
        if abs(self.x) < 0.05 and self.completed_at is None:
            self.completed_at = self.time - self.start
        return self.completed_at is not None

    def episode_facts(self) -> dict:
        return {}

    def cameras_for(self, spec) -> dict:
        return {key: PointCamera(self) for key in spec.cameras}

    def frame(self) -> np.ndarray:
        return self.render()

    def expert(self, seed: int, fps: float, noise: float = 0.0):
        world = self

        class Halving:  # halves the distance each tick, for 2 s
            def act(self, t):
                return None if t >= 2.0 else (np.array([-5 * world.x], np.float32),) * 2

            def succeeded(self):
                return abs(world.x) < 0.05

        return Halving()

    def expert_policy(self, fps: float):
        return (lambda observation: np.array([[-5 * self.x]])), policy_io.PolicySpec({}, 1, 1, 1, 1)

    def action_limits(self):
        return np.array([-1.0]), np.array([1.0])

    def close(self) -> None:
        pass


class PointCamera:
    def __init__(self, world: PointWorld):
        self.world = world

    def read(self) -> np.ndarray:
        return self.world.render()


class FailingPointWorld(PointWorld):
    """A PointWorld whose expert fails on seeds below `first_success` (it never moves the point)."""

    def __init__(self, first_success: int, task: str):
        super().__init__()
        self.first_success, self.task = first_success, task

    def expert(self, seed: int, fps: float, noise: float = 0.0):
        if seed >= self.first_success:
            return super().expert(seed, fps, noise)

        class Idle:
            def act(self, t):
                return None if t >= 0.5 else (np.array([0.0], np.float32),) * 2

            def succeeded(self):
                return False

        return Idle()


def test_the_recorder_bounds_each_worlds_expert_failures_not_their_sum(tmp_path):
    """Chained worlds (Meta-World's tasks) each get the failure allowance, max(10, episodes): 8 + 8
    failures in two worlds record; 11 in one stop the recording, naming the world."""
    worlds = [FailingPointWorld(8, "first"), FailingPointWorld(8, "second")]
    summary = sim.record(worlds, tmp_path / "ds", episodes=1, seed=0, log=lambda m: None)
    assert summary["episodes"] == 2 and len(summary["expert_failures"]) == 16
    with pytest.raises(sim.SimError, match="in hopeless on 11 seeds"):
        sim.record(FailingPointWorld(100, "hopeless"), tmp_path / "ds2", episodes=1, seed=0, log=lambda m: None)
    assert not (tmp_path / "ds2").exists()


def test_a_second_world_records_and_evaluates_through_the_same_interface(tmp_path):
    world = PointWorld()
    summary = sim.record(world, tmp_path / "ds", episodes=2, seed=3, log=lambda m: None)
    assert summary["episodes"] == 2 and summary["seeds"] == [3, 4]
    ds = data.LeRobotDataset(tmp_path / "ds", chunk_size=4)
    assert ds.fps == 10 and ds.camera_keys == ["observation.images.top"] and len(ds) == 40  # 2 s at 10 fps, twice
    item = ds[0]
    assert item["task"] == "go to zero" and item["observation.state"].shape == (1,) and item["action"].shape == (4, 1)
    assert item["observation.state"][0] == pytest.approx(np.random.default_rng(3).uniform(0.5, 1.0), abs=1e-6)
    assert item["action"][0, 0] == pytest.approx(-5 * item["observation.state"][0], abs=1e-5)  # as recorded: unclipped
    info = data.read_json(tmp_path / "ds" / "meta" / "info.json")
    assert info["robot_type"] == "point" and info["features"]["observation.state"]["names"] == ["x"]

    policy, spec = world.expert_policy(world.fps)
    config = sim.EvalConfig(episodes=3, seed=0, time_limit_s=3, measure_latency=False, client=sim.client_config(world))
    result = sim.evaluate(world, policy, spec, config, log=lambda m: None)
    # From 0.5-1.0 to within 0.05 at no more than 1 a second: at least 0.45 s; at full speed down to 0.2,
    # then halving each tick: at most 0.8 s + 3 ticks, and a tick or two before the first action.
    assert result["success_rate"] == 1.0 and 0.45 <= result["mean_completion_s"] <= 1.3
    assert (result["ease_in"], result["similarity"], result["control_period_ms"]) == (0, 0.0, 100.0)  # the world's
    policy, spec = sim.random_policy(world, chunk_size=5)
    assert sim.evaluate(world, policy, spec, config, log=lambda m: None)["episodes"] == 3


class Line:
    """A world with no physics for SimClock: simulated time, and a robot that holds its last goal."""

    def __init__(self):
        self.time, self.goal = 0.0, np.zeros(1, np.float32)

    def step(self, seconds: float) -> None:
        self.time += seconds

    def read(self) -> np.ndarray:
        return self.goal

    def write(self, action) -> None:
        self.goal = np.asarray(action, np.float32)


def plan_at(t) -> np.ndarray:
    """The one right action for timestep t: a plan every chunk agrees on."""
    return np.array([10 * math.sin(t / 7)])


@pytest.mark.parametrize("future_state_max_offset", [0, 10])
def test_rtc_in_simulated_time_executes_the_plan_and_lands_each_chunk_after_its_delay(future_state_max_offset):
    """A policy that takes 0.45 s at 10 fps (d = ceil(4.5) = 5), with 10-action chunks, each chunk the
    plan from where the policy is told it starts (T + the offset: 5 for a future-state policy, told its
    state is the present one moved as the plan moves it until T + 4). SimClock.timed hands each observation through as sent. If
    a chunk landed a timestep off, the arm would execute the plan shifted at its seams."""
    world = Line()
    clock = sim.SimClock(world)
    spec = policy_io.PolicySpec({}, 1, 1, 10, 10, future_state_max_offset=future_state_max_offset)
    seen = []

    def policy(observation):
        offset = policy_io.chunk_offset(future_state_max_offset, observation.inference_delay)
        seen.append(observation)
        if offset:  # the arm holds its last goal (action T - 1), moved by the plan from T to T + offset - 1
            t = observation.timestep
            expected = plan_at(t - 1) + plan_at(t + offset - 1) - plan_at(t)
            assert observation.state == pytest.approx(expected, abs=1e-5)
        return np.stack([plan_at(observation.timestep + offset + i) for i in range(10)])

    config = infer_async.ClientConfig(fps=10, rtc=True, similarity=0.0)
    client = infer_async.RobotClient(world, {}, clock.timed(policy, 0.45, measure=False), spec, "t", config,
                                     clock=clock.now, sleep=clock.sleep)
    clock.attach(client.policy_thread)
    metrics = client.run(max_actions=60, duration=100)
    clock.attach(None)
    assert metrics.mode == "rtc" and metrics.idle_ticks == 0
    np.testing.assert_allclose(np.array(metrics.executed)[:, 0], [plan_at(t)[0] for t in range(60)], atol=1e-5)
    assert [o.inference_delay for o in seen[:3]] == [0, 5, 5]  # none known before the first chunk
    for observation in seen[1:]:
        assert observation.left_over is not None and len(observation.left_over) >= observation.inference_delay
        np.testing.assert_allclose(observation.left_over[:, 0],
                                   [plan_at(observation.timestep + i)[0] for i in range(len(observation.left_over))],
                                   atol=1e-5)
    # The plain policy's first 4 actions of each chunk after the first come for timesteps already
    # executed (4 ticks pass before it lands at 0.45 s); a future-state policy's chunk starts later.
    assert metrics.stale_actions_dropped == (0 if future_state_max_offset else 4 * (metrics.chunks_received - 1))


def test_the_summary_reports_rtc_and_the_seam_jerk_over_episodes():
    """Per-episode seam jerks 100, 200, 300 (mean 200, sd 100): 95% interval 200 +- 4.303 x 100 / sqrt(3)
    (Student's t, 2 degrees of freedom) = 200 +- 248.4; an episode without a seam is left out."""
    results = [{"success": True, "completion_s": 1.0, "idle_ticks": 0, "ticks": 10, "latencies": [0.1],
                "seam_jerk": jerk, "seam_jerk_max": jerk and 2 * jerk, "facts": {}}
               for jerk in (100.0, 200.0, 300.0, None)]
    config = sim.EvalConfig(client=infer_async.ClientConfig(rtc=True))
    summary = sim.summarise(results, config, {})
    assert summary["mode"] == "rtc" and summary["seam_jerk_mean"] == 200.0
    assert summary["seam_jerk_ci95"] == pytest.approx([200 - 248.4, 200 + 248.4], abs=0.1)
    assert summary["seam_jerk_max"] == 600.0
    assert sim.summarise(results, sim.EvalConfig(client=infer_async.ClientConfig(sync=True)), {})["mode"] == "sync"
    assert sim.mean_interval([5.0]) == (5.0, 5.0)
    low, high = sim.mean_interval(list(np.arange(31.0)))  # 30 degrees of freedom: t = 2.042
    assert (high - low) / 2 == pytest.approx(2.042 * np.std(np.arange(31.0), ddof=1) / math.sqrt(31), rel=1e-3)


def test_command_line_eval_rtc_runs_and_excludes_sync(tmp_path, capsys):
    summary_path = tmp_path / "eval.json"
    assert sim.main(["eval", "--expert", "--rtc", "--episodes", "2", "--time-limit", "2", "--latency", "0.3",
                     "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["mode"] == "rtc" and summary["episodes"] == 2
    assert summary["seam_jerk_mean"] is not None and len(summary["seam_jerk_ci95"]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        sim.main(["eval", "--expert", "--rtc", "--sync"])
    assert exit_.value.code == cli.USER_ERROR and "not allowed with argument" in capsys.readouterr().err
