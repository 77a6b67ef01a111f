"""Simulated worlds behind a real arm's control loop: scripted demonstrations and closed-loop evaluation.

An `Environment` is a world a policy acts in exactly as on a robot: a `robot` read and written
through its driver, cameras, and a `SimClock` that gives infer_async.RobotClient its clock and sleep
so that the physics advances in the control loop's sleep and a policy's latency passes in simulated
time. On that one interface sit the recording of LeRobot datasets from a world's scripted expert and
the closed-loop evaluation (success rate with its interval, completion time, idle ticks, video).

The SO-100 environment (`--env so100`, the default) is the MuJoCo scene of sim_so100.py (an arm, a
cube, a box, a scripted expert) reached the way the real arm is: `so100.SO100` talks Feetech packets
over a pseudo-terminal to a simulated servo bus whose encoders read the physics (sim_bus.py), so a
policy driven through `infer_async.RobotClient` runs the exact code path of a real arm.

    python sim.py record --episodes 50 --out outputs/sim_dataset --seed 0   # scripted demonstrations
    python sim.py eval --policy outputs/demo/checkpoints/last/pretrained_model --episodes 50 --seed 10000
    python sim.py eval --expert --episodes 5 --video expert.mp4             # the scripted expert
    python sim.py eval --policy DIR --latency 0.6 --rtc                     # a slow policy, latency-tolerant
    python sim.py live --task "Pick up the cube and place it in the box."   # infer_async's client, real time
    python sim.py eval --env metaworld --task mt50 --expert --episodes 3    # Meta-World (sim_metaworld.py)
    python sim.py eval --env metaworld --task mt50 --policy DIR --episodes 10 --jobs 2   # tasks on 2 cores

Read top to bottom:
  1. the environment interface
  2. simulated time: physics advances in sleep(); a policy's latency passes in simulated time
  3. the SO-100 environment: scene + servo bus + driver + cameras; its expert; in real time (live)
  4. recording a LeRobot dataset, closed-loop evaluation, video
  5. the command line

The SO-100's units are the real arm's: joints in degrees (LeRobot's convention: 0 at the middle of
the calibrated range), the gripper in percent of its range, so a recorded dataset looks like a real
SO-100 dataset to data.py and train.py.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

import cli
import infer_async
import policy_io
import sim_bus
import so100

try:  # the SO-100 scene; TASK, task_for and CUBE_COLOURS are also its words for sim's users (tokenizers)
    from sim_so100 import CAMERAS, CUBE_COLOURS, IMAGE_SIZE, JOINTS, SETTLE_S, TASK, Scene, ScriptedExpert, task_for
except cli.UserError as err:  # MuJoCo is missing, or its GL back end (loaded on import) cannot start
    if __name__ != "__main__":
        raise
    print(f"sim.py: {err}", file=sys.stderr)
    sys.exit(cli.USER_ERROR)

FPS = int(policy_io.DEFAULT_FPS)  # the control rate of real SO-100 datasets (an int, as info.json records it)
FEATURE_NAMES = [f"{name}.pos" for name in JOINTS]  # as current LeRobot SO-100 datasets name them
ROBOT_TYPE = "so100_follower"
INSTRUCTIONS = ("named", "other", "empty")  # what a two-cube episode's policy is told (see instruct)

PolicyFn = Callable[[policy_io.Observation], np.ndarray]


class SimError(cli.UserError):
    """A problem the user can fix (the command lines print it in one line and exit USER_ERROR)."""

# ---------------------------------------------------------------------------------------------
# 1. The environment interface
# ---------------------------------------------------------------------------------------------
# Recording and evaluation see a world only through this: a second world (Meta-World, issue 18)
# is a new class with these members, not edits to the loops below.


class Robot(Protocol):
    def read(self) -> np.ndarray: ...  # the state, float32 (S,), in the units of the world's datasets

    def write(self, action: np.ndarray) -> None: ...  # one action (A,), in the same units


class Camera(Protocol):
    def read(self) -> np.ndarray: ...  # uint8 (H, W, 3) RGB, rendered now


class Demonstration(Protocol):
    """A world's scripted expert for the episode just reset."""

    def act(self, t: float) -> tuple[np.ndarray, np.ndarray] | None:
        """At `t` seconds into the episode: (the action to record, the action to execute; they differ
        when noise is injected), or None once the demonstration is over."""

    def succeeded(self) -> bool:
        """Judged at the end: only a successful demonstration goes into a dataset."""


