"""remote.py: the wire format byte for byte, a round trip over loopback, and what the server refuses
(a wrong token, an oversized message before it is read, a pickle, an observation that does not fit)."""

import json
import pickle
import socket
import struct
import threading
import time

import numpy as np
import pytest

import remote
from policy_io import Observation, PolicySpec

TOP = "observation.images.top"
SPEC_2 = PolicySpec(cameras={TOP: (6, 8)}, state_dim=6, action_dim=6, chunk_size=5, n_action_steps=5)
REST_POSE = [0.0, -20.0, 30.0, 10.0, 0.0, 40.0]
SO100_NAMES = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos",
               "gripper.pos"]
LEGACY_NAMES = ["main_shoulder_pan", "main_shoulder_lift", "main_elbow_flex", "main_wrist_flex", "main_wrist_roll",
                "main_gripper"]


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
        chunk = policy(Observation(7, state, {TOP: image}, "pick up the cube"))
        chunk_again = policy(Observation(8, state + 1, {TOP: image}, "pick up the cube"))
    finally:
        policy.close()
    assert np.array_equal(chunk, state[None, :] + np.arange(5)[:, None])
    assert np.array_equal(chunk_again, chunk + 1)
    assert seen[0].timestep == 7 and seen[0].task == "pick up the cube"
    assert np.array_equal(seen[0].state, state) and np.array_equal(seen[0].images[TOP], image)


def test_remote_round_trip_of_an_rtc_observation(tcp_server):
    server, seen = tcp_server
    policy = remote.RemotePolicy("127.0.0.1", server.server_address[1], token="s3cret")
    plan = np.arange(3 * 6, dtype=np.float32).reshape(3, 6) + 0.25
    try:
        policy.connect()
        image = np.zeros((6, 8, 3), np.uint8)
        policy(Observation(7, np.zeros(6, np.float32), {TOP: image}, "x", left_over=plan, inference_delay=2))
        policy(Observation(8, np.zeros(6, np.float32), {TOP: image}, "x", left_over=plan[:0], inference_delay=0))
        policy(Observation(9, np.zeros(6, np.float32), {TOP: image}, "x"))  # async and sync send no plan
    finally:
        policy.close()
    assert np.array_equal(seen[0].left_over, plan) and seen[0].left_over.dtype == np.float32
    assert seen[0].inference_delay == 2
    assert seen[1].left_over.shape == (0, 6) and seen[1].inference_delay == 0
    assert seen[2].left_over is None and seen[2].inference_delay == 0


def test_an_observation_from_an_older_client_decodes_without_a_plan():
    header = {"type": "infer", "timestep": 3, "task": "x"}  # what version 1 clients sent before --rtc
    tensors = {"observation.state": np.zeros(6, np.float32), TOP: np.zeros((6, 8, 3), np.uint8)}
    observation = remote.decode_observation(header, tensors, SPEC_2)
    assert observation.timestep == 3 and observation.left_over is None and observation.inference_delay == 0


@pytest.mark.parametrize("header, left_over, message", [
    ({"inference_delay": 5}, np.zeros((2, 6), np.float32), "inference_delay must be an integer from 0 to 4"),
    ({"inference_delay": -1}, None, "inference_delay"),
    ({"inference_delay": True}, None, "inference_delay"),
    ({"inference_delay": 1}, np.zeros((2, 5), np.float32), "left_over must be finite float32 \\(n, 6\\)"),
    ({"inference_delay": 1}, np.zeros((2, 6), np.float64), "left_over must be finite float32"),
    ({"inference_delay": 1}, np.full((2, 6), np.nan, np.float32), "left_over must be finite float32"),
])
def test_a_malformed_plan_is_refused(header, left_over, message):
    tensors = {"observation.state": np.zeros(6, np.float32), TOP: np.zeros((6, 8, 3), np.uint8)}
    if left_over is not None:
        tensors["left_over"] = left_over
    with pytest.raises(remote.WireError, match=message):
        remote.decode_observation({"type": "infer", "timestep": 0, "task": "x", **header}, tensors, SPEC_2)


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


def test_remote_refuses_an_observation_that_does_not_fit_the_policy(tcp_server):
    server, seen = tcp_server
    policy = remote.RemotePolicy("127.0.0.1", server.server_address[1], token="s3cret")
    policy.connect()
    wrong_image = np.zeros((8, 6, 3), np.uint8)  # transposed
    with pytest.raises(remote.WireError, match="uint8 \\(6, 8, 3\\)"):
        policy(Observation(0, np.zeros(6, np.float32), {TOP: wrong_image}, "x"))
    policy.close()
    assert seen == []



def spec_with(**fields) -> PolicySpec:
    return PolicySpec(**{"cameras": {}, "state_dim": 6, "action_dim": 6, "chunk_size": 10, "n_action_steps": 10,
                         **fields})


def test_the_spec_carries_names_and_means_over_the_wire():
    spec = spec_with(state_names=SO100_NAMES, action_names=LEGACY_NAMES, state_mean=REST_POSE, action_mean=REST_POSE)
    assert remote.spec_from_json(json.loads(json.dumps(remote.spec_to_json(spec)))) == spec
    older_server = {k: v for k, v in remote.spec_to_json(spec).items() if "names" not in k and "mean" not in k}
    assert remote.spec_from_json(older_server) == spec_with()
    delayed = spec_with(rtc_prefix_max=3, future_state_max_offset=7)
    assert remote.spec_from_json(json.loads(json.dumps(remote.spec_to_json(delayed)))) == delayed
    before_rtc = {k: v for k, v in remote.spec_to_json(delayed).items() if k not in ("rtc_prefix_max",
                                                                                   "future_state_max_offset")}
    assert remote.spec_from_json(before_rtc) == spec_with()  # an older server: trained for neither
    with pytest.raises(remote.WireError, match="rtc_prefix_max must be an integer >= 0"):
        remote.spec_from_json({**remote.spec_to_json(delayed), "rtc_prefix_max": -1})
    with pytest.raises(remote.WireError, match="state_names must be 6 strings"):
        remote.spec_from_json({**remote.spec_to_json(spec), "state_names": "abcdef"})


def test_serve_reports_a_policy_it_cannot_load_in_one_line(tmp_path, capsys):
    assert remote.serve_main(["--policy", str(tmp_path / "no_policy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot load the policy") and "no_policy" in err


def test_serve_reports_a_port_it_cannot_listen_on(monkeypatch, capsys):
    monkeypatch.setattr(remote, "prepare_policy", lambda *args: (None, lambda obs: None, SPEC_2))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert remote.serve_main(["--policy", "p", "--listen", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port} (--host, --listen)")
