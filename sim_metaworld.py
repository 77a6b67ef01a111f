"""Meta-World MT50, the paper's own benchmark, behind the simulator's environment interface.

SmolVLA's paper (and LeRobot's `lerobot-eval --env.type=metaworld`) judge a policy on Meta-World's 50
tasks (Farama Foundation's `metaworld` 3.1.1: a Sawyer arm at a table, MuJoCo, assets inside the
wheel) with Meta-World's own success signal. This file builds each task as LeRobot's protocol does,
so our numbers sit in the paper's table:

- the task's instruction is its description from LeRobot, and the 50 tasks fall into LeRobot's four
  difficulty groups (easy 28, medium 11, hard 6, very hard 5);
- the world is `MT1(task, seed=42)` with `train_tasks[0]`, each reset drawing new object and goal
  positions from its seed; the camera is `corner2` moved to (0.75, 0.075, 0.7), its image turned right
  side up (flipped on both axes); the robot's state is the hand's xyz and the gripper's opening
  (`observation.state` = obs[0:4]), the action 4-D in [-1, 1]: xyz deltas of 1 cm a step and a gripper
  effort; 80 steps a second; an episode ends after 500 steps (6.25 s);
- success is `info["success"]` at any step, nothing else.

`MetaWorldEnv` is the environment sim.py drives (sim.Environment: `fps`, `robot`, `cameras_for`,
`reset`, `task_done`, `completed_at`, `frame`, `close`) and the world its `SimClock` advances (`time`,
`step`): a policy runs through `infer_async.RobotClient` as on the SO-100 scene. Meta-World's
scripted experts (`metaworld.policies`, one per task) are a policy for that loop and the source of
demonstrations, recorded as a LeRobot v3.0 dataset with LeRobot's feature names:

    python sim.py record --env metaworld --task easy --episodes 10 --out DIR
    python sim.py eval --env metaworld --task mt50 --expert --episodes 3

Read top to bottom: 1. the benchmark (tasks, instructions, groups), 2. the world and its camera,
3. the scripted experts (recording goes through sim.record, one world per task).
"""

from __future__ import annotations

import os

# Headless rendering: Mesa's software EGL needs no display. Set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import difflib
import math
import threading
import warnings
import weakref
from typing import Callable

import mujoco
import numpy as np

import cli
import policy_io
from cli import UserError


class MetaWorldError(UserError):
    """A problem the user can fix: an unknown task or group, Meta-World missing, no headless GL."""


try:
    import metaworld
    import metaworld.policies
except ImportError as err:  # metaworld 3.1.1 needs `packaging`, which gymnasium pulls only with its mujoco extra
    raise MetaWorldError(f"Meta-World cannot be imported ({err}): pip install metaworld==3.1.1 packaging") from err

# The scripted experts warn whenever a gain overshoots [-1, 1]; they are clipped below, as the
# environments clip every action.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", module="metaworld.policies")

# ---------------------------------------------------------------------------------------------
# 1. The benchmark: LeRobot's tasks, instructions and difficulty groups
# ---------------------------------------------------------------------------------------------
# The descriptions and groups are LeRobot 0.4.4's `src/lerobot/envs/metaworld_config.json`
# (TASK_DESCRIPTIONS, DIFFICULTY_TO_TASKS), the ones `lerobot-eval --env.type=metaworld` and the
# paper's table use. push-v3 and push-back-v3 share one instruction there: a policy can tell them
# apart only by what it sees.

