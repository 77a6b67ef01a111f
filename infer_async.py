"""Asynchronous inference for SmolVLA on an SO-100 arm (SmolVLA paper, Algorithm 1).

The arm executes one action per control tick from a queue while the policy, on a thread of its own
(or on another machine), computes the next chunk of actions from a recent observation, so the arm
does not stop and wait for the model:

    every tick:   execute the queue's next action
                  if queue size / chunk size <= g and no observation is with the policy:
                      send the present observation (skipped there if the joints barely moved)
    on a chunk:   merge it into the queue: actions for timesteps already executed are dropped,
                  those overlapping queued ones are blended, the rest appended

--rtc, the latency-tolerant mode, instead sends the queued plan and the inference delay d (the actions
the arm will have executed when the chunk arrives, from the latencies measured) with the observation,
has the policy continue that plan (policy_io.continuation), and lets the chunk replace the queue from
timestep T + d on: the first d queued actions are committed, the rest is the new plan.

Timesteps count executed actions: an observation is stamped with the timestep of the next action
the robot will execute, and action i of the chunk computed from it is meant for timestep + i.

Read top to bottom: ActionQueue (aggregation of overlapping chunks), PolicyThread (the policy
on a thread of its own), RobotClient (the control loop) and drive() (every way out stops the arm
safely). Then the machinery: metrics, checking that a policy fits the arm, cameras, and the command
line, whose run_client() also drives a simulated arm (a SimulatedRig: `python sim.py live`). Remote
mode, the policy on a GPU machine over TCP, is remote.py; what both ends share is policy_io.py.

    python infer_async.py --port /dev/ttyACM0 --policy <hub id or dir> --task "Pick up the cube." \\
        --camera top=/dev/video0 --camera wrist=/dev/video2
    python infer_async.py --port ... --policy ... --rtc ...         # a slow policy: chunks continue the plan
    python infer_async.py serve --policy <id or dir>              # on the GPU machine, then
    python infer_async.py --server 127.0.0.1:8765 --port ... --task ... --camera ...
    python sim.py live                                            # the MuJoCo arm, in real time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

import remote
import so100
from cli import USER_ERROR, HelpFormatter, Parser, UserError, integer, number, print_live
from plot import Panel, save_panels
from policy_io import (ACTION, DEFAULT_FPS, DEMO_POLICY, FAST_CHOICES, IMAGE_PREFIX, STATE, Observation, PolicySpec,
                       chunk_offset, control_rate, prepare_policy)

# ---------------------------------------------------------------------------------------------
# 1. Errors (the observation and the policy's description are policy_io's)
# ---------------------------------------------------------------------------------------------


class InferError(UserError):
    """A robot-client error, told in one line: before the run the command exits USER_ERROR; during it
    the arm stops (drive) and the command exits 1."""


class PolicyError(InferError):
    """The policy failed or returned unusable actions: the arm must stop."""


class CameraError(InferError):
    """A camera cannot be opened or stopped delivering frames."""

# ---------------------------------------------------------------------------------------------
# 2. The action queue: timestep-stamped actions, overlapping chunks blended
# ---------------------------------------------------------------------------------------------

# How an action already queued for a timestep (old) and a newer chunk's action for the same
# timestep (new) combine. The newer chunk saw a more recent observation, so `weighted` trusts it
# more (LeRobot's weighted_average: 0.3 old + 0.7 new).
def aggregate_weighted(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return 0.3 * old + 0.7 * new


def aggregate_latest(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return new.copy()


def aggregate_average(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return 0.5 * (old + new)


AGGREGATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "weighted": aggregate_weighted, "latest": aggregate_latest, "average": aggregate_average}


class ActionQueue:
    """Actions keyed by timestep, shared by the control loop (pop) and the policy thread (merge).

    merge() drops the actions of a chunk whose timesteps were already executed, blends those that
    overlap queued ones with `aggregate`, and appends the rest. With ease_in = N > 0 the first N
    actions after a merge are a linear crossfade from the plan before the merge (continued by holding
    its last action, or the last executed action when the queue had run dry) to the merged plan:
    action k (k = 0..N-1) = (1 - w) * before + w * merged with w = (k + 1) / (N + 1), so a jump at the
    chunk seam is spread over N + 1 ticks instead of hitting the joints at once.
    """

    def __init__(self, aggregate: Callable[[np.ndarray, np.ndarray], np.ndarray] = aggregate_weighted,
                 ease_in: int = 0):
        self.aggregate = aggregate
        self.ease_in = ease_in
        self.next_timestep = 0  # = actions executed so far
        self.merged_at = 0  # next_timestep at the last merge or replace: the seam's position
        self._newest_source = -1  # replace(): the request whose chunk last replaced the plan
        self._actions: dict[int, np.ndarray] = {}
        self._last: np.ndarray | None = None  # last executed action, or the pose given to hold()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._actions)

    def hold(self, pose: np.ndarray) -> None:
        """Where the robot is before any action: the start of the first ease-in."""
        with self._lock:
            self._last = np.asarray(pose, dtype=np.float64).copy()

    def pop(self) -> tuple[int, np.ndarray] | None:
        """(timestep, action) to execute now, or None when the queue has run dry."""
        with self._lock:
            action = self._actions.pop(self.next_timestep, None)
            if action is None:
                return None
            timestep = self.next_timestep
            self.next_timestep += 1
            self._last = action
            return timestep, action

    def merge(self, timestep: int, chunk: np.ndarray) -> int:
        """Adds a chunk whose first action is for `timestep`; returns how many were stale (dropped)."""
        chunk = np.asarray(chunk, dtype=np.float64)
        with self._lock:
            before = dict(self._actions)
            stale = 0
            for i, new in enumerate(chunk):
                t = timestep + i
                if t < self.next_timestep:
                    stale += 1
                elif t in self._actions:
                    self._actions[t] = self.aggregate(self._actions[t], new)
                else:
                    self._actions[t] = new.copy()
            self._crossfade(before)
            self.merged_at = self.next_timestep
            return stale

    def plan(self) -> tuple[int, list[np.ndarray]]:
        """(the next timestep, the queued actions for it and the timesteps after, in order): what an
        --rtc observation carries. Empty when the queue is."""
        with self._lock:
            actions, t = [], self.next_timestep
            while t in self._actions:
                actions.append(self._actions[t].copy())
                t += 1
            return self.next_timestep, actions

    def replace(self, timestep: int, chunk: np.ndarray, committed_until: int, source: int) -> int:
        """--rtc: the chunk (its first action for `timestep`) replaces the queue from timestep
        max(committed_until, next_timestep) on; the queued actions before committed_until stay. The
        chunk's actions for timesteps already executed are dropped, and so is a whole chunk from an
        older request (`source`, counting requests) than the one whose chunk last replaced the plan:
        the arm never gets actions older than those they would replace. Returns how many were dropped.

        Where the queue holds no action for a timestep before committed_until (it ran short), the
        chunk's fills it, so that the queue never has a gap the robot could not step over."""
        chunk = np.asarray(chunk, dtype=np.float64)
        with self._lock:
            if source < self._newest_source:
                return len(chunk)
            self._newest_source = source
            start = max(committed_until, self.next_timestep)
            for t in [t for t in self._actions if t >= start]:
                del self._actions[t]
            stale = 0
            for i, new in enumerate(chunk):
                t = timestep + i
                if t < self.next_timestep:
                    stale += 1
                elif t >= start or t not in self._actions:
                    self._actions[t] = new.copy()
            self.merged_at = self.next_timestep
            return stale

    def _crossfade(self, before: dict[int, np.ndarray]) -> None:
        held = before[max(before)] if before else self._last
        if held is None:
            return
        for k in range(self.ease_in):
            t = self.next_timestep + k
            if t not in self._actions:
                break
            w = (k + 1) / (self.ease_in + 1)
            self._actions[t] = (1 - w) * before.get(t, held) + w * self._actions[t]

    def clear(self) -> None:
        with self._lock:
            self._actions.clear()

