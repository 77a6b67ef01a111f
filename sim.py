"""An SO-100 arm in MuJoCo: pick up a cube and place it in a box, closed loop, on a laptop CPU.

The arm is built from the SO-100's kinematics (link offsets and joint axes of the real arm), with
position servos that have the STS3215's torque and speed limits, a 3 cm cube at a random place and
yaw, and a shallow box to put it in. A fixed overview camera and a wrist camera render headless.

The simulated arm is reached the way the real one is: `so100.SO100` talks Feetech packets over a
pseudo-terminal to a simulated servo bus whose encoders read the physics (`sim_bus.SimulatedBus`), so a
policy driven through `infer_async.RobotClient` runs the exact code path of a real arm.

    python sim.py record --episodes 50 --out outputs/sim_dataset --seed 0   # scripted demonstrations
    python sim.py eval --policy outputs/demo/checkpoints/last/pretrained_model --episodes 50 --seed 10000
    python sim.py eval --expert --episodes 5 --video expert.mp4             # the scripted expert

Read top to bottom:
  1. the scene (MJCF) and its physics: servos, success judged from the physics state alone
  2. simulated time: physics advances in sleep(); a policy's latency passes in simulated time
  3. cameras, and the arm + cameras as infer_async uses them
  4. the scripted expert (inverse kinematics through waypoints)
  5. recording a LeRobot dataset, closed-loop evaluation, video
  6. the command line (the servo bus on a pseudo-terminal is sim_bus.py)

Units are the real arm's: joints in degrees (LeRobot's convention: 0 at the middle of the
calibrated range), the gripper in percent of its range, so a recorded dataset looks like a real
SO-100 dataset to data.py and train.py.
"""

from __future__ import annotations

import os

# Headless rendering: Mesa's software EGL needs no display. Set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import argparse
import copy
import json
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np



def gl_problem(err: BaseException) -> str:
    """One line saying what to install when MuJoCo cannot render headless."""
    backend = os.environ.get("MUJOCO_GL", "")
    hint = {"egl": "libEGL (Debian/Ubuntu: apt install libegl1 libgl1-mesa-dri)",
            "osmesa": "OSMesa (Debian/Ubuntu: apt install libosmesa6)"}.get(
        backend, "libEGL and set MUJOCO_GL=egl (or OSMesa and MUJOCO_GL=osmesa)")
    return (f"MuJoCo cannot render with MUJOCO_GL={backend or '(unset)'} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}); install {hint}")


try:
    import mujoco
except ImportError as err:
    if "mujoco" in str(err):
        raise SystemExit(f"sim.py needs MuJoCo: pip install mujoco ({err})") from err
    raise SystemExit(f"sim.py: {gl_problem(err)}") from err
except Exception as err:  # MuJoCo loads its GL back end on import: a missing or wrong one fails here
    raise SystemExit(f"sim.py: {gl_problem(err)}") from err

import cli
import infer_async
import policy_io
import sim_bus
import so100

TASK = "Pick up the cube and place it in the box."
CUBE_COLOURS = {"red": "0.85 0.1 0.1 1", "green": "0.1 0.65 0.15 1"}  # the language scene's two cubes


def task_for(colour: str) -> str:
    """The instruction of a two-cube scene: which cube to move is said only in words."""
    return f"Pick up the {colour} cube and place it in the box."
FPS = 30  # the control rate of real SO-100 datasets
CAMERAS = ("top", "wrist")
IMAGE_SIZE = (96, 96)  # (height, width) of each camera: small, so rendering costs ~10 ms a frame
JOINTS = so100.JOINT_NAMES  # shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper
FEATURE_NAMES = [f"{name}.pos" for name in JOINTS]  # as current LeRobot SO-100 datasets name them
ROBOT_TYPE = "so100_follower"

# ---------------------------------------------------------------------------------------------
# 1. The scene
# ---------------------------------------------------------------------------------------------
# The kinematic chain is the SO-100's (MuJoCo Menagerie's trs_so_arm100 model, measured from the
# real arm): each body's offset from its parent in metres, its orientation, and the joint axis in
# its own frame. Links are capsules and boxes; only the jaw pads, the cube, the box and the table
# collide (the links pass through each other, which real calibration ranges prevent).

JOINT_RANGES = {  # radians; wrist_roll stops short of +-pi so its encoder never wraps
    "shoulder_pan": (-2.2, 2.2), "shoulder_lift": (-3.14158, 0.2), "elbow_flex": (0.0, 3.14158),
    "wrist_flex": (-2.0, 1.8), "wrist_roll": (-2.9, 2.9), "gripper": (-0.2, 2.0)}
HOME = np.array([0.0, -2.8, 1.9, 1.7, 0.0, 0.35])  # radians: tucked up by the base, out of the top view

# STS3215 at 7.4 V: stall torque 19.5 kg.cm (1.9 N.m), no-load speed 0.22 s per 60 degrees.
SERVO_TORQUE = 1.9  # N.m
SERVO_SPEED = math.radians(60) / 0.22  # rad/s
GRIPPER_TORQUE = 0.6  # N.m: the driver caps the gripper's torque on connect, so it squeezes, not crushes
SERVO_KP = 40.0  # N.m/rad: gravity sags the arm by ~0.3 degrees at the shoulder (arm held out)

CUBE_HALF = 0.015  # a 3 cm cube
CUBE_AREA = ((-0.11, 0.05), (-0.27, -0.17))  # x, y ranges of the cube's centre (m); forward is -y
CUBE_YAW = (-math.pi / 4, math.pi / 4)  # a cube looks the same every quarter turn
CUBE_GAP = 0.075  # m between two cubes' centres: the open jaws (7.5 cm) fit around one without the other
BOX_CENTRE = (0.14, -0.21)
BOX_INNER_HALF = 0.045  # inner half-width of the box (m)
BOX_WALL = (0.004, 0.012)  # wall half-thickness and half-height

TOP_CAMERA, TOP_CAMERA_TARGET = (0.03, -0.46, 0.42), (0.03, -0.21, 0.0)

PHYSICS_DT = 0.002
REST_SPEED = 0.02  # m/s: the cube counts as at rest below this
SETTLE_S = 0.3  # the success condition must hold this long


