"""infer_async.py and policy_io.py: queue arithmetic by hand, the control loop on the simulated servo bus
with stand-in policies of controlled latency, the command line (its checks, the start's order, a
simulated rig, Ctrl-C and SIGTERM), PyAV capture, and the real tiny SmolVLA. remote.py's wire format
is tests/test_remote.py; the MuJoCo rig behind `python sim.py live` is exercised here end to end.

Timing-based checks use margins of several times the latency, so a loaded machine cannot flip them.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import infer_async as ia
import policy_io
import remote
import so100
from policy_io import FAST_CHOICES, Observation, PolicySpec
from sim_bus import SimulatedBus

ROOT = Path(__file__).resolve().parents[1]
TINY_POLICY, TINY_VLM = ROOT / "tests/fixtures/tiny/policy", ROOT / "tests/fixtures/tiny/vlm"
TOP, WRIST = "observation.images.top", "observation.images.wrist"  # LeRobot's names for the cameras

# ---------------------------------------------------------------------------------------------
# Aggregation and the action queue (values computed by hand)


def test_aggregation_functions_hand_computed():
    old, new = np.array([1.0, 10.0]), np.array([3.0, 20.0])
    assert np.allclose(ia.aggregate_weighted(old, new), [2.4, 17.0])  # 0.3 old + 0.7 new
    assert np.allclose(ia.aggregate_latest(old, new), [3.0, 20.0])
    assert np.allclose(ia.aggregate_average(old, new), [2.0, 15.0])


def queue_after_five_of_ten_ones(aggregate: str) -> ia.ActionQueue:
    """A queue whose first chunk (ten actions of 1.0, timesteps 0-9) has had 0-4 executed."""
    queue = ia.ActionQueue(ia.AGGREGATES[aggregate])
    queue.merge(0, np.ones((10, 1)))
    assert [queue.pop()[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    return queue


@pytest.mark.parametrize("aggregate, overlap", [
    ("weighted", [21.3, 28.3, 35.3, 42.3, 49.3]),  # 0.3 x 1 (queued) + 0.7 x 30..70 (new)
    ("latest", [30, 40, 50, 60, 70]),
    ("average", [15.5, 20.5, 25.5, 30.5, 35.5]),
])
def test_overlapping_chunk_drops_stale_blends_overlap_appends_rest(aggregate, overlap):
    queue = queue_after_five_of_ten_ones(aggregate)
    # A chunk computed from the observation stamped 3: its actions are for timesteps 3..12.
    stale = queue.merge(3, np.arange(10, 110, 10, dtype=float)[:, None])
    assert stale == 2  # timesteps 3 and 4 were executed while it was computed
    assert len(queue) == 8  # 5..12
    popped = [queue.pop() for _ in range(8)]
    assert [t for t, _ in popped] == list(range(5, 13))
    assert np.allclose([a[0] for _, a in popped], overlap + [80, 90, 100])
    assert queue.pop() is None


def test_chunk_entirely_in_the_past_is_dropped():
    queue = queue_after_five_of_ten_ones("weighted")
    assert queue.merge(0, np.full((4, 1), 7.0)) == 4
    assert [queue.pop()[1][0] for _ in range(5)] == [1.0] * 5


def test_ease_in_from_the_held_pose_when_the_queue_is_empty():
    queue = ia.ActionQueue(ia.aggregate_latest, ease_in=3)
    queue.hold(np.array([0.0]))
    queue.merge(0, np.full((5, 1), 10.0))
    # weights (k+1)/4 for k = 0, 1, 2, then the chunk itself
    assert [queue.pop()[1][0] for _ in range(5)] == pytest.approx([2.5, 5.0, 7.5, 10.0, 10.0])


def test_ease_in_crossfades_from_the_previous_plan_held_at_its_end():
    queue = ia.ActionQueue(ia.aggregate_latest, ease_in=3)
    queue.merge(0, np.zeros((2, 1)))  # the old plan: 0, 0 at timesteps 0, 1 (no pose held: no ease)
    queue.merge(0, np.full((5, 1), 8.0))
    # k=0: 0.75*0 + 0.25*8; k=1: 0.5*0 + 0.5*8; k=2: beyond the old plan, its last action (0) held
    assert [queue.pop()[1][0] for _ in range(5)] == pytest.approx([2.0, 4.0, 6.0, 8.0, 8.0])


# ---------------------------------------------------------------------------------------------
# Metrics (values computed by hand)


def test_latency_statistics_and_summary_by_hand():
    metrics = ia.Metrics(chunk_size=10)
    metrics.latencies = [(float(t), ms / 1000) for t, ms in enumerate([7, 1, 20, 3, 2, 4, 5, 6, 8, 9, 10, 11, 12,
                                                                       13, 14, 15, 16, 17, 18, 19])]
    metrics.queue_sizes = [(0.0, 0), (0.5, 10), (1.0, 8), (1.5, 6)]
    # 1..20 ms: mean 10.5; p95 with linear interpolation between sorted values: position 0.95 x 19 =
    # 18.05, i.e. 19 + 0.05 x (20 - 19) = 19.05; max 20.
    stats = metrics.latency_stats_ms()
    assert stats == pytest.approx({"mean": 10.5, "p95": 19.05, "max": 20.0})
    summary = metrics.summary()
    assert summary["duration_s"] == 1.5 and summary["queue_size_mean"] == 6.0  # (0 + 10 + 8 + 6) / 4
    assert "mean 10.5 ms" in metrics.report() and "max 20.0 ms" in metrics.report()
    assert ia.Metrics().latency_stats_ms() == {"mean": None, "p95": None, "max": None}


# ---------------------------------------------------------------------------------------------
# --rtc: the inference delay, the queue replaced, the observation sent, what the policy is given,
# the seam metric (values computed by hand)


@pytest.mark.parametrize("latencies, fps, chunk, delay", [
    ([], 10, 50, 0),  # nothing measured yet
    ([0.25, 0.61], 10, 50, 7),  # ceil(0.61 s / 0.1 s) = ceil(6.1)
    ([0.3], 10, 50, 3),  # exactly 3 ticks: 0.3 x 10 is 3.0000000000000004 in floats, still 3
    ([0.9, 0.1, 0.1, 0.1, 0.1, 0.1], 10, 50, 1),  # the slow one is the sixth last: out of the window of 5
    ([0.9, 0.1, 0.1, 0.1, 0.1], 10, 50, 9),  # and the fifth last is in it
    ([0.05], 30, 50, 2),  # 1.5 ticks at 30 fps
    ([5.0], 10, 10, 9),  # 50 ticks, held to chunk - 1
])
def test_rtc_inference_delay_by_hand(latencies, fps, chunk, delay):
    assert ia.inference_delay(latencies, fps, chunk - 1) == delay


def test_rtc_delay_reaches_past_a_chunk_only_for_a_policy_trained_on_future_states():
    plain = ia.PolicySpec({}, 6, 6, 10, 10)
    future = ia.PolicySpec({}, 6, 6, 10, 10, future_state_max_offset=20)
    assert ia.max_inference_delay(plain) == 9 and ia.max_inference_delay(future) == 20
    assert ia.inference_delay([1.04], 10, ia.max_inference_delay(future)) == 11


def queue_of(values, executed: int) -> ia.ActionQueue:
    """A queue holding values[t] for timesteps 0.. (one dim), the first `executed` of them executed."""
    queue = ia.ActionQueue()
    queue.merge(0, np.array(values, float)[:, None])
    assert [queue.pop()[0] for _ in range(executed)] == list(range(executed))
    return queue


def queued(queue: ia.ActionQueue) -> tuple[int, list[float]]:
    timestep, actions = queue.plan()
    return timestep, [float(a[0]) for a in actions]


def test_rtc_chunk_replaces_the_queue_after_the_committed_actions():
    # Plan 0..9 for timesteps 0..9; 0, 1, 2 executed. A chunk 100..109 computed from the observation at
    # T = 2 with d = 3 (its action i for timestep 2 + i): timestep 2 was executed meanwhile (stale),
    # 3 and 4 are committed (they stay 3, 4), from T + d = 5 on the chunk: 103..109 for 5..11.
    queue = queue_of(range(10), executed=3)
    assert queue.replace(2, np.arange(100, 110, dtype=float)[:, None], committed_until=5, source=1) == 1
    assert queued(queue) == (3, [3, 4, 103, 104, 105, 106, 107, 108, 109])
    assert queue.merged_at == 3  # the seam: 3 actions were executed when it came
    # An older request's chunk (source 0) never overwrites the newer plan: dropped whole, counted stale.
    assert queue.replace(3, np.full((10, 1), -1.0), committed_until=3, source=0) == 10
    assert queued(queue) == (3, [3, 4, 103, 104, 105, 106, 107, 108, 109])


def test_rtc_chunk_later_than_its_delay_replaces_from_the_next_action():
    # d = 1 underestimated: by the time the chunk from T = 2 comes, timesteps 0..5 are executed. Its
    # actions for 2..5 are stale (never executed late), the rest replaces the queue from 6 on.
    queue = queue_of(range(10), executed=6)
    assert queue.replace(2, np.arange(100, 110, dtype=float)[:, None], committed_until=3, source=1) == 4
    assert queued(queue) == (6, [104, 105, 106, 107, 108, 109])


def test_rtc_chunk_fills_what_a_short_queue_lacks_before_the_delay():
    # Only timesteps 0, 1 were queued and 0 executed; d = 4 from T = 1 would leave 2, 3 empty: the chunk
    # fills them, and the committed action 1 stays.
    queue = queue_of([0, 1], executed=1)
    assert queue.replace(1, np.arange(100, 106, dtype=float)[:, None], committed_until=5, source=1) == 0
    assert queued(queue) == (1, [1, 101, 102, 103, 104, 105])


class HeldArm:
    """A robot that reports one state and remembers its goals (no bus: the tests below drive the
    client by hand, tick by tick)."""

    def __init__(self, state):
        self.state, self.goals = np.asarray(state, np.float32), []

    def read(self):
        return self.state

    def write(self, goal):
        self.goals.append(np.array(goal))


def rtc_client(spec: PolicySpec, threshold: float = 0.7) -> tuple[ia.RobotClient, list[Observation]]:
    """An --rtc client at 10 fps whose policy thread is never started: the observations it would send
    are collected, and the test hands the client chunks itself (policy_thread.on_chunk)."""
    config = ia.ClientConfig(fps=10, threshold=threshold, rtc=True, similarity=0.0)
    client = ia.RobotClient(HeldArm([7.0] * 6), {}, lambda obs: None, spec, "task", config)
    sent: list[Observation] = []
    client.policy_thread.submit = sent.append
    return client, sent


def chunk_of(first: float, chunk: int = 10) -> np.ndarray:
    """(chunk, 6): action i is first + i in every dim."""
    return first + np.repeat(np.arange(chunk, dtype=float)[:, None], 6, axis=1)


@pytest.mark.parametrize("future_state_max_offset", [0, 5])
def test_rtc_observation_carries_the_plan_and_the_delay_and_the_chunk_lands_after_it(future_state_max_offset):
    spec = spec_with(future_state_max_offset=future_state_max_offset)
    client, _ = rtc_client(spec)
    first = client.capture(must_go=True)  # the empty queue, no latency known yet
    assert first.timestep == 0 and first.left_over.shape == (0, 6) and first.inference_delay == 0
    assert np.array_equal(first.state, [7.0] * 6)  # offset 0: the present state, even for future states
    client.policy_thread.on_chunk(0, chunk_of(0), 0.25)  # 0.25 s at 10 fps: d = 3 from now on
    assert client.delay == 3 and client.metrics.merges == [0]
    for _ in range(4):
        client.tick()  # executes 0, 1, 2, 3
    observation = client.capture(must_go=False)
    assert observation.timestep == 4 and observation.inference_delay == 3
    assert observation.left_over.dtype == np.float32 and np.array_equal(observation.left_over, chunk_of(4, 6))
    # A policy trained on future states plans from the present state (7) moved as the plan moves it
    # until T + d - 1 = 6 (action 6 - action 4 = 2); its chunk is meant for 7.. . Any other policy plans
    # from the present state; its chunk is for 4..
    future = future_state_max_offset > 0
    assert np.array_equal(observation.state, [9.0] * 6 if future else [7.0] * 6)
    client.policy_thread.on_chunk(4, chunk_of(100), 0.25)
    timestep, actions = client.queue.plan()
    # 4, 5, 6 committed (no action executed meanwhile), then the new chunk from timestep 7
    expected = [4, 5, 6] + (list(range(100, 110)) if future else list(range(103, 110)))
    assert timestep == 4 and [a[0] for a in actions] == expected
    assert client.metrics.stale_actions_dropped == 0 and client.metrics.merges == [0, 4]


def test_rtc_sends_an_observation_when_the_queue_is_down_to_the_delay():
    """g = 0.2 of a 10-action chunk asks at 2 actions left; with d = 4, --rtc asks at d + 1 = 5 already."""
    client, sent = rtc_client(spec_with(), threshold=0.2)
    client.capture(must_go=True)
    client.policy_thread.on_chunk(0, chunk_of(0), 0.35)  # d = ceil(3.5) = 4
    for _ in range(4):
        client.tick()
    assert sent == [] and len(client.queue) == 6
    client.tick()
    assert [o.timestep for o in sent] == [5] and sent[0].inference_delay == 4
    assert np.array_equal(sent[0].left_over, chunk_of(5, 5))


def test_rtc_never_skips_an_observation_as_similar():
    """The arm stands still (the same state every time), the default similarity of 1 degree would skip
    the second observation in async; under --rtc each one carries a new plan and delay and is processed."""
    calls = []
    for rtc in (False, True):
        client = ia.RobotClient(HeldArm([7.0] * 6), {}, lambda obs: calls.append(rtc) or chunk_of(0), spec_with(),
                                "task", ia.ClientConfig(fps=10, rtc=rtc, similarity=1.0))
        for must_go in (True, False):
            client.policy_thread._process(client.capture(must_go=must_go))
        assert client.metrics.observations_skipped == (0 if rtc else 1)
    assert calls == [False, True, True]


def test_rtc_and_sync_exclude_each_other():
    with pytest.raises(ia.InferError, match="--rtc and --sync exclude each other"):
        ia.RobotClient(HeldArm([0.0] * 6), {}, lambda obs: None, spec_with(), "task",
                       ia.ClientConfig(sync=True, rtc=True))


class RecordingPolicy:
    """A stand-in for flow.SmolVLA: a config, and predict_chunk recording what it was given."""

    def __init__(self, **config):
        self.config, self.calls = SimpleNamespace(**config), []

    def predict_chunk(self, batch, **kwargs):
        import torch

        self.calls.append(kwargs)
        return torch.zeros(1, 10, 6)


def plan_observation(n: int, delay: int) -> Observation:
    """An --rtc observation at timestep 20 whose plan is 20, 21, ... (every dim)."""
    return Observation(20, np.zeros(6, np.float32), {}, "task", left_over=chunk_of(20, n).astype(np.float32),
                       inference_delay=delay)


@pytest.mark.parametrize("config, n, delay, expected", [
    ({}, 8, 3, ("guidance", 20, 3, 10)),  # a config before these fields: guidance, LeRobot's horizon 10
    ({"rtc_prefix_max": 0, "future_state_max_offset": 0}, 8, 0, ("guidance", 20, 0, 10)),
    ({}, 14, 12, ("guidance", 20, 12, 12)),  # the horizon covers every committed action
    ({"rtc_prefix_max": 2}, 8, 3, ("prefix", 20, 2)),  # min(d, 2) committed actions as the prefix
    ({"rtc_prefix_max": 5}, 8, 3, ("prefix", 20, 3)),
    ({"rtc_prefix_max": 5}, 8, 0, ("neither",)),  # nothing committed; no guidance for a prefix policy
    ({"future_state_max_offset": 5}, 8, 3, ("guidance", 23, 0, 10)),  # the chunk starts at T + 3
    ({"future_state_max_offset": 2}, 8, 3, ("guidance", 22, 1, 10)),  # offset held to 2: one committed
    ({"future_state_max_offset": 2, "rtc_prefix_max": 4}, 8, 3, ("prefix", 22, 1)),
    ({}, 0, 0, ("neither",)),  # an empty queue
])
def test_make_policy_fn_gives_guidance_prefix_or_neither_by_what_the_policy_was_trained_for(config, n, delay, expected):
    policy = RecordingPolicy(**config)
    policy_io.make_policy_fn(policy)(plan_observation(n, delay))
    kwargs = policy.calls[0]
    if expected[0] == "neither":
        assert kwargs == {}
    elif expected[0] == "prefix":
        _, start, k = expected
        assert set(kwargs) == {"prefix_actions"}
        assert np.array_equal(kwargs["prefix_actions"].numpy(), chunk_of(start, k)[None])
    else:
        _, start, committed, horizon = expected
        rtc = kwargs["rtc"]
        assert set(kwargs) == {"rtc"} and (rtc.inference_delay, rtc.execution_horizon) == (committed, horizon)
        assert np.array_equal(rtc.prev_chunk_left_over.numpy(), chunk_of(start, n - (start - 20))[None])


def test_a_plain_observation_gets_the_plain_chunk():
    policy = RecordingPolicy(rtc_prefix_max=3, future_state_max_offset=3)
    policy_io.make_policy_fn(policy)(observation([0.0] * 6, 5))  # async and sync send no plan
    assert policy.calls == [{}]


def test_the_spec_reads_delayed_execution_from_the_config_and_zero_from_an_old_one():
    assert policy_io.delayed_execution(SimpleNamespace()) == (0, 0)
    assert policy_io.delayed_execution(SimpleNamespace(rtc_prefix_max=4, future_state_max_offset=9)) == (4, 9)


def test_seam_jerk_by_hand():
    # One joint and the gripper at 10 fps. The joint steps 3 -> 10 between actions 3 and 4 (a merge
    # after 4 executed): second differences at actions 1..8 are 0, 0, 6, -6, 0, 0, 0, 1, so the seam
    # at 4 (actions 2..6 within 2) jolts 6 x 10^2 = 600 per s^2 and the one at 8 (6..8) 1 x 100. The
    # merge at 0 (the first chunk) is no seam. The gripper's jumps (0 / 100 percent) are not a joint's.
    joint = [0, 1, 2, 3, 10, 11, 12, 13, 14, 16]
    gripper = [0, 100, 0, 100, 0, 100, 0, 100, 0, 100]
    actions = np.array([joint, gripper], float).T
    spec = spec_with(state_dim=2, action_dim=2, action_names=["elbow_flex.pos", "gripper.pos"])
    assert ia.joint_dims(spec) == [0]
    assert ia.seam_jerk(actions, [0, 4, 8], 10, ia.joint_dims(spec)) == pytest.approx([600, 100])
    assert ia.seam_jerk(actions, [4], 10)[0] > 1e4  # with the gripper: its 200-percent swings
    metrics = ia.Metrics(fps=10, joints=[0], executed=list(actions), merges=[0, 4, 8])
    assert metrics.summary()["seam_jerk"] == pytest.approx({"mean": 350, "max": 600, "seams": 2})
    assert ia.joint_dims(spec_with()) == [0, 1, 2, 3, 4]  # no names, 6 values: the SO-100, gripper last
    assert ia.joint_dims(spec_with(state_dim=3, action_dim=3)) == [0, 1, 2]
    assert ia.Metrics().summary()["seam_jerk"] == {"mean": None, "max": None, "seams": 0}


# ---------------------------------------------------------------------------------------------
# The policy thread: similarity skipping, errors

SPEC_1 = PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=4, n_action_steps=4)


def observation(state, timestep=0, must_go=False) -> Observation:
    return Observation(timestep, np.asarray(state, np.float32), {}, "task", must_go, time.monotonic())


def run_policy_thread(observations, similarity, policy_fn=None):
    calls, chunks = [], []
    metrics = ia.Metrics()
    fn = policy_fn or (lambda obs: calls.append(obs.state.copy()) or np.zeros((4, 6)))
    thread = ia.PolicyThread(fn, SPEC_1, lambda t, c, lat: chunks.append(t), metrics, similarity)
    thread.start()
    try:
        for obs in observations:
            thread.submit(obs)
            deadline = time.monotonic() + 10
            while thread.busy and time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        thread.stop()
    return calls, chunks, metrics, thread


def test_similar_observation_skipped_unless_must_go():
    zero = [0.0] * 6
    near = [0.5, 0, 0, 0, -0.9, 0]  # every joint within 1 degree of the last processed
    far = [0, 0, 1.5, 0, 0, 0]  # one joint 1.5 degrees away
    calls, chunks, metrics, _ = run_policy_thread(
        [observation(zero, 0), observation(near, 1), observation(near, 2, must_go=True), observation(far, 3)],
        similarity=1.0)
    assert len(calls) == 3 and all(np.allclose(c, e) for c, e in zip(calls, [zero, near, far]))
    assert chunks == [0, 2, 3]
    assert metrics.observations_skipped == 1


def test_similarity_zero_never_skips():
    calls, _, metrics, _ = run_policy_thread([observation([0.0] * 6, t) for t in range(3)], similarity=0.0)
    assert len(calls) == 3 and metrics.observations_skipped == 0


@pytest.mark.parametrize("bad_chunk, message", [
    (np.array([[0.0] * 6, [np.nan] + [0.0] * 5]), "non-finite"),
    (np.zeros((4, 5)), "shape"),
])
def test_unusable_chunk_is_a_policy_error(bad_chunk, message):
    _, chunks, _, thread = run_policy_thread([observation([0.0] * 6)], 0.0, policy_fn=lambda obs: bad_chunk)
    assert chunks == []
    assert isinstance(thread.error, ia.PolicyError) and message in str(thread.error)


# ---------------------------------------------------------------------------------------------
# The control loop on the simulated arm with stand-in policies


class StillCamera:
    """A camera that always shows the same frame (infer_async's camera interface)."""

    def __init__(self, frame: np.ndarray):
        self.frame = frame

    def read(self) -> np.ndarray:
        return self.frame

    def close(self) -> None:
        pass


class RecordingArm:
    """An SO100 that remembers every goal asked of it (before its clipping) and what it sent."""

    def __init__(self, robot: so100.SO100):
        self.robot, self.asked, self.sent, self.reads = robot, [], [], []
        self.torque_offs = 0

    def read(self):
        state = self.robot.read()
        self.reads.append(state.copy())
        return state

    def write(self, goal):
        self.asked.append(np.array(goal, dtype=float))
        sent = self.robot.write(goal)
        self.sent.append(sent)
        return sent

    def torque_off(self):
        self.torque_offs += 1
        self.robot.torque_off()


@pytest.fixture
def sim_arm():
    with SimulatedBus() as sim:
        with so100.SO100(sim.port, calibration=sim.calibration) as robot:
            yield RecordingArm(robot), sim


def trajectory(start: np.ndarray, length: int) -> np.ndarray:
    """A smooth reach from the start pose: timestep t -> 6 joint goals (degrees, gripper percent)."""
    t = np.arange(length)[:, None]
    return start[None, :] + np.array([20, -10, 15, 5, 10, 20]) * np.sin(t / 40.0)


def stand_in_policy(plan: np.ndarray, chunk_size: int, latency: float):
    """Returns plan[timestep : timestep + chunk] after `latency` seconds (the rest of the plan held)."""
    def policy(obs: Observation) -> np.ndarray:
        time.sleep(latency)
        index = np.minimum(np.arange(obs.timestep, obs.timestep + chunk_size), len(plan) - 1)
        return plan[index]
    return policy


def run_loop(arm, actions: int, latency: float, threshold: float, sync: bool = False, chunk: int = 20,
             fps: float = 100.0, aggregate: str = "latest"):
    plan = trajectory(arm.robot.read().astype(float), actions + chunk)
    spec = PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=chunk, n_action_steps=chunk)
    config = ia.ClientConfig(fps=fps, threshold=threshold, aggregate=aggregate, ease_in=0, similarity=0.0, sync=sync)
    client = ia.RobotClient(arm, {}, stand_in_policy(plan, chunk, latency), spec, "task", config)
    metrics = client.run(max_actions=actions, duration=60)
    return metrics, plan


