"""Remote mode of infer_async.py: the policy runs on a GPU machine, the control loop beside the arm.

The robot computer then needs neither torch nor the model: it sends observations over TCP and gets
chunks back. The wire format is one kind of frame,

    b"SVLA" | header length | payload length | header | payload

a 12-byte prefix (magic, then two big-endian uint32), a UTF-8 JSON header, and a payload of
safetensors bytes (tensors as raw little-endian numbers with a JSON index: nothing in a message is
executed). Both lengths are checked against their limits before anything else is
read, so an oversized message costs 12 bytes. A connection is this conversation:

    client -> server  {"type": "hello", "version": 1, "token": "..."}
    server -> client  {"type": "spec", "spec": PolicySpec}            or {"type": "error", "message": ...}
    then, repeated:
    client -> server  {"type": "infer", "timestep": t, "task": "..."}  + observation.state and the cameras
                      (--rtc adds "inference_delay": d and the tensor "left_over" (n, action_dim); absent: 0, None)
    server -> client  {"type": "chunk", "timestep": t}                 + action (chunk_size, action_dim)
                                                                       or {"type": "error", "message": ...}

The server's policy is fixed when it starts: no message can name a file or a model. A token, when
set, is compared in constant time. Read top to bottom: frames, the policy description and the
observation on the wire, the server (PolicyTCPServer), the client (RemotePolicy, a policy function
like a local one), and `python infer_async.py serve`, the server's command line.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import socket
import socketserver
import struct
import sys
import threading
from typing import Callable

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from cli import USER_ERROR, HelpFormatter, Parser, UserError, integer, number
from policy_io import ACTION, FAST_CHOICES, STATE, Observation, PolicySpec, prepare_policy

MAGIC = b"SVLA"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct(">4sII")  # magic, header length, payload length
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_TASK_CHARS = 2000
LEFT_OVER = "left_over"  # the tensor of an --rtc observation's queued plan


class WireError(UserError):
    """A malformed, oversized or refused message in remote mode."""


# ---------------------------------------------------------------------------------------------
# 1. Frames
# ---------------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, header: dict, tensors: dict[str, np.ndarray] | None = None) -> None:
    body = json.dumps(header).encode()
    payload = save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}) if tensors else b""
    sock.sendall(PREFIX.pack(MAGIC, len(body), len(payload)) + body + payload)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = sock.recv(min(size - len(data), 1 << 20))
        if not part:
            raise ConnectionError("the connection closed mid-message" if data else "the connection closed")
        data += part
    return bytes(data)


def recv_frame(sock: socket.socket, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[dict, dict[str, np.ndarray]]:
    magic, header_len, payload_len = PREFIX.unpack(recv_exact(sock, PREFIX.size))
    if magic != MAGIC:
        raise WireError(f"not an infer_async message (starts with {magic!r})")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"message header of {header_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if payload_len > max_bytes:
        raise WireError(f"message of {payload_len} bytes exceeds the limit of {max_bytes}")
    try:
        header = json.loads(recv_exact(sock, header_len).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"malformed message header: {err}") from err
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireError("malformed message header: not a JSON object with a 'type'")
    payload = recv_exact(sock, payload_len)
    try:
        tensors = load_tensors(payload) if payload else {}
    except Exception as err:  # safetensors raises its own error type on garbage
        raise WireError(f"malformed tensor payload: {err}") from err
    return header, tensors


# ---------------------------------------------------------------------------------------------
# 2. What travels: the policy's description and observations
# ---------------------------------------------------------------------------------------------


def spec_to_json(spec: PolicySpec) -> dict:
    return {"cameras": {k: list(v) for k, v in spec.cameras.items()}, "state_dim": spec.state_dim,
            "action_dim": spec.action_dim, "chunk_size": spec.chunk_size, "n_action_steps": spec.n_action_steps,
            "state_names": spec.state_names, "action_names": spec.action_names,
            "state_mean": spec.state_mean, "action_mean": spec.action_mean,
            "rtc_prefix_max": spec.rtc_prefix_max, "future_state_max_offset": spec.future_state_max_offset}


def spec_from_json(raw: dict) -> PolicySpec:
    """The server's description of its policy, checked: the client trusts its shapes and names."""
    try:
        cameras = {str(k): (int(h), int(w)) for k, (h, w) in raw["cameras"].items()}
        spec = PolicySpec(cameras, int(raw["state_dim"]), int(raw["action_dim"]), int(raw["chunk_size"]),
                          int(raw["n_action_steps"]))
        for key, dim in (("state", spec.state_dim), ("action", spec.action_dim)):
            names, mean = raw.get(f"{key}_names"), raw.get(f"{key}_mean")  # absent from older servers
            if names is not None:
                if not isinstance(names, list) or len(names) != dim or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"{key}_names must be {dim} strings")
                setattr(spec, f"{key}_names", list(names))
            if mean is not None:
                if not isinstance(mean, list) or len(mean) != dim or not all(
                        isinstance(v, (int, float)) and math.isfinite(v) for v in mean):
                    raise ValueError(f"{key}_mean must be {dim} finite numbers")
                setattr(spec, f"{key}_mean", [float(v) for v in mean])
        for key in ("rtc_prefix_max", "future_state_max_offset"):  # absent from older servers: not trained for it
            value = raw.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0")
            setattr(spec, key, value)
        return spec
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise WireError(f"malformed policy description from the server: {err}") from err