def look_at(position: Sequence[float], target: Sequence[float]) -> str:
    """MJCF xyaxes of a camera at `position` looking at `target` with the image's up toward +z."""
    forward = np.asarray(target, float) - np.asarray(position, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return " ".join(f"{v:.4f}" for v in (*right, *up))


def box_walls_xml() -> str:
    h, (t, z) = BOX_INNER_HALF, BOX_WALL
    walls = [(h + t, 0, t, h + 2 * t), (-h - t, 0, t, h + 2 * t), (0, h + t, h, t), (0, -h - t, h, t)]
    return "\n".join(f'<geom class="box" pos="{x} {y} {z + 0.002}" size="{sx} {sy} {z}"/>'
                     for x, y, sx, sy in walls)


def cube_xml(name: str, colour: str, x: float) -> str:
    return f"""
    <body name="{name}" pos="{x} -0.22 {CUBE_HALF}">
      <freejoint name="{name}"/>
      <geom name="{name}" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.03" rgba="{colour}"
            friction="1 0.005 0.0001" condim="4" contype="1" conaffinity="1"/>
    </body>"""


def cube_names(cubes: int) -> list[str]:
    """Body names: `cube` (red) alone; with two, `cube` (red) and `cube_green`."""
    return ["cube"] + [f"cube_{colour}" for colour in list(CUBE_COLOURS)[1:cubes]]


def scene_xml(image_size: tuple[int, int] = IMAGE_SIZE, cubes: int = 1) -> str:
    r = JOINT_RANGES
    height, width = image_size
    top_camera = look_at(TOP_CAMERA, TOP_CAMERA_TARGET)
    return f"""
<mujoco model="so100_pick_place">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{PHYSICS_DT}" cone="elliptic" impratio="10" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <global offwidth="{max(width, 640)}" offheight="{max(height, 480)}"/>
  </visual>
  <default>
    <default class="link">
      <joint armature="0.02" damping="0.1" frictionloss="0.01"/>
      <geom type="capsule" size="0.018" contype="0" conaffinity="0" rgba="0.95 0.95 0.9 1" density="300"/>
      <position kp="{SERVO_KP}" dampratio="1" forcerange="-{SERVO_TORQUE} {SERVO_TORQUE}"/>
    </default>
    <default class="pad">
      <geom type="box" contype="1" conaffinity="1" friction="1 0.005 0.0001" solimp="0.95 0.99 0.001"
            solref="0.004 1" condim="4" rgba="0.2 0.2 0.2 1" mass="0.005"/>
    </default>
    <default class="box">
      <geom type="box" rgba="0.25 0.45 0.85 1" contype="1" conaffinity="1"/>
    </default>
  </default>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.55 0.45 0.35" rgb2="0.5 0.4 0.3" width="64" height="64"/>
    <material name="table" texture="grid" texrepeat="8 8"/>
  </asset>
  <worldbody>
    <light pos="0.2 -0.4 1.0" dir="-0.2 0.3 -1" diffuse="0.8 0.8 0.8"/>
    <light pos="-0.4 0.2 1.2" dir="0.3 -0.1 -1" diffuse="0.4 0.4 0.4"/>
    <geom name="table" type="plane" size="0.6 0.6 0.01" material="table" contype="1" conaffinity="1"/>
    <camera name="top" pos="{TOP_CAMERA[0]} {TOP_CAMERA[1]} {TOP_CAMERA[2]}" xyaxes="{top_camera}" fovy="45"/>
    <body name="base" childclass="link">
      <geom type="box" size="0.045 0.05 0.0165" pos="0 -0.03 0.0165" rgba="0.2 0.2 0.2 1"/>
      <body name="shoulder" pos="0 -0.0452 0.0165" quat="0.707105 0.707108 0 0">
        <joint name="shoulder_pan" axis="0 1 0" range="{r['shoulder_pan'][0]} {r['shoulder_pan'][1]}"/>
        <geom fromto="0 0 0 0 0.1025 0.0306"/>
        <body name="upper_arm" pos="0 0.1025 0.0306" euler="1.57079 0 0">
          <joint name="shoulder_lift" axis="1 0 0" range="{r['shoulder_lift'][0]} {r['shoulder_lift'][1]}"/>
          <geom fromto="0 0 0 0 0.11257 0.028" size="0.016"/>
          <body name="lower_arm" pos="0 0.11257 0.028" euler="-1.57079 0 0">
            <joint name="elbow_flex" axis="1 0 0" range="{r['elbow_flex'][0]} {r['elbow_flex'][1]}"/>
            <geom fromto="0 0 0 0 0.0052 0.1349" size="0.014"/>
            <body name="wrist" pos="0 0.0052 0.1349" euler="-1.57079 0 0">
              <joint name="wrist_flex" axis="1 0 0" range="{r['wrist_flex'][0]} {r['wrist_flex'][1]}"/>
              <geom fromto="0 0 0 0 -0.045 0" size="0.014"/>
              <body name="gripper" pos="0 -0.0601 0">
                <joint name="wrist_roll" axis="0 1 0" range="{r['wrist_roll'][0]} {r['wrist_roll'][1]}"/>
                <geom type="box" size="0.022 0.022 0.016" pos="-0.004 -0.012 0" rgba="0.95 0.6 0.1 1"/>
                <geom type="box" size="0.004 0.03 0.015" pos="0.012 -0.058 0" rgba="0.95 0.6 0.1 1"/>
                <geom name="fixed_pad" class="pad" size="0.002 0.018 0.015" pos="0.007 -0.082 0"/>
                <site name="grasp" pos="-0.024 -0.082 0" size="0.003" rgba="0 1 0 0"/>
                <camera name="wrist" pos="-0.009 -0.04 0.032" xyaxes="-1 0 0 0 -0.58 0.81" fovy="80"/>
                <body name="moving_jaw" pos="-0.0202 -0.0244 0" quat="0 0 1 0">
                  <joint name="gripper" axis="0 0 1" range="{r['gripper'][0]} {r['gripper'][1]}"/>
                  <geom type="box" size="0.004 0.04 0.014" pos="0.004 -0.038 0" rgba="0.95 0.6 0.1 1"/>
                  <geom name="moving_pad" class="pad" size="0.002 0.018 0.015" pos="-0.002 -0.058 0"/>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>
    {"".join(cube_xml(name, colour, 0.1 * i) for i, (name, colour) in enumerate(zip(cube_names(cubes), CUBE_COLOURS.values())))}
    <body name="target" pos="{BOX_CENTRE[0]} {BOX_CENTRE[1]} 0">
      <geom class="box" pos="0 0 0.001" size="{BOX_INNER_HALF + 2 * BOX_WALL[0]} {BOX_INNER_HALF + 2 * BOX_WALL[0]} 0.001"/>
      {box_walls_xml()}
    </body>
  </worldbody>
  <actuator>
    {"".join(f'<position class="link" name="{j}" joint="{j}" ctrlrange="{r[j][0]} {r[j][1]}"/>' for j in JOINTS[:-1])}
    <position class="link" name="gripper" joint="gripper" ctrlrange="{r['gripper'][0]} {r['gripper'][1]}"
              kp="{SERVO_KP / 4}" forcerange="-{GRIPPER_TORQUE} {GRIPPER_TORQUE}"/>
  </actuator>
</mujoco>"""


class Scene:
    """The physics: MuJoCo's `model` and `data`, servos that move toward their goals no faster than
    the STS3215 turns, and the success condition read from the physics state alone."""

    def __init__(self, image_size: tuple[int, int] = IMAGE_SIZE, cubes: int = 1):
        if cubes not in (1, 2):
            raise SimError(f"the scene has 1 or 2 cubes, not {cubes}")
        self.model = mujoco.MjModel.from_xml_string(scene_xml(image_size, cubes))
        self.data = mujoco.MjData(self.model)
        self.image_size = image_size
        self.joint_ranges = JOINT_RANGES  # the servo bus calibrates its encoders from these
        self.joint_qpos = np.array([self.model.joint(j).qposadr[0] for j in JOINTS])
        self.cubes = cube_names(cubes)
        self.colours = list(CUBE_COLOURS)[:cubes]
        self.target = 0  # the cube the task names; the expert, success and the conveyor act on it
        # Each cube's addresses in qpos/qvel and its geom id, looked up once (the conveyor reads them
        # every physics step).
        self._qpos_of = [int(self.model.joint(name).qposadr[0]) for name in self.cubes]
        self._dof_of = [int(self.model.joint(name).dofadr[0]) for name in self.cubes]
        self._geom_of = [int(self.model.geom(name).id) for name in self.cubes]
        self.goal = HOME.copy()  # where each servo is told to go (radians)
        self.cube_velocity = np.zeros(2)  # m/s: a cube that slides (a conveyor) until the jaws touch it
        self._pads = {self.model.geom("fixed_pad").id, self.model.geom("moving_pad").id}
        self.torque = np.zeros(len(JOINTS), bool)
        self.lock = threading.RLock()  # the servo bus thread and the control loop share the physics
        self._kp = self.model.actuator_gainprm[:, 0].copy()
        self._bias = self.model.actuator_biasprm[:, 1:3].copy()
        self._renderer: mujoco.Renderer | None = None
        self.reset(0)

    # -- the named cube -----------------------------------------------------------------------------

    @property
    def cube_qpos(self) -> int:
        return self._qpos_of[self.target]

    @property
    def cube_dof(self) -> int:
        return self._dof_of[self.target]

    @property
    def _cube_geom(self) -> int:
        return self._geom_of[self.target]

    def task(self) -> str:
        """The instruction for this scene: with two cubes it names the target's colour."""
        return TASK if len(self.cubes) == 1 else task_for(self.colours[self.target])

    # -- state ------------------------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        """The arm at rest near HOME, the cube at a random place and yaw (from `seed`)."""
        rng = np.random.default_rng(seed)
        with self.lock:
            mujoco.mj_resetData(self.model, self.data)
            q = HOME + rng.normal(0.0, 0.02, len(JOINTS))
            self.data.qpos[self.joint_qpos] = q
            self.data.ctrl[:] = q
            self.goal = q.copy()
            for servo in range(len(JOINTS)):
                self.set_torque(servo, True)
            self.target = 0
            x, y = (rng.uniform(*r) for r in CUBE_AREA)
            yaw = rng.uniform(*CUBE_YAW)
            self._place(0, x, y, yaw)
            if len(self.cubes) == 2:  # drawn after the first cube, so one-cube scenes keep their seeds
                while True:
                    x2, y2 = (rng.uniform(*r) for r in CUBE_AREA)
                    if math.hypot(x2 - x, y2 - y) >= CUBE_GAP:
                        break
                self._place(1, x2, y2, rng.uniform(*CUBE_YAW))
                self.target = int(rng.integers(2))
            self.cube_velocity = np.zeros(2)
            mujoco.mj_forward(self.model, self.data)
            self.step(0.2)  # let the cube settle on the table and the servos take hold

    def _place(self, cube: int, x: float, y: float, yaw: float) -> None:
        adr = self._qpos_of[cube]
        self.data.qpos[adr:adr + 7] = [x, y, CUBE_HALF, math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]

    @property
    def time(self) -> float:
        return float(self.data.time)

    def joint_angles(self) -> np.ndarray:
        return self.data.qpos[self.joint_qpos].copy()

    def cube_position(self) -> np.ndarray:
        return self.data.qpos[self.cube_qpos:self.cube_qpos + 3].copy()

    def cube_yaw(self) -> float:
        w, x, y, z = self.data.qpos[self.cube_qpos + 3:self.cube_qpos + 7]
        return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))

    def cube_speed(self) -> float:
        return float(np.linalg.norm(self.data.qvel[self.cube_dof:self.cube_dof + 3]))

    def set_cube(self, position: Sequence[float], yaw: float = 0.0) -> None:
        """Put the cube somewhere by hand (tests, the judge's own checks)."""
        with self.lock:
            self.data.qpos[self.cube_qpos:self.cube_qpos + 7] = [*position, math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]
            self.data.qvel[self.cube_dof:self.cube_dof + 6] = 0
            mujoco.mj_forward(self.model, self.data)

    def cube_in_box(self, cube: int | None = None) -> bool:
        """The cube's centre (the named one's unless `cube` is given) inside the box's inner walls and
        low enough to be in it, not above it."""
        adr = self._qpos_of[self.target if cube is None else cube]
        x, y, z = self.data.qpos[adr:adr + 3]
        margin = BOX_INNER_HALF - CUBE_HALF * 0.5
        return (abs(x - BOX_CENTRE[0]) < margin and abs(y - BOX_CENTRE[1]) < margin
                and z < CUBE_HALF + 2 * BOX_WALL[1])

    def success(self) -> bool:
        """In the box and at rest: read from the physics state, nothing else."""
        return self.cube_in_box() and self.cube_speed() < REST_SPEED

    # -- stepping ---------------------------------------------------------------------------------

    def step(self, seconds: float) -> None:
        """Advance the physics. Each servo's set point moves toward its goal at the servo's top
        speed (the STS3215 runs a speed-limited profile, not a jump); a servo with torque off is limp."""
        with self.lock:
            steps = int(round(seconds / PHYSICS_DT))
            max_move = SERVO_SPEED * PHYSICS_DT
            for _ in range(steps):
                ctrl = self.data.ctrl
                ctrl[:] = np.where(self.torque, ctrl + np.clip(self.goal - ctrl, -max_move, max_move),
                                   self.data.qpos[self.joint_qpos])
                if self.cube_velocity.any():
                    self._slide_cube()
                mujoco.mj_step(self.model, self.data)

    def _slide_cube(self) -> None:
        """Carry the cube along the table at cube_velocity, turning back at the edges of the area it
        was placed in, until a jaw pad touches it (then it is the gripper's)."""
        contact = self.data.contact[:self.data.ncon]
        touching = ((contact.geom1 == self._cube_geom) & np.isin(contact.geom2, list(self._pads))) | (
            (contact.geom2 == self._cube_geom) & np.isin(contact.geom1, list(self._pads)))
        if touching.any() or self.cube_position()[2] > CUBE_HALF + 0.003:
            self.cube_velocity = np.zeros(2)
            return
        position = self.cube_position()
        for axis in range(2):
            low, high = CUBE_AREA[axis]
            if (position[axis] < low and self.cube_velocity[axis] < 0) or (
                    position[axis] > high and self.cube_velocity[axis] > 0):
                self.cube_velocity[axis] *= -1
        # Moved kinematically (table friction would slow a pushed cube): a conveyor under it.
        self.data.qpos[self.cube_qpos:self.cube_qpos + 2] += self.cube_velocity * PHYSICS_DT
        self.data.qvel[self.cube_dof:self.cube_dof + 2] = 0.0
        self.data.qvel[self.cube_dof + 3:self.cube_dof + 6] = 0.0

    def set_torque(self, servo: int, on: bool) -> None:
        """Torque off zeroes the servo's stiffness and damping: the joint is free (limp)."""
        with self.lock:
            self.torque[servo] = on
            self.model.actuator_gainprm[servo, 0] = self._kp[servo] if on else 0.0
            self.model.actuator_biasprm[servo, 1:3] = self._bias[servo] if on else 0.0

    # -- rendering --------------------------------------------------------------------------------

    def render(self, camera: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB from the named camera."""
        with self.lock:
            if self._renderer is None:
                self._renderer = open_renderer(self.model, *self.image_size)
            self._renderer.update_scene(self.data, camera)
            return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def open_renderer(model, height: int, width: int) -> "mujoco.Renderer":
    try:
        return mujoco.Renderer(model, height, width)
    except Exception as err:  # the GL library is missing or cannot start headless
        raise SimError(gl_problem(err)) from err


class SimError(cli.UserError):
    """A problem the user can fix (the command lines print it and exit)."""

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
# the wall clock and lets the policy run freely beside it (infer_async.py --sim).


class SimClock:
    def __init__(self, scene: "Scene", bus: "sim_bus.SimulatedBus | None" = None, realtime: bool = False):
        self.scene, self.bus, self.realtime = scene, bus, realtime
        self.policy_busy: Callable[[], bool] = lambda: False  # the policy server's `busy` and `stopping`
        self.policy_stopping: Callable[[], bool] = lambda: False
        self._cond = threading.Condition()
        self._computing = False
        self._due: float | None = None  # simulated time at which the pending chunk arrives
        self._released = True
        self._wall_start: float | None = None

    def now(self) -> float:
        return self.scene.time

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
        with a notification (the server's on_change, or timed()'s run)."""
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
        if self.bus is not None:
            self.bus.settle()  # the goals already written reach the servos before time moves
        self.scene.step(when - self.now())

    def timed(self, policy_fn: Callable, extra_latency: float = 0.0, measure: bool = True) -> Callable:
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
                    # (the server stopping, its chunk no longer wanted).
                    while not self._released and not self.policy_stopping():
                        self._cond.wait()

        return run

    def attach(self, server) -> None:
        """Follow this infer_async.PolicyServer (None: none). Forgets any chunk of a server before."""
        if server is not None:
            server.on_change = self._wake
        with self._cond:
            self.policy_busy = (lambda: server.busy) if server is not None else (lambda: False)
            self.policy_stopping = (lambda: server.stopping) if server is not None else (lambda: False)
            self._computing, self._due, self._released = False, None, True
            self._cond.notify_all()

# ---------------------------------------------------------------------------------------------
# 3. Cameras, and the simulated robot as infer_async uses it
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


class SimRobot:
    """The scene, its servo bus on a pseudo-terminal, the so100.SO100 driver connected to it, the
    cameras and a clock: `robot`, `cameras` and `clock` plug into infer_async.RobotClient where a
    real arm's do. `model` and `data` are MuJoCo's."""

    def __init__(self, image_size: tuple[int, int] = IMAGE_SIZE, realtime: bool = False, cubes: int = 1):
        self.scene = Scene(image_size, cubes)
        self.bus = sim_bus.SimulatedBus(scene=self.scene)
        self.clock = SimClock(self.scene, self.bus, realtime)
        self.robot: so100.SO100 | None = None
        self.cameras = {policy_io.IMAGE_PREFIX + name: SimCamera(self.scene, name) for name in CAMERAS}
        self._episode_start, self._success_since = 0.0, None
        self.completed_at: float | None = None

    @property
    def model(self):
        return self.scene.model

    @property
    def data(self):
        return self.scene.data

    def start(self, connect: bool = True) -> "SimRobot":
        """Serve the bus; with `connect`, also connect `robot` (torque on). infer_async.py --sim
        connects its own driver to `bus.port`, as to a real arm."""
        self.bus.start()
        if connect:
            # A generous reply timeout: a busy CPU can delay the bus thread, and simulated time does not
            # pass meanwhile, so waiting longer than a real arm's 50 ms costs nothing.
            self.robot = so100.SO100(self.bus.port, calibration=self.bus.calibration, reply_timeout=1.0)
            self.robot.connect()
        self._episode_start = self.clock.now()
        return self

    def reset(self, seed: int) -> None:
        """A new episode: the scene from `seed`, the driver holding the new pose (torque on again)."""
        self.scene.reset(seed)
        self.bus.settle()
        self.robot.torque_on()
        self._episode_start = self.clock.now()
        self._success_since, self.completed_at = None, None

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

    def close(self) -> None:
        if self.robot is not None and self.robot.is_connected:
            self.robot.disconnect()
        self.bus.stop()
        self.scene.close()

    def __enter__(self) -> "SimRobot":
        return self.start()

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def cameras_for(self, spec) -> dict[str, SimCamera]:
        """The cameras a policy asks for (infer_async.PolicySpec), at the sizes it asks for."""
        missing = sorted(set(spec.cameras) - set(self.cameras))
        if missing:
            raise SimError(f"the policy expects camera(s) {missing}; the simulator has {sorted(self.cameras)}")
        return {key: SimCamera(self.scene, key.rsplit(".", 1)[-1], size) for key, size in spec.cameras.items()}

    def units(self, angles: np.ndarray) -> np.ndarray:
        """Joint angles (radians) in the robot's units (degrees, gripper percent), as the driver
        would report them."""
        calibration = self.bus.calibration
        return so100.ticks_to_units([sim_bus.radians_to_ticks(a) for a in angles], calibration)


# ---------------------------------------------------------------------------------------------
# 4. The scripted expert
# ---------------------------------------------------------------------------------------------
# Waypoints for the point between the jaw pads ("grasp" site), the gripper pointing straight
# down with its jaws closing across two faces of the cube: above the cube, down, close, lift,
# over the box, down, open, up. Each waypoint becomes joint angles by damped least squares on
# MuJoCo's site Jacobian; between waypoints the joints follow a smooth (minimum-jerk) profile.
# The cube does not move until it is grasped, so the plan is made once, from the first state.

GRASP_HEIGHT = CUBE_HALF + 0.006  # the site a little above the cube's centre: pad tips clear the table
OPEN, CLOSED = 1.1, -0.15  # gripper radians: wide open (7.5 cm at the pads), squeezing (the cube stops it)


def down_orientation(yaw: float) -> np.ndarray:
    """Rotation (world from site) with the gripper pointing down (site -y = world -z) and the jaws
    closing along (cos yaw, sin yaw, 0)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [s, 0.0, -c], [0.0, 1.0, 0.0]])


def solve_ik(model, scratch, position: np.ndarray, orientation: np.ndarray, q0: np.ndarray,
             iterations: int = 200, damping: float = 1e-3) -> tuple[np.ndarray, float]:
    """Joint angles (the five arm joints; gripper kept) putting the grasp site at `position` with
    `orientation`; returns (angles, position error in m)."""
    site = model.site("grasp").id
    arm = np.arange(5)
    q = q0.copy()
    jac_p, jac_r = np.zeros((3, model.nv)), np.zeros((3, model.nv))
    target_quat, site_quat, error_rot = np.zeros(4), np.zeros(4), np.zeros(3)
    mujoco.mju_mat2Quat(target_quat, orientation.flatten())
    low = np.array([JOINT_RANGES[j][0] for j in JOINTS])
    high = np.array([JOINT_RANGES[j][1] for j in JOINTS])
    for _ in range(iterations):
        scratch.qpos[:len(JOINTS)] = q
        mujoco.mj_kinematics(model, scratch)
        mujoco.mj_comPos(model, scratch)
        error_pos = position - scratch.site_xpos[site]
        mujoco.mju_mat2Quat(site_quat, scratch.site_xmat[site])
        mujoco.mju_subQuat(error_rot, target_quat, site_quat)
        error_rot_world = scratch.site_xmat[site].reshape(3, 3) @ error_rot
        if np.linalg.norm(error_pos) < 1e-4 and np.linalg.norm(error_rot_world) < 1e-3:
            break
        mujoco.mj_jacSite(model, scratch, jac_p, jac_r, site)
        jac = np.vstack([jac_p[:, arm], 0.1 * jac_r[:, arm]])  # metres weigh more than radians
        error = np.concatenate([error_pos, 0.1 * error_rot_world])
        step = jac.T @ np.linalg.solve(jac @ jac.T + damping * np.eye(6), error)
        q[arm] = np.clip(q[arm] + step, low[arm], high[arm])
    scratch.qpos[:len(JOINTS)] = q
    mujoco.mj_kinematics(model, scratch)
    return q, float(np.linalg.norm(position - scratch.site_xpos[site]))


def min_jerk(s: float) -> float:
    s = min(max(s, 0.0), 1.0)
    return s * s * s * (10 - 15 * s + 6 * s * s)


@dataclass
class Segment:
    duration: float
    goal: np.ndarray  # joint angles at the end (radians)


class ScriptedExpert:
    """A pick-and-place plan for the scene's current state, varied by `rng` (speed, approach height,
    grasp point, release height). `goal(t)` gives the joint goals (radians) t seconds after start.
    `check(scene, t)`, called every tick, notices a grasp that lifted nothing and plans a new attempt
    from where the arm and the cube are then (at most MAX_ATTEMPTS)."""

    MAX_ATTEMPTS = 3

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.rng, self.attempts = rng, 0
        self._plan(scene, 0.0)

    def _plan(self, scene: Scene, t0: float) -> None:
        model, rng = scene.model, self.rng
        scratch = mujoco.MjData(model)
        cube, cube_yaw = scene.cube_position(), scene.cube_yaw()
        q = scene.joint_angles()
        # Of the four ways to grip a cube (every quarter turn), the one needing the least wrist roll.
        best = None
        for k in range(-2, 3):
            yaw = cube_yaw + k * math.pi / 2
            above = cube + [0.0, 0.0, 0.08]
            solution, err = solve_ik(model, scratch, above, down_orientation(yaw), q)
            score = abs(solution[4]) + 10 * err
            if best is None or score < best[0]:
                best = (score, yaw)
        yaw = best[1]
        speed = rng.uniform(0.8, 1.25)
        hover = rng.uniform(0.06, 0.10)
        lift = rng.uniform(0.09, 0.13)
        grasp_at = cube + [*rng.normal(0.0, 0.002, 2), 0.0]
        grasp_at[2] = GRASP_HEIGHT
        box = np.array([BOX_CENTRE[0], BOX_CENTRE[1], 0.0]) + [*rng.uniform(-0.01, 0.01, 2), 0.0]
        release = rng.uniform(0.05, 0.07)
        box_yaw = math.atan2(box[1], box[0]) - math.atan2(cube[1], cube[0]) + yaw  # carried without roll

        def pose(position, yaw_, gripper):
            nonlocal q
            q, _ = solve_ik(model, scratch, np.asarray(position, float), down_orientation(yaw_), q)
            q = q.copy()
            q[5] = gripper
            return q

        plan = [  # (seconds at speed 1, where)
            (1.6, pose(cube + [0, 0, hover], yaw, OPEN)),
            (1.2, pose(grasp_at, yaw, OPEN)),
            (0.8, pose(grasp_at, yaw, CLOSED)),
            (0.8, pose(grasp_at + [0, 0, lift], yaw, CLOSED)),  # the grasp is judged at the end of this
            (1.4, pose(box + [0, 0, lift], box_yaw, CLOSED)),
            (0.8, pose(box + [0, 0, release], box_yaw, CLOSED)),
            (0.5, pose(box + [0, 0, release], box_yaw, OPEN)),
            (1.0, pose(box + [0, 0, release + 0.08], box_yaw, OPEN)),
        ]
        self.t0, self.start = t0, scene.joint_angles()
        self.segments = [Segment(seconds / speed, goal) for seconds, goal in plan]
        self.lifted_at = t0 + sum(s.duration for s in self.segments[:4])
        self.duration = t0 + sum(s.duration for s in self.segments)
        self.attempts += 1

    def check(self, scene: Scene, t: float) -> None:
        if self.lifted_at <= t and self.attempts < self.MAX_ATTEMPTS:
            self.lifted_at = math.inf
            if scene.cube_position()[2] < CUBE_HALF + 0.02:  # still on the table: try again
                self._plan(scene, t)

    def goal(self, t: float) -> np.ndarray:
        previous, t = self.start, t - self.t0
        for segment in self.segments:
            if t < segment.duration:
                return previous + (segment.goal - previous) * min_jerk(t / segment.duration)
            t -= segment.duration
            previous = segment.goal
        return previous.copy()

# ---------------------------------------------------------------------------------------------
# 5. Recording demonstrations, closed-loop evaluation, video
# ---------------------------------------------------------------------------------------------


def expert_episode(sim_robot: SimRobot, seed: int, fps: int, noise: float = 0.0, tail_s: float = 1.0) -> dict | None:
    """One scripted demonstration from `seed`, recorded as LeRobot records a real arm: each tick the
    observation (state, both cameras), then the action. None if the expert failed.

    With `noise` (radians), the arm executes the expert's goals plus a slowly wandering offset
    (Ornstein-Uhlenbeck, 0.5 s time constant) while the dataset records the expert's own goals
    (DART, Laskey et al. 2017): the policy then sees states off the expert's path labelled with
    the way back, and the grasps the noise spoils with the expert's second attempt."""
    sim_robot.reset(seed)
    rng = np.random.default_rng(seed)
    expert = ScriptedExpert(sim_robot.scene, rng)
    robot, clock = sim_robot.robot, sim_robot.clock
    low, high = so100.unit_limits(sim_robot.bus.calibration)
    state = policy_io.STATE
    episode: dict = {"task": sim_robot.scene.task(), state: [], "action": []}
    episode.update({key: [] for key in sim_robot.cameras})
    offset, dt, tau = np.zeros(len(JOINTS)), 1.0 / fps, 0.5
    k = 0
    while k * dt < expert.duration + tail_s:
        expert.check(sim_robot.scene, k * dt)
        goal = expert.goal(k * dt)
        episode[state].append(robot.read())
        for key, camera in sim_robot.cameras.items():
            episode[key].append(camera.read())
        episode["action"].append(np.clip(sim_robot.units(goal), low, high).astype(np.float32))
        offset[:5] += -offset[:5] * dt / tau + noise * math.sqrt(2 * dt / tau) * rng.normal(size=5)
        robot.write(sim_robot.units(goal + offset))
        clock.sleep(dt)
        k += 1
    if not sim_robot.scene.success():
        return None
    episode[state] = np.stack(episode[state])
    episode["action"] = np.stack(episode["action"])
    return episode


