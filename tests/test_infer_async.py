"""infer_async.py, remote.py and plot.py: queue arithmetic by hand, the control loop on the simulated arm with
stand-in policies of controlled latency, the TCP wire format, PyAV capture, and the real tiny SmolVLA.

Timing-based checks use margins of several times the latency, so a loaded machine cannot flip them.
"""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import infer_async as ia
import policy_io
import remote
from sim_bus import SimulatedBus
import so100
from plot import COLOURS, Panel, save_line_plot, save_panels

ROOT = Path(__file__).resolve().parents[1]
TINY_POLICY, TINY_VLM = ROOT / "tests/fixtures/tiny/policy", ROOT / "tests/fixtures/tiny/vlm"
TOP, WRIST = "observation.images.top", "observation.images.wrist"

# ---------------------------------------------------------------------------------------------
# plot.py


def pixels_of(image: Image.Image, colour) -> np.ndarray:
    """(row, column) of every pixel of (nearly) `colour`."""
    a = np.asarray(image.convert("RGB")).astype(int)
    return np.argwhere(np.abs(a - np.array(colour)).sum(-1) <= 30)


def test_line_plot_is_a_png_of_the_requested_size_with_the_line_where_the_data_goes(tmp_path):
    path = tmp_path / "loss.png"
    xs = list(range(50))
    save_line_plot(str(path), {"rising": (xs, [float(x) for x in xs])}, "t", "x", "y", size=(640, 400))
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (640, 400)
    line = pixels_of(image, COLOURS[0])
    line = line[line[:, 1] < 500]  # leave out the legend swatch in the top-right corner
    assert len(line) > 200
    # A rising series: the leftmost line pixels sit low in the image, the rightmost high.
    left = line[line[:, 1] < line[:, 1].min() + 20][:, 0].mean()
    right = line[line[:, 1] > line[:, 1].max() - 20][:, 0].mean()
    assert left > right + 150
    assert line[:, 1].max() - line[:, 1].min() > 400  # spans most of the width


def test_panels_stack_top_to_bottom_each_with_its_own_series(tmp_path):
    path = tmp_path / "panels.png"
    xs = [0.0, 1.0, 2.0]
    save_panels(str(path), [Panel({"a": (xs, [1.0, 2.0, 3.0])}, "top"),
                            Panel({"b": (xs, [5.0, 5.0, 5.0]), "c": (xs, [1.0, 0.0, 1.0])}, "bottom")], size=(500, 600))
    image = Image.open(path)
    assert image.size == (500, 600)
    first_colour, second_colour = pixels_of(image, COLOURS[0]), pixels_of(image, COLOURS[1])
    assert len(first_colour[first_colour[:, 0] < 300]) > 50  # "a" in the upper half
    assert len(first_colour[first_colour[:, 0] >= 300]) > 50  # "c": each panel starts the palette anew
    assert len(second_colour) > 50 and second_colour[:, 0].min() >= 300  # "b" only in the lower half


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
# The policy server thread: similarity skipping, errors

SPEC_1 = ia.PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=4, n_action_steps=4)


def observation(state, timestep=0, must_go=False) -> ia.Observation:
    return ia.Observation(timestep, np.asarray(state, np.float32), {}, "task", must_go, time.monotonic())


def run_server(observations, similarity, policy_fn=None):
    calls, chunks = [], []
    metrics = ia.Metrics()
    fn = policy_fn or (lambda obs: calls.append(obs.state.copy()) or np.zeros((4, 6)))
    server = ia.PolicyServer(fn, SPEC_1, lambda t, c, lat: chunks.append(t), metrics, similarity)
    server.start()
    try:
        for obs in observations:
            server.submit(obs)
            deadline = time.monotonic() + 10
            while server.busy and time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        server.stop()
    return calls, chunks, metrics, server