INSTRUCTIONS = {
    "assembly-v3": "Pick up a nut and place it onto a peg",
    "basketball-v3": "Dunk the basketball into the basket",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin",
    "box-close-v3": "Grasp the cover and close the box with it",
    "button-press-topdown-v3": "Press a button from the top",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top",
    "button-press-v3": "Press a button",
    "button-press-wall-v3": "Bypass a wall and press a button",
    "coffee-button-v3": "Push a button on the coffee machine",
    "coffee-pull-v3": "Pull a mug from a coffee machine",
    "coffee-push-v3": "Push a mug under a coffee machine",
    "dial-turn-v3": "Rotate a dial 180 degrees",
    "disassemble-v3": "Pick a nut out of a peg",
    "door-close-v3": "Close a door with a revolving joint",
    "door-lock-v3": "Lock the door by rotating the lock clockwise",
    "door-open-v3": "Open a door with a revolving joint",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise",
    "hand-insert-v3": "Insert the gripper into a hole",
    "drawer-close-v3": "Push and close a drawer",
    "drawer-open-v3": "Open a drawer",
    "faucet-open-v3": "Rotate the faucet counter-clockwise",
    "faucet-close-v3": "Rotate the faucet clockwise",
    "hammer-v3": "Hammer a screw on the wall",
    "handle-press-side-v3": "Press a handle down sideways",
    "handle-press-v3": "Press a handle down",
    "handle-pull-side-v3": "Pull a handle up sideways",
    "handle-pull-v3": "Pull a handle up",
    "lever-pull-v3": "Pull a lever down 90 degrees",
    "peg-insert-side-v3": "Insert a peg sideways",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck",
    "pick-out-of-hole-v3": "Pick up a puck from a hole",
    "reach-v3": "Reach a goal position",
    "push-back-v3": "Push the puck to a goal",
    "push-v3": "Push the puck to a goal",
    "pick-place-v3": "Pick and place a puck to a goal",
    "plate-slide-v3": "Slide a plate into a cabinet",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways",
    "plate-slide-back-v3": "Get a plate from the cabinet",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways",
    "peg-unplug-side-v3": "Unplug a peg sideways",
    "soccer-v3": "Kick a soccer into the goal",
    "stick-push-v3": "Grasp a stick and push a box using the stick",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick",
    "push-wall-v3": "Bypass a wall and push a puck to a goal",
    "reach-wall-v3": "Bypass a wall and reach a goal",
    "shelf-place-v3": "Pick and place a puck onto a shelf",
    "sweep-into-v3": "Sweep a puck into a hole",
    "sweep-v3": "Sweep a puck off the table",
    "window-open-v3": "Push and open a window",
    "window-close-v3": "Push and close a window",
}

GROUPS = {
    "easy": (
        "button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-wall-v3",
        "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
        "drawer-close-v3", "drawer-open-v3", "faucet-close-v3", "faucet-open-v3", "handle-press-v3",
        "handle-press-side-v3", "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
        "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3", "reach-wall-v3",
        "window-close-v3", "window-open-v3", "peg-unplug-side-v3",
    ),
    "medium": (
        "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3", "hammer-v3",
        "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-v3", "sweep-into-v3",
    ),
    "hard": ("assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3"),
    "very_hard": ("shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"),
}
MT50 = tuple(task for tasks in GROUPS.values() for task in tasks)  # all 50, group by group
GROUP_OF = {task: group for group, tasks in GROUPS.items() for task in tasks}