def test_queue_never_empties_when_g_covers_the_latency(sim_arm):
    arm, _ = sim_arm
    # latency 20 ms = 2 ticks at 100 Hz; g >= 0.02 / (20 * 0.01) = 0.1. With g = 0.7 an observation
    # goes out with 14 actions (140 ms) left: seven times the latency.
    metrics, plan = run_loop(arm, actions=300, latency=0.02, threshold=0.7)
    assert metrics.actions_executed == 300
    assert metrics.idle_ticks == 0
    assert min(n for _, n in metrics.queue_sizes[metrics.startup_ticks:]) > 0
    assert metrics.ticks == 300 + metrics.startup_ticks
    assert metrics.chunks_received >= 300 // 20
    # Stale actions were dropped by timestep: the arm got exactly the plan, in order, no repeats.
    assert metrics.stale_actions_dropped > 0
    assert np.allclose(np.array(arm.asked), plan[:300])


def test_idle_ticks_appear_and_are_counted_when_g_is_too_small(sim_arm):
    arm, _ = sim_arm
    # latency 80 ms = 8 ticks > g * chunk = 0.1 * 20 = 2 ticks of actions left at each request.
    metrics, plan = run_loop(arm, actions=100, latency=0.08, threshold=0.1)
    assert metrics.actions_executed == 100
    assert metrics.idle_ticks > 0
    empty_after_start = sum(1 for _, n in metrics.queue_sizes[metrics.startup_ticks:] if n == 0)
    assert metrics.idle_ticks <= empty_after_start  # an idle tick is a tick that found the queue empty
    assert metrics.ticks == metrics.actions_executed + metrics.idle_ticks + metrics.startup_ticks
    assert np.allclose(np.array(arm.asked), plan[:100])


