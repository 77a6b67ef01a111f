"""What a policy is to the robot side: the feature keys, an observation, a policy's description
(`PolicySpec`), and a checkpoint loaded as a function observation -> chunk of actions.

Both ends of remote mode need these (remote.py's robot client and its server), as do the local
control loop (infer_async.py), the simulator's evaluation (sim.py) and the demo. The robot computer in
remote mode needs neither torch nor the model code: this module imports them only when a policy is
loaded (tests check it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cli import UserError

# LeRobot's feature names, as flow.STATE, flow.ACTION and flow.IMAGE_PREFIX spell them and a checkpoint's
# config.json names its features: spelled out, as importing flow would import torch.
STATE = "observation.state"
ACTION = "action"
IMAGE_PREFIX = "observation.images."
DEMO_POLICY = "outputs/demo/checkpoints/last/pretrained_model"  # written by `python train.py`
DEFAULT_FPS = 30.0  # real SO-100 datasets; a policy trained here records its dataset's beside it
DATASET_INFO = "train_dataset.json"  # written by train.py beside a policy: its dataset and that dataset's fps


@dataclass
class Observation:
    timestep: int  # the timestep of the next action the robot executes
    state: np.ndarray  # float32 (state_dim,): joints in degrees, gripper in percent
    images: dict[str, np.ndarray]  # policy camera key -> uint8 (H, W, 3) RGB
    task: str
    must_go: bool = False  # sent with an empty queue: never skipped
    captured_at: float = 0.0  # clock() when captured
    # --rtc (latency-tolerant execution): the plan the new chunk must continue. left_over: float32
    # (n, action_dim), robot units, the queued actions for timesteps timestep, timestep + 1, ...;
    # inference_delay d: how many of them the robot will have executed when the chunk arrives
    # (they are committed). None and 0 otherwise: the plain chunk.
    left_over: np.ndarray | None = None
    inference_delay: int = 0


@dataclass
class PolicySpec:
    """What the robot side needs to know about a policy (sent by the server in remote mode).

    The names and means describe the policy's training data, for checking that it fits the arm:
    names only when the checkpoint records them ("names" of its state/action features; LeRobot's
    checkpoints do not), means when it carries normalisation stats."""
    cameras: dict[str, tuple[int, int]]  # camera key -> (height, width) the policy was trained on
    state_dim: int
    action_dim: int
    chunk_size: int
    n_action_steps: int
    state_names: list[str] | None = None
    action_names: list[str] | None = None
    state_mean: list[float] | None = None  # robot units
    action_mean: list[float] | None = None
    # How the policy was trained for delayed execution (flow.SmolVLAConfig; 0: not at all).
    # rtc_prefix_max: training-time real-time chunking, the longest committed prefix it takes;
    # future_state_max_offset: the largest offset in frames between its images and the state it plans from.
    rtc_prefix_max: int = 0
    future_state_max_offset: int = 0


def chunk_offset(future_state_max_offset: int, inference_delay: int) -> int:
    """Timesteps from an --rtc observation's timestep T to its chunk's first action. A policy trained on
    future states plans from the state the arm will be in when the chunk starts, T + d: the offset
    is d, held to the largest it was trained on (the chunk then starts d - offset actions early and
    those, committed, are discarded). Any other policy plans from the state at capture: 0. Both ends
    of remote mode compute it from the spec, so they agree where a chunk lands."""
    return min(max(inference_delay, 0), max(future_state_max_offset, 0))

# ---------------------------------------------------------------------------------------------
# A checkpoint (flow.SmolVLA) as a function observation -> chunk
# ---------------------------------------------------------------------------------------------


# --fast's values on the command lines (bare --fast is "auto"): flow.FAST_MODES spelt out here, since in
# remote mode the robot computer parses --fast without importing torch (a test keeps the two equal).
FAST_CHOICES = ("auto", "int8", "int8+bf16", "bf16", "fp32")


def load_policy(policy: str, vlm: str | None = None, device: str | None = None, fast: bool | str = False):
    """flow.SmolVLA from a Hub id or directory (fast: a CPU speed mode, True for the one chosen for
    this CPU or a flow.FAST_MODES name; see SmolVLA.make_fast). Imported here: in remote
    mode the robot computer needs neither torch nor the model code."""
    from flow import SmolVLA

    if fast and device not in (None, "cpu"):
        raise UserError(f"--fast is a CPU mode; it cannot run on --device {device}")
    try:
        return SmolVLA.from_pretrained(policy, vlm=vlm, device="cpu" if fast else device, fast=fast)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot load the policy {policy}: {err}") from err


def recorded_fps(policy_dir: str | Path) -> float | None:
    """The frame rate of the dataset a policy was trained on, when train.py recorded it (a policy
    runs at the rate of its data: each action is one frame's step)."""
    try:
        return float(json.loads((Path(policy_dir) / DATASET_INFO).read_text())["fps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def control_rate(policy_dir: str | Path | None, given: float | None = None, default: float = DEFAULT_FPS) -> float:
    """The control ticks per second to run a policy at: `given` (--fps) when set, else the frame rate
    recorded beside the policy, else `default`. A remote policy (None) has no files the robot sees."""
    if given:
        return float(given)
    return (recorded_fps(policy_dir) if policy_dir is not None else None) or default


def warm_up(policy_fn: Callable[[Observation], np.ndarray], spec: PolicySpec) -> None:
    """One inference on a blank observation: the first call is several times slower (memory
    allocation, kernel selection), and would otherwise stall the start of the run."""
    images = {key: np.zeros((height, width, 3), np.uint8) for key, (height, width) in spec.cameras.items()}
    policy_fn(Observation(0, np.zeros(spec.state_dim, np.float32), images, ""))


def feature_names(feature: dict) -> list[str] | None:
    """The "names" of a state/action feature: a list, or LeRobot v2's {"motors": [...]}; None if absent."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    return [str(n) for n in names] if isinstance(names, list) else None


def policy_spec(policy) -> PolicySpec:
    """Camera keys as the robot names them: a policy whose preprocessor renames data cameras onto
    its slots (e.g. top -> camera1) expects the data names."""
    data_name = {slot: name for name, slot in getattr(policy, "rename_map", {}).items()}
    features, action = policy.config.input_features, policy.config.output_features[ACTION]
    cameras = {data_name.get(k, k): tuple(int(s) for s in features[k]["shape"][1:]) for k in policy.camera_keys}
    stats = policy.normalizer.stats

    def mean(key: str) -> list[float] | None:
        return [float(v) for v in stats[key]["mean"].flatten()] if "mean" in stats.get(key, {}) else None

    return PolicySpec(cameras, int(features[STATE]["shape"][0]), int(action["shape"][0]),
                      int(policy.config.chunk_size), int(policy.config.n_action_steps),
                      feature_names(features[STATE]), feature_names(action), mean(STATE), mean(ACTION),
                      *delayed_execution(policy.config))


def delayed_execution(config) -> tuple[int, int]:
    """(rtc_prefix_max, future_state_max_offset) of a policy's config; 0 for a config that predates them."""
    return int(getattr(config, "rtc_prefix_max", 0)), int(getattr(config, "future_state_max_offset", 0))


def make_policy_fn(policy) -> Callable[[Observation], np.ndarray]:
    """observation -> chunk (chunk_size, action_dim) in robot units, running flow.SmolVLA. An --rtc
    observation's plan is given to predict_chunk as continuation() says."""
    import torch

    from flow import RealTimeChunking

    prefix_max, offset_max = delayed_execution(policy.config)

    def run(observation: Observation) -> np.ndarray:
        # torch.tensor copies: arrays received over the wire are read-only views of the message.
        batch = {key: torch.tensor(image).permute(2, 0, 1)[None].float() / 255
                 for key, image in observation.images.items()}
        batch[STATE] = torch.tensor(observation.state, dtype=torch.float32)[None]
        batch["task"] = [observation.task]
        given = continuation(observation, prefix_max, offset_max)
        if "prefix_actions" in given:
            kwargs = {"prefix_actions": torch.tensor(given["prefix_actions"])[None]}
        elif "left_over" in given:
            horizon = max(RealTimeChunking.execution_horizon, given["inference_delay"])
            kwargs = {"rtc": RealTimeChunking(torch.tensor(given["left_over"])[None], given["inference_delay"],
                                              execution_horizon=horizon)}
        else:
            kwargs = {}
        return policy.predict_chunk(batch, **kwargs)[0].float().cpu().numpy()

    return run


def seed_flow_noise(seed: int) -> None:
    """Seed the generator a policy in this process draws its flow noise from (torch's global one), so
    that an evaluation's episode sees the same draws whatever ran before it: two settings compared on
    the same scene seeds differ by the setting, not by the luck of the noise, and a run repeats. No
    policy here has drawn from torch if torch was never imported (the expert, a remote policy, whose
    server draws its own noise): nothing to seed then, and the robot side stays free of torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def continuation(observation: Observation, rtc_prefix_max: int, future_state_max_offset: int) -> dict:
    """How a chunk continues an --rtc observation's plan, by what the policy was trained for:

    - the plan is first aligned with the chunk, which starts chunk_offset() actions after the
      observation's timestep; its first d - offset actions are then committed (d: inference_delay);
    - a policy trained with training-time RTC (rtc_prefix_max > 0) is given the first
      min(committed, rtc_prefix_max) of them as its chunk's clean prefix, {"prefix_actions": (k, A)},
      and no guidance (none at all when nothing is committed);
    - any other policy is guided toward the aligned plan (inference-time RTC), {"left_over": (n, A),
      "inference_delay": committed};
    - no plan (not --rtc, or an empty queue): {}, the plain chunk.

    float32 arrays in robot units. flow.RealTimeChunking's execution horizon (LeRobot's 10) is raised to
    the committed count where that is larger: its weights hold the chunk to the plan only within the
    horizon, and every committed action must be held."""
    if observation.left_over is None or len(observation.left_over) == 0:
        return {}
    offset = chunk_offset(future_state_max_offset, observation.inference_delay)
    plan = np.asarray(observation.left_over, np.float32)[offset:]
    committed = min(max(observation.inference_delay - offset, 0), len(plan))
    if rtc_prefix_max > 0:
        k = min(committed, rtc_prefix_max)
        return {"prefix_actions": plan[:k]} if k > 0 else {}
    return {"left_over": plan, "inference_delay": committed} if len(plan) else {}


def prepare_policy(path: str, vlm: str | None = None, device: str | None = None,
                   fast: bool | str = False) -> tuple[object, Callable[[Observation], np.ndarray], PolicySpec]:
    """(policy, policy_fn, spec) for a control loop: loaded, and warmed up by one inference."""
    policy = load_policy(path, vlm, device, fast)
    spec, policy_fn = policy_spec(policy), make_policy_fn(policy)
    warm_up(policy_fn, spec)
    return policy, policy_fn, spec