def tasks_for(name: str) -> list[str]:
    """The tasks a --task value names: one task ("pick-place-v3"), a group (easy, medium, hard,
    very_hard) or "mt50" (all 50, group by group)."""
    if name == "mt50":
        return list(MT50)
    if name in GROUPS:
        return list(GROUPS[name])
    if name in INSTRUCTIONS:
        return [name]
    close = difflib.get_close_matches(name, [*INSTRUCTIONS, *GROUPS, "mt50"], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise MetaWorldError(f"unknown Meta-World task {name!r}: a task such as pick-place-v3, a group "
                         f"({', '.join(GROUPS)}) or mt50{hint}")

# ---------------------------------------------------------------------------------------------
# 2. The world: one task, its physics at 80 Hz, its camera
# ---------------------------------------------------------------------------------------------
# The RobotClient writes an action once a tick and the simulated clock advances the world between
# ticks by whatever it needs (a tick, or up to a chunk's arrival). The world steps Meta-World once
# per 1/fps of simulated time, each step with the latest action written: Meta-World's xyz action is
# a delta, so an action executes once; a step with no new action moves the hand by zero but holds
# the gripper's effort (at zero effort the gripper springs open and drops what it holds).

BENCHMARK_SEED = 42  # LeRobot's MT1(task, seed=42)
FPS = 80  # Meta-World steps 5 physics steps of 2.5 ms at a time
CAMERA = "corner2"
CAMERA_POSITION = (0.75, 0.075, 0.7)  # LeRobot's corner2 (as in arXiv 2206.14244), not the XML's
TOP = policy_io.IMAGE_PREFIX + "top"  # the one camera, named as LeRobot names a dataset's cameras
# 128 px: the puck and buttons stay ~5 px across (at 96 px, 3-4); rendering costs ~8 ms a frame on one
# core. LeRobot renders 480 px (~22 ms a frame, and 14x the pixels for the vision encoder).
IMAGE_SIZE = (128, 128)
STATE_NAMES = ["hand.x", "hand.y", "hand.z", "gripper.opening"]  # metres; the opening in [0, 1]
ACTION_NAMES = ["hand.dx", "hand.dy", "hand.dz", "gripper.effort"]  # in [-1, 1]: 1 cm per unit; > 0 closes
ROBOT_TYPE = "sawyer"
OPEN_EFFORT = -1.0  # what Meta-World's reset holds the gripper at


class MetaWorldArm:
    """The Sawyer as infer_async.RobotClient drives an arm: read() the state, write() an action."""

    def __init__(self, env: "MetaWorldEnv"):
        self.env = env

    def read(self) -> np.ndarray:
        """observation.state: the hand's xyz (m) and the gripper's opening, float32 (4,)."""
        return self.env.observation[:4].astype(np.float32)

    def write(self, action: np.ndarray) -> None:
        """The action for the next step, clipped to [-1, 1] as Meta-World's actions are."""
        action = np.asarray(action, np.float64)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"a Meta-World action is 4 finite numbers (xyz delta, gripper), got {action!r}")
        self.env.command(np.clip(action, -1.0, 1.0))


class MetaWorldCamera:
    """The corner2 camera with infer_async.Camera's interface: read() -> uint8 (H, W, 3), rendered now."""

    def __init__(self, env: "MetaWorldEnv", size: tuple[int, int]):
        self.env, self.size = env, (int(size[0]), int(size[1]))

    def read(self) -> np.ndarray:
        return self.env.render(self.size)

    def close(self) -> None:
        pass


