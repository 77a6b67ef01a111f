"""The SO-100 scene in MuJoCo: an arm, a cube (or two) and a box, and a scripted expert that puts the
cube in the box.

The arm is built from the SO-100's kinematics (link offsets and joint axes of the real arm), with
position servos that have the STS3215's torque and speed limits, a 3 cm cube at a random place and
yaw, and a shallow box to put it in. A fixed overview camera and a wrist camera render headless.
Success is judged from the physics state alone. The expert plans through waypoints by inverse
kinematics on MuJoCo's Jacobian; it is an oracle (it reads the cube's pose from the physics).

    scene = Scene()
    scene.reset(seed=3)
    expert = ScriptedExpert(scene, np.random.default_rng(3))
    scene.goal = expert.goal(t); scene.step(0.05)   # ... until scene.success()

Read top to bottom:
  1. the scene (MJCF) and its physics: servos, success, rendering
  2. the scripted expert (inverse kinematics through waypoints)

Angles here are radians, as MuJoCo's. The arm as a robot (the servo bus on a pseudo-terminal, the
driver, the driver's units) is sim.py's, which assembles it from this scene and sim_bus.py.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import cli
import so100

# Headless rendering: Mesa's software EGL needs no display. Set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")


class SceneError(cli.UserError):
    """The scene cannot be built or rendered as asked (the command lines print it in one line)."""


try:
    import mujoco
except ImportError as err:
    if "mujoco" in str(err):
        raise SceneError(f"the simulator needs MuJoCo: pip install -r requirements.txt ({err})") from err
    raise SceneError(cli.gl_problem(err)) from err
except Exception as err:  # MuJoCo loads its GL back end on import: a missing or wrong one fails here
    raise SceneError(cli.gl_problem(err)) from err

TASK = "Pick up the cube and place it in the box."
CUBE_COLOURS = {"red": "0.85 0.1 0.1 1", "green": "0.1 0.65 0.15 1"}  # the language scene's two cubes


def task_for(colour: str) -> str:
    """The instruction of a two-cube scene: which cube to move is said only in words."""
    return f"Pick up the {colour} cube and place it in the box."


CAMERAS = ("top", "wrist")
IMAGE_SIZE = (96, 96)  # (height, width) of each camera: small, so rendering costs ~10 ms a frame
JOINTS = so100.JOINT_NAMES  # shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper

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
    the STS3215 turns, and the success condition read from the physics state alone. `time` and
    `step(seconds)` make it a world for sim.SimClock; `target_cube` is the index (in `cubes`) of
    the cube the task names (the box is the body named "target")."""

    def __init__(self, image_size: tuple[int, int] = IMAGE_SIZE, cubes: int = 1):
        if cubes not in (1, 2):
            raise SceneError(f"the scene has 1 or 2 cubes, not {cubes}")
        self.model = mujoco.MjModel.from_xml_string(scene_xml(image_size, cubes))
        self.data = mujoco.MjData(self.model)
        self.image_size = image_size
        self.joint_ranges = JOINT_RANGES  # the servo bus calibrates its encoders from these
        self.joint_qpos = np.array([self.model.joint(j).qposadr[0] for j in JOINTS])
        self.cubes = cube_names(cubes)
        self.colours = list(CUBE_COLOURS)[:cubes]
        self.target_cube = 0  # the cube the task names; the expert, success and the conveyor act on it
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
        return self._qpos_of[self.target_cube]

    @property
    def cube_dof(self) -> int:
        return self._dof_of[self.target_cube]

    @property
    def _cube_geom(self) -> int:
        return self._geom_of[self.target_cube]

    def task(self) -> str:
        """The instruction for this scene: with two cubes it names the target cube's colour."""
        return TASK if len(self.cubes) == 1 else task_for(self.colours[self.target_cube])

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
            self.target_cube = 0
            x, y = (rng.uniform(*r) for r in CUBE_AREA)
            yaw = rng.uniform(*CUBE_YAW)
            self._place(0, x, y, yaw)
            if len(self.cubes) == 2:  # drawn after the first cube, so one-cube scenes keep their seeds
                while True:
                    x2, y2 = (rng.uniform(*r) for r in CUBE_AREA)
                    if math.hypot(x2 - x, y2 - y) >= CUBE_GAP:
                        break
                self._place(1, x2, y2, rng.uniform(*CUBE_YAW))
                self.target_cube = int(rng.integers(2))
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
        adr = self._qpos_of[self.target_cube if cube is None else cube]
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
        raise SceneError(cli.gl_problem(err)) from err


# ---------------------------------------------------------------------------------------------
# 2. The scripted expert
# ---------------------------------------------------------------------------------------------
# Waypoints for the point between the jaw pads ("grasp" site), the gripper pointing straight
# down with its jaws closing across two faces of the cube: above the cube, down, close, lift,
# over the box, down, open, up. Each waypoint becomes joint angles by damped least squares on
# MuJoCo's site Jacobian; between waypoints the joints follow a smooth (minimum-jerk) profile.
# The cube does not move until it is grasped, so the plan is made from the first state, and made
# again only when a grasp lifted nothing.

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
    `replan_if_grasp_missed(scene, t)`, called every tick, notices a grasp that lifted nothing and
    plans a new attempt from where the arm and the cube are then (at most MAX_ATTEMPTS)."""

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

    def replan_if_grasp_missed(self, scene: Scene, t: float) -> None:
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