def test_async_finishes_a_fixed_sequence_in_fewer_ticks_than_sync(sim_arm):
    arm, _ = sim_arm
    # 120 actions in chunks of 20, latency 60 ms (6 ticks at 100 Hz). Sync waits for every chunk
    # (6 chunks x >= 1 idle tick, ~6 each); async waits once at the start.
    sync, plan = run_loop(arm, actions=120, latency=0.06, threshold=0.7, sync=True)
    assert np.allclose(np.array(arm.asked), plan[:120])
    assert sync.chunks_received == 6 and sync.stale_actions_dropped == 0
    assert sync.idle_ticks >= 5  # at least one tick per chunk after the first
    arm.asked.clear()
    asynchronous, plan = run_loop(arm, actions=120, latency=0.06, threshold=0.7, sync=False)
    assert np.allclose(np.array(arm.asked), plan[:120])
    assert asynchronous.ticks < sync.ticks
    assert asynchronous.idle_ticks < sync.idle_ticks


def test_sync_executes_n_action_steps_per_chunk(sim_arm):
    arm, _ = sim_arm
    plan = trajectory(arm.robot.read().astype(float), 40)
    spec = PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    config = ia.ClientConfig(fps=200, sync=True, n_action_steps=4, ease_in=0, similarity=0)
    policy, stamps = stand_in_policy(plan, 10, 0.0), []
    client = ia.RobotClient(arm, {}, lambda obs: stamps.append(obs.timestep) or policy(obs), spec, "task", config)
    client.run(max_actions=12)
    assert stamps[:3] == [0, 4, 8]  # observe, execute 4 of the 10 actions, observe again
    assert np.allclose(np.array(arm.asked), plan[:12])