class Environment(Protocol):
    """A simulated world as a policy meets it: what infer_async.RobotClient needs of a robot, plus
    episodes, the world's own success signal, and its scripted expert."""

    fps: float  # its control rate (a policy trained on its data runs at that data's rate)
    time_limit_s: float  # an episode's length when no success ends it sooner
    robot: Robot
    clock: SimClock  # over the world (a world's own file need not import sim: open_environment can give it one)
    cameras: dict[str, Camera]  # its cameras under the policy's keys, at the size datasets record
    image_size: tuple[int, int]  # (height, width) of those cameras
    client_defaults: dict  # infer_async.ClientConfig fields this world needs (e.g. ease_in=0 for deltas)
    robot_type: str  # a recorded dataset's robot type and feature names (info.json)
    state_names: list[str]
    action_names: list[str]
    settings: dict  # the world's own settings, reported in an evaluation's summary
    completed_at: float | None  # after task_done(): simulated seconds from the reset to success

    def reset(self, seed: int) -> str:
        """A new episode from `seed` (the same seed, the same episode); returns its instruction."""

    def task_done(self) -> bool:
        """Called once a control tick: True once the world's own success signal says so."""

    def episode_facts(self) -> dict[str, bool]:
        """What else the end of an episode shows, counted over episodes in the summary."""

    def cameras_for(self, spec: policy_io.PolicySpec) -> dict[str, Camera]:
        """The cameras a policy asks for, at the sizes it asks for; a SimError names any it lacks."""

    def frame(self) -> np.ndarray:
        """uint8 (H, W, 3): what a video of the episode shows now."""

    def expert(self, seed: int, fps: float, noise: float = 0.0) -> Demonstration:
        """The scripted expert for the episode just reset from `seed`, acting `fps` times a second."""

    def expert_policy(self, fps: float) -> tuple[PolicyFn, policy_io.PolicySpec]:
        """The scripted expert as a policy (observation -> chunk): evaluation should score it ~1."""

    def action_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest action the robot takes (a random policy draws between them)."""

    def close(self) -> None: ...

# ---------------------------------------------------------------------------------------------
# 2. Simulated time
# ---------------------------------------------------------------------------------------------
# infer_async.RobotClient takes a clock and a sleep function. Given these, the control loop runs
# on simulated time: sleep(d) advances the physics by d. The policy runs on its own thread as on
# a robot; while it computes, simulated time stands still, and its chunk arrives `latency`
# simulated seconds after the observation was captured (the latency measured in wall time, plus
# any extra given). So an evaluation runs as fast as the CPU allows, yet the arm moves exactly as
# far during an inference as a real arm would in real time, and idle ticks, stale actions and
# completion times mean what they would on a robot. realtime=True instead paces the physics to
# the wall clock and lets the policy run freely beside it (`python sim.py live`).


class World(Protocol):
    time: float  # simulated seconds

    def step(self, seconds: float) -> None: ...  # advance the physics


class SimClock:
    """The clock and sleep of a control loop driving `world`. `before_advance`, if given, runs
    before time moves (the SO-100's servo bus acting on every goal already written to it)."""

    def __init__(self, world: World, realtime: bool = False, before_advance: Callable[[], None] | None = None):
        self.world, self.realtime, self.before_advance = world, realtime, before_advance
        self.policy_busy: Callable[[], bool] = lambda: False  # the policy thread's `busy` and `stopping`
        self.policy_stopping: Callable[[], bool] = lambda: False
        self._cond = threading.Condition()
        self._computing = False
        self._due: float | None = None  # simulated time at which the pending chunk arrives
        self._released = True
        self._wall_start: float | None = None

    def now(self) -> float:
        return self.world.time

    def sleep(self, seconds: float) -> None:
        target = self.now() + max(seconds, 0.0)
        if self.realtime:
            self._advance_to(target)
            if self._wall_start is None:
                self._wall_start = time.monotonic() - self.now()
            delay = self._wall_start + self.now() - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return
        while True:
            due = self._pending_due()
            if due is None or due > target:
                self._advance_to(target)
                return
            self._advance_to(due)
            self._deliver()

    def _pending_due(self) -> float | None:
        """None when no chunk is on its way; else when it arrives. Waits while an observation is
        submitted but not started, being skipped as too similar, or computed: each of those ends
        with a notification (the policy thread's on_change, or timed()'s run)."""
        with self._cond:
            while self.policy_busy() and (self._computing or self._due is None):
                self._cond.wait()
            return self._due

    def _deliver(self) -> None:
        """Release the finished chunk at its arrival time and wait until it is in the queue."""
        with self._cond:
            self._due, self._released = None, True
            self._cond.notify_all()
            while self.policy_busy():
                self._cond.wait()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _advance_to(self, when: float) -> None:
        if self.before_advance is not None:
            self.before_advance()
        self.world.step(when - self.now())

    def timed(self, policy_fn: PolicyFn, extra_latency: float = 0.0, measure: bool = True) -> PolicyFn:
        """policy_fn wrapped so that its chunk arrives `latency` after the observation in simulated
        time: the wall time it took (if `measure`) plus `extra_latency`. In real time it runs as is."""
        if self.realtime:
            return policy_fn

        def run(observation):
            with self._cond:
                self._computing = True
            start = time.perf_counter()
            try:
                return policy_fn(observation)
            finally:
                latency = (time.perf_counter() - start if measure else 0.0) + extra_latency
                with self._cond:
                    self._computing = False
                    self._due, self._released = observation.captured_at + latency, False
                    self._cond.notify_all()
                    # Until sleep() has brought simulated time to _due, or the run has ended
                    # (the policy thread stopping, its chunk no longer wanted).
                    while not self._released and not self.policy_stopping():
                        self._cond.wait()

        return run

    def attach(self, policy_thread) -> None:
        """Follow this infer_async.PolicyThread (None: none). Forgets any chunk of one before."""
        if policy_thread is not None:
            policy_thread.on_change = self._wake
        with self._cond:
            self.policy_busy = (lambda: policy_thread.busy) if policy_thread is not None else (lambda: False)
            self.policy_stopping = (lambda: policy_thread.stopping) if policy_thread is not None else (lambda: False)
            self._computing, self._due, self._released = False, None, True
            self._cond.notify_all()

# ---------------------------------------------------------------------------------------------
# 3. The SO-100 environment
# ---------------------------------------------------------------------------------------------


class SimCamera:
    """A scene camera with infer_async.Camera's interface: read() -> uint8 (H, W, 3), rendered now,
    resized to `size` if given (as a real camera is captured at the size the policy was trained on)."""

    def __init__(self, scene: Scene, name: str, size: tuple[int, int] | None = None):
        self.scene, self.name, self.size = scene, name, size

    def read(self) -> np.ndarray:
        frame = self.scene.render(self.name)
        if self.size is None or tuple(self.size) == frame.shape[:2]:
            return frame
        from PIL import Image

        return np.asarray(Image.fromarray(frame).resize((self.size[1], self.size[0]), Image.BILINEAR))

    def close(self) -> None:
        pass


class SO100Env:
    """The SO-100 scene, its servo bus on a pseudo-terminal, the so100.SO100 driver connected to it,
    the cameras and a clock: `robot`, `cameras` and `clock` plug into infer_async.RobotClient where a
    real arm's do. With two cubes, `instruction` says what each episode's policy is told (see
    instruct); `cube_speed` (m/s) slides the cube in a random direction until the jaws touch it."""

    fps = FPS
    time_limit_s = 25.0  # three times the demo policy's mean completion
    client_defaults: dict = {}  # ClientConfig's defaults are the SO-100's
    robot_type, state_names, action_names = ROBOT_TYPE, FEATURE_NAMES, FEATURE_NAMES

    def __init__(self, image_size: tuple[int, int] = IMAGE_SIZE, cubes: int = 1, realtime: bool = False,
                 instruction: str = "named", cube_speed: float = 0.0):
        check_instruction(instruction, cubes)  # before anything slow (the policy) is loaded
        self.scene = Scene(image_size, cubes)
        self.image_size = image_size
        self.bus = sim_bus.SimulatedBus(scene=self.scene)
        self.clock = SimClock(self.scene, realtime, before_advance=self.bus.settle)
        self.robot: so100.SO100 | None = None
        self.cameras = {policy_io.IMAGE_PREFIX + name: SimCamera(self.scene, name) for name in CAMERAS}
        self.instruction, self.cube_speed = instruction, cube_speed
        self._episode_start, self._success_since = 0.0, None
        self.completed_at: float | None = None

    @property
    def settings(self) -> dict:
        return {"cube_speed": self.cube_speed, "instruction": self.instruction}

    def start(self, connect: bool = True) -> "SO100Env":
        """Serve the bus; with `connect`, also connect `robot` (torque on). `sim.py live` connects
        infer_async's own driver to `bus.port` instead, as to a real arm."""
        self.bus.start()
        if connect:
            # A generous reply timeout: a busy CPU can delay the bus thread, and simulated time does not
            # pass meanwhile, so waiting longer than a real arm's 50 ms costs nothing.
            self.robot = so100.SO100(self.bus.port, calibration=self.bus.calibration, reply_timeout=1.0)
            self.robot.connect()
        self._episode_start = self.clock.now()
        return self

    def reset(self, seed: int) -> str:
        """A new episode: the scene from `seed`, the driver holding the new pose (torque on again);
        returns the instruction the policy is given."""
        self.scene.reset(seed)
        self.bus.settle()
        self.robot.torque_on()
        self._episode_start = self.clock.now()
        self._success_since, self.completed_at = None, None
        task = instruct(self.scene, self.instruction)
        if self.cube_speed > 0:
            heading = np.random.default_rng([seed, 1]).uniform(0, 2 * math.pi)
            self.scene.cube_velocity = self.cube_speed * np.array([math.cos(heading), math.sin(heading)])
        return task

    def task_done(self) -> bool:
        """Called once a control tick: True once the cube has been in the box and at rest for SETTLE_S.
        `completed_at` then holds the simulated seconds from the episode's start to that success."""
        elapsed = self.clock.now() - self._episode_start
        if not self.scene.success():
            self._success_since = None
            return False
        if self._success_since is None:
            self._success_since = elapsed
        if elapsed - self._success_since >= SETTLE_S:
            self.completed_at = self._success_since
            return True
        return False

    def episode_facts(self) -> dict[str, bool]:
        scene = self.scene
        return {"other_cube_in_box": any(scene.cube_in_box(c) for c in range(len(scene.cubes))
                                         if c != scene.target_cube)}

    def cameras_for(self, spec: policy_io.PolicySpec) -> dict[str, SimCamera]:
        """The cameras a policy asks for (policy_io.PolicySpec), at the sizes it asks for."""
        missing = sorted(set(spec.cameras) - set(self.cameras))
        if missing:
            raise SimError(f"the policy expects camera(s) {missing}; the simulator has {sorted(self.cameras)}")
        return {key: SimCamera(self.scene, key.rsplit(".", 1)[-1], size) for key, size in spec.cameras.items()}

    def frame(self) -> np.ndarray:
        return np.concatenate([self.scene.render(c) for c in CAMERAS], axis=1)

    def units(self, angles: np.ndarray) -> np.ndarray:
        """Joint angles (radians) in the robot's units (degrees, gripper percent), as the driver
        would report them."""
        return so100.ticks_to_units([sim_bus.radians_to_ticks(a) for a in angles], self.bus.calibration)

    def action_limits(self) -> tuple[np.ndarray, np.ndarray]:
        return so100.unit_limits(self.bus.calibration)

    def expert(self, seed: int, fps: float, noise: float = 0.0) -> "SO100Demonstration":
        return SO100Demonstration(self, seed, fps, noise)

    def expert_policy(self, fps: float, chunk_size: int = 30) -> tuple[PolicyFn, policy_io.PolicySpec]:
        """The scripted expert as a policy (observation -> chunk), and its policy_io.PolicySpec: a
        check that evaluation scores a perfect policy as perfect. It plans from the scene (it is an
        oracle) on the first observation of each episode."""
        plan: dict = {}

        def run(observation) -> np.ndarray:
            if observation.timestep == 0 or "expert" not in plan:
                plan["expert"] = ScriptedExpert(self.scene, np.random.default_rng(0))
            expert = plan["expert"]
            return np.stack([self.units(expert.goal((observation.timestep + i) / fps)) for i in range(chunk_size)])

        cameras = {key: self.image_size for key in self.cameras}
        return run, policy_io.PolicySpec(cameras, len(JOINTS), len(JOINTS), chunk_size, chunk_size)

    def close(self) -> None:
        if self.robot is not None and self.robot.is_connected:
            self.robot.disconnect()
        self.bus.stop()
        self.scene.close()

    def __enter__(self) -> "SO100Env":
        return self.start()

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False


def check_instruction(instruction: str, cubes: int) -> None:
    if instruction not in INSTRUCTIONS:
        raise SimError(f"unknown instruction {instruction!r}: {', '.join(INSTRUCTIONS)}")
    if instruction != "named" and cubes < 2:
        raise SimError(f"instruction {instruction!r} needs the two-cube scene (--cubes 2)")


def instruct(scene: Scene, instruction: str) -> str:
    """The instruction an episode gets. "other" re-targets the scene at the cube the scene did not
    name, so success then means that cube moved; "empty" keeps the named cube as the one judged."""
    check_instruction(instruction, len(scene.cubes))
    if instruction == "other":
        scene.target_cube = 1 - scene.target_cube
    return "" if instruction == "empty" else scene.task()


class SO100Demonstration:
    """The scripted expert (sim_so100.ScriptedExpert) driving the arm through the driver, in the
    driver's units. It plans from the scene as reset from `seed`, and plans a new attempt when a
    grasp lifted nothing; the demonstration ends `tail_s` after the plan's end.

    With `noise` (radians), the arm executes the expert's goals plus a slowly wandering offset
    (Ornstein-Uhlenbeck, 0.5 s time constant) while the dataset records the expert's own goals
    (DART, Laskey et al. 2017): the policy then sees states off the expert's path labelled with
    the way back, and the grasps the noise spoils with the expert's second attempt."""

    def __init__(self, env: SO100Env, seed: int, fps: float, noise: float = 0.0, tail_s: float = 1.0):
        self.env, self.noise, self.tail_s = env, noise, tail_s
        self.rng = np.random.default_rng(seed)  # the plan's variations, then the noise, from one stream
        self.plan = ScriptedExpert(env.scene, self.rng)
        self.low, self.high = env.action_limits()
        self.offset, self.dt, self.tau = np.zeros(len(JOINTS)), 1.0 / fps, 0.5

    def act(self, t: float) -> tuple[np.ndarray, np.ndarray] | None:
        if t >= self.plan.duration + self.tail_s:
            return None
        self.plan.replan_if_grasp_missed(self.env.scene, t)
        goal = self.plan.goal(t)
        recorded = np.clip(self.env.units(goal), self.low, self.high).astype(np.float32)
        dt, tau = self.dt, self.tau
        self.offset[:5] += -self.offset[:5] * dt / tau + self.noise * math.sqrt(2 * dt / tau) * self.rng.normal(size=5)
        return recorded, self.env.units(goal + self.offset)

    def succeeded(self) -> bool:
        return self.env.scene.success()


class LiveSO100:
    """The SO-100 environment in real time as an infer_async.SimulatedRig (`python sim.py live`):
    its bus served for the client's own driver, the physics paced to the wall clock, the policy
    running freely beside it."""

    default_task = TASK

    def __init__(self, scene_seed: int):
        self.env, self.scene_seed = SO100Env(realtime=True), scene_seed

    def open_bus(self) -> tuple[str, dict]:
        self.env.scene.reset(self.scene_seed)
        self.env.start(connect=False)
        return self.env.bus.port, self.env.bus.calibration

    def cameras_for(self, spec: policy_io.PolicySpec) -> dict[str, SimCamera]:
        return self.env.cameras_for(spec)

    def now(self) -> float:
        return self.env.clock.now()

    def sleep(self, seconds: float) -> None:
        self.env.clock.sleep(seconds)

    def task_done(self) -> bool:
        return self.env.task_done()

    def outcome(self) -> str:
        done = self.env.completed_at
        return f"simulation: the cube is {'in the box after %.1f s' % done if done is not None else 'not in the box'}"

    def close(self) -> None:
        self.env.close()

# ---------------------------------------------------------------------------------------------
# 4. Recording demonstrations, closed-loop evaluation, video
# ---------------------------------------------------------------------------------------------


def expert_episode(env: Environment, seed: int, fps: float, noise: float = 0.0) -> dict | None:
    """One scripted demonstration from `seed`, recorded as LeRobot records a real arm: each tick the
    observation (state, cameras), then the action. None if the expert failed."""
    task = env.reset(seed)
    expert = env.expert(seed, fps, noise)
    state = policy_io.STATE
    episode: dict = {"task": task, state: [], policy_io.ACTION: []}
    episode.update({key: [] for key in env.cameras})
    dt, k = 1.0 / fps, 0
    while (step := expert.act(k * dt)) is not None:
        recorded, executed = step
        episode[state].append(env.robot.read())
        for key, camera in env.cameras.items():
            episode[key].append(camera.read())
        episode[policy_io.ACTION].append(recorded)
        env.robot.write(executed)
        env.clock.sleep(dt)
        k += 1
    if not expert.succeeded():
        return None
    episode[state] = np.stack(episode[state])
    episode[policy_io.ACTION] = np.stack(episode[policy_io.ACTION])
    return episode


def demonstrations(env: Environment, episodes: int, seed: int = 0, fps: float | None = None, noise: float = 0.0,
                   log: Callable[[str], None] = print, used: list | None = None,
                   failed: list | None = None) -> Iterator[dict]:
    """`episodes` successful demonstrations in `env` at `fps` (default: the world's), from seeds seed,
    seed+1, ...; a seed where the expert fails is skipped. The seeds go into `used` and `failed`.
    A dataset of several worlds (one per task) chains these, one world after another."""
    fps = fps or env.fps
    used = [] if used is None else used
    failed = [] if failed is None else failed
    s, start, done, failed_here = seed, time.monotonic(), 0, []  # failed_here: this world's alone
    while done < episodes:
        episode = expert_episode(env, s, fps, noise)
        if episode is not None:
            used.append(s)
            done += 1
            log(f"episode {done}/{episodes} (seed {s}): {len(episode[policy_io.ACTION])} frames, "
                f"{time.monotonic() - start:.0f} s")
            yield episode
        else:
            failed.append(s)
            failed_here.append(s)
            if len(failed_here) > max(10, episodes):
                where = f" in {env.task}" if getattr(env, "task", None) else ""
                raise SimError(f"the scripted expert failed{where} on {len(failed_here)} seeds ({failed_here[:10]} ...)")
        s += 1


def record(envs: Environment | Iterable[Environment], out: str | Path, episodes: int, seed: int = 0,
           fps: float | None = None, noise: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """A LeRobot v3.0 dataset of `episodes` successful demonstrations in each world at `out` (see
    demonstrations), with the worlds' robot type and feature names. `envs`: one world, or several
    taken one after another (a generator may open each and close it when the next is asked for:
    Meta-World, one world per task). Each episode's task is the instruction its reset gave. Returns
    what was recorded."""
    import data

    worlds = iter([envs]) if hasattr(envs, "reset") else iter(envs)
    first = next(worlds)
    used, failed = [], []

    def every_world() -> Iterator[dict]:
        for env in itertools.chain([first], worlds):
            yield from demonstrations(env, episodes, seed, fps, noise, log, used, failed)

    data.write_dataset(out, every_world(), fps=round(fps or first.fps), robot_type=first.robot_type,
                       state_names=first.state_names, action_names=first.action_names)
    return {"dataset": str(out), "episodes": len(used), "seeds": [min(used), max(used)] if used else [],
            "expert_failures": failed}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (sound at 0 and n successes, unlike p +- 2se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# Student's t at 97.5% for 1..9 degrees of freedom; from 10 on, the Cornish-Fisher expansion below is
# within 0.15% of it.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """95% interval for the mean of `values` (Student's t with n - 1 degrees of freedom, so that a few
    episodes give a wide one); a single value gives (value, value): no spread is known."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return (mean, mean)
    df = n - 1
    t = T_975[df - 1] if df <= len(T_975) else (z + (z ** 3 + z) / (4 * df)
                                                + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2))
    half = t * float(np.std(values, ddof=1)) / math.sqrt(n)
    return (mean - half, mean + half)


def client_mode(client: infer_async.ClientConfig) -> str:
    """The control loop's mode as its metrics name it: rtc, sync or async."""
    return "rtc" if client.rtc else "sync" if client.sync else "async"


@dataclass
class EvalConfig:
    episodes: int = 50
    seed: int = 10_000  # episode i uses seed + i; recording uses small seeds, so these are held out
    time_limit_s: float = 25.0
    # The control loop exactly as on a real arm: fps, threshold g, aggregation, ease-in, observation
    # skipping, sync or rtc. Make it with client_config(env, fps), which applies the world's own defaults.
    client: infer_async.ClientConfig = field(default_factory=infer_async.ClientConfig)
    latency_s: float = 0.0  # added to the measured inference time (a slower model, a remote server)
    measure_latency: bool = True  # False: the policy costs no time (only latency_s), fully repeatable
    video: str | None = None
    video_episodes: int = 4


def client_config(env: Environment, fps: float | None = None, **given) -> infer_async.ClientConfig:
    """The control loop's settings for `env`: ClientConfig's defaults, then the world's own (its fps
    and env.client_defaults), then those given (`fps` and any ClientConfig field; None: not given)."""
    given = {key: value for key, value in {"fps": fps, **given}.items() if value is not None}
    return infer_async.ClientConfig(**{"fps": env.fps, **env.client_defaults, **given})


def evaluate(env: Environment, policy_fn: PolicyFn, spec: policy_io.PolicySpec, config: EvalConfig,
             log: Callable[[str], None] = print) -> dict:
    """Closed-loop success rate of a policy through infer_async.RobotClient (the queue, threshold g
    and aggregation a real arm uses). Success is the world's own signal (SO-100: the cube in the box
    and at rest for SETTLE_S, read from the physics); completion time: simulated seconds from the
    start to that moment. Each episode seeds the policy's flow noise with its scene seed
    (policy_io.seed_flow_noise): settings compared on the same seeds see the same draws."""
    clock = env.clock
    results, frames = [], []
    for i in range(config.episodes):
        seed = config.seed + i
        task = env.reset(seed)
        policy_io.seed_flow_noise(seed)
        client = infer_async.RobotClient(
            env.robot, env.cameras_for(spec), clock.timed(policy_fn, config.latency_s, config.measure_latency),
            spec, task, config.client, clock=clock.now, sleep=clock.sleep)
        clock.attach(client.policy_thread)
        film = config.video is not None and i < config.video_episodes
        episode_frames = []

        def done() -> bool:
            if film:
                episode_frames.append(env.frame())
            return env.task_done()

        metrics = client.run(duration=config.time_limit_s, until=done)
        clock.attach(None)
        completed = env.completed_at
        success = completed is not None
        latencies = [latency for _, latency in metrics.latencies]
        jerks = metrics.seam_jerks()
        results.append({"seed": seed, "success": success, "completion_s": completed,
                        "idle_ticks": metrics.idle_ticks, "ticks": metrics.ticks, "latencies": latencies,
                        "seam_jerk": float(np.mean(jerks)) if jerks else None,
                        "seam_jerk_max": max(jerks) if jerks else None,
                        "task": task, "facts": env.episode_facts()})
        outcome = f"success at {completed:.1f} s" if success else "failure"
        if film:
            frames.extend(annotate(f, f"seed {seed}: {outcome}", success) for f in episode_frames)
        log(f"episode {i + 1}/{config.episodes} (seed {seed}): {outcome}, idle ticks {metrics.idle_ticks}")
    if config.video is not None:
        write_video(config.video, frames, config.client.fps)
    return summarise(results, config, env.settings)


def summarise(results: list[dict], config: EvalConfig, settings: dict) -> dict:
    """The evaluation's JSON summary: the outcome, then every setting that was run."""
    successes = sum(r["success"] for r in results)
    times = [r["completion_s"] for r in results if r["success"]]
    latencies = np.array([x for r in results for x in r["latencies"]] or [np.nan])
    jerks = [r["seam_jerk"] for r in results if r.get("seam_jerk") is not None]
    jerk_max = [r["seam_jerk_max"] for r in results if r.get("seam_jerk_max") is not None]
    client = config.client
    return {
        "success_rate": successes / len(results), "episodes": len(results), "successes": successes,
        "ci95": [round(x, 4) for x in wilson_interval(successes, len(results))],
        "mean_completion_s": round(float(np.mean(times)), 3) if times else None,
        "idle_ticks": int(sum(r["idle_ticks"] for r in results)),
        "ticks": int(sum(r["ticks"] for r in results)),
        "latency_ms_mean": round(float(np.nanmean(latencies)) * 1000, 1),
        "latency_ms_p95": round(float(np.nanpercentile(latencies, 95)) * 1000, 1),
        "control_period_ms": round(1000 / client.fps, 1),
        # degrees/s^2 on the SO-100: each episode's mean over its seams, then over the episodes
        "seam_jerk_mean": round(float(np.mean(jerks)), 1) if jerks else None,
        "seam_jerk_ci95": [round(x, 1) for x in mean_interval(jerks)] if jerks else None,
        "seam_jerk_max": round(max(jerk_max), 1) if jerk_max else None,
        "mode": client_mode(client), "threshold": 0.0 if client.sync else client.threshold,
        "aggregate": client.aggregate, "ease_in": client.ease_in, "similarity": client.similarity,
        "added_latency_s": config.latency_s, "seeds": [config.seed, config.seed + len(results) - 1],
        **settings, **{key: int(sum(r["facts"][key] for r in results)) for key in results[0]["facts"]},
    }


def benchmark_summary(per_task: dict[str, dict], group_of: dict[str, str]) -> dict:
    """Several worlds' evaluations as one: successes over all episodes, per group and per task, each
    with its 95% Wilson interval. `group_average` is the mean of the groups' success rates, the
    average the SmolVLA paper reports for Meta-World (its 57.3% = the mean of 82.5, 41.8, 45.0, 60.0)."""
    def rate(successes: int, episodes: int) -> dict:
        return {"success_rate": round(successes / episodes, 4), "successes": successes, "episodes": episodes,
                "ci95": [round(x, 4) for x in wilson_interval(successes, episodes)]}

    groups: dict[str, list[str]] = {}
    for task in per_task:
        groups.setdefault(group_of[task], []).append(task)
    per_group = {group: {**rate(sum(per_task[t]["successes"] for t in tasks), sum(per_task[t]["episodes"] for t in tasks)),
                         "tasks": len(tasks)} for group, tasks in groups.items()}
    total = rate(sum(s["successes"] for s in per_task.values()), sum(s["episodes"] for s in per_task.values()))
    completed = [(s["mean_completion_s"], s["successes"]) for s in per_task.values() if s["successes"]]
    mean_completion = sum(t * n for t, n in completed) / sum(n for _, n in completed) if completed else None
    return {**total, "group_average": round(float(np.mean([g["success_rate"] for g in per_group.values()])), 4),
            "mean_completion_s": round(mean_completion, 3) if completed else None,
            "per_group": per_group,
            "per_task": {task: {**rate(s["successes"], s["episodes"]), "group": group_of[task],
                                "mean_completion_s": s["mean_completion_s"], "idle_ticks": s["idle_ticks"]}
                         for task, s in per_task.items()},
            "seeds": next(iter(per_task.values()))["seeds"], "mode": next(iter(per_task.values()))["mode"]}


def benchmark_table(summary: dict) -> str:
    """The per-task, per-group and overall rows of benchmark_summary, as a plain-text table."""
    def row(name: str, r: dict) -> str:
        low, high = r["ci95"]
        return f"{name:28s} {r['successes']:4d}/{r['episodes']:<4d} {100 * r['success_rate']:5.1f}%  ({100 * low:.0f}-{100 * high:.0f}%)"

    lines = [f"{'task':28s} {'success':>9s} {'rate':>6s}  95% interval"]
    for group, g in summary["per_group"].items():
        lines += [row(task, r) for task, r in summary["per_task"].items() if r["group"] == group]
        lines += [row(f"[{group}: {g['tasks']} tasks]", g), ""]
    lines.append(row("all", summary))
    lines.append(f"{'average of the groups':28s} {100 * summary['group_average']:16.1f}%")
    return "\n".join(lines)


def random_policy(env: Environment, chunk_size: int = 30, seed: int = 0) -> tuple[PolicyFn, policy_io.PolicySpec]:
    """Uniformly random actions within the robot's limits: what a policy that learnt nothing scores."""
    rng = np.random.default_rng(seed)
    low, high = env.action_limits()

    def run(observation) -> np.ndarray:
        return rng.uniform(low, high, size=(chunk_size, len(low)))

    cameras = {key: env.image_size for key in env.cameras}
    return run, policy_io.PolicySpec(cameras, len(env.state_names), len(low), chunk_size, chunk_size)


def annotate(frame: np.ndarray, label: str, success: bool, scale: int = 2) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, image.width, 14], fill=(0, 0, 0))
    draw.text((4, 2), label, fill=(80, 230, 80) if success else (240, 80, 80))
    return np.asarray(image)