def observation_header(observation: Observation) -> dict:
    header = {"type": "infer", "timestep": observation.timestep, "task": observation.task}
    if observation.left_over is not None:
        header["inference_delay"] = observation.inference_delay
    return header


def observation_tensors(observation: Observation) -> dict[str, np.ndarray]:
    tensors = {STATE: np.asarray(observation.state, np.float32), **observation.images}
    if observation.left_over is not None:
        tensors[LEFT_OVER] = np.asarray(observation.left_over, np.float32)
    return tensors


def decode_observation(header: dict, tensors: dict[str, np.ndarray], spec: PolicySpec) -> Observation:
    """Checks a received observation against the policy: exactly its keys, shapes and dtypes."""
    timestep, task = header.get("timestep"), header.get("task")
    if not isinstance(timestep, int) or timestep < 0:
        raise WireError(f"bad timestep {timestep!r}")
    if not isinstance(task, str) or len(task) > MAX_TASK_CHARS:
        raise WireError(f"the task must be a string of at most {MAX_TASK_CHARS} characters")
    expected = {STATE, *spec.cameras}
    if set(tensors) - {LEFT_OVER} != expected:
        raise WireError(f"observation keys {sorted(tensors)} do not match the policy's {sorted(expected)}")
    state = tensors[STATE]
    if state.dtype != np.float32 or state.shape != (spec.state_dim,) or not np.all(np.isfinite(state)):
        raise WireError(f"{STATE} must be finite float32 ({spec.state_dim},), got {state.dtype} {state.shape}")
    for key, (height, width) in spec.cameras.items():
        if tensors[key].dtype != np.uint8 or tensors[key].shape != (height, width, 3):
            raise WireError(f"{key} must be uint8 ({height}, {width}, 3), got {tensors[key].dtype} {tensors[key].shape}")
    left_over, delay = decode_plan(header, tensors, spec)
    return Observation(timestep, state, {k: tensors[k] for k in spec.cameras}, task,
                       left_over=left_over, inference_delay=delay)


def decode_plan(header: dict, tensors: dict[str, np.ndarray], spec: PolicySpec) -> tuple[np.ndarray | None, int]:
    """An --rtc observation's queued plan and inference delay, checked; (None, 0) from a client without
    them (an older one, or not --rtc). The client caps d below a chunk."""
    delay = header.get("inference_delay", 0)
    most = max(spec.chunk_size - 1, spec.future_state_max_offset)  # infer_async.max_inference_delay
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= most:
        raise WireError(f"inference_delay must be an integer from 0 to {most}, got {delay!r}")
    left_over = tensors.get(LEFT_OVER)
    if left_over is None:
        return None, delay
    if left_over.dtype != np.float32 or left_over.ndim != 2 or left_over.shape[1] != spec.action_dim or not np.all(
            np.isfinite(left_over)):
        raise WireError(f"{LEFT_OVER} must be finite float32 (n, {spec.action_dim}), got {left_over.dtype} "
                        f"{left_over.shape}")
    return left_over, delay


# ---------------------------------------------------------------------------------------------
# 3. The server
# ---------------------------------------------------------------------------------------------