def record(out: str | Path, episodes: int, seed: int = 0, fps: int = FPS, noise: float = 0.0,
           image_size: tuple[int, int] = IMAGE_SIZE, log: Callable[[str], None] = print, cubes: int = 1) -> dict:
    """A LeRobot v3.0 dataset of `episodes` successful demonstrations at `out`, from seeds
    seed, seed+1, ... (a seed where the expert fails is skipped). Returns what was recorded. With two
    cubes each episode's task names the cube the expert moves."""
    import data

    used, failed = [], []

    def demonstrations() -> Iterator[dict]:
        with SimRobot(image_size, cubes=cubes) as sim_robot:
            s, start = seed, time.monotonic()
            while len(used) < episodes:
                episode = expert_episode(sim_robot, s, fps, noise)
                (used if episode is not None else failed).append(s)
                if episode is not None:
                    log(f"episode {len(used)}/{episodes} (seed {s}): {len(episode['action'])} frames, "
                        f"{time.monotonic() - start:.0f} s")
                    yield episode
                elif len(failed) > max(10, episodes):
                    raise SimError(f"the scripted expert failed on {len(failed)} seeds ({failed[:10]} ...)")
                s += 1

    data.write_dataset(out, demonstrations(), fps=fps, robot_type=ROBOT_TYPE,
                       state_names=FEATURE_NAMES, action_names=FEATURE_NAMES)
    return {"dataset": str(out), "episodes": len(used), "seeds": [used[0], used[-1]] if used else [],
            "expert_failures": failed}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (sound at 0 and n successes, unlike p +- 2se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalConfig:
    episodes: int = 50
    seed: int = 10_000  # episode i uses seed + i; recording uses small seeds, so these are held out
    fps: float = FPS
    time_limit_s: float = 25.0
    sync: bool = False
    threshold: float = 0.7  # g
    n_action_steps: int | None = None  # --sync: actions executed per chunk
    latency_s: float = 0.0  # added to the measured inference time (a slower model, a remote server)
    measure_latency: bool = True  # False: the policy costs no time (only latency_s), fully repeatable
    cube_speed: float = 0.0  # m/s: the cube slides in a random direction (a moving object)
    instruction: str = "named"  # two cubes: "named" (the scene's), "other" (names the other cube), "empty"
    video: str | None = None
    video_episodes: int = 4


def evaluate(sim_robot: SimRobot, policy_fn: Callable, spec, config: EvalConfig,
             log: Callable[[str], None] = print) -> dict:
    """Closed-loop success rate of a policy through infer_async.RobotClient (the queue, threshold g
    and aggregation a real arm uses). Success: the cube in the box and at rest for SETTLE_S,
    read from the physics. Completion time: simulated seconds from the start to that moment."""
    clock = sim_robot.clock
    results, frames = [], []
    for i in range(config.episodes):
        seed = config.seed + i
        sim_robot.reset(seed)
        task = instruct(sim_robot.scene, config.instruction)
        if config.cube_speed > 0:
            heading = np.random.default_rng([seed, 1]).uniform(0, 2 * math.pi)
            sim_robot.scene.cube_velocity = config.cube_speed * np.array([math.cos(heading), math.sin(heading)])
        client = infer_async.RobotClient(
            sim_robot.robot, sim_robot.cameras_for(spec),
            clock.timed(policy_fn, config.latency_s, config.measure_latency), spec, task,
            infer_async.ClientConfig(fps=config.fps, threshold=config.threshold, sync=config.sync,
                                     n_action_steps=config.n_action_steps),
            clock=clock.now, sleep=clock.sleep)
        clock.attach(client.server)
        film = config.video is not None and i < config.video_episodes
        episode_frames = []

        def done() -> bool:
            if film:
                episode_frames.append(np.concatenate([sim_robot.scene.render(c) for c in CAMERAS], axis=1))
            return sim_robot.task_done()

        metrics = client.run(duration=config.time_limit_s, until=done)
        clock.attach(None)
        completed = sim_robot.completed_at
        success = completed is not None
        latencies = [latency for _, latency in metrics.latencies]
        scene = sim_robot.scene
        results.append({"seed": seed, "success": success, "completion_s": completed,
                        "idle_ticks": metrics.idle_ticks, "ticks": metrics.ticks, "latencies": latencies,
                        "task": task, "other_cube_in_box": any(scene.cube_in_box(c) for c in range(len(scene.cubes))
                                                               if c != scene.target)})
        outcome = f"success at {completed:.1f} s" if success else "failure"
        if film:
            frames.extend(annotate(f, f"seed {seed}: {outcome}", success) for f in episode_frames)
        log(f"episode {i + 1}/{config.episodes} (seed {seed}): {outcome}, idle ticks {metrics.idle_ticks}")
    if config.video is not None:
        write_video(config.video, frames, config.fps)
    return summarise(results, config)


def instruct(scene: Scene, instruction: str) -> str:
    """The instruction an episode gets. "other" re-targets the scene at the cube the scene did not
    name, so success then means that cube moved; "empty" keeps the named cube as the one judged."""
    if instruction == "named":
        return scene.task()
    if len(scene.cubes) < 2:
        raise SimError(f"instruction {instruction!r} needs the two-cube scene (--cubes 2)")
    if instruction == "other":
        scene.target = 1 - scene.target
        return scene.task()
    if instruction == "empty":
        return ""
    raise SimError(f"unknown instruction {instruction!r}: named, other or empty")


def summarise(results: list[dict], config: EvalConfig) -> dict:
    successes = sum(r["success"] for r in results)
    times = [r["completion_s"] for r in results if r["success"]]
    latencies = np.array([x for r in results for x in r["latencies"]] or [np.nan])
    return {
        "success_rate": successes / len(results), "episodes": len(results), "successes": successes,
        "ci95": [round(x, 4) for x in wilson_interval(successes, len(results))],
        "mean_completion_s": round(float(np.mean(times)), 3) if times else None,
        "idle_ticks": int(sum(r["idle_ticks"] for r in results)),
        "ticks": int(sum(r["ticks"] for r in results)),
        "latency_ms_mean": round(float(np.nanmean(latencies)) * 1000, 1),
        "latency_ms_p95": round(float(np.nanpercentile(latencies, 95)) * 1000, 1),
        "control_period_ms": round(1000 / config.fps, 1),
        "mode": "sync" if config.sync else "async", "threshold": 0.0 if config.sync else config.threshold,
        "added_latency_s": config.latency_s, "cube_speed": config.cube_speed,
        "seeds": [config.seed, config.seed + len(results) - 1],
        "instruction": config.instruction, "other_cube_in_box": int(sum(r.get("other_cube_in_box", False) for r in results)),
    }


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


def expert_policy(sim_robot: SimRobot, fps: float, chunk_size: int = 30):
    """The scripted expert as a policy (observation -> chunk), and its infer_async.PolicySpec: a
    check that evaluation scores a perfect policy as perfect. It plans from the scene (it is an
    oracle) on the first observation of each episode."""
    plan: dict = {}

    def run(observation) -> np.ndarray:
        if observation.timestep == 0 or "expert" not in plan:
            plan["expert"] = ScriptedExpert(sim_robot.scene, np.random.default_rng(0))
        expert = plan["expert"]
        return np.stack([sim_robot.units(expert.goal((observation.timestep + i) / fps)) for i in range(chunk_size)])

    cameras = {key: sim_robot.scene.image_size for key in sim_robot.cameras}
    return run, policy_io.PolicySpec(cameras, len(JOINTS), len(JOINTS), chunk_size, chunk_size)


def random_policy(sim_robot: SimRobot, chunk_size: int = 30, seed: int = 0):
    """Uniformly random goals within the joint ranges: what a policy that learnt nothing scores."""
    rng = np.random.default_rng(seed)
    low, high = so100.unit_limits(sim_robot.bus.calibration)

    def run(observation) -> np.ndarray:
        return rng.uniform(low, high, size=(chunk_size, len(JOINTS)))

    cameras = {key: sim_robot.scene.image_size for key in sim_robot.cameras}
    return run, policy_io.PolicySpec(cameras, len(JOINTS), len(JOINTS), chunk_size, chunk_size)

# ---------------------------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------------------------


positive_int, non_negative_int = cli.integer(1), cli.integer(0)
positive_float, non_negative_float = cli.number(above=0), cli.number(0)
unit_interval = cli.number(0, 1)


def image_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    try:
        size = (int(height), int(width))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 16 or max(size) > 1080:
        raise argparse.ArgumentTypeError(f"expects HEIGHTxWIDTH between 16 and 1080, e.g. 96x128; got {text!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description="An SO-100 in MuJoCo: scripted demonstrations and closed-loop "
                                       "evaluation of a policy on pick-and-place.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record scripted demonstrations as a LeRobot v3.0 dataset")
    r.add_argument("--episodes", type=positive_int, default=50, help="successful episodes to record (default 50)")
    r.add_argument("--out", required=True, help="dataset directory (must not exist)")
    r.add_argument("--seed", type=non_negative_int, default=0, help="first scene seed; episode i uses seed + i")
    r.add_argument("--fps", type=positive_int, default=FPS, help=f"frames per second (default {FPS})")
    r.add_argument("--size", type=image_size, default=IMAGE_SIZE, help="camera HEIGHTxWIDTH (default 96x96)")
    r.add_argument("--noise", type=non_negative_float, default=0.0,
                   help="radians of wandering offset added to the executed goals, not to the recorded ones (DART)")
    r.add_argument("--cubes", type=int, choices=(1, 2), default=1,
                   help="2: a red and a green cube, each episode's task names the one to move")
    e = sub.add_parser("eval", help="closed-loop success rate of a policy (JSON summary on the last line)")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--policy", help="policy directory or Hub id (a checkpoint's pretrained_model)")
    who.add_argument("--expert", action="store_true", help="the scripted expert as the policy (should score 1.0)")
    who.add_argument("--random", action="store_true", help="random goals (should score about 0)")
    e.add_argument("--vlm", default=None, help="where the policy's VLM config/tokenizer are (default: its config)")
    e.add_argument("--episodes", type=positive_int, default=50, help="episodes (default 50)")
    e.add_argument("--seed", type=non_negative_int, default=10_000,
                   help="first scene seed (default 10000: never used for recording by the demo)")
    e.add_argument("--fps", type=positive_float, default=None,
                   help="control rate; default: the policy's training dataset's, else 30")
    e.add_argument("--sync", action="store_true", help="synchronous: infer, execute the chunk, repeat")
    e.add_argument("--threshold", type=unit_interval, default=0.7, help="g of asynchronous inference (default 0.7)")
    e.add_argument("--n-action-steps", type=positive_int, default=None, help="--sync: actions per chunk")
    e.add_argument("--latency", type=non_negative_float, default=0.0,
                   help="seconds added to each measured inference (a slower model or a remote server)")
    e.add_argument("--time-limit", type=positive_float, default=25.0, help="seconds per episode (default 25)")
    e.add_argument("--video", default=None, help="mp4 of the first episodes, both cameras, success written on them")
    e.add_argument("--video-episodes", type=positive_int, default=4, help="episodes in the video (default 4)")
    e.add_argument("--json", default=None, help="also write the summary to this file")
    e.add_argument("--cubes", type=int, choices=(1, 2), default=1, help="2: the red/green scene (language)")
    e.add_argument("--instruction", choices=("named", "other", "empty"), default="named",
                   help="--cubes 2: name the scene's cube, the other cube (judged on that one) or say nothing")
    e.add_argument("--device", default=None, help="torch device for the policy (default: cuda if available)")
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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "record":
            summary = record(args.out, args.episodes, args.seed, args.fps, args.noise, args.size, cubes=args.cubes)
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
    except (SimError, so100.FeetechError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
    fps = args.fps or (policy_io.recorded_fps(args.policy) if args.policy else None) or FPS
    config = EvalConfig(episodes=args.episodes, seed=args.seed, fps=fps, time_limit_s=args.time_limit,
                        sync=args.sync, threshold=args.threshold, n_action_steps=args.n_action_steps,
                        latency_s=args.latency, video=args.video, video_episodes=args.video_episodes,
                        instruction=args.instruction)
    with SimRobot(cubes=args.cubes) as sim_robot:
        if args.expert:
            policy_fn, spec = expert_policy(sim_robot, fps)
        elif args.random:
            policy_fn, spec = random_policy(sim_robot)
        else:
            try:
                policy = policy_io.load_policy(args.policy, args.vlm, args.device)
            except cli.UserError as err:
                raise SimError(str(err)) from err
            spec = policy_io.policy_spec(policy)
            sim_robot.cameras_for(spec)  # the policy's cameras exist here, before anything runs
            policy_fn = policy_io.make_policy_fn(policy)
            policy_io.warm_up(policy_fn, spec)
        print(f"evaluating on seeds {config.seed}..{config.seed + config.episodes - 1} at {fps:g} fps, "
              f"{'sync' if config.sync else f'async (g={config.threshold})'}", file=sys.stderr)
        summary = evaluate(sim_robot, policy_fn, spec, config, log=lambda m: print(m, file=sys.stderr))
    if args.video:
        print(f"video: {args.video}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