def write_video(path: str | Path, frames: list[np.ndarray], fps: float) -> None:
    """H.264 mp4 of the frames (PyAV)."""
    import av

    if not frames:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:stream.height, :stream.width]),
                                                 format="rgb24")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

# ---------------------------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------------------------


positive_int, non_negative_int = cli.integer(1), cli.integer(0)
positive_float, non_negative_float = cli.number(above=0), cli.number(0)
unit_interval = cli.number(0, 1)
ENVIRONMENTS = ("so100", "metaworld")  # --env: the worlds record and eval can run


def image_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    try:
        size = (int(height), int(width))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 16 or max(size) > 1080:
        raise argparse.ArgumentTypeError(f"expects HEIGHTxWIDTH between 16 and 1080, e.g. 96x128; got {text!r}")
    return size


def open_environment(name: str, image_size: tuple[int, int] | None = None, cubes: int = 1,
                     instruction: str = "named", task: str | None = None) -> Environment:
    """The world --env names, set up as the command's flags say (started by `with`). Meta-World is one
    world per task; its file does not import this one, so its clock is given here."""
    if name == "so100":
        if task is not None:
            raise SimError("--task names a Meta-World task or group (--env metaworld); the SO-100 scene has one "
                           "task (two cubes: --cubes 2)")
        return SO100Env(image_size or IMAGE_SIZE, cubes=cubes, instruction=instruction)
    if name != "metaworld":
        raise SimError(f"unknown --env {name!r}: {', '.join(ENVIRONMENTS)}")
    import sim_metaworld

    env = sim_metaworld.MetaWorldEnv(task, image_size or sim_metaworld.IMAGE_SIZE)
    env.clock = SimClock(env)
    return env