def sim_torque(sim) -> list[int]:
    return [servo.get("Torque_Enable") for servo in sim.servos.values()]


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_policy_failure_holds_the_arm_then_torque_off(sim_arm, failure, capsys):
    arm, sim = sim_arm
    plan = trajectory(arm.robot.read().astype(float), 200)
    calls = []

    def failing_policy(obs):
        calls.append(obs.timestep)
        if len(calls) == 3:
            if failure == "raises":
                raise RuntimeError("CUDA out of memory")
            return np.full((10, 6), np.nan)
        return plan[obs.timestep:obs.timestep + 10]

    spec = PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    client = ia.RobotClient(arm, {}, failing_policy, spec, "task", ia.ClientConfig(fps=100, ease_in=0, similarity=0))
    assert sim_torque(sim) == [1] * 6
    status = ia.drive(client, duration=30)
    assert status == 1
    message = capsys.readouterr().err
    assert ("CUDA out of memory" if failure == "raises" else "non-finite") in message
    assert "torque went off" in message
    # The last goal written is the hold: the pose read just before it. Nothing non-finite went out.
    assert np.allclose(arm.asked[-1], arm.reads[-1])
    assert all(np.all(np.isfinite(goal)) for goal in arm.asked)
    assert arm.torque_offs == 1 and sim_torque(sim) == [0] * 6
    assert len(calls) == 3


def test_duration_ends_the_run_with_the_safe_stop(sim_arm, capsys):
    arm, sim = sim_arm
    spec = PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    hold = arm.robot.read()
    client = ia.RobotClient(arm, {}, lambda obs: np.tile(hold, (10, 1)), spec, "task", ia.ClientConfig(fps=50))
    started = time.monotonic()
    assert ia.drive(client, duration=0.5) == 0
    assert time.monotonic() - started < 10
    assert client.metrics.actions_executed > 0
    assert sim_torque(sim) == [0] * 6
    assert "done" in capsys.readouterr().err