# ---------------------------------------------------------------------------------------------
# 3. The policy thread: the policy run on the newest observation, beside the control loop
# ---------------------------------------------------------------------------------------------


def joint_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute joint difference: degrees (percent for the gripper)."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class PolicyThread:
    """Runs `policy_fn(observation) -> chunk (n, action_dim)` on a thread, one observation at a time.

    An observation whose joints are all within `similarity` (degrees; gripper percent) of the last
    one processed is skipped, unless it is a must-go (sent with an empty queue). Each chunk goes to
    `on_chunk(timestep, chunk, latency_s)`. A failing policy or a chunk with a wrong shape or a
    non-finite value sets `error` and ends the thread.
    """

    def __init__(self, policy_fn: Callable[[Observation], np.ndarray], spec: PolicySpec,
                 on_chunk: Callable[[int, np.ndarray, float], None], metrics: Metrics,
                 similarity: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.policy_fn, self.spec, self.on_chunk, self.metrics = policy_fn, spec, on_chunk, metrics
        self.similarity, self.clock = similarity, clock
        self.error: BaseException | None = None
        self._inbox: Observation | None = None
        self._busy = False
        self._stopping = False
        self._last_state: np.ndarray | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="policy", daemon=True)
        # Called after `busy` turns False and after stop(), from the thread that changed it: whoever
        # waits on those (the simulator's clock) is woken instead of polling.
        self.on_change: Callable[[], None] = lambda: None

    @property
    def busy(self) -> bool:
        """True from submit() until that observation is skipped or its chunk is merged."""
        return self._busy

    @property
    def stopping(self) -> bool:
        """stop() was called: a chunk still being computed will be dropped."""
        return self._stopping

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.on_change()
        self._thread.join(timeout=5)

    def submit(self, observation: Observation) -> None:
        with self._cond:
            if self._busy:
                raise RuntimeError("one observation at a time: wait until the policy thread is not busy")
            self._inbox, self._busy = observation, True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._inbox is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                observation, self._inbox = self._inbox, None
            try:
                self._process(observation)
            except BaseException as err:  # reported to the control loop, which stops the arm
                self.error = err
                return
            finally:
                self._busy = False
                self.on_change()

    def _process(self, observation: Observation) -> None:
        if (not observation.must_go and self.similarity > 0 and self._last_state is not None
                and joint_distance(observation.state, self._last_state) < self.similarity):
            self.metrics.observations_skipped += 1
            return
        self._last_state = observation.state
        chunk = np.asarray(self.policy_fn(observation), dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != self.spec.action_dim:
            raise PolicyError(f"the policy returned actions of shape {chunk.shape}, expected "
                              f"(chunk, {self.spec.action_dim})")
        if not np.all(np.isfinite(chunk)):
            raise PolicyError(f"the policy returned non-finite actions for timestep {observation.timestep}")
        if not self._stopping:
            self.on_chunk(observation.timestep, chunk, self.clock() - observation.captured_at)

# ---------------------------------------------------------------------------------------------
# 4. The robot client: the control loop
# ---------------------------------------------------------------------------------------------


@dataclass
class ClientConfig:
    fps: float = DEFAULT_FPS
    threshold: float = 0.7  # g: send an observation when queue size / chunk size <= g
    aggregate: str = "weighted"
    ease_in: int = 3  # ticks of crossfade at chunk seams (0: off)
    similarity: float = 1.0  # degrees (gripper percent); 0 disables skipping (--rtc never skips)
    sync: bool = False  # infer, execute n_action_steps, repeat
    n_action_steps: int | None = None  # --sync: actions executed per chunk (None: the policy's)
    rtc: bool = False  # latency-tolerant: chunks continue the queued plan and replace it (RobotClient)


LATENCY_WINDOW = 5  # --rtc: the inference delay covers the slowest of this many latest chunks


def inference_delay(latencies: list[float], fps: float, most: int) -> int:
    """--rtc's d: the ticks the slowest of the latest LATENCY_WINDOW latencies (seconds) spans,
    ceil(max / control period), at most `most` (max_inference_delay); 0 before any latency is known. Rounded up, the margin of under a tick covers a latency a little
    above the slowest seen; a tolerance of 1e-9 keeps float error (0.3 s x 10 = 3.0000000000000004)
    from adding a whole tick."""
    if not latencies:
        return 0
    ticks = math.ceil(max(latencies[-LATENCY_WINDOW:]) * fps - 1e-9)
    return min(max(ticks, 0), most)


def max_inference_delay(spec: PolicySpec) -> int:
    """The largest d worth sending: chunk_size - 1 (a chunk must keep an action of its own past the
    committed ones), or more for a policy trained on future states, whose chunk starts d ahead (its
    actions are all new however long the latency, up to the largest offset it was trained on)."""
    return max(spec.chunk_size - 1, spec.future_state_max_offset)


class RobotClient:
    """The control loop: one action per tick from the queue; an observation to the policy thread
    whenever the queue is at or below g of a chunk and no request is in flight.

    `robot` needs read() -> state and write(goal) (so100.SO100 clips, ramps and refuses non-finite
    goals); `cameras` maps policy camera keys to objects with read() -> uint8 (H, W, 3).
    --sync is the same loop with g = 0 (observe only once the queue is empty, the arm standing
    still while the policy runs) and chunks cut to n_action_steps.

    --rtc (config.rtc) keeps the arm fed at a latency near a chunk's length, with what the policy
    supports (policy_io.continuation). An observation goes out when the queue is at or below g of a
    chunk or at most d + 1 actions (d = inference_delay(), from the latencies measured; the chunk
    must arrive before the queue runs dry), and it carries the queued plan from its timestep T and
    d, held to the plan's length (the arm cannot execute more than is queued). A policy trained on
    future states is given, as its state, the measured one plus the motion the plan commands until its
    chunk starts (the plan's action for T + offset - 1 minus that for T), and its chunk starts at
    T + offset (policy_io.chunk_offset). The chunk replaces the queue from T + d on, or from the next
    action if the arm got further (ActionQueue.replace): no blending and no ease-in, the policy has
    made the seam consistent. Every mode records the seams' jolt (Metrics.seam_jerks).
    """

    def __init__(self, robot, cameras: dict, policy_fn: Callable[[Observation], np.ndarray], spec: PolicySpec,
                 task: str, config: ClientConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        config = config or ClientConfig()
        missing = sorted(set(spec.cameras) - set(cameras))
        if missing:
            raise InferError(f"the policy needs the camera(s) {missing}; given {sorted(cameras)}")
        if config.sync and config.rtc:
            raise InferError("--rtc and --sync exclude each other: --rtc keeps the arm moving while the policy runs")
        if config.rtc and spec.future_state_max_offset > 0 and spec.state_dim != spec.action_dim:
            raise InferError(f"--rtc with a policy trained on future states needs actions that are states: it has "
                             f"{spec.state_dim} state and {spec.action_dim} action values")
        self.robot, self.cameras, self.spec, self.task, self.config = robot, cameras, spec, task, config
        self.clock, self.sleep = clock, sleep
        self.dt = 1.0 / config.fps
        self.threshold = 0.0 if config.sync else config.threshold
        self.actions_per_chunk = (config.n_action_steps or spec.n_action_steps) if config.sync else spec.chunk_size
        self.queue = ActionQueue(AGGREGATES[config.aggregate], config.ease_in)
        mode = "rtc" if config.rtc else "sync" if config.sync else "async"
        self.metrics = Metrics(mode=mode, fps=config.fps, chunk_size=spec.chunk_size, threshold=self.threshold,
                               joints=joint_dims(spec))
        self.delay = 0  # --rtc: d, from the latencies measured (written by the policy thread)
        # --rtc: (request number, T, d, the chunk's offset) of the observation with the policy; one at a time
        self._request: tuple[int, int, int, int] | None = None  # the number: observations sent before it
        # --rtc never skips an observation as similar: it carries the plan and d, which change while the
        # arm stands still, and a skipped one would leave the queue to run dry before the next is sent.
        similarity = 0.0 if config.rtc else config.similarity
        self.policy_thread = PolicyThread(policy_fn, spec, self._on_chunk, self.metrics, similarity, clock)

    def _on_chunk(self, timestep: int, chunk: np.ndarray, latency: float) -> None:
        m = self.metrics
        if self.config.rtc:
            number, observed, delay, offset = self._request
            if observed != timestep:  # one request in flight: the chunk answers the last one sent
                raise PolicyError(f"a chunk for timestep {timestep} arrived while the request for {observed} was pending")
            m.stale_actions_dropped += self.queue.replace(timestep + offset, chunk[: self.actions_per_chunk],
                                                          committed_until=timestep + delay, source=number)
        else:
            m.stale_actions_dropped += self.queue.merge(timestep, chunk[: self.actions_per_chunk])
        m.merges.append(self.queue.merged_at)
        m.latencies.append((self.clock() - m.start, latency))
        m.chunks_received += 1
        self.delay = inference_delay([s for _, s in m.latencies], self.config.fps, max_inference_delay(self.spec))

    def capture(self, must_go: bool) -> Observation:
        now = self.clock()
        images = {key: self.cameras[key].read() for key in self.spec.cameras}
        state = np.asarray(self.robot.read(), np.float32)
        if not self.config.rtc:
            return Observation(self.queue.next_timestep, state, images, self.task, must_go, now)
        timestep, actions = self.queue.plan()
        plan = np.array(actions, np.float32).reshape(len(actions), self.spec.action_dim)
        delay = min(self.delay, len(plan))
        offset = chunk_offset(self.spec.future_state_max_offset, delay)
        if offset > 0:  # where the plan takes the arm by then (train.at_state_offsets: the same estimate)
            state = state + plan[offset - 1] - plan[0]
        self._request = (self.metrics.observations_sent, timestep, delay, offset)
        self.metrics.inference_delays.append(delay)
        return Observation(timestep, state, images, self.task, must_go, now, plan, delay)

    def tick(self) -> None:
        if self.policy_thread.error is not None:
            err = self.policy_thread.error
            raise err if isinstance(err, PolicyError) else PolicyError(f"the policy failed: {type(err).__name__}: {err}")
        m = self.metrics
        item = self.queue.pop()
        if item is None:
            if m.actions_executed:
                m.idle_ticks += 1
            else:
                m.startup_ticks += 1
        else:
            timestep, action = item
            if not np.all(np.isfinite(action)):  # the policy thread checks too; this is the last line
                raise PolicyError(f"non-finite action for timestep {timestep}: {action.tolist()}")
            self.robot.write(action)
            m.actions_executed += 1
            m.executed.append(action.astype(np.float32))
        size = len(self.queue)
        m.ticks += 1
        m.queue_sizes.append((self.clock() - m.start, size))
        due = size / self.spec.chunk_size <= self.threshold or (self.config.rtc and size <= self.delay + 1)
        if not self.policy_thread.busy and due:
            self.policy_thread.submit(self.capture(must_go=size == 0))
            m.observations_sent += 1

    def run(self, duration: float | None = None, max_actions: int | None = None, live: bool = False,
            until: Callable[[], bool] | None = None) -> Metrics:
        """Ticks at fps until `duration` seconds, `max_actions` actions or `until()` is true after a
        tick (a task judged done; sim.py's evaluation), or an exception."""
        self.queue.hold(self.robot.read())
        self.metrics.start = next_tick = self.clock()
        last_print, print_every = 0.0, (0.25 if sys.stderr.isatty() else 5.0)
        self.policy_thread.start()
        try:
            while True:
                if duration is not None and self.clock() - self.metrics.start >= duration:
                    break
                if max_actions is not None and self.metrics.actions_executed >= max_actions:
                    break
                self.tick()
                if until is not None and until():
                    break
                if live and self.clock() - last_print >= print_every:
                    last_print = self.clock()
                    print_live(self.metrics.live_line())
                next_tick += self.dt
                delay = next_tick - self.clock()
                if delay > 0:
                    self.sleep(delay)
                elif delay < -self.dt:  # fell behind by more than a tick: skip, never burst actions
                    self.metrics.late_ticks += 1
                    next_tick = self.clock()
        finally:
            self.policy_thread.stop()
            if live:
                print_live(self.metrics.live_line(), end=True)
        return self.metrics

# ---------------------------------------------------------------------------------------------
# 5. Stopping safely: every way out holds the pose, then torque off
# ---------------------------------------------------------------------------------------------


def safe_stop(robot, hold_seconds: float = 0.3) -> list[str]:
    """Hold the present pose (the last write), then release torque. Returns what went wrong."""
    problems = []
    try:
        robot.write(robot.read())
        time.sleep(hold_seconds)
    except Exception as err:
        problems.append(f"could not hold the pose: {err}")
    try:
        robot.torque_off()
    except Exception as err:
        problems.append(f"torque off not confirmed ({err}): switch the arm's power off")
    return problems


class Terminated(KeyboardInterrupt):
    """SIGTERM (from a service manager, `timeout` or `kill`), raised where Ctrl-C would be."""


@contextmanager
def sigterm_as_ctrl_c():
    """While active, SIGTERM takes Ctrl-C's way out: the arm holds its pose, torque goes off, the
    summary is printed. Only the first one: a second SIGTERM during that stop is ignored rather than
    cutting it short. (Python's default for SIGTERM ends the process at once, torque on.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    fired = False

    def handle(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def drive(client: RobotClient, duration: float | None = None, max_actions: int | None = None,
          live: bool = False, until: Callable[[], bool] | None = None) -> int:
    """Runs the client; every way out (the end, Ctrl-C or SIGTERM, a policy or camera failure) stops
    the arm holding its pose and turns torque off. Returns the exit status (0, or 1 after a failure)."""
    status, reason = 0, "done"
    try:
        client.run(duration, max_actions, live, until)
    except KeyboardInterrupt as err:
        reason = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
    except UserError as err:  # feetech.FeetechError too: a servo fault, a lost arm
        status, reason = 1, f"error: {err}"
    finally:
        problems = safe_stop(client.robot)
    if problems:
        print(f"{reason}; stopping the arm failed: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"{reason}: the arm held its pose, then torque went off", file=sys.stderr)
    return status

# =============================================================================================
# Machinery: metrics, the policy checked against the arm, cameras, the command line
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 6. Metrics
# ---------------------------------------------------------------------------------------------


def joint_dims(spec: PolicySpec) -> list[int]:
    """The action dims seam_jerk() measures: the joints, not the gripper, whose percent of opening is
    no joint angle and whose open/close steps are meant to be abrupt. Dims whose action name contains
    "gripper" are left out; with no names recorded, an action of 6 values is taken for the SO-100's
    (the gripper last); any other action is measured whole."""
    if spec.action_names is not None:
        return [i for i, name in enumerate(spec.action_names) if "gripper" not in name.lower()]
    return list(range(5)) if spec.action_dim == 6 else list(range(spec.action_dim))


SEAM_TICKS = 2  # seam_jerk(): the accelerations within this many actions of a merge


def seam_jerk(actions: list[np.ndarray] | np.ndarray, merges: list[int], fps: float,
              joints: list[int] | None = None) -> list[float]:
    """How hard each chunk seam jolts the arm: for each merge, the largest joint acceleration
    |a[k+1] - 2 a[k] + a[k-1]| x fps^2 (robot units per s^2: degrees/s^2 on the SO-100) over the
    executed actions a[k] with k within SEAM_TICKS of the merge. A merge is stamped with the number of
    actions executed before it, m: the seam lies between a[m-1] and a[m]. Positions count executed
    actions, not ticks (an idle tick adds none). Merges before the first action (nothing to be a seam
    with) or without an acceleration in reach are left out. `joints`: the dims measured (all: None)."""
    if len(actions) < 3:
        return []
    a = np.asarray(actions, dtype=np.float64).reshape(len(actions), -1)
    if joints is not None:
        a = a[:, joints]
    if a.shape[1] == 0:
        return []
    acceleration = np.abs(a[2:] - 2 * a[1:-1] + a[:-2]).max(axis=1) * fps ** 2  # [j]: at action j + 1
    jerks = []
    for m in merges:
        if m < 1:
            continue
        low, high = max(m - SEAM_TICKS, 1), min(m + SEAM_TICKS, len(a) - 2)
        if low <= high:
            jerks.append(float(acceleration[low - 1: high].max()))
    return jerks


@dataclass
class Metrics:
    """Counters of one run. Each field is written by one thread only (the control loop or the
    policy thread), so no lock is needed; times are seconds since the start of the run."""
    mode: str = "async"
    fps: float = ClientConfig.fps
    chunk_size: int = 50
    threshold: float = ClientConfig.threshold
    start: float = 0.0  # clock() at the start of the run
    ticks: int = 0
    actions_executed: int = 0
    startup_ticks: int = 0  # empty queue before the first action: waiting for the first chunk
    idle_ticks: int = 0  # empty queue after the first action: the robot stood still
    late_ticks: int = 0  # ticks the loop could not keep (it resynchronises instead of bursting)
    observations_sent: int = 0
    observations_skipped: int = 0  # too similar to the last processed one (by the policy thread)
    chunks_received: int = 0
    stale_actions_dropped: int = 0  # actions for timesteps executed while the chunk was computed
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds) per chunk
    queue_sizes: list[tuple[float, int]] = field(default_factory=list)  # (time, size) per tick
    joints: list[int] | None = None  # the action dims seam_jerk measures (joint_dims; None: all)
    executed: list[np.ndarray] = field(default_factory=list)  # every action executed, in order
    merges: list[int] = field(default_factory=list)  # per chunk: actions executed when it was merged
    inference_delays: list[int] = field(default_factory=list)  # --rtc: d sent with each observation

    def seam_jerks(self) -> list[float]:
        """Per merge, degrees/s^2 on the SO-100 (seam_jerk)."""
        return seam_jerk(self.executed, self.merges, self.fps, self.joints)

    def latency_stats_ms(self) -> dict[str, float | None]:
        values = np.array([s for _, s in self.latencies]) * 1000
        if values.size == 0:
            return {"mean": None, "p95": None, "max": None}
        return {"mean": float(values.mean()), "p95": float(np.percentile(values, 95)), "max": float(values.max())}

    def summary(self) -> dict:
        elapsed = self.queue_sizes[-1][0] if self.queue_sizes else 0.0
        sizes = [n for _, n in self.queue_sizes]
        return {"mode": self.mode, "fps": self.fps, "chunk_size": self.chunk_size, "threshold": self.threshold,
                "duration_s": elapsed, "ticks": self.ticks, "actions_executed": self.actions_executed,
                "idle_ticks": self.idle_ticks, "startup_ticks": self.startup_ticks, "late_ticks": self.late_ticks,
                "observations_sent": self.observations_sent, "observations_skipped": self.observations_skipped,
                "chunks_received": self.chunks_received, "stale_actions_dropped": self.stale_actions_dropped,
                "latency_ms": self.latency_stats_ms(),
                "queue_size_mean": float(np.mean(sizes)) if sizes else None,
                "seam_jerk": self.seam_jerk_stats(),
                "inference_delay_max": max(self.inference_delays) if self.inference_delays else None}

    def seam_jerk_stats(self) -> dict[str, float | int | None]:
        jerks = self.seam_jerks()
        return {"mean": float(np.mean(jerks)) if jerks else None, "max": max(jerks) if jerks else None,
                "seams": len(jerks)}

    def live_line(self) -> str:
        lat = self.latency_stats_ms()
        latency = "-" if lat["mean"] is None else f"{lat['mean']:.0f} ms (p95 {lat['p95']:.0f})"
        queue = self.queue_sizes[-1][1] if self.queue_sizes else 0
        elapsed = self.queue_sizes[-1][0] if self.queue_sizes else 0.0
        return (f"{elapsed:6.1f} s | actions {self.actions_executed} | queue {queue:3d}/{self.chunk_size} | "
                f"idle ticks {self.idle_ticks} | latency {latency} | skipped {self.observations_skipped}")

    def report(self) -> str:
        s = self.summary()
        lat = s["latency_ms"]
        latency = "no chunk received" if lat["mean"] is None else (
            f"mean {lat['mean']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms")
        jerk = s["seam_jerk"]
        seam = "no seam" if jerk["mean"] is None else (
            f"mean {jerk['mean']:.0f}, max {jerk['max']:.0f} per s^2 over {jerk['seams']} seams (joints)")
        return "\n".join([
            f"{s['mode']} run: {s['duration_s']:.1f} s, {s['ticks']} ticks at {s['fps']:g} fps",
            f"  actions executed    {s['actions_executed']}",
            f"  idle ticks          {s['idle_ticks']} (empty queue after the first action; "
            f"{s['startup_ticks']} more waiting for the first chunk, {s['late_ticks']} late)",
            f"  inference latency   {latency} over {s['chunks_received']} chunks",
            f"  observations        {s['observations_sent']} sent, {s['observations_skipped']} skipped as similar",
            f"  stale actions       {s['stale_actions_dropped']} dropped",
            f"  queue size          mean {s['queue_size_mean'] or 0:.1f} of {s['chunk_size']}",
            f"  seam jerk           {seam}"]
            + ([f"  inference delay     at most {s['inference_delay_max']} actions"] if self.mode == "rtc" else []))

    def write_json(self, path: str | Path) -> None:
        out = self.summary()
        out["queue_size"] = [[round(t, 4), n] for t, n in self.queue_sizes]
        out["latency_s"] = [[round(t, 4), round(s, 6)] for t, s in self.latencies]
        Path(path).write_text(json.dumps(out, indent=1))

    def plot(self, path: str | Path) -> None:
        times, sizes = [t for t, _ in self.queue_sizes], [float(n) for _, n in self.queue_sizes]
        queue = {"queue size": (times, sizes)}
        if times and self.threshold > 0:
            queue[f"threshold g={self.threshold:g}"] = ([times[0], times[-1]], [self.threshold * self.chunk_size] * 2)
        latency = {"latency": ([t for t, _ in self.latencies], [s * 1000 for _, s in self.latencies])}
        save_panels(str(path), [Panel(queue, "action queue", "time (s)", "actions", ylim=(0, 1.05 * self.chunk_size)),
                                Panel(latency, "inference latency (observation to chunk)", "time (s)", "ms")])



# ---------------------------------------------------------------------------------------------
# 7. Does the policy fit the arm?
# ---------------------------------------------------------------------------------------------


def joint_of(name: str) -> tuple[str, bool]:
    """A dataset's name for an SO-100 value -> (joint, legacy units?). LeRobot 0.3 and later name
    them `shoulder_pan.pos`; this project's demo `shoulder_pan`; datasets recorded before mid-2025
    `main_shoulder_pan`, in the legacy units (so100.to_legacy)."""
    legacy = name.startswith("main_")
    return name.removeprefix("main_").removesuffix(".pos"), legacy


def unit_bounds(legacy: bool) -> tuple[np.ndarray, np.ndarray]:
    """The widest values an SO-100 joint can report: degrees within half a turn of the middle of
    its calibrated range, the gripper in 0..100 percent; in legacy units, shifted accordingly."""
    low = np.array([-180.0] * 5 + [0.0])
    high = np.array([180.0] * 5 + [100.0])
    if not legacy:
        return low, high
    ends = np.stack([so100.to_legacy(low), so100.to_legacy(high)])  # 90 - lift flips that joint's ends
    return ends.min(0), ends.max(0)


def check_policy_fits_arm(spec: PolicySpec, legacy: bool) -> list[str]:
    """Raises InferError if the policy cannot have been trained on this arm in these units (legacy:
    the arm reads and writes in the old `main_*` units); returns what could not be checked.

    Checked: 6 state and 6 action values; their names, where the checkpoint records them: the SO-100's
    joints in order, `main_*` names only with --legacy; the state and action means of the
    normalisation stats within what a joint can report in these units (raw servo steps, 0..4095,
    fail it). Not checkable from a checkpoint: LeRobot's RANGE_M100_100 joint units (-100..100 over
    the calibrated range, the default of its SO-100 driver) against degrees."""
    joints, units = list(so100.JOINT_NAMES), ("legacy `main_*` degrees" if legacy else "degrees")
    for key, dim in ((STATE, spec.state_dim), (ACTION, spec.action_dim)):
        if dim != len(joints):
            raise InferError(f"the policy's {key} has {dim} values; the SO-100 has {len(joints)} "
                             f"({', '.join(joints)}): the policy was trained for another robot")
    unchecked = []
    for key, names, mean in ((STATE, spec.state_names, spec.state_mean), (ACTION, spec.action_names, spec.action_mean)):
        if names is None:
            unchecked.append(f"{key} names")
        else:
            found = [joint_of(n) for n in names]
            if [joint for joint, _ in found] != joints:
                raise InferError(f"the policy's {key} names {names} are not the SO-100's joints in its order "
                                 f"({', '.join(joints)})")
            legacy_names = [old for _, old in found]
            if any(legacy_names) and not all(legacy_names):
                raise InferError(f"the policy's {key} names {names} mix legacy `main_*` and current names")
            if all(legacy_names) and not legacy:
                raise InferError(f"the policy's {key} names ({names[0]}, ...) are `main_*`: it was trained in "
                                 "legacy SO-100 units; add --legacy")
            if not any(legacy_names) and legacy:
                raise InferError(f"the policy's {key} names ({names[0]}, ...) are in current LeRobot units, "
                                 "not legacy `main_*` ones: drop --legacy")
        if mean is None:
            unchecked.append(f"{key} units")
            continue
        low, high = unit_bounds(legacy)
        for joint, value, lo, hi in zip(joints, mean, low, high):
            if not lo <= value <= hi:
                raise InferError(
                    f"the policy's {key} mean for {joint} is {value:.1f}, outside the {lo:g}..{hi:g} that joint "
                    f"can report in {units}: the policy was trained in other units (raw servo steps?) or for "
                    "another robot")
    return unchecked

# ---------------------------------------------------------------------------------------------
# 8. Cameras: PyAV capture threads keeping the newest frame
# ---------------------------------------------------------------------------------------------


def default_camera_format() -> str | None:
    """FFmpeg's capture device for this system: V4L2 on Linux, AVFoundation on macOS."""
    return {"linux": "v4l2", "darwin": "avfoundation"}.get(sys.platform)


class Camera:
    """A PyAV capture thread that keeps only the newest frame, resized to the policy's size.

    read() never returns a frame older than `timeout` seconds: a camera that stops delivering (or
    whose stream ends or fails) raises CameraError instead of feeding a stale image to the policy.
    """

    def __init__(self, key: str, device: str, size: tuple[int, int], input_format: str | None = None,
                 options: dict[str, str] | None = None, timeout: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.key, self.device, self.size, self.clock = key, device, size, clock  # size: (height, width)
        self.input_format = input_format if input_format is not None else default_camera_format()
        self.options = dict(options or {})
        if self.input_format == "avfoundation":  # it refuses the default 29.97 on most webcams
            self.options.setdefault("framerate", "30")
        self.timeout = timeout
        self._frame: np.ndarray | None = None
        self._frame_time = 0.0
        self._error: str | None = None
        self._first = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._container = None
        self._thread: threading.Thread | None = None

    def start(self, first_frame_timeout: float = 10.0) -> "Camera":
        import av

        try:
            self._container = av.open(self.device, format=self.input_format, options=self.options)
        except (av.FFmpegError, OSError) as err:
            raise CameraError(f"camera {self.key}: cannot open {self.device} "
                              f"(format {self.input_format or 'auto'}): {err}") from err
        self._thread = threading.Thread(target=self._capture, name=f"camera-{self.key}", daemon=True)
        self._thread.start()
        if not self._first.wait(first_frame_timeout) and self._error is None:
            raise CameraError(f"camera {self.key} ({self.device}) delivered no frame in {first_frame_timeout:g} s")
        self.read()  # raises if the stream already failed
        return self

    def _capture(self) -> None:
        height, width = self.size
        try:
            for frame in self._container.decode(video=0):
                image = frame.to_ndarray(width=width, height=height, format="rgb24")
                with self._lock:
                    self._frame, self._frame_time = image, self.clock()
                self._first.set()
                if self._stop.is_set():
                    return
            self._error = "the video stream ended"
        except Exception as err:  # a capture device that fails (unplugged...) surfaces in read()
            self._error = f"{type(err).__name__}: {err}"
        finally:
            self._first.set()

    def read(self) -> np.ndarray:
        with self._lock:
            frame, frame_time, error = self._frame, self._frame_time, self._error
        if error is not None and not self._stop.is_set():
            raise CameraError(f"camera {self.key} ({self.device}) stopped: {error}")
        age = self.clock() - frame_time
        if frame is None or age > self.timeout:
            raise CameraError(f"camera {self.key} ({self.device}) delivered no frame for {age:.1f} s "
                              f"(timeout {self.timeout:g} s)")
        return frame

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._container is not None and (self._thread is None or not self._thread.is_alive()):
            self._container.close()  # a thread stuck in a dead device keeps it; it is a daemon


def parse_camera(text: str) -> tuple[str, str]:
    """'top=/dev/video0' -> ('observation.images.top', '/dev/video0'); a full key works too."""
    name, sep, device = text.partition("=")
    if not sep or not name or not device:
        raise InferError(f"--camera expects NAME=DEVICE (e.g. top=/dev/video0), got {text!r}")
    return (name if name.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + name), device

# ---------------------------------------------------------------------------------------------
# 9. Command line: the real arm here; a simulated one through a SimulatedRig (sim.py live)
# ---------------------------------------------------------------------------------------------


class SimulatedRig(Protocol):
    """What a simulated arm gives run_client (`python sim.py live` passes its SO-100 in real time).
    The driver, so100.SO100, talks to the rig's servo bus exactly as to a real arm's port."""
    default_task: str  # the scene's instruction, given to the demo policy when there is no --task

    def open_bus(self) -> tuple[str, dict]:
        """Starts serving the servo bus; (port, calibration) for so100.SO100."""

    def cameras_for(self, spec: PolicySpec) -> dict:
        """The policy's cameras (key -> object with read() -> uint8 (H, W, 3)) at its sizes."""

    def now(self) -> float:
        """The physics' clock (seconds)."""

    def sleep(self, seconds: float) -> None:
        """Advances the physics by `seconds`, paced to the wall clock."""

    def task_done(self) -> bool:
        """Called once a control tick: True ends the run (the world's own success signal)."""

    def outcome(self) -> str:
        """One line printed after the run (e.g. whether and when the task was done)."""

    def close(self) -> None:
        """Stops the bus and the physics; run_client calls it on every way out."""


def build_parser(prog: str = "infer_async.py") -> argparse.ArgumentParser:
    """The robot client's flags; `sim.py live` adds its own to the same parser (its prog)."""
    defaults = ClientConfig()
    p = Parser(prog=prog, formatter_class=HelpFormatter,
               description="Run a SmolVLA policy on an SO-100 arm with asynchronous inference\n"
                           "(`python infer_async.py serve --help` for the remote policy server).")
    g = p.add_argument_group("policy")
    g.add_argument("--policy", help=f"Hub id or directory; required unless --server is given (in the simulator, "
                                    f"`python sim.py live`, the default is the demo's {DEMO_POLICY})")
    g.add_argument("--vlm", help="VLM config/tokenizer (dir or Hub id) if not the policy's vlm_model_name")
    g.add_argument("--device", help="cuda, cpu, mps (default: cuda if available)")
    g.add_argument("--fast", nargs="?", const="auto", choices=FAST_CHOICES, metavar="MODE",
                   help="a faster CPU mode: bare --fast picks it from the CPU's instruction sets (int8 on AVX2 "
                        f"and AVX-512, bf16 with AMX), or name one of {', '.join(FAST_CHOICES[1:])} "
                        "(~2.4x faster chunks; see docs/performance.md)")
    g.add_argument("--task", help="the instruction given to the policy (in the simulator with the demo policy, "
                                  "the default is the scene's)")
    g.add_argument("--server", metavar="HOST:PORT", help="use a remote policy server instead of a local policy")
    g.add_argument("--token", default=os.environ.get("INFER_ASYNC_TOKEN"),
                   help="shared token for --server (default: $INFER_ASYNC_TOKEN)")
    g = p.add_argument_group("robot")
    g.add_argument("--port", help="the arm's serial port, e.g. /dev/ttyACM0")
    g.add_argument("--calibration", help="LeRobot calibration JSON (default: looked up by --robot-id)")
    g.add_argument("--robot-id", help="the calibration's id in LeRobot's calibration directory")
    g.add_argument("--legacy", action="store_true",
                   help="old joint units of `main_*` datasets such as lerobot/svla_so100_pickplace")
    g.add_argument("--max-relative-target", type=number(above=0),
                   help="degrees: clamp each goal to present position +- this")
    g = p.add_argument_group("cameras")
    g.add_argument("--camera", action="append", default=[], metavar="NAME=DEVICE",
                   help="e.g. top=/dev/video0 feeds observation.images.top (macOS: top=0); repeat per camera")
    g.add_argument("--camera-option", action="append", default=[], metavar="KEY=VALUE",
                   help="FFmpeg capture option for every camera, e.g. video_size=640x480, framerate=30, "
                        "input_format=mjpeg")
    g.add_argument("--camera-format", help="FFmpeg input format (default: v4l2 on Linux, avfoundation on macOS)")
    g.add_argument("--camera-timeout", type=number(above=0), default=1.0,
                   help="seconds: a camera whose newest frame is older than this stops the run")
    g = p.add_argument_group("control")
    g.add_argument("--fps", type=number(above=0), help=f"control ticks per second, one action each: use the training "
                   f"data's frame rate (default: the one recorded beside the policy by train.py, else "
                   f"{DEFAULT_FPS:g})")
    g.add_argument("--threshold", type=number(0, 1), default=defaults.threshold,
                   help="g: send an observation when queue size / chunk size <= g")
    g.add_argument("--aggregate", choices=sorted(AGGREGATES), default=defaults.aggregate,
                   help="overlapping actions: weighted = 0.3 old + 0.7 new, latest = new, average = 0.5 each")
    g.add_argument("--ease-in", type=integer(0), default=defaults.ease_in,
                   help="ticks of crossfade into each new chunk (0: off)")
    g.add_argument("--similarity", type=number(0), default=defaults.similarity,
                   help="skip an observation whose joints all lie within this many degrees (gripper: "
                        "percent) of the last one processed; 0 disables (--rtc never skips)")
    g.add_argument("--sync", action="store_true", help="synchronous loop: infer, execute, repeat")
    g.add_argument("--rtc", action="store_true",
                   help="latency-tolerant: each chunk continues the queued plan (real-time chunking, or what "
                        "the policy was trained for) and replaces it after the inference delay; observes also "
                        "when the queue is down to that delay + 1 (--aggregate, --ease-in unused)")
    g.add_argument("--n-action-steps", type=integer(1), help="--sync: actions executed per chunk (default: the policy's)")
    g = p.add_argument_group("run")
    g.add_argument("--duration", type=number(above=0), help="seconds, then the same safe stop as Ctrl-C")
    g.add_argument("--metrics-json", help="write the metrics here at exit")
    g.add_argument("--plot", help="PNG of queue size and latency over time, written at exit")
    g.add_argument("--quiet", action="store_true", help="no live status line")
    return p


def check_client_args(args: argparse.Namespace, simulated: bool) -> None:
    """What the flags' types cannot check (each numeric flag checks its own range)."""
    if simulated:
        own = [flag for flag, value in (("--port", args.port), ("--calibration", args.calibration),
                                        ("--robot-id", args.robot_id), ("--camera", args.camera)) if value]
        if own:
            raise InferError(f"{', '.join(own)}: the simulated arm brings its own bus, calibration and cameras")
    elif not args.port:
        raise InferError("give the arm's serial port with --port (the simulated arm: `python sim.py live`)")
    if args.server and args.policy:
        raise InferError("--server and --policy exclude each other: the server's policy is fixed when it starts")
    if args.rtc and args.sync:
        raise InferError("--rtc and --sync exclude each other: --rtc keeps the arm moving while the policy runs")
    if args.server:
        host, sep, port = args.server.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise InferError(f"--server expects HOST:PORT with a port in [0, 65535], got {args.server!r}")
    if not simulated and not (args.policy or args.server):
        # The demo checkpoint is a toy trained on synthetic frames: it must never drive a real arm by default.
        raise InferError("a real arm (--port) needs the policy to run: give --policy (or --server); "
                         "the demo policy runs only in the simulator (`python sim.py live`)")
    if args.task is None and not (simulated and not args.policy and not args.server):
        raise InferError("give the instruction with --task \"...\"")


def open_arm(args: argparse.Namespace, stack: ExitStack, rig: SimulatedRig | None) -> so100.SO100:
    """The arm comes first, before the slow policy load: the port and the six servos, then the
    calibration (compared with the servos' registers). Connected with torque off until the run."""
    port, calibration = rig.open_bus() if rig is not None else (args.port, args.calibration)
    so100.check_arm(port)  # a wrong port or an unpowered arm is reported before a missing calibration
    robot = so100.SO100(port, calibration=calibration, legacy=args.legacy,
                        max_relative_target=args.max_relative_target, robot_id=args.robot_id)
    stack.callback(robot.disconnect)  # torque off and the port closed, whatever happens
    robot.connect(torque=False)
    print(f"arm on {port}: six servos answer, calibration {robot.calibration_source}", file=sys.stderr)
    return robot


def open_policy(args: argparse.Namespace,
                stack: ExitStack) -> tuple[Callable[[Observation], np.ndarray], PolicySpec, str | None]:
    """(policy_fn, spec, the policy's directory or Hub id; None for a remote one)."""
    if args.server:
        host, _, port = args.server.rpartition(":")
        policy = remote.RemotePolicy(host.strip("[]"), int(port), args.token)
        stack.callback(policy.close)
        spec = policy.connect()
        print(f"policy server {args.server}: chunk {spec.chunk_size}, cameras {sorted(spec.cameras)}", file=sys.stderr)
        return policy, spec, None
    path = args.policy or DEMO_POLICY  # check_client_args lets only the simulator come without one
    if args.policy is None and not Path(DEMO_POLICY).exists():
        raise InferError(f"no demo policy at {DEMO_POLICY}: run `python train.py` first "
                         "(about 10 minutes on a CPU), or pass --policy")
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    policy, policy_fn, spec = prepare_policy(path, args.vlm, args.device, args.fast)
    fast_mode = getattr(policy, "fast_mode", "off")
    mode = f" ({fast_mode} fast mode)" if fast_mode != "off" else ""
    print(f"policy on {policy.device}{mode}: chunk {spec.chunk_size}, cameras {sorted(spec.cameras)}", file=sys.stderr)
    return policy_fn, spec, path


def open_cameras(args: argparse.Namespace, spec: PolicySpec, stack: ExitStack) -> dict:
    given = dict(parse_camera(text) for text in args.camera)
    unknown = sorted(set(given) - set(spec.cameras))
    if unknown:
        raise InferError(f"camera(s) {unknown} are not inputs of the policy, which expects {sorted(spec.cameras)} "
                         f"(--camera NAME=DEVICE: NAME is the part after {IMAGE_PREFIX})")
    missing = sorted(set(spec.cameras) - set(given))
    if missing:
        raise InferError(f"the policy needs the camera(s) {missing}: add --camera NAME=DEVICE for each")
    options = dict(option.partition("=")[::2] for option in args.camera_option)
    cameras = {}
    for key, size in spec.cameras.items():
        camera = Camera(key, given[key], size, args.camera_format, options, args.camera_timeout)
        stack.callback(camera.close)
        cameras[key] = camera.start()
    return cameras


def report(metrics: Metrics, args: argparse.Namespace) -> None:
    print(metrics.report(), file=sys.stderr)
    if args.metrics_json:
        metrics.write_json(args.metrics_json)
        print(f"metrics written to {args.metrics_json}", file=sys.stderr)
    if args.plot:
        metrics.plot(args.plot)
        print(f"queue and latency plot written to {args.plot}", file=sys.stderr)


def run_client(args: argparse.Namespace, rig: SimulatedRig | None = None) -> int:
    """The robot client from parsed flags: the arm connected with torque off, the policy loaded and
    checked against it, the cameras opened, torque on, then drive() until --duration, Ctrl-C or
    SIGTERM, a failure, or (with a rig) its task done. Returns the exit status: USER_ERROR for a
    mistake in the set-up, 1 after a failure during the run, 128 + the signal if interrupted before.

    With a rig the arm is simulated: no --port, its cameras and clock, the demo policy when neither
    --policy nor --server is given (with the scene's task unless --task), and its outcome printed
    after the run. The rig is closed on every way out."""
    try:
        with sigterm_as_ctrl_c():
            return _client(args, rig)
    except KeyboardInterrupt as err:  # while loading: the arm, if connected, never had torque on
        word, status = interruption(err)
        print(f"{word} before the run started; the arm did not move", file=sys.stderr)
        return status


def _client(args: argparse.Namespace, rig: SimulatedRig | None) -> int:
    with ExitStack() as stack:
        if rig is not None:
            stack.callback(rig.close)  # after the driver's disconnect (the stack unwinds in reverse)
        try:
            check_client_args(args, simulated=rig is not None)
            robot = open_arm(args, stack, rig)
            policy_fn, spec, source = open_policy(args, stack)
            unchecked = check_policy_fits_arm(spec, robot.legacy)
            if unchecked:
                print(f"warning: the policy records no {' or '.join(unchecked)}, so they could not be checked "
                      "against the arm: make sure it was trained on SO-100 data in degrees (`main_*` datasets "
                      "such as lerobot/svla_so100_pickplace need --legacy)", file=sys.stderr)
            task = args.task if args.task is not None else rig.default_task  # only a rig's demo has none
            config = ClientConfig(control_rate(source, args.fps), args.threshold, args.aggregate, args.ease_in,
                                  args.similarity, args.sync, args.n_action_steps, rtc=args.rtc)
            if rig is None:
                client = RobotClient(robot, open_cameras(args, spec, stack), policy_fn, spec, task, config)
            else:  # the physics advances in the control loop's sleep, paced to the wall clock
                client = RobotClient(robot, rig.cameras_for(spec), policy_fn, spec, task, config,
                                     clock=rig.now, sleep=rig.sleep)
            robot.torque_on()  # holds the present pose; the first moves ramp from it
        except UserError as err:  # feetech.FeetechError too: a wrong port, a silent servo, a calibration
            print(f"error: {err}", file=sys.stderr)
            return USER_ERROR
        print(f"running {client.metrics.mode} at {config.fps:g} fps, g = {client.threshold:g}; Ctrl-C stops",
              file=sys.stderr)
        status = drive(client, args.duration, live=not args.quiet, until=rig.task_done if rig is not None else None)
        if rig is not None:
            print(rig.outcome(), file=sys.stderr)
    report(client.metrics, args)
    return status


def interruption(err: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped a command before its run, in words, and the exit status a shell expects."""
    if isinstance(err, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"--sim", "--sim-seed"} & set(argv):  # else argparse would take --sim for an abbreviated --similarity
        print("error: the simulated arm moved to `python sim.py live` (the same flags; --sim-seed is "
              "--scene-seed there)", file=sys.stderr)
        return USER_ERROR
    if argv[:1] != ["serve"]:
        return run_client(build_parser().parse_args(argv))
    try:
        with sigterm_as_ctrl_c():  # serving, remote.serve_main stops on either with "stopped" and 0
            return remote.serve_main(argv[1:])
    except KeyboardInterrupt as err:
        word, status = interruption(err)
        print(f"{word} while loading the policy", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