def test_similar_observation_skipped_unless_must_go():
    zero = [0.0] * 6
    near = [0.5, 0, 0, 0, -0.9, 0]  # every joint within 1 degree of the last processed
    far = [0, 0, 1.5, 0, 0, 0]  # one joint 1.5 degrees away
    calls, chunks, metrics, _ = run_server(
        [observation(zero, 0), observation(near, 1), observation(near, 2, must_go=True), observation(far, 3)],
        similarity=1.0)
    assert len(calls) == 3 and all(np.allclose(c, e) for c, e in zip(calls, [zero, near, far]))
    assert chunks == [0, 2, 3]
    assert metrics.observations_skipped == 1


def test_similarity_zero_never_skips():
    calls, _, metrics, _ = run_server([observation([0.0] * 6, t) for t in range(3)], similarity=0.0)
    assert len(calls) == 3 and metrics.observations_skipped == 0


@pytest.mark.parametrize("bad_chunk, message", [
    (np.array([[0.0] * 6, [np.nan] + [0.0] * 5]), "non-finite"),
    (np.zeros((4, 5)), "shape"),
])
def test_unusable_chunk_is_a_policy_error(bad_chunk, message):
    _, chunks, _, server = run_server([observation([0.0] * 6)], 0.0, policy_fn=lambda obs: bad_chunk)
    assert chunks == []
    assert isinstance(server.error, ia.PolicyError) and message in str(server.error)


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
    def policy(obs: ia.Observation) -> np.ndarray:
        time.sleep(latency)
        index = np.minimum(np.arange(obs.timestep, obs.timestep + chunk_size), len(plan) - 1)
        return plan[index]
    return policy


def run_loop(arm, actions: int, latency: float, threshold: float, sync: bool = False, chunk: int = 20,
             fps: float = 100.0, aggregate: str = "latest"):
    plan = trajectory(arm.robot.read().astype(float), actions + chunk)
    spec = ia.PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=chunk, n_action_steps=chunk)
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
    spec = ia.PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
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

    spec = ia.PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
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
    spec = ia.PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    hold = arm.robot.read()
    client = ia.RobotClient(arm, {}, lambda obs: np.tile(hold, (10, 1)), spec, "task", ia.ClientConfig(fps=50))
    started = time.monotonic()
    assert ia.drive(client, duration=0.5) == 0
    assert time.monotonic() - started < 10
    assert client.metrics.actions_executed > 0
    assert sim_torque(sim) == [0] * 6
    assert "done" in capsys.readouterr().err