def test_client_refuses_a_policy_whose_cameras_are_missing():
    spec = PolicySpec(cameras={TOP: (48, 64)}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    with pytest.raises(ia.InferError, match="observation.images.top"):
        ia.RobotClient(object(), {}, lambda obs: None, spec, "task")


# ---------------------------------------------------------------------------------------------
# policy_io: feature keys, the control rate


def test_feature_keys_are_those_a_checkpoint_names():
    """The keys the robot side spells out (it must not import flow and torch) are the checkpoint's."""
    config = json.loads((TINY_POLICY / "config.json").read_text())
    assert policy_io.STATE in config["input_features"] and policy_io.ACTION in config["output_features"]
    assert {TOP, WRIST} <= set(config["input_features"]) and TOP.startswith(policy_io.IMAGE_PREFIX)


def test_control_rate_given_then_recorded_then_default(tmp_path):
    (tmp_path / policy_io.DATASET_INFO).write_text(json.dumps({"fps": 12.5}))
    assert policy_io.control_rate(tmp_path, 50) == 50.0  # --fps wins
    assert policy_io.control_rate(tmp_path) == 12.5  # the training data's rate, recorded by train.py
    assert policy_io.control_rate(tmp_path / "elsewhere") == 30.0  # LeRobot's checkpoints record none
    assert policy_io.control_rate(None, default=20) == 20.0  # a remote policy: no files to read


def test_the_robot_side_of_remote_mode_needs_no_torch_nor_mujoco():
    """The robot computer in remote mode runs infer_async and remote without the model or the simulator."""
    code = ("import sys, infer_async, remote; "
            "print(*(name in sys.modules for name in ('torch', 'flow', 'sim', 'mujoco')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.split() == ["False"] * 4


# ---------------------------------------------------------------------------------------------
# Does the policy fit the arm?

REST_POSE = [0.0, -20.0, 30.0, 10.0, 0.0, 40.0]  # degrees, gripper percent: a pose any SO-100 can take
SO100_NAMES = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos",
               "gripper.pos"]
LEGACY_NAMES = ["main_shoulder_pan", "main_shoulder_lift", "main_elbow_flex", "main_wrist_flex", "main_wrist_roll",
                "main_gripper"]


def spec_with(**fields) -> PolicySpec:
    return PolicySpec(**{"cameras": {}, "state_dim": 6, "action_dim": 6, "chunk_size": 10, "n_action_steps": 10,
                         **fields})


@pytest.mark.parametrize("legacy, fields", [
    (False, dict(state_names=SO100_NAMES, action_names=SO100_NAMES, state_mean=REST_POSE, action_mean=REST_POSE)),
    (False, dict(state_names=[n.removesuffix(".pos") for n in SO100_NAMES], action_names=SO100_NAMES,
                 state_mean=[-179.0, 179.0, 0, 0, 0, 100.0], action_mean=[0, 0, 0, 0, 0, 0.0])),
    # svla_so100_pickplace's legacy means; legacy shoulder_lift = 90 - lift reaches 90 + 180 = 270
    (True, dict(state_names=LEGACY_NAMES, action_names=LEGACY_NAMES,
                state_mean=[14.47, -55.77, 54.39, 63.23, 85.84, 9.35], action_mean=[0, 265.0, 265.0, 0, 0, 0])),
])
def test_a_policy_that_fits_the_arm_passes(legacy, fields):
    assert ia.check_policy_fits_arm(spec_with(**fields), legacy) == []


@pytest.mark.parametrize("legacy, fields, message", [
    (False, dict(state_dim=7), "observation.state has 7 values; the SO-100 has 6"),
    (False, dict(action_dim=14), "action has 14 values"),
    (False, dict(state_names=LEGACY_NAMES), "are `main_*`: it was trained in legacy SO-100 units; add --legacy"),
    (True, dict(action_names=SO100_NAMES), "not legacy `main_*` ones: drop --legacy"),
    (False, dict(state_names=SO100_NAMES[1:] + SO100_NAMES[:1]), "not the SO-100's joints in its order"),
    (False, dict(action_names=["x", "y", "z", "roll", "pitch", "yaw"]), "not the SO-100's joints"),
    (False, dict(state_names=LEGACY_NAMES[:3] + SO100_NAMES[3:]), "mix legacy"),
    (False, dict(state_mean=[2047.5] * 6), "mean for shoulder_pan is 2047.5, outside the -180..180"),  # raw steps
    (False, dict(action_mean=REST_POSE[:5] + [-3.3]), "mean for gripper is -3.3, outside the 0..100"),
    (True, dict(state_mean=[0.0, -95.0, 90, 0, 0, 50]), "mean for shoulder_lift is -95.0, outside the -90..270"),
])
def test_a_policy_that_does_not_fit_the_arm_is_refused(legacy, fields, message):
    with pytest.raises(ia.InferError, match=re.escape(message)):
        ia.check_policy_fits_arm(spec_with(**fields), legacy)


def test_what_a_checkpoint_does_not_record_is_reported_unchecked():
    assert ia.check_policy_fits_arm(spec_with(state_mean=REST_POSE, action_mean=REST_POSE), False) == [
        "observation.state names", "action names"]
    assert ia.check_policy_fits_arm(spec_with(), False) == [
        "observation.state names", "observation.state units", "action names", "action units"]


# ---------------------------------------------------------------------------------------------
# The command line: its checks, and a simulated rig (what `python sim.py live` passes run_client)


class BusRig:
    """An ia.SimulatedRig without physics: sim_bus's servos moving toward their goals, cameras showing
    one frame, the wall clock. run_client's side of the simulator, without MuJoCo."""
    default_task = "Stack the blocks."
    outcome_line = "rig: the run is over"

    def __init__(self):
        self.bus = SimulatedBus()
        self.closed, self.ticks_judged = False, 0

    def open_bus(self) -> tuple[str, dict]:
        self.bus.start()
        return self.bus.port, self.bus.calibration

    def cameras_for(self, spec: PolicySpec) -> dict:
        return {key: StillCamera(np.full((*size, 3), 128, np.uint8)) for key, size in spec.cameras.items()}

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def task_done(self) -> bool:
        self.ticks_judged += 1
        return False

    def outcome(self) -> str:
        return self.outcome_line

    def close(self) -> None:
        self.bus.stop()
        self.closed = True


def run_on_rig(argv: list[str], rig: BusRig | None = None) -> int:
    return ia.run_client(ia.build_parser(prog="sim.py live").parse_args(argv), rig or BusRig())


@pytest.mark.parametrize("simulated, argv, message", [
    (False, ["--policy", "p", "--task", "t"], "--port"),
    (False, ["--port", "/dev/x", "--server", "h:1", "--policy", "p", "--task", "t"], "exclude"),
    (False, ["--port", "/dev/x", "--server", "nohostport", "--task", "t"], "HOST:PORT"),
    (False, ["--sim", "--policy", "p"], "moved to `python sim.py live`"),
    (False, ["--port", "/dev/x", "--policy", "p", "--task", "t", "--rtc", "--sync"], "--rtc and --sync exclude"),
    (True, ["--rtc", "--sync"], "--rtc and --sync exclude"),  # sim.py live shares the parser
    (True, ["--policy", "p"], "--task"),  # the scene's task is the demo policy's default only
    (True, ["--server", "nohostport", "--task", "t"], "HOST:PORT"),
    (True, ["--port", "/dev/x", "--camera", "top=/dev/video0"], "--port, --camera: the simulated arm brings its own"),
])
def test_command_line_errors_are_clear(simulated, argv, message, capsys):
    assert (run_on_rig(argv) if simulated else ia.main(argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, flag, allowed", [
    (["--duration", "-1"], "--duration", "> 0"),
    (["--duration", "0"], "--duration", "> 0"),
    (["--duration", "nan"], "--duration", "> 0"),
    (["--fps", "0"], "--fps", "> 0"),
    (["--threshold", "1.5"], "--threshold", "a number from 0 to 1"),
    (["--threshold", "-0.1"], "--threshold", "a number from 0 to 1"),
    (["--ease-in", "-1"], "--ease-in", "integer >= 0"),
    (["--ease-in", "1.5"], "--ease-in", "integer >= 0"),
    (["--similarity", "-1"], "--similarity", ">= 0"),
    (["--n-action-steps", "0"], "--n-action-steps", "integer >= 1"),
    (["--camera-timeout", "0"], "--camera-timeout", "> 0"),
    (["--max-relative-target", "-5"], "--max-relative-target", "> 0"),
    (["serve", "--policy", "p", "--listen", "70000"], "--listen", "an integer from 0 to 65535"),
    (["serve", "--policy", "p", "--max-message-mb", "0"], "--max-message-mb", "> 0"),
])
def test_a_numeric_flag_out_of_range_is_one_line_and_exit_2(argv, flag, allowed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if argv[0] != "serve":
        argv = ["--port", str(tmp_path / "no_arm"), "--policy", "p", "--task", "t", *argv]
    with pytest.raises(SystemExit) as exit_:
        ia.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: expected" in err and allowed in err and repr(argv[-1]) in err


def test_a_real_port_never_falls_back_to_the_demo_policy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / policy_io.DEMO_POLICY  # a demo checkpoint that the simulator would run
    shutil.copytree(TINY_POLICY, demo)
    loaded = []
    monkeypatch.setattr(policy_io, "load_policy", lambda *args, **kwargs: loaded.append(args))
    assert ia.main(["--port", "/dev/ttyACM0", "--task", "pick"]) == 2
    assert "give --policy (or --server); the demo policy runs only in the simulator" in capsys.readouterr().err
    assert loaded == []


def test_the_simulator_without_the_demo_checkpoint_says_to_train_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rig = BusRig()
    assert run_on_rig(["--quiet"], rig) == 2
    assert "python train.py" in capsys.readouterr().err
    assert rig.closed


def test_the_simulator_runs_the_demo_policy_on_the_scene_task_at_its_recorded_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / policy_io.DEMO_POLICY
    demo.mkdir(parents=True)
    (demo / policy_io.DATASET_INFO).write_text(json.dumps({"fps": 25}))
    spec = spec_with(cameras={TOP: (6, 8)}, state_mean=REST_POSE, action_mean=REST_POSE)
    loaded, seen = [], []

    def prepare_policy(path, vlm, device, fast):  # a stand-in for the slow load: holds the pose it sees
        loaded.append(path)
        return SimpleNamespace(device="cpu"), lambda obs: seen.append(obs) or np.tile(obs.state, (10, 1)), spec

    monkeypatch.setattr(ia, "prepare_policy", prepare_policy)
    rig, metrics_path = BusRig(), tmp_path / "m.json"
    assert run_on_rig(["--duration", "0.5", "--quiet", "--metrics-json", str(metrics_path)], rig) == 0
    assert loaded == [policy_io.DEMO_POLICY]
    assert seen and {obs.task for obs in seen} == {BusRig.default_task}
    assert seen[0].images[TOP].shape == (6, 8, 3) and np.all(seen[0].images[TOP] == 128)  # the rig's camera
    metrics = json.loads(metrics_path.read_text())
    assert metrics["fps"] == 25 and metrics["actions_executed"] > 0
    assert rig.ticks_judged == metrics["ticks"]  # its task judged once a tick
    err = capsys.readouterr().err
    assert f"{BusRig.outcome_line}\n" in err and "torque went off" in err
    assert rig.closed


@pytest.fixture
def no_calibration(tmp_path, monkeypatch):
    """LeRobot's calibration directory, empty."""
    for var in ("HF_LEROBOT_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "calibration"))


@pytest.fixture
def policy_loads(monkeypatch):
    """Records each load_policy call (then loads as usual) and every torque_on of an arm."""
    calls = {"load": [], "torque_on": 0}
    load, torque_on = policy_io.load_policy, so100.SO100.torque_on

    def recording_load(*args, **kwargs):
        calls["load"].append(args)
        if "on_load" in calls:
            calls.setdefault("arm_at_load", []).append(calls["on_load"]())
        return load(*args, **kwargs)

    def recording_torque_on(self):
        calls["torque_on"] += 1
        return torque_on(self)

    monkeypatch.setattr(policy_io, "load_policy", recording_load)
    monkeypatch.setattr(so100.SO100, "torque_on", recording_torque_on)
    return calls


@pytest.mark.parametrize("interruption, status, words", [
    (KeyboardInterrupt, 128 + signal.SIGINT, "interrupted"), (ia.Terminated, 128 + signal.SIGTERM, "terminated (SIGTERM)")])
def test_interrupted_while_the_policy_loads_the_arm_never_had_torque(interruption, status, words, policy_loads,
                                                                     monkeypatch, capsys):
    def prepare_policy(*args):
        raise interruption()

    monkeypatch.setattr(ia, "prepare_policy", prepare_policy)
    rig = BusRig()
    assert run_on_rig(["--policy", "p", "--task", "t"], rig) == status
    assert f"{words} before the run started; the arm did not move" in capsys.readouterr().err
    assert policy_loads["torque_on"] == 0 and rig.closed


# The order of the start: the arm (port, servos, calibration) before the slow policy load, the
# policy checked against the arm before torque goes on


def test_a_wrong_port_is_reported_before_the_calibration_and_the_policy(no_calibration, policy_loads, capsys):
    argv = ["--port", "/nonexistent/ttyACM9", "--policy", str(TINY_POLICY), "--vlm", str(TINY_VLM), "--task", "t"]
    assert ia.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: cannot open serial port /nonexistent/ttyACM9" in err and "calibration" not in err
    assert policy_loads["load"] == []


def test_a_missing_calibration_is_reported_before_the_policy_loads(no_calibration, policy_loads, capsys):
    with SimulatedBus() as sim:
        argv = ["--port", sim.port, "--policy", str(TINY_POLICY), "--vlm", str(TINY_VLM), "--task", "t"]
        assert ia.main(argv) == 2
    assert "no SO-100 calibration found" in capsys.readouterr().err
    assert policy_loads["load"] == []


def test_the_arm_is_configured_before_the_policy_loads_and_a_misfit_refused_before_torque(tmp_path, policy_loads,
                                                                                           capsys):
    policy = so100_policy(tmp_path, names=LEGACY_NAMES)  # trained on `main_*` data; the arm runs without --legacy
    with SimulatedBus() as sim:
        calibration = tmp_path / "arm.json"
        calibration.write_text(json.dumps(sim.calibration))
        # Connecting writes Return_Delay 0 over the factory 250, with torque off.
        policy_loads["on_load"] = lambda: ([sim.register(i, "Return_Delay") for i in range(1, 7)],
                                           [sim.torque_enabled(i) for i in range(1, 7)])
        argv = ["--port", sim.port, "--calibration", str(calibration), "--policy", str(policy), "--vlm", str(TINY_VLM),
                "--device", "cpu", "--task", "t", "--duration", "1", "--quiet"]
        assert ia.main(argv) == 2
        assert policy_loads["arm_at_load"] == [([0] * 6, [False] * 6)]
        assert not any(sim.torque_enabled(i) for i in range(1, 7))
    err = capsys.readouterr().err
    assert "error: the policy's observation.state names (main_shoulder_pan, ...) are `main_*`" in err
    assert "add --legacy" in err
    assert policy_loads["torque_on"] == 0


def test_a_policy_that_fits_runs_on_the_arm_once_torque_is_on(tmp_path, policy_loads, capsys):
    policy = so100_policy(tmp_path, names=LEGACY_NAMES)
    argv = ["--legacy", "--policy", str(policy), "--vlm", str(TINY_VLM), "--device", "cpu", "--task", "t",
            "--duration", "1", "--quiet"]
    assert run_on_rig(argv) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "torque went off" in err
    assert policy_loads["torque_on"] == 1


def test_ctrl_c_stops_the_loop_with_the_safe_stop(sim_arm, capsys):
    arm, sim = sim_arm
    spec = PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    hold = arm.robot.read()
    sleeps = []

    def sleep(seconds):  # Ctrl-C lands while the loop waits for its next tick, as it mostly does
        sleeps.append(seconds)
        if len(sleeps) == 40:
            raise KeyboardInterrupt
        time.sleep(seconds)

    client = ia.RobotClient(arm, {}, lambda obs: np.tile(hold, (10, 1)), spec, "task", ia.ClientConfig(fps=100),
                            sleep=sleep)
    assert ia.drive(client, duration=30) == 0
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert np.allclose(arm.asked[-1], arm.reads[-1]) and sim_torque(sim) == [0] * 6


# ---------------------------------------------------------------------------------------------
# Cameras


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "camera.fifo"
    os.mkfifo(path)
    return path


def test_pyav_camera_keeps_the_newest_frame_and_refuses_a_stale_one(fifo):
    # A FIFO stands in for the capture device: PyAV decodes raw RGB frames as they are written. The
    # camera's clock is ours: a frame's age is what the test says, however loaded the machine is.
    now = [100.0]
    opened = {}

    def device():
        opened["fd"] = fd = os.open(fifo, os.O_WRONLY)
        for value in (10, 20, 30):
            os.write(fd, np.full((24, 32, 3), value, np.uint8).tobytes())

    writer = threading.Thread(target=device)
    writer.start()
    camera = ia.Camera(TOP, str(fifo), (12, 16), input_format="rawvideo", timeout=0.5, clock=lambda: now[0],
                       options={"video_size": "32x24", "pixel_format": "rgb24", "framerate": "30"})
    try:
        camera.start(first_frame_timeout=60)
        writer.join()
        deadline = time.monotonic() + 60
        while camera.read()[0, 0, 0] != 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        frame = camera.read()
        assert frame.shape == (12, 16, 3) and frame.dtype == np.uint8 and np.all(frame == 30)
        now[0] += 0.4  # younger than the timeout: still served
        assert np.all(camera.read() == 30)
        now[0] += 0.2  # the device stalled: no frame for 0.6 s, longer than the 0.5 s timeout
        with pytest.raises(ia.CameraError, match="no frame for 0.6 s"):
            camera.read()
        os.close(opened["fd"])  # the device goes away
        deadline = time.monotonic() + 60
        while camera._error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ia.CameraError, match="ended"):
            camera.read()
    finally:
        camera.close()


def test_camera_that_cannot_open_names_the_device(tmp_path):
    with pytest.raises(ia.CameraError, match="no_such_device"):
        ia.Camera(TOP, str(tmp_path / "no_such_device"), (12, 16), input_format="rawvideo",
                  options={"video_size": "32x24", "pixel_format": "rgb24"}).start()


def test_camera_argument_names_map_to_policy_keys():
    assert ia.parse_camera("top=/dev/video0") == (TOP, "/dev/video0")
    assert ia.parse_camera("observation.images.wrist=1") == (WRIST, "1")
    with pytest.raises(ia.InferError, match="NAME=DEVICE"):
        ia.parse_camera("/dev/video0")


# ---------------------------------------------------------------------------------------------
# The real SmolVLA (tiny fixture) end to end


@pytest.fixture(scope="module")
def tiny_policy():
    return policy_io.load_policy(str(TINY_POLICY), str(TINY_VLM), "cpu")


def so100_policy(root: Path, names: list[str] | None = None) -> Path:
    """A copy of the tiny policy with normalisation means an SO-100 can take (the fixture's random
    stats put the gripper at -3.3 percent, which the client refuses), and optionally the state and
    action names recorded in its config, as a dataset's features spell them."""
    policy = root / "policy"
    shutil.copytree(TINY_POLICY, policy)
    for path in policy.glob("*normalizer_processor.safetensors"):
        tensors = load_file(path)
        tensors["observation.state.mean"] = tensors["action.mean"] = np.array(REST_POSE, np.float32)
        save_file(tensors, path)
    if names is not None:
        config = json.loads((policy / "config.json").read_text())
        config["input_features"]["observation.state"]["names"] = names
        config["output_features"]["action"]["names"] = names
        (policy / "config.json").write_text(json.dumps(config))
    return policy


@pytest.fixture(scope="module")
def arm_policy(tmp_path_factory) -> Path:
    return so100_policy(tmp_path_factory.mktemp("arm_policy"))


def test_real_smolvla_drives_the_simulated_arm(sim_arm, tiny_policy):
    arm, sim = sim_arm
    spec = policy_io.policy_spec(tiny_policy)
    assert (spec.cameras, spec.state_dim, spec.action_dim, spec.chunk_size, spec.n_action_steps) == (
        {TOP: (48, 64), WRIST: (48, 64)}, 6, 6, 10, 10)
    # The fixture records no names; its means are those of its normaliser file.
    stats = load_file(TINY_POLICY / "policy_preprocessor_step_5_normalizer_processor.safetensors")
    assert spec.state_names is None and spec.action_names is None
    assert np.allclose(spec.state_mean, stats["observation.state.mean"])
    assert np.allclose(spec.action_mean, stats["action.mean"])
    rng = np.random.default_rng(0)
    cameras = {key: StillCamera(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for key, size in spec.cameras.items()}
    client = ia.RobotClient(arm, cameras, policy_io.make_policy_fn(tiny_policy), spec, "Pick up the cube.",
                            ia.ClientConfig(fps=30))
    assert ia.drive(client, duration=60, max_actions=30) == 0
    metrics = client.metrics
    assert metrics.actions_executed == 30 and metrics.chunks_received >= 3
    # Random weights: the actions are arbitrary, but finite, and what reached the servos is clipped
    # to the calibrated range.
    low, high = so100.unit_limits(sim.calibration)
    assert all(np.all(np.isfinite(goal)) for goal in arm.asked)
    assert all(np.all(goal >= low - 1e-6) and np.all(goal <= high + 1e-6) for goal in arm.sent)
    for name, servo_id in so100.MOTOR_IDS.items():
        goal = sim.servos[servo_id].get("Goal_Position")
        assert sim.calibration[name]["range_min"] <= goal <= sim.calibration[name]["range_max"]
    assert sim_torque(sim) == [0] * 6


def test_command_line_run_on_a_rig_writes_metrics_and_plot(tmp_path, capsys, arm_policy):
    metrics_path, plot_path = tmp_path / "metrics.json", tmp_path / "queue.png"
    status = run_on_rig(["--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--device", "cpu",
                         "--task", "Pick up the cube.", "--duration", "2", "--quiet",
                         "--metrics-json", str(metrics_path), "--plot", str(plot_path)])
    assert status == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["mode"] == "async" and metrics["actions_executed"] > 0 and metrics["chunk_size"] == 10
    assert metrics["ticks"] == len(metrics["queue_size"]) > 0
    assert metrics["chunks_received"] == len(metrics["latency_s"]) > 0
    latency = metrics["latency_ms"]
    assert 0 < latency["mean"] <= latency["max"] and latency["p95"] <= latency["max"]
    assert Image.open(plot_path).size == (800, 600)
    err = capsys.readouterr().err
    assert "inference latency" in err and "torque went off" in err


@pytest.mark.parametrize("fast", [["--fast"], ["--fast", "fp32"]])
def test_command_line_fast_mode_runs_the_mode_asked_for(tmp_path, capsys, arm_policy, fast):
    """Bare --fast: the mode chosen for this CPU's instruction sets; or the one named."""
    import flow

    status = run_on_rig(["--policy", str(arm_policy), "--vlm", str(TINY_VLM), *fast,
                         "--task", "Pick up the cube.", "--duration", "1", "--quiet",
                         "--metrics-json", str(tmp_path / "m.json")])
    assert status == 0
    assert json.loads((tmp_path / "m.json").read_text())["actions_executed"] > 0
    expected = fast[1] if len(fast) == 2 else flow.choose_fast_mode()
    assert f"policy on cpu ({expected} fast mode)" in capsys.readouterr().err


def test_fast_choices_are_the_model_modes(capsys):
    """The command lines spell the modes out (no torch import in remote mode): they must stay flow's."""
    import flow

    assert FAST_CHOICES == ("auto", *flow.FAST_MODES)
    with pytest.raises(SystemExit) as exit_:
        ia.build_parser().parse_args(["--policy", "p", "--fast", "int4"])
    assert exit_.value.code == 2 and "argument --fast: invalid choice: 'int4'" in capsys.readouterr().err
    assert remote.build_serve_parser().parse_args(["--policy", "p", "--fast"]).fast == "auto"
    assert remote.build_serve_parser().parse_args(["--policy", "p"]).fast is None


def test_command_line_remote_run_against_a_token_server(tmp_path):
    seen = []

    def policy_fn(obs):
        seen.append(obs)
        return np.tile(obs.state, (5, 1))

    spec = PolicySpec(cameras={TOP: (6, 8)}, state_dim=6, action_dim=6, chunk_size=5, n_action_steps=5)
    server = remote.PolicyTCPServer(("127.0.0.1", 0), policy_fn, spec, token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        metrics_path = tmp_path / "m.json"
        status = run_on_rig(["--server", f"127.0.0.1:{server.server_address[1]}", "--token", "s3cret", "--task",
                             "wave", "--fps", "50", "--duration", "1", "--quiet", "--metrics-json", str(metrics_path)])
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0
    assert json.loads(metrics_path.read_text())["actions_executed"] > 0
    assert seen and seen[0].task == "wave" and seen[0].images[TOP].shape == (6, 8, 3)


def test_sim_live_runs_the_mujoco_arm_and_says_where_the_cube_is(tmp_path, capsys, arm_policy):
    """`python sim.py live`: the MuJoCo SO-100 (sim.py's rig) in real time through run_client."""
    import sim

    metrics_path = tmp_path / "metrics.json"
    status = sim.main(["live", "--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--device", "cpu",
                       "--task", "Pick up the cube.", "--duration", "2", "--quiet", "--metrics-json", str(metrics_path)])
    assert status == 0
    assert json.loads(metrics_path.read_text())["actions_executed"] > 0
    err = capsys.readouterr().err
    assert "torque went off" in err
    # the MuJoCo arm ran (random weights cannot place the cube in 2 s): judged from its physics
    assert "simulation: the cube is not in the box" in err


# ---------------------------------------------------------------------------------------------
# The commands as users run them: separate processes, Ctrl-C and SIGTERM


class Process:
    """A command (a script of the repository and its arguments) whose stderr lines are collected by a
    thread, for waiting on a message."""

    def __init__(self, spawn, script: str, argv: list[str]):
        self.popen = spawn([sys.executable, str(ROOT / script), *argv], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.popen.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.popen.poll() is not None
            time.sleep(0.1)  # after an exit too: the reader thread catches up with the last lines
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if exited:
                raise AssertionError(f"exited with {self.popen.returncode}:\n{''.join(self.lines)}")
        raise AssertionError(f"no {pattern!r} within {timeout} s in:\n{''.join(self.lines)}")

    def interrupt(self, sig: int = signal.SIGINT) -> int:
        """Sends `sig` (Ctrl-C by default), waits for the exit and for the last lines; the exit status."""
        self.popen.send_signal(sig)
        status = self.popen.wait(timeout=60)
        self.reader.join(timeout=10)
        return status


def test_the_script_reports_an_unreachable_policy_server_in_one_line(tmp_path):
    """Run as a script, infer_async.py is the module __main__: remote.py's errors still end in its
    one-line report (they are cli.UserError, not a class of infer_async's)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with SimulatedBus() as bus:  # the arm is connected first: a simulated one on a pseudo-terminal
        calibration = tmp_path / "arm.json"
        calibration.write_text(json.dumps(bus.calibration))
        done = subprocess.run([sys.executable, str(ROOT / "infer_async.py"), "--port", bus.port, "--calibration",
                               str(calibration), "--server", f"127.0.0.1:{port}", "--task", "t"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert not any(bus.torque_enabled(i) for i in range(1, 7))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: cannot reach the policy server at 127.0.0.1:{port}")


def test_serve_and_client_processes_with_ctrl_c(tmp_path, arm_policy, spawn):
    """The remote-GPU setup as users run it: `serve` in one process, the robot client (the simulated
    arm, `sim.py live`) in another, Ctrl-C to each."""
    server = Process(spawn, "infer_async.py", ["serve", "--policy", str(arm_policy), "--vlm", str(TINY_VLM),
                                               "--device", "cpu", "--listen", "0", "--token", "s3cret"])
    try:
        port = server.wait_for(r"serving .* on 127\.0\.0\.1:(\d+)").group(1)
        metrics_path = tmp_path / "metrics.json"
        client = Process(spawn, "sim.py", ["live", "--server", f"127.0.0.1:{port}", "--token", "s3cret",
                                           "--task", "Pick up the cube.", "--metrics-json", str(metrics_path)])
        try:
            client.wait_for(r"actions [1-9]")  # the live line, once actions flow
        finally:
            status = client.interrupt()
        output = "".join(client.lines)
        assert status == 0, output
        assert "interrupted (Ctrl-C)" in output and "torque went off" in output
        assert json.loads(metrics_path.read_text())["chunks_received"] > 0
        assert server.wait_for(r"connected")
    finally:
        assert server.interrupt(signal.SIGTERM) == 0  # as a service manager stops it
    assert server.lines[-1] == "stopped\n"


def test_sigterm_stops_the_run_like_ctrl_c(tmp_path, arm_policy, spawn):
    """What a service manager or `timeout` sends: the arm holds its pose, torque goes off, the summary
    and the metrics are written (Python's default would end the process at once, torque on)."""
    metrics_path = tmp_path / "metrics.json"
    client = Process(spawn, "sim.py", ["live", "--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--device",
                                       "cpu", "--task", "Pick up the cube.", "--metrics-json", str(metrics_path)])
    try:
        client.wait_for(r"actions [1-9]")
    finally:
        status = client.interrupt(signal.SIGTERM)
    output = "".join(client.lines)
    assert status == 0, output
    assert "terminated (SIGTERM): the arm held its pose, then torque went off" in output
    assert "inference latency" in output
    assert json.loads(metrics_path.read_text())["actions_executed"] > 0