class PolicyTCPServer(socketserver.ThreadingTCPServer):
    """Serves one fixed policy over TCP, a thread per connection; a lock runs one inference at a time."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], policy_fn: Callable[[Observation], np.ndarray], spec: PolicySpec,
                 token: str | None = None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, read_timeout: float = 60.0,
                 log: Callable[[str], None] = lambda message: None):
        self.policy_fn, self.spec, self.token, self.max_bytes = policy_fn, spec, token, max_bytes
        self.read_timeout, self.log = read_timeout, log
        self.policy_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, PolicyConnection)


class PolicyConnection(socketserver.BaseRequestHandler):
    """One client: the hello (and token), then one chunk per observation until it disconnects. A
    malformed message is answered with an error and closes the connection; the server goes on."""
    server: PolicyTCPServer

    def handle(self) -> None:
        sock, server = self.request, self.server
        sock.settimeout(server.read_timeout)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            if not self._hello(sock, server):
                server.log(f"{peer}: refused (wrong or missing token)")
                return
            server.log(f"{peer}: connected")
            while True:
                header, tensors = recv_frame(sock, server.max_bytes)
                if header["type"] != "infer":
                    raise WireError(f"unexpected message type {header['type']!r}")
                observation = decode_observation(header, tensors, server.spec)
                try:
                    with server.policy_lock:
                        chunk = np.asarray(server.policy_fn(observation), np.float32)
                except Exception as err:
                    send_frame(sock, {"type": "error", "message": f"the policy failed: {type(err).__name__}: {err}"})
                    raise
                send_frame(sock, {"type": "chunk", "timestep": observation.timestep}, {ACTION: chunk})
        except WireError as err:
            server.log(f"{peer}: {err}; closing")
            try:
                send_frame(sock, {"type": "error", "message": str(err)})
            except OSError:
                pass
        except (ConnectionError, socket.timeout, OSError) as err:
            server.log(f"{peer}: disconnected ({err})")
        except Exception as err:
            server.log(f"{peer}: policy error {type(err).__name__}: {err}")

    @staticmethod
    def _hello(sock: socket.socket, server: PolicyTCPServer) -> bool:
        header, _ = recv_frame(sock, max_bytes=0)
        if header["type"] != "hello" or header.get("version") != PROTOCOL_VERSION:
            raise WireError(f"expected a version {PROTOCOL_VERSION} hello, got {header['type']!r} "
                            f"version {header.get('version')!r}")
        if server.token is not None:
            given = header.get("token")
            # compare_digest takes the same time wherever the strings differ: no timing oracle.
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), server.token.encode()):
                send_frame(sock, {"type": "error", "message": "wrong or missing token"})
                return False
        send_frame(sock, {"type": "spec", "spec": spec_to_json(server.spec)})
        return True


# ---------------------------------------------------------------------------------------------
# 4. The client
# ---------------------------------------------------------------------------------------------


class RemotePolicy:
    """A policy_fn that runs on a PolicyTCPServer: connect() once, then call with observations."""

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 30.0,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.address, self.token, self.timeout, self.max_bytes = (host, port), token, timeout, max_bytes
        self.sock: socket.socket | None = None

    def connect(self) -> PolicySpec:
        try:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as err:
            raise WireError(f"cannot reach the policy server at {self.address[0]}:{self.address[1]}: {err}") from err
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
        header, _ = self._exchange({"type": "hello", "version": PROTOCOL_VERSION, "token": self.token})
        return spec_from_json(header.get("spec", {}))

    def _exchange(self, header: dict, tensors: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
        if self.sock is None:
            raise WireError("not connected: call connect() first")
        try:
            send_frame(self.sock, header, tensors)
            header, tensors = recv_frame(self.sock, self.max_bytes)
        except OSError as err:  # refused, reset, timed out, closed
            raise WireError(f"the policy server at {self.address[0]}:{self.address[1]} failed: {err}") from err
        if header["type"] == "error":
            raise WireError(f"the policy server says: {header.get('message')}")
        return header, tensors

    def __call__(self, observation: Observation) -> np.ndarray:
        header, tensors = self._exchange(observation_header(observation), observation_tensors(observation))
        if header["type"] != "chunk" or header.get("timestep") != observation.timestep or ACTION not in tensors:
            raise WireError(f"unexpected reply from the policy server: {header}")
        return tensors[ACTION]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# ---------------------------------------------------------------------------------------------
# 5. `python infer_async.py serve`
# ---------------------------------------------------------------------------------------------


def build_serve_parser() -> argparse.ArgumentParser:
    p = Parser(prog="infer_async.py serve", formatter_class=HelpFormatter,
               description="Serve one policy over TCP for `infer_async.py --server HOST:PORT`.")
    p.add_argument("--policy", required=True, help="Hub id or directory, fixed for the server's lifetime")
    p.add_argument("--vlm", help="VLM config/tokenizer (dir or Hub id) if not the policy's vlm_model_name")
    p.add_argument("--device", help="cuda, cpu, mps (default: cuda if available)")
    p.add_argument("--fast", nargs="?", const="auto", choices=FAST_CHOICES, metavar="MODE",
                   help="a faster CPU mode, as infer_async.py --fast: bare, the one chosen for this CPU (CPU only)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; keep 127.0.0.1 and reach it through an SSH tunnel")
    p.add_argument("--listen", type=integer(0, 65535), default=8765, help="TCP port (0: any free one)")
    p.add_argument("--token", default=os.environ.get("INFER_ASYNC_TOKEN"),
                   help="clients must present this token (default: $INFER_ASYNC_TOKEN)")
    p.add_argument("--max-message-mb", type=number(above=0), default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                   help="larger messages are refused before they are read")
    return p


def serve_main(argv: list[str]) -> int:
    """Serves until Ctrl-C (infer_async.main turns SIGTERM into one). Returns the exit status."""
    args = build_serve_parser().parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: serving on {args.host} without --token: anyone who can reach this port can drive "
              "the policy. Prefer 127.0.0.1 with an SSH tunnel.", file=sys.stderr)
    try:
        _, policy_fn, spec = prepare_policy(args.policy, args.vlm, args.device, args.fast)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        server = PolicyTCPServer((args.host, args.listen), policy_fn, spec, args.token,
                                 int(args.max_message_mb * 2**20), log=log)
    except OSError as err:  # the port is taken, the address is not this machine's
        print(f"error: cannot listen on {args.host}:{args.listen} (--host, --listen): {err}", file=sys.stderr)
        return USER_ERROR
    host, port = server.server_address[:2]
    log(f"serving {args.policy} on {host}:{port} (chunk {spec.chunk_size}, cameras {sorted(spec.cameras)}"
        f"{', token required' if args.token else ''}); Ctrl-C or SIGTERM stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
    return 0