class MetaWorldEnv:
    """One Meta-World task as LeRobot's protocol builds it, as sim.py's Environment and its clock's world.

    `time` is simulated seconds (it never goes back, across episodes too); `step(seconds)` advances it
    and steps the physics at each 1/fps boundary crossed. `observation` is Meta-World's latest 39-D
    observation (0:3 hand, 3 gripper, 4:18 objects, 18:36 the previous step's, 36:39 the goal), which
    only the scripted expert, an oracle, reads. `clock` is for sim.py to set (sim.SimClock(env)): this
    file does not import sim. Rendering makes this renderer's GL context current on every frame, so
    several environments in one process render correctly, and closing one leaves the others working.
    """

    def __init__(self, task: str, image_size: tuple[int, int] = IMAGE_SIZE):
        if task not in INSTRUCTIONS:
            tasks = tasks_for(task)  # an unknown name raises here, naming the closest
            raise MetaWorldError(f"{task!r} names {len(tasks)} tasks; an environment is one task, e.g. {tasks[0]}")
        self.task, self.instruction = task, INSTRUCTIONS[task]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        benchmark = metaworld.MT1(task, seed=BENCHMARK_SEED)
        self.sawyer = benchmark.train_classes[task]()  # Meta-World's environment (a SawyerXYZEnv)
        self.sawyer.set_task(benchmark.train_tasks[0])  # its goal in the observation (the experts read it)
        self.sawyer._freeze_rand_vec = False  # else every reset replays train_tasks[0]'s positions
        self.sawyer.seeded_rand_vec = True  # drawn from env.seed(s), not numpy's global state
        model = self.sawyer.model
        model.cam_pos[model.camera(CAMERA).id] = CAMERA_POSITION
        model.vis.quality.offsamples = 0  # no 4x multisampling: read when the first renderer is made
        self.fps = float(FPS)
        self.max_steps = int(self.sawyer.max_path_length)  # 500
        self.time_limit_s = self.max_steps / self.fps
        # ClientConfig fields this world needs. Its state is metres, not degrees: skipping observations
        # within `similarity` of the last would skip every one. Its actions are deltas, executed once:
        # the ease-in's crossfade, which smooths a jump between two goal poses, only delays them.
        self.client_defaults = {"fps": self.fps, "ease_in": 0, "similarity": 0.0}
        self.robot = MetaWorldArm(self)
        self.cameras = {TOP: MetaWorldCamera(self, self.image_size)}
        self.clock = None
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._render_lock = threading.Lock()
        self._time = 0.0
        self.reset(0)

    # The world, as sim.SimClock drives it

    @property
    def time(self) -> float:
        return self._time

    def step(self, seconds: float) -> None:
        self._time += max(seconds, 0.0)
        # The 1e-6 step: a tick's time summed from 1/fps increments lands a hair short of its boundary.
        due = min(self.max_steps, math.floor((self._time - self._episode_start) * self.fps + 1e-6))
        while self.steps < due:
            self._physics_step()

    def command(self, action: np.ndarray) -> None:
        """The action the next physics step executes (MetaWorldArm.write checks and clips it)."""
        self._action = action

    def _physics_step(self) -> None:
        action = self._action if self._action is not None else np.array([0.0, 0.0, 0.0, self._gripper])
        self._action, self._gripper = None, float(action[3])
        self.observation, _, _, _, info = self.sawyer.step(action)
        self.steps += 1
        if self.completed_at is None and info["success"]:
            self.completed_at = self.steps / self.fps

    # The environment, as sim.py evaluates and records it

    robot_type = ROBOT_TYPE
    state_names, action_names = STATE_NAMES, ACTION_NAMES

    @property
    def settings(self) -> dict:
        """What an evaluation summary records of this world."""
        return {"env": "metaworld", "task": self.task, "image_size": list(self.image_size)}

    def episode_facts(self) -> dict[str, bool]:
        return {}

    def action_limits(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(4, -1.0), np.full(4, 1.0)

    def expert(self, seed: int, fps: float, noise: float = 0.0) -> MetaWorldDemonstration:
        """The scripted expert for the episode reset() has just begun (at the world's own fps: an action
        is one Meta-World step). `noise`: DART, the standard deviation of Gaussian noise (action units:
        1 = 1 cm a step) added to the hand's executed xyz deltas, drawn from `seed`; the recorded
        action stays the expert's own, which reads the hand where the noise put it."""
        if fps != self.fps:
            raise MetaWorldError(f"Meta-World's demonstrations are recorded at {self.fps:g} fps (asked: {fps:g} fps)")
        return MetaWorldDemonstration(self, seed, noise)

    def expert_policy(self, fps: float) -> tuple[Callable[[policy_io.Observation], np.ndarray], policy_io.PolicySpec]:
        return expert_policy(self)

    def reset(self, seed: int) -> str:
        """A new episode: object and goal positions drawn from `seed`. Returns the task's instruction."""
        self.sawyer.seed(int(seed))  # env.reset(seed=...) ignores its seed
        self.observation, _ = self.sawyer.reset()
        self._episode_start, self.steps = self._time, 0
        self._action, self._gripper = None, OPEN_EFFORT
        self.completed_at: float | None = None  # simulated seconds from the reset to the first success
        return self.instruction

    def task_done(self) -> bool:
        """True once Meta-World's info["success"] was seen at any step of this episode (it may not hold
        after: a pushed puck can roll on, yet the task counts as done, as in LeRobot's evaluation)."""
        return self.completed_at is not None

    def cameras_for(self, spec: policy_io.PolicySpec) -> dict[str, MetaWorldCamera]:
        """The cameras a policy asks for, at the sizes it asks for; a policy made for another robot
        (another state or action size, another camera) is refused here, before the episode starts."""
        if (spec.state_dim, spec.action_dim) != (4, 4):
            raise MetaWorldError(f"the policy has a {spec.state_dim}-D state and {spec.action_dim}-D actions; "
                                 "Meta-World's are 4-D (hand xyz and gripper; xyz delta and gripper effort)")
        unknown = sorted(set(spec.cameras) - {TOP})
        if unknown:
            raise MetaWorldError(f"the policy expects camera(s) {unknown}; Meta-World has {TOP}")
        return {key: MetaWorldCamera(self, size) for key, size in spec.cameras.items()}

    def frame(self) -> np.ndarray:
        """The camera's view now, at the environment's image size (for videos)."""
        return self.render(self.image_size)

    def render(self, size: tuple[int, int]) -> np.ndarray:
        """corner2 at `size` (height, width), right side up (the camera's image comes upside down)."""
        size = (int(size[0]), int(size[1]))
        with self._render_lock:
            renderer = self._renderers.get(size) or self._open_renderer(size)
            renderer.update_scene(self.sawyer.data, CAMERA)
            return np.ascontiguousarray(np.flip(renderer.render(), (0, 1)))

    def _open_renderer(self, size: tuple[int, int]) -> mujoco.Renderer:
        height, width = size
        visual = self.sawyer.model.vis.global_  # the offscreen buffer must hold the largest image asked for
        visual.offheight, visual.offwidth = max(visual.offheight, height), max(visual.offwidth, width)
        try:
            renderer = mujoco.Renderer(self.sawyer.model, height, width)
        except Exception as err:  # the GL library is missing or cannot start headless
            raise MetaWorldError(cli.gl_problem(err)) from err
        # Shadow maps and reflections cost ~10x the rest of a frame on a software renderer.
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._renderers[size] = renderer
        weakref.finalize(self, renderer.close)  # an environment never closed: before EGL goes, at exit
        return renderer

    def close(self) -> None:
        with self._render_lock:
            for renderer in self._renderers.values():
                renderer.close()
            self._renderers.clear()
        self.sawyer.close()

    def __enter__(self) -> "MetaWorldEnv":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

# ---------------------------------------------------------------------------------------------
# 3. The scripted experts: a policy for the control loop, and demonstrations
# ---------------------------------------------------------------------------------------------


class ScriptedExpert:
    """Meta-World's hand-written policy for a task: the full observation -> an action. It reads the
    objects' and goal's positions, so it is an oracle; its gains overshoot [-1, 1] (up to ~25), and the
    action is clipped as the environment would clip it, so what a dataset records is what ran."""

    def __init__(self, task: str):
        self.policy = metaworld.policies.ENV_POLICY_MAP[task]()

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        return np.clip(self.policy.get_action(observation), -1.0, 1.0).astype(np.float32)


class MetaWorldDemonstration:
    """One scripted demonstration as sim.expert_episode records it (sim.Demonstration): each step the
    expert's action for the present observation, recorded; executed as it is or, with `noise`, with
    the hand's xyz delta perturbed (DART: the deterministic experts never leave their own path, so
    without it a policy never sees how to come back to it). The gripper is never perturbed. It ends at
    the step Meta-World reports success, or at the episode's 500 steps (then it did not succeed)."""

    def __init__(self, env: "MetaWorldEnv", seed: int, noise: float = 0.0):
        self.env, self.expert, self.noise = env, ScriptedExpert(env.task), noise
        self.rng = np.random.default_rng(seed)  # the noise, drawn from the episode's seed

    def act(self, t: float) -> tuple[np.ndarray, np.ndarray] | None:
        if self.env.task_done() or self.env.steps >= self.env.max_steps:
            return None
        action = self.expert(self.env.observation)
        if not self.noise:
            return action, action
        executed = action.copy()
        executed[:3] = np.clip(action[:3] + self.noise * self.rng.normal(size=3), -1.0, 1.0)
        return action, executed

    def succeeded(self) -> bool:
        return self.env.task_done()


def expert_policy(env: "MetaWorldEnv") -> tuple[Callable[[policy_io.Observation], np.ndarray], policy_io.PolicySpec]:
    """The scripted expert as a policy (observation -> chunk) for infer_async.RobotClient, and its
    PolicySpec: a check that the evaluation scores a near-perfect policy as near perfect. It is a
    feedback controller, so its chunk is one action, from the world's full observation when it runs.
    It asks for no camera: it never looks, and rendering would only cost time."""
    expert = ScriptedExpert(env.task)

    def run(observation: policy_io.Observation) -> np.ndarray:
        return expert(env.observation)[None]

    return run, policy_io.PolicySpec(cameras={}, state_dim=4, action_dim=4, chunk_size=1, n_action_steps=1,
                                     state_names=STATE_NAMES, action_names=ACTION_NAMES)