def test_client_refuses_a_policy_whose_cameras_are_missing():
    spec = ia.PolicySpec(cameras={TOP: (48, 64)}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
    with pytest.raises(ia.InferError, match="observation.images.top"):
        ia.RobotClient(object(), {}, lambda obs: None, spec, "task")


# ---------------------------------------------------------------------------------------------
# Remote mode: the wire format over loopback

SPEC_2 = ia.PolicySpec(cameras={TOP: (6, 8)}, state_dim=6, action_dim=6, chunk_size=5, n_action_steps=5)


@pytest.fixture
def tcp_server():
    """A PolicyTCPServer on an ephemeral loopback port with token 's3cret' and a 1 MiB message limit;
    its policy records each observation and answers chunk[i, j] = state[j] + i."""
    seen = []

    def policy_fn(obs):
        seen.append(obs)
        return obs.state[None, :] + np.arange(5, dtype=np.float32)[:, None]

    server = remote.PolicyTCPServer(("127.0.0.1", 0), policy_fn, SPEC_2, token="s3cret", max_bytes=1 << 20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, seen
    server.shutdown()
    server.server_close()


def raw_exchange(port: int, data: bytes) -> tuple[dict, float]:
    """Sends bytes on a fresh connection; returns the server's reply header and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(data)
        header, _ = remote.recv_frame(sock)
        return header, time.monotonic() - started


def frame(header: dict, payload: bytes = b"") -> bytes:
    """The documented layout, built by hand: b'SVLA', header length, payload length (big-endian)."""
    body = json.dumps(header).encode()
    return b"SVLA" + struct.pack(">II", len(body), len(payload)) + body + payload


def test_frame_layout_matches_the_documented_bytes():
    left, right = socket.socketpair()
    with left, right:
        remote.send_frame(left, {"type": "x"})
        assert right.recv(100) == b"SVLA\x00\x00\x00\x0d\x00\x00\x00\x00" + b'{"type": "x"}'


def test_remote_round_trip_of_an_observation_and_a_chunk(tcp_server):
    server, seen = tcp_server
    policy = remote.RemotePolicy("127.0.0.1", server.server_address[1], token="s3cret")
    try:
        assert policy.connect() == SPEC_2
        image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
        state = np.array([1.5, -2, 3, 4, 5, 99], np.float32)
        chunk = policy(ia.Observation(7, state, {TOP: image}, "pick up the cube"))
        chunk_again = policy(ia.Observation(8, state + 1, {TOP: image}, "pick up the cube"))
    finally:
        policy.close()
    assert np.array_equal(chunk, state[None, :] + np.arange(5)[:, None])
    assert np.array_equal(chunk_again, chunk + 1)
    assert seen[0].timestep == 7 and seen[0].task == "pick up the cube"
    assert np.array_equal(seen[0].state, state) and np.array_equal(seen[0].images[TOP], image)


@pytest.mark.parametrize("token", ["wrong", None, "s3cret "])
def test_remote_refuses_a_wrong_or_missing_token(tcp_server, token):
    server, seen = tcp_server
    policy = remote.RemotePolicy("127.0.0.1", server.server_address[1], token=token)
    with pytest.raises(remote.WireError, match="token"):
        policy.connect()
    policy.close()
    assert seen == []


def test_remote_refuses_an_oversized_message_before_reading_it(tcp_server):
    server, seen = tcp_server
    port = server.server_address[1]
    hello = frame({"type": "hello", "version": 1, "token": "s3cret"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(hello)
        assert remote.recv_frame(sock)[0]["type"] == "spec"
        # Announce a 2 MiB payload (limit 1 MiB) and send none of it: the refusal comes at once.
        sock.sendall(b"SVLA" + struct.pack(">II", 2, 2 << 20) + b"{}")
        header, _ = remote.recv_frame(sock)
    assert header["type"] == "error" and "exceeds the limit" in header["message"]
    header, _ = raw_exchange(port, b"SVLA" + struct.pack(">II", 1 << 30, 0))  # an absurd header length
    assert header["type"] == "error" and "header" in header["message"]
    assert seen == []


def test_remote_refuses_a_pickle_payload(tcp_server):
    server, seen = tcp_server
    port = server.server_address[1]
    bomb = pickle.dumps({"type": "hello", "version": 1, "token": "s3cret"})
    header, _ = raw_exchange(port, bomb)  # a bare pickle instead of a frame
    assert header["type"] == "error" and "not an infer_async message" in header["message"]
    # A pickle where the tensor payload goes, after a good hello.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(frame({"type": "hello", "version": 1, "token": "s3cret"}))
        remote.recv_frame(sock)
        sock.sendall(frame({"type": "infer", "timestep": 0, "task": "x"}, pickle.dumps(np.zeros(6))))
        header, _ = remote.recv_frame(sock)
    assert header["type"] == "error" and "malformed tensor payload" in header["message"]
    assert seen == []


def test_module_never_uses_pickle():
    for module in ("infer_async.py", "remote.py"):
        source = (ROOT / module).read_text()
        assert "pickle" not in source and "torch.load" not in source and "eval(" not in source


def test_the_script_reports_an_unreachable_policy_server_in_one_line():
    """remote.py's errors are the InferError that infer_async.py catches also when it runs as a script."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, str(ROOT / "infer_async.py"), "--sim", "--server", f"127.0.0.1:{port}",
                           "--task", "t"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: cannot reach the policy server at 127.0.0.1:{port}")


def test_the_robot_side_of_remote_mode_needs_no_torch():
    """infer_async spells out flow's feature keys rather than import flow (and with it torch)."""
    code = "import sys, infer_async, remote; print('torch' in sys.modules, 'flow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.split() == ["False", "False"]
    import flow

    assert (ia.STATE, ia.IMAGE_PREFIX) == (flow.STATE, flow.IMAGE_PREFIX)


def test_remote_refuses_an_observation_that_does_not_fit_the_policy(tcp_server):
    server, seen = tcp_server
    policy = remote.RemotePolicy("127.0.0.1", server.server_address[1], token="s3cret")
    policy.connect()
    wrong_image = np.zeros((8, 6, 3), np.uint8)  # transposed
    with pytest.raises(remote.WireError, match="uint8 \\(6, 8, 3\\)"):
        policy(ia.Observation(0, np.zeros(6, np.float32), {TOP: wrong_image}, "x"))
    policy.close()
    assert seen == []


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
# The real SmolVLA (tiny fixture) end to end on the simulated arm


@pytest.fixture(scope="module")
def tiny_policy():
    return ia.load_policy(str(TINY_POLICY), str(TINY_VLM), "cpu")


REST_POSE = [0.0, -20.0, 30.0, 10.0, 0.0, 40.0]  # degrees, gripper percent: a pose any SO-100 can take


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
    spec = ia.policy_spec(tiny_policy)
    assert (spec.cameras, spec.state_dim, spec.action_dim, spec.chunk_size, spec.n_action_steps) == (
        {TOP: (48, 64), WRIST: (48, 64)}, 6, 6, 10, 10)
    # The fixture records no names; its means are those of its normaliser file.
    stats = load_file(TINY_POLICY / "policy_preprocessor_step_5_normalizer_processor.safetensors")
    assert spec.state_names is None and spec.action_names is None
    assert np.allclose(spec.state_mean, stats["observation.state.mean"])
    assert np.allclose(spec.action_mean, stats["action.mean"])
    rng = np.random.default_rng(0)
    cameras = {key: StillCamera(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for key, size in spec.cameras.items()}
    client = ia.RobotClient(arm, cameras, ia.make_policy_fn(tiny_policy), spec, "Pick up the cube.",
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


def test_command_line_sim_run_writes_metrics_and_plot(tmp_path, capsys, arm_policy):
    metrics_path, plot_path = tmp_path / "metrics.json", tmp_path / "queue.png"
    status = ia.main(["--sim", "--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--device", "cpu",
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
    # the MuJoCo arm ran (random weights cannot place the cube in 2 s): judged from its physics
    assert "simulation: the cube is not in the box" in err


def test_command_line_fast_mode_runs_the_int8_policy(tmp_path, capsys, arm_policy):
    status = ia.main(["--sim", "--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--fast",
                      "--task", "Pick up the cube.", "--duration", "1", "--quiet",
                      "--metrics-json", str(tmp_path / "m.json")])
    assert status == 0
    assert json.loads((tmp_path / "m.json").read_text())["actions_executed"] > 0
    assert "int8 fast mode" in capsys.readouterr().err


def test_command_line_remote_run_against_a_token_server(tcp_server, tmp_path):
    server, seen = tcp_server
    metrics_path = tmp_path / "m.json"
    status = ia.main(["--sim", "--server", f"127.0.0.1:{server.server_address[1]}", "--token", "s3cret",
                      "--task", "wave", "--fps", "50", "--duration", "1", "--quiet", "--metrics-json", str(metrics_path)])
    assert status == 0
    assert json.loads(metrics_path.read_text())["actions_executed"] > 0
    assert seen and seen[0].task == "wave" and seen[0].images[TOP].shape == (6, 8, 3)


def test_sim_without_the_demo_checkpoint_says_to_train_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ia.main(["--sim", "--quiet"]) == 2
    assert "python train.py" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--policy", "p", "--task", "t"], "--port"),
    (["--sim", "--policy", "p"], "--task"),
    (["--sim", "--server", "h:1", "--policy", "p", "--task", "t"], "exclude"),
    (["--sim", "--server", "nohostport", "--task", "t"], "HOST:PORT"),
])
def test_command_line_errors_are_clear(argv, message, capsys):
    assert ia.main(argv) == 2
    assert message in capsys.readouterr().err


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
    monkeypatch.chdir(tmp_path)  # no demo checkpoint here: nothing could run even if the flag passed
    if argv[0] != "serve":
        argv = ["--sim", "--task", "t", *argv]
    with pytest.raises(SystemExit) as exit_:
        ia.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: expected" in err and allowed in err and repr(argv[-1]) in err


def test_a_real_port_never_falls_back_to_the_demo_policy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / ia.DEMO_POLICY  # a demo checkpoint that --sim would run
    shutil.copytree(TINY_POLICY, demo)
    loaded = []
    monkeypatch.setattr(ia, "load_policy", lambda *args, **kwargs: loaded.append(args))
    assert ia.main(["--port", "/dev/ttyACM0", "--task", "pick"]) == 2
    assert "give --policy (or --server); the demo policy runs only with --sim" in capsys.readouterr().err
    assert loaded == []


SO100_NAMES = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos",
               "gripper.pos"]
LEGACY_NAMES = ["main_shoulder_pan", "main_shoulder_lift", "main_elbow_flex", "main_wrist_flex", "main_wrist_roll",
                "main_gripper"]


def spec_with(**fields) -> ia.PolicySpec:
    return ia.PolicySpec(**{"cameras": {}, "state_dim": 6, "action_dim": 6, "chunk_size": 10, "n_action_steps": 10,
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


def test_the_spec_carries_names_and_means_over_the_wire():
    spec = spec_with(state_names=SO100_NAMES, action_names=LEGACY_NAMES, state_mean=REST_POSE, action_mean=REST_POSE)
    assert remote.spec_from_json(json.loads(json.dumps(remote.spec_to_json(spec)))) == spec
    older_server = {k: v for k, v in remote.spec_to_json(spec).items() if "names" not in k and "mean" not in k}
    assert remote.spec_from_json(older_server) == spec_with()
    with pytest.raises(remote.WireError, match="state_names must be 6 strings"):
        remote.spec_from_json({**remote.spec_to_json(spec), "state_names": "abcdef"})


# ---------------------------------------------------------------------------------------------
# The order of the start: the arm (port, servos, calibration) before the slow policy load, the
# policy checked against the arm before torque goes on


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
    argv = ["--sim", "--legacy", "--policy", str(policy), "--vlm", str(TINY_VLM), "--device", "cpu", "--task", "t",
            "--duration", "1", "--quiet"]
    assert ia.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "torque went off" in err
    assert policy_loads["torque_on"] == 1


def test_ctrl_c_stops_the_loop_with_the_safe_stop(sim_arm, capsys):
    arm, sim = sim_arm
    spec = ia.PolicySpec(cameras={}, state_dim=6, action_dim=6, chunk_size=10, n_action_steps=10)
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


class Process:
    """A subprocess whose stderr lines are collected by a thread, for waiting on a message."""

    def __init__(self, spawn, argv):
        self.popen = spawn([sys.executable, str(ROOT / "infer_async.py"), *argv], cwd=ROOT,
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


def test_serve_and_client_processes_with_ctrl_c(tmp_path, arm_policy, spawn):
    """The remote-GPU setup as users run it: `serve` in one process, the robot client (simulated arm)
    in another, Ctrl-C to each."""
    server = Process(spawn, ["serve", "--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--device", "cpu",
                      "--listen", "0", "--token", "s3cret"])
    try:
        port = server.wait_for(r"serving .* on 127\.0\.0\.1:(\d+)").group(1)
        metrics_path = tmp_path / "metrics.json"
        client = Process(spawn, ["--sim", "--server", f"127.0.0.1:{port}", "--token", "s3cret", "--task", "Pick up the cube.",
                          "--metrics-json", str(metrics_path)])
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
    client = Process(spawn, ["--sim", "--policy", str(arm_policy), "--vlm", str(TINY_VLM), "--device", "cpu",
                      "--task", "Pick up the cube.", "--metrics-json", str(metrics_path)])
    try:
        client.wait_for(r"actions [1-9]")
    finally:
        status = client.interrupt(signal.SIGTERM)
    output = "".join(client.lines)
    assert status == 0, output
    assert "terminated (SIGTERM): the arm held its pose, then torque went off" in output
    assert "inference latency" in output
    assert json.loads(metrics_path.read_text())["actions_executed"] > 0