def benchmark_tasks(name: str, task: str | None) -> list[str | None]:
    """The worlds a command runs one after another: the SO-100 scene once ([None]); Meta-World's task,
    group (easy, medium, hard, very_hard) or all 50 (mt50)."""
    if name != "metaworld":
        return [task]
    if task is None:
        raise SimError("--env metaworld needs --task: a task such as pick-place-v3, a group (easy, medium, "
                       "hard, very_hard) or mt50")
    import sim_metaworld

    return sim_metaworld.tasks_for(task)


def open_worlds(name: str, tasks: list[str | None], image_size: tuple[int, int] | None = None, cubes: int = 1,
                instruction: str = "named") -> Iterator[Environment]:
    """Each task's world in turn, opened when asked for and closed when the next is."""
    for task in tasks:
        with open_environment(name, image_size, cubes, instruction, task) as env:
            yield env


def build_parser() -> argparse.ArgumentParser:
    client = infer_async.ClientConfig()
    p = cli.Parser(description="Simulated worlds (default: an SO-100 in MuJoCo): scripted demonstrations and "
                               "closed-loop evaluation of a policy.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record scripted demonstrations as a LeRobot v3.0 dataset")
    r.add_argument("--env", choices=ENVIRONMENTS, default="so100", help="the world (default so100)")
    r.add_argument("--task", default=None, help="--env metaworld: a task (pick-place-v3), a group (easy, medium, "
                                                "hard, very_hard) or mt50")
    r.add_argument("--episodes", type=positive_int, default=50,
                   help="successful episodes to record, per task (default 50)")
    r.add_argument("--out", required=True, help="dataset directory (must not exist)")
    r.add_argument("--seed", type=non_negative_int, default=0, help="first scene seed; episode i uses seed + i")
    r.add_argument("--fps", type=positive_int, default=None,
                   help=f"frames per second (default: the world's: so100 {FPS}, metaworld 80)")
    r.add_argument("--size", type=image_size, default=None,
                   help="camera HEIGHTxWIDTH (default: the world's: so100 96x96, metaworld 128x128)")
    r.add_argument("--noise", type=non_negative_float, default=0.0,
                   help="DART: noise in what is executed, not in what is recorded (so100: radians of wandering offset "
                        "of the goals; metaworld: the std of Gaussian noise on the hand's xyz action, 1 = 1 cm a step)")
    r.add_argument("--cubes", type=int, choices=(1, 2), default=1,
                   help="2: a red and a green cube, each episode's task names the one to move")
    e = sub.add_parser("eval", help="closed-loop success rate of a policy (JSON summary on the last line)")
    e.add_argument("--env", choices=ENVIRONMENTS, default="so100", help="the world (default so100)")
    e.add_argument("--task", default=None, help="--env metaworld: a task (pick-place-v3), a group (easy, medium, "
                                                "hard, very_hard) or mt50; a table per task and group")
    e.add_argument("--size", type=image_size, default=None,
                   help="--env metaworld: the camera's HEIGHTxWIDTH for videos (default 128x128; a policy's "
                        "cameras render at the size it was trained on)")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--policy", help="policy directory or Hub id (a checkpoint's pretrained_model)")
    who.add_argument("--expert", action="store_true", help="the scripted expert as the policy (should score 1.0)")
    who.add_argument("--random", action="store_true", help="random goals (should score about 0)")
    e.add_argument("--vlm", default=None, help="where the policy's VLM config/tokenizer are (default: its config)")
    e.add_argument("--episodes", type=positive_int, default=50, help="episodes per task (default 50)")
    e.add_argument("--seed", type=non_negative_int, default=10_000,
                   help="first scene seed (default 10000: never used for recording by the demo)")
    e.add_argument("--fps", type=positive_float, default=None,
                   help=f"control rate; default: the policy's training dataset's, else {FPS}")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--sync", action="store_true", help="synchronous: infer, execute the chunk, repeat")
    how.add_argument("--rtc", action="store_true",
                     help="latency-tolerant: each chunk continues the queued plan and replaces it after the "
                          "inference delay (infer_async.RobotClient)")
    e.add_argument("--threshold", type=unit_interval, default=None,
                   help=f"g of asynchronous inference (default {client.threshold:g})")
    e.add_argument("--n-action-steps", type=positive_int, default=None, help="--sync: actions per chunk")
    e.add_argument("--aggregate", choices=sorted(infer_async.AGGREGATES), default=None,
                   help=f"overlapping actions of two chunks (default {client.aggregate})")
    e.add_argument("--ease-in", type=non_negative_int, default=None,
                   help=f"ticks of crossfade into each new chunk, 0: off (default {client.ease_in})")
    e.add_argument("--similarity", type=non_negative_float, default=None,
                   help=f"skip an observation within this many degrees of the last one, 0: never "
                        f"(default {client.similarity:g})")
    e.add_argument("--latency", type=non_negative_float, default=0.0,
                   help="seconds added to each measured inference (a slower model or a remote server)")
    e.add_argument("--time-limit", type=positive_float, default=None,
                   help="seconds per episode (default: the world's: so100 25, metaworld 6.25 = 500 steps)")
    e.add_argument("--video", default=None, help="mp4 of the first episodes, both cameras, success written on them")
    e.add_argument("--video-episodes", type=positive_int, default=4, help="episodes in the video (default 4)")
    e.add_argument("--json", default=None, help="also write the summary to this file")
    e.add_argument("--jobs", type=positive_int, default=1,
                   help="--task with several tasks: evaluate them in this many processes (2 halves an MT50 "
                        "evaluation on 2 cores; default 1)")
    e.add_argument("--cubes", type=int, choices=(1, 2), default=1, help="2: the red/green scene (language)")
    e.add_argument("--instruction", choices=INSTRUCTIONS, default="named",
                   help="--cubes 2: name the scene's cube, the other cube (judged on that one) or say nothing")
    e.add_argument("--device", default=None, help="torch device for the policy (default: cuda if available)")
    sub.add_parser("live", add_help=False,
                   help="infer_async's robot client on the SO-100 in real time (its flags: sim.py live --help)")
    b = sub.add_parser("bus", help="serve a simulated servo bus on a pseudo-terminal (no physics); prints its "
                                   "path, for trying `so100.py read/calibrate` without an arm")
    b.add_argument("--uncalibrated", action="store_true", help="factory registers (to try `calibrate`)")
    b.add_argument("--speed", type=positive_float, default=3000.0, help="servo speed in steps/s (default 3000)")
    b.add_argument("--calibration-out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "so100_sim_calibration.json"),
                   help="where to write the matching calibration JSON")
    v = sub.add_parser("view", help="render both cameras of one scene to a PNG")
    v.add_argument("--seed", type=non_negative_int, default=0)
    v.add_argument("--out", default="sim_view.png")
    v.add_argument("--size", type=image_size, default=(240, 320), help="camera HEIGHTxWIDTH (default 240x320)")
    v.add_argument("--cubes", type=int, choices=(1, 2), default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["live"]:  # infer_async's own flags, errors, Ctrl-C and SIGTERM handling
        return live_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "record":
            if Path(args.out).exists():  # before the scene is built and the expert runs
                raise SimError(f"{args.out} already exists: a recording never overwrites a dataset")
            worlds = open_worlds(args.env, benchmark_tasks(args.env, args.task), args.size, args.cubes)
            try:
                summary = record(worlds, args.out, args.episodes, args.seed, args.fps, args.noise)
            finally:
                worlds.close()  # the world being recorded, if an error stopped it
            print(json.dumps(summary))
            return 0
        if args.command == "bus":
            return serve_bus(args)
        if args.command == "view":
            scene = Scene(args.size, args.cubes)
            scene.reset(args.seed)
            from PIL import Image

            Image.fromarray(np.concatenate([scene.render(c) for c in CAMERAS], axis=1)).save(args.out)
            print(f"wrote {args.out}")
            return 0
        return eval_main(args)
    except cli.UserError as err:  # so100.FeetechError too
        print(f"error: {err}", file=sys.stderr)
        return cli.USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def live_main(argv: list[str]) -> int:
    parser = infer_async.build_parser(prog="sim.py live")
    parser.description = ("Run a policy on the simulated SO-100 in real time, through the robot client a\n"
                          "real arm uses (infer_async.py): its driver talks to the scene's servo bus on a\n"
                          "pseudo-terminal. Without --policy or --server: the demo's policy and task.")
    parser.add_argument("--scene-seed", type=non_negative_int, default=10_000,
                        help="the scene (cube place and yaw); the demo records from seed 0 up, so the default "
                             "is one it never saw")
    args = parser.parse_args(argv)
    try:
        rig = LiveSO100(args.scene_seed)
    except cli.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.USER_ERROR
    return infer_async.run_client(args, rig=rig)


def serve_bus(args: argparse.Namespace) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it as cleanly as Ctrl-C
    with sim_bus.SimulatedBus(calibrated=not args.uncalibrated, speed=args.speed) as bus:
        path = Path(args.calibration_out)
        path.write_text(json.dumps(bus.calibration, indent=4) + "\n")
        print(bus.port, flush=True)
        print(f"Simulated SO-100 bus on {bus.port} (calibration: {path}). Ctrl-C to stop.", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    return 0


def eval_main(args: argparse.Namespace) -> int:
    tasks = benchmark_tasks(args.env, args.task)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.jobs > 1 and len(tasks) > 1 and args.video:
        raise SimError("--video with --jobs: the videos are written by one process; drop one of them")
    summaries = map_tasks(functools.partial(eval_tasks, args), tasks, args.jobs)
    if args.video:
        say(f"video: {args.video}" if len(tasks) == 1 else f"videos: {video_path(args.video, '<task>')}")
    if args.env == "metaworld":
        import sim_metaworld

        summary = benchmark_summary(summaries, sim_metaworld.GROUP_OF)
        say(benchmark_table(summary))
    else:
        summary = summaries[None]
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


def eval_tasks(args: argparse.Namespace, tasks: list[str | None]) -> dict:
    """The eval command's evaluations of `tasks` in this process, {task: evaluate() summary}; the
    policy is loaded once, whatever the number of worlds."""
    if args.policy:
        _, policy_fn, spec = policy_io.prepare_policy(args.policy, args.vlm, args.device)
    summaries = {}
    worlds = open_worlds(args.env, tasks, args.size, args.cubes, args.instruction)
    try:
        for task, env in zip(tasks, worlds):
            say = lambda message: print(f"{task + ': ' if task else ''}{message}", file=sys.stderr)  # noqa: E731
            fps = policy_io.control_rate(args.policy, args.fps, env.fps)
            client = client_config(env, fps, sync=args.sync, rtc=args.rtc, threshold=args.threshold,
                                   n_action_steps=args.n_action_steps, aggregate=args.aggregate,
                                   ease_in=args.ease_in, similarity=args.similarity)
            video = args.video if args.video is None or len(tasks) == 1 else video_path(args.video, task)
            config = EvalConfig(episodes=args.episodes, seed=args.seed, time_limit_s=args.time_limit or env.time_limit_s,
                                client=client, latency_s=args.latency, video=video, video_episodes=args.video_episodes)
            if args.expert:
                policy_fn, spec = env.expert_policy(fps)
            elif args.random:
                policy_fn, spec = random_policy(env)
            else:
                env.cameras_for(spec)  # the policy's cameras exist here, before anything runs
            say(f"evaluating on seeds {config.seed}..{config.seed + config.episodes - 1} "
                f"at {fps:g} fps, {client_mode(client)}{'' if client.sync else f' (g={client.threshold:g})'}")
            summaries[task] = evaluate(env, policy_fn, spec, config, log=say)
    finally:
        worlds.close()
    return summaries


def map_tasks(evaluate_share: Callable[[list], dict], tasks: list, jobs: int = 1) -> dict:
    """evaluate_share(tasks) -> {task: summary} over `tasks`, in `jobs` processes: the tasks dealt round
    robin (neighbours in a group are alike in length), each process with its own policy, GL context and
    cores / jobs torch threads. An evaluation runs the policy and the renderer one after the other on
    one core, so on a 2-core machine two processes take half the time. Summaries in the tasks' order.
    `evaluate_share` must pickle (a module-level function, or a functools.partial of one)."""
    if jobs <= 1 or len(tasks) <= 1:
        return evaluate_share(list(tasks))
    import concurrent.futures
    import multiprocessing

    jobs = min(jobs, len(tasks))
    shares = [list(tasks[i::jobs]) for i in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawned, not forked: a forked child would inherit this process's GL and torch thread state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_worker, initargs=(threads,)) as pool:
        done: dict = {}
        for result in pool.map(evaluate_share, shares):
            done.update(result)
    return {task: done[task] for task in tasks}


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def video_path(path: str, task: str) -> str:
    """One video per task: eval.mp4 -> eval-pick-place-v3.mp4."""
    base = Path(path)
    return str(base.with_name(f"{base.stem}-{task}{base.suffix or '.mp4'}"))


if __name__ == "__main__":
    sys.exit(main())
