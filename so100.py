"""SO-100 arm driver: six Feetech STS3215 servos on one half-duplex bus (feetech.py speaks their protocol).

Read top to bottom:
  1. the arm's layout and LeRobot's units (degrees, gripper percent; the legacy `main_*` units)
  2. SO100: connect and check the servos and calibration, torque, and read()/write() with safety
     limits on every goal
Machinery after the core: LeRobot calibration files, the interactive calibration procedure, and the
command line (`python so100.py {calibrate,read}`).

Without hardware: sim_bus.py serves a simulated servo bus on a pseudo-terminal (`python sim.py bus`),
with a MuJoCo arm behind it or simple motors, and fault injection for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from cli import USER_ERROR, HelpFormatter, Parser, number, write_text
from feetech import PHASE_MULTI_TURN, STS3215_MODEL, CorruptReplyError, FeetechBus, FeetechError, NoReplyError

# ---------------------------------------------------------------------------------------------
# 1. The SO-100 arm: layout and units
# ---------------------------------------------------------------------------------------------

JOINT_NAMES: tuple[str, ...] = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
MOTOR_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(JOINT_NAMES)}
MOTOR_NAMES: dict[int, str] = {i: name for name, i in MOTOR_IDS.items()}  # for error messages
FULL_TURN_JOINT = "wrist_roll"  # turns freely: calibrated to the whole 0..4095 range
GRIPPER = "gripper"
MAX_RESOLUTION = 4095  # the highest raw position; LeRobot's unit conversions divide by it, not by 4096
HALF_TURN = 2047  # calibration puts the middle pose at this raw position

# Written on connect, with torque off and Lock 0: the settings LeRobot's SO-100 driver applies.
ARM_SETTINGS: tuple[tuple[str, int], ...] = (
    ("Return_Delay", 0),  # reply at once (the default waits 500 us before answering)
    ("Maximum_Acceleration", 254),
    ("Acceleration", 254),
    ("Operating_Mode", 0),  # position control
    ("P_Coefficient", 16),  # lower than the factory 32 to avoid shakiness
    ("I_Coefficient", 0),
    ("D_Coefficient", 32),
)
GRIPPER_SETTINGS: tuple[tuple[str, int], ...] = (
    # The gripper squeezes objects: cap its torque and current so it does not overheat or burn out.
    ("Max_Torque_Limit", 500),
    ("Protection_Current", 250),
    ("Overload_Torque", 25),
)


# LeRobot's units. Joints: DEGREES = (ticks - (range_min + range_max) / 2) * 360 / 4095, so 0 is the
# middle of the calibrated range (LeRobot divides by 4095, not 4096, and does not clamp).
def ticks_to_degrees(ticks: float, range_min: int, range_max: int) -> float:
    return (ticks - (range_min + range_max) / 2) * 360 / MAX_RESOLUTION


# Back to ticks LeRobot truncates toward zero. Rounding to 1e-6 first only removes float noise, so
# that a position read and written back (or a range limit) maps to the same tick, not one below.
def _truncate(ticks: float) -> int:
    return int(round(ticks, 6))


def degrees_to_ticks(degrees: float, range_min: int, range_max: int) -> int:
    return _truncate(degrees * MAX_RESOLUTION / 360 + (range_min + range_max) / 2)


# Gripper: RANGE_0_100, percent of the calibrated range.
def ticks_to_percent(ticks: float, range_min: int, range_max: int) -> float:
    ticks = min(max(ticks, range_min), range_max)
    return (ticks - range_min) / (range_max - range_min) * 100


def percent_to_ticks(percent: float, range_min: int, range_max: int) -> int:
    percent = min(max(percent, 0.0), 100.0)
    return _truncate(percent / 100 * (range_max - range_min) + range_min)


# The old convention of `main_*` datasets (svla_so100_pickplace): zero with the arm fully extended.
# Approximate per arm: the two zero poses differ by about, not exactly, 90 degrees.
LIFT, ELBOW = JOINT_NAMES.index("shoulder_lift"), JOINT_NAMES.index("elbow_flex")


def to_legacy(values: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=np.float64, copy=True)
    out[..., LIFT] = 90.0 - out[..., LIFT]
    out[..., ELBOW] = out[..., ELBOW] + 90.0
    return out


def from_legacy(values: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=np.float64, copy=True)
    out[..., LIFT] = 90.0 - out[..., LIFT]
    out[..., ELBOW] = out[..., ELBOW] - 90.0
    return out


def ticks_to_units(ticks: Sequence[float], calibration: Mapping) -> np.ndarray:
    out = np.empty(len(JOINT_NAMES), dtype=np.float64)
    for j, name in enumerate(JOINT_NAMES):
        c = calibration[name]
        convert = ticks_to_percent if name == GRIPPER else ticks_to_degrees
        out[j] = convert(ticks[j], c["range_min"], c["range_max"])
    return out


def units_to_ticks(values: Sequence[float], calibration: Mapping) -> list[int]:
    out = []
    for j, name in enumerate(JOINT_NAMES):
        c = calibration[name]
        convert = percent_to_ticks if name == GRIPPER else degrees_to_ticks
        out.append(convert(float(values[j]), c["range_min"], c["range_max"]))
    return out


def unit_limits(calibration: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated range of each joint in user units (degrees; percent for the gripper)."""
    low = ticks_to_units([calibration[n]["range_min"] for n in JOINT_NAMES], calibration)
    high = ticks_to_units([calibration[n]["range_max"] for n in JOINT_NAMES], calibration)
    return low, high


def check_servos(bus: FeetechBus, servo_ids: Sequence[int] = tuple(MOTOR_IDS.values())) -> None:
    """Ping every servo (reporting all missing ones at once), then check each is an STS3215."""
    missing = []
    for servo_id in servo_ids:
        try:
            bus.ping(servo_id)
        except (NoReplyError, CorruptReplyError) as e:  # a ServoFaultError names its fault: let it through
            missing.append((servo_id, e))
    if missing:
        who = "; ".join(f"{bus.who(i)}: {'corrupt reply' if isinstance(e, CorruptReplyError) else 'no reply'}"
                        for i, e in missing)
        raise NoReplyError(
            f"{bus.port}: {len(missing)} of {len(servo_ids)} servos did not answer a PING ({who}). Hint: "
            "check the arm's power supply (USB alone does not power the servos), the daisy-chain cables, "
            "and that the servos were given ids 1..6.", port=bus.port, servo_id=missing[0][0])
    for servo_id in servo_ids:
        model = bus.read_register(servo_id, "Model_Number")
        if model != STS3215_MODEL:
            raise FeetechError(f"{bus.port}: {bus.who(servo_id)} reports model number {model}, expected "
                               f"{STS3215_MODEL} (STS3215)", port=bus.port, servo_id=servo_id,
                               register="Model_Number")


def check_arm(port: str, *, reply_timeout: float = 0.05, attempts: int = 3) -> None:
    """Open `port`, check that the six servos answer and are STS3215s, and close it again.

    This needs no calibration: a program calls it first so that a wrong port or an unpowered arm is
    reported before a missing calibration file (SO100() loads the calibration when it is built)."""
    with FeetechBus(port, reply_timeout=reply_timeout, attempts=attempts, motor_names=MOTOR_NAMES) as bus:
        check_servos(bus, list(MOTOR_IDS.values()))


# ---------------------------------------------------------------------------------------------
# 2. SO100: the driver
# ---------------------------------------------------------------------------------------------


class SO100:
    """One SO-100 follower arm.

    Units: five joints in degrees (LeRobot's DEGREES convention, 0 at the middle of the calibrated
    range) and the gripper in percent of its range (0..100). With legacy=True, read and write use
    the old convention of `main_*` datasets instead (shoulder_lift and elbow_flex shifted, see
    to_legacy).

    Safety in write(): non-finite goals are refused (ValueError); goals are clipped to the
    calibrated range; `max_relative_target` (degrees, one number or one per joint) clamps each goal
    to present +- cap; and after connect() or torque_on() the goals ramp: each write() moves every
    joint at most `ramp_step` (degrees, percent for the gripper) from the previous goal, starting
    from the present position, until a goal within `ramp_step` of the last one has been reached;
    from then on goals pass straight through. At 30 calls a second and ramp_step 3 that is 90
    degrees a second.

    A calibration is a LeRobot JSON path, a dict in that format, or None to look up
    `<calibration dir>/robots/{so_follower,so100_follower}/<robot_id>.json`. On
    connect the file is compared with the servos' registers 9/11/31; a difference raises
    CalibrationError unless calibration_mismatch="write", which writes the file's values to the
    servos (what LeRobot does when you accept the file).
    """

    def __init__(self, port: str, calibration: str | os.PathLike | Mapping | None = None, legacy: bool = False,
                 max_relative_target: float | Sequence[float] | Mapping[str, float] | None = None, *,
                 robot_id: str | None = None, calibration_mismatch: str = "raise",
                 ramp_step: float = 3.0, reply_timeout: float = 0.05, attempts: int = 3):
        if calibration_mismatch not in ("raise", "write"):
            raise ValueError(f"calibration_mismatch must be 'raise' or 'write', got {calibration_mismatch!r}")
        if not ramp_step > 0:
            raise ValueError(f"ramp_step must be positive, got {ramp_step}")
        self.port, self.robot_id, self.legacy = port, robot_id, legacy
        self.calibration, self.calibration_source = load_calibration(calibration, robot_id)
        self.calibration_mismatch, self.ramp_step = calibration_mismatch, float(ramp_step)
        self.max_relative_target = self._per_joint(max_relative_target)
        self.joint_names = list(JOINT_NAMES)
        self.bus = FeetechBus(port, reply_timeout=reply_timeout, attempts=attempts, motor_names=MOTOR_NAMES)
        self._ids = [MOTOR_IDS[n] for n in JOINT_NAMES]
        self._low, self._high = unit_limits(self.calibration)
        self._connected = False
        self._torque = False
        self._ramping = False
        self._last_goal: np.ndarray | None = None  # LeRobot units

    @property
    def state_names(self) -> list[str]:
        """Feature names as datasets spell them: `main_*` in legacy mode."""
        return [f"main_{n}" for n in JOINT_NAMES] if self.legacy else list(JOINT_NAMES)

    @property
    def is_connected(self) -> bool:
        return self._connected

    @staticmethod
    def _per_joint(cap) -> np.ndarray | None:
        if cap is None:
            return None
        if isinstance(cap, Mapping):
            unknown = set(cap) - set(JOINT_NAMES)
            if unknown:
                raise ValueError(f"max_relative_target names unknown joint(s) {sorted(unknown)}")
            cap = [cap.get(n, np.inf) for n in JOINT_NAMES]
        caps = np.broadcast_to(np.asarray(cap, dtype=np.float64), (len(JOINT_NAMES),)).copy()
        if np.any(np.isnan(caps)) or np.any(caps <= 0):
            raise ValueError(f"max_relative_target must be positive, got {cap}")
        return caps

    # -- connection -------------------------------------------------------------------------------

    def connect(self, torque: bool = True) -> None:
        """Open the port, check the servos and calibration, configure, and (by default) torque on."""
        if self._connected:
            return
        self.bus.open()
        try:
            check_servos(self.bus, self._ids)
            mismatches = self.calibration_mismatches()
            if mismatches and self.calibration_mismatch == "raise":
                raise CalibrationError(
                    f"{self.port}: the calibration ({self.calibration_source}) does not match the servos: "
                    + "; ".join(mismatches) + ". Either recalibrate (`python so100.py calibrate --port "
                    f"{self.port} --id ...`) or write the file to the servos with calibration_mismatch='write'.",
                    port=self.port)
            self._configure(write_calibration=bool(mismatches))
            self._connected = True
            if torque:
                self.torque_on()
        except BaseException:
            self._connected = False
            self._torque_off_quietly()
            self.bus.close()
            raise

    def calibration_mismatches(self) -> list[str]:
        """Differences between the calibration and the servos' registers 9/11/31, in words."""
        fields = tuple(zip(CALIBRATION_REGISTERS, ("homing_offset", "range_min", "range_max")))
        diffs = []
        for name in JOINT_NAMES:
            servo_id = MOTOR_IDS[name]
            for register, field in fields:
                value = self.bus.read_register(servo_id, register)
                if value != self.calibration[name][field]:
                    diffs.append(f"{name} (id {servo_id}) {register} is {value} on the servo, "
                                 f"{self.calibration[name][field]} in the file")
        return diffs

    def _configure(self, write_calibration: bool) -> None:
        bus = self.bus
        for servo_id in self._ids:  # EEPROM writes need torque off and the lock open
            bus.write_register(servo_id, "Torque_Enable", 0)
            bus.write_register(servo_id, "Lock", 0)
        self._torque = False
        for name in JOINT_NAMES:
            servo_id = MOTOR_IDS[name]
            if write_calibration:
                c = self.calibration[name]
                bus.write_register(servo_id, "Homing_Offset", c["homing_offset"])
                bus.write_register(servo_id, "Min_Position_Limit", c["range_min"])
                bus.write_register(servo_id, "Max_Position_Limit", c["range_max"])
            for register, value in ARM_SETTINGS:
                bus.write_register(servo_id, register, value)
            phase = bus.read_register(servo_id, "Phase")
            if phase & PHASE_MULTI_TURN:
                bus.write_register(servo_id, "Phase", phase & ~PHASE_MULTI_TURN)
            if name == GRIPPER:
                for register, value in GRIPPER_SETTINGS:
                    bus.write_register(servo_id, register, value)
        for servo_id in self._ids:
            bus.write_register(servo_id, "Lock", 1)

    def disconnect(self) -> None:
        """Turn torque off (always, best effort on every servo) and close the port."""
        if not self.bus.is_open:
            self._connected = False
            return
        try:
            failures = self._torque_off_quietly()
            if failures:
                warnings.warn(f"{self.port}: could not confirm torque off on: {'; '.join(failures)}. "
                              "Switch the arm's power off.", RuntimeWarning, stacklevel=2)
        finally:
            self._connected = False
            self.bus.close()

    def __enter__(self) -> "SO100":
        self.connect()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.disconnect()
        return False

    def _require_connection(self) -> None:
        if not self._connected:
            raise FeetechError(f"SO-100 on {self.port} is not connected: call connect() or use `with`",
                               port=self.port)

    # -- torque -----------------------------------------------------------------------------------

    def torque_on(self) -> None:
        """Hold the present pose: goal := present position, then torque on; restarts the ramp."""
        self._require_connection()
        ticks = self._read_ticks()
        self.bus.sync_write_register("Goal_Position", dict(zip(self._ids, ticks)))
        for servo_id in self._ids:
            self.bus.write_register(servo_id, "Torque_Enable", 1)
        self._torque = True
        self._last_goal = ticks_to_units(ticks, self.calibration)
        self._ramping = True

    def torque_off(self) -> None:
        """Let the arm go limp (it falls if unsupported). Raises if a servo does not confirm."""
        self._require_connection()
        self._torque = False
        failures = self._torque_off_quietly()
        if failures:
            raise FeetechError(f"{self.port}: torque off not confirmed on: {'; '.join(failures)}", port=self.port)

    def _torque_off_quietly(self) -> list[str]:
        """Torque off on every servo: one broadcast, then a confirmed write each. Returns failures."""
        self._torque = False
        if not self.bus.is_open:
            return ["port not open"]
        failures = []
        try:
            self.bus.sync_write_register("Torque_Enable", {i: 0 for i in self._ids})
        except FeetechError as e:
            failures.append(str(e))
        for servo_id in self._ids:
            try:
                self.bus.write_register(servo_id, "Torque_Enable", 0)
            except FeetechError as e:
                failures.append(f"{self.bus.who(servo_id)}: {e}")
        return failures

    # -- reading and writing ----------------------------------------------------------------------

    def _read_ticks(self) -> list[int]:
        positions = self.bus.sync_read_register("Present_Position", self._ids)
        return [positions[i] for i in self._ids]

    def read(self) -> np.ndarray:
        """Present joint positions (float32[6]): degrees, gripper in percent (legacy units if legacy)."""
        self._require_connection()
        values = ticks_to_units(self._read_ticks(), self.calibration)
        return (to_legacy(values) if self.legacy else values).astype(np.float32)

    def write(self, goal: Sequence[float] | np.ndarray) -> np.ndarray:
        """Send goal positions (same units as read()); returns the goal actually sent after the
        safety limits (clip to range, max_relative_target, ramp), in the same units."""
        self._require_connection()
        if not self._torque:
            raise FeetechError(f"{self.port}: torque is off; call torque_on() before write()", port=self.port)
        goal = np.asarray(goal, dtype=np.float64)
        if goal.shape != (len(JOINT_NAMES),):
            raise ValueError(f"goal must have shape ({len(JOINT_NAMES)},) for {', '.join(JOINT_NAMES)}; "
                             f"got {goal.shape}")
        bad = [n for n, v in zip(JOINT_NAMES, goal) if not np.isfinite(v)]
        if bad:
            raise ValueError(f"refusing non-finite goal for {', '.join(bad)}: {goal.tolist()}")
        if self.legacy:
            goal = from_legacy(goal)
        goal = np.clip(goal, self._low, self._high)
        if self.max_relative_target is not None:
            present = ticks_to_units(self._read_ticks(), self.calibration)
            goal = np.clip(goal, present - self.max_relative_target, present + self.max_relative_target)
        if self._ramping:
            delta = goal - self._last_goal
            if np.all(np.abs(delta) <= self.ramp_step):
                self._ramping = False  # reached: this goal goes out as asked
            else:
                goal = self._last_goal + np.clip(delta, -self.ramp_step, self.ramp_step)
        ticks = units_to_ticks(goal, self.calibration)
        ticks = [min(max(t, self.calibration[n]["range_min"]), self.calibration[n]["range_max"])
                 for t, n in zip(ticks, JOINT_NAMES)]
        self.bus.sync_write_register("Goal_Position", dict(zip(self._ids, ticks)))
        self._last_goal = goal
        return (to_legacy(goal) if self.legacy else goal).astype(np.float32)


# =============================================================================================
# Machinery: calibration files, the calibration procedure, the command line
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 3. Calibration files: LeRobot's format and where its versions keep them
# ---------------------------------------------------------------------------------------------

class CalibrationError(FeetechError):
    """A calibration file is missing, malformed, or does not match the servos' registers."""



CALIBRATION_FIELDS = ("id", "drive_mode", "homing_offset", "range_min", "range_max")
CALIBRATION_REGISTERS = ("Homing_Offset", "Min_Position_Limit", "Max_Position_Limit")  # 31, 9, 11
# LeRobot up to v0.4.2 files SO-100 calibrations under so100_follower, from v0.4.3 under so_follower.
CALIBRATION_ROBOT_DIRS = ("so_follower", "so100_follower")


def calibration_root() -> Path:
    """LeRobot's calibration directory, honouring its environment variables."""
    if os.environ.get("HF_LEROBOT_CALIBRATION"):
        return Path(os.environ["HF_LEROBOT_CALIBRATION"]).expanduser()
    if os.environ.get("HF_LEROBOT_HOME"):
        return Path(os.environ["HF_LEROBOT_HOME"]).expanduser() / "calibration"
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "lerobot" / "calibration"


def default_calibration_path(robot_id: str) -> Path:
    """Where `python so100.py calibrate` writes: the location current LeRobot reads."""
    return calibration_root() / "robots" / CALIBRATION_ROBOT_DIRS[0] / f"{robot_id}.json"


def find_calibration_file(robot_id: str | None) -> Path:
    dirs = [calibration_root() / "robots" / d for d in CALIBRATION_ROBOT_DIRS]
    if robot_id is not None:
        candidates = [d / f"{robot_id}.json" for d in dirs]
        for path in candidates:
            if path.is_file():
                return path
        looked = ", ".join(str(p) for p in candidates)
    else:
        found = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.json"))
        if len(found) == 1:
            return found[0]
        if found:
            raise CalibrationError(
                f"several SO-100 calibrations found ({', '.join(str(p) for p in found)}); "
                "say which with robot_id=... (CLI: --id) or pass the file's path")
        looked = ", ".join(f"{d}/*.json" for d in dirs)
    raise CalibrationError(
        f"no SO-100 calibration found (looked at {looked}). Run "
        f"`python so100.py calibrate --port PORT --id {robot_id or 'ID'}` to make one, or pass the path "
        "of a LeRobot calibration JSON")


def validate_calibration(calibration: Mapping, source: str) -> dict[str, dict[str, int]]:
    """Check a LeRobot-format calibration dict and return a clean copy, naming what is wrong."""
    if not isinstance(calibration, Mapping):
        raise CalibrationError(f"{source}: calibration must be a JSON object keyed by joint name")
    missing = [name for name in JOINT_NAMES if name not in calibration]
    if missing:
        raise CalibrationError(f"{source}: no entry for joint(s) {', '.join(missing)}")
    clean: dict[str, dict[str, int]] = {}
    for name in JOINT_NAMES:
        entry = calibration[name]
        if not isinstance(entry, Mapping):
            raise CalibrationError(f"{source}: {name} must be an object with {', '.join(CALIBRATION_FIELDS)}")
        absent = [f for f in CALIBRATION_FIELDS if f not in entry]
        if absent:
            raise CalibrationError(f"{source}: {name} lacks {', '.join(absent)}")
        values = {}
        for field in CALIBRATION_FIELDS:
            value = entry[field]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise CalibrationError(f"{source}: {name}.{field} must be an integer, got {value!r}")
            values[field] = int(value)
        if values["id"] != MOTOR_IDS[name]:
            raise CalibrationError(f"{source}: {name}.id is {values['id']}, the SO-100 uses id {MOTOR_IDS[name]}")
        if values["drive_mode"] != 0:
            # LeRobot's SO-100 calibration always writes drive_mode 0; inverted joints are not supported
            # here rather than guessed.
            raise CalibrationError(f"{source}: {name}.drive_mode is {values['drive_mode']}; only 0 is supported")
        if not 0 <= values["range_min"] < values["range_max"] <= MAX_RESOLUTION:
            raise CalibrationError(
                f"{source}: {name} range {values['range_min']}..{values['range_max']} must satisfy "
                f"0 <= range_min < range_max <= {MAX_RESOLUTION}")
        if abs(values["homing_offset"]) > HALF_TURN:
            raise CalibrationError(f"{source}: {name}.homing_offset {values['homing_offset']} is outside "
                                   f"-{HALF_TURN}..{HALF_TURN}")
        clean[name] = values
    return clean


def load_calibration(calibration: str | os.PathLike | Mapping | None,
                     robot_id: str | None = None) -> tuple[dict[str, dict[str, int]], str]:
    """Return (calibration, where it came from) from a path, a dict, or LeRobot's default location."""
    if isinstance(calibration, Mapping):
        return validate_calibration(calibration, "calibration dict"), "calibration dict"
    path = Path(calibration).expanduser() if calibration is not None else find_calibration_file(robot_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read calibration file {path}: {e}") from e
    return validate_calibration(data, str(path)), str(path)


def save_calibration(calibration: Mapping, path: str | os.PathLike) -> Path:
    """Write LeRobot's JSON format; an existing file is kept as <name>.json.bak first."""
    path = Path(path).expanduser()
    clean = validate_calibration(calibration, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.copy2(path, path.with_name(path.name + ".bak"))  # the old file stays in place until replaced
    return write_text(path, json.dumps(clean, indent=4) + "\n")

# ---------------------------------------------------------------------------------------------
# 4. Calibration procedure (LeRobot's: middle pose -> homing offsets, then ranges of motion)
# ---------------------------------------------------------------------------------------------

def _enter_pressed_flag() -> Callable[[], bool]:
    """A poll that turns true once ENTER is pressed (a thread blocks on stdin; works everywhere)."""
    pressed = threading.Event()

    def wait() -> None:
        try:
            sys.stdin.readline()
        finally:
            pressed.set()

    threading.Thread(target=wait, daemon=True).start()
    return pressed.is_set


def run_calibration(bus: FeetechBus, *, wait_for_enter: Callable[[str], object] = input,
                    recording_done: Callable[[], bool] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Calibrate the arm on `bus` interactively; writes registers 9/11/31 and returns the calibration.

    `wait_for_enter(prompt)` blocks until the user is ready; `recording_done()` is polled between
    position samples while the user moves the joints (default: ENTER pressed). Tests script both.
    """
    ids = [MOTOR_IDS[n] for n in JOINT_NAMES]
    check_servos(bus, ids)
    for servo_id in ids:
        bus.write_register(servo_id, "Torque_Enable", 0)
    saved = {i: {r: bus.read_register(i, r) for r in CALIBRATION_REGISTERS} for i in ids}
    try:
        return _record_calibration(bus, ids, wait_for_enter, recording_done, log)
    except BaseException:
        # A failed or interrupted calibration leaves the servos as they were (matching the old file).
        for servo_id, registers in saved.items():
            try:
                bus.write_register(servo_id, "Lock", 0)
                for register, value in registers.items():
                    bus.write_register(servo_id, register, value)
                bus.write_register(servo_id, "Lock", 1)
            except FeetechError:
                pass
        raise


def _record_calibration(bus: FeetechBus, ids: list[int], wait_for_enter: Callable[[str], object],
                        recording_done: Callable[[], bool] | None,
                        log: Callable[[str], None]) -> dict[str, dict[str, int]]:
    for servo_id in ids:
        bus.write_register(servo_id, "Lock", 0)
    for servo_id in ids:  # read raw positions: no offset, full range
        bus.write_register(servo_id, "Homing_Offset", 0)
        bus.write_register(servo_id, "Min_Position_Limit", 0)
        bus.write_register(servo_id, "Max_Position_Limit", MAX_RESOLUTION)

    wait_for_enter("Move the arm to the middle of its range of motion (every joint halfway, gripper "
                   "half open), then press ENTER...")
    raw = bus.sync_read_register("Present_Position", ids)
    # Homing offset so that this pose reads HALF_TURN (Present = Actual - Offset); the register holds
    # 11 bits of magnitude, so a joint sitting exactly at 4095 gets 2047 (one tick off the middle).
    offsets = {name: min(raw[MOTOR_IDS[name]] - HALF_TURN, HALF_TURN) for name in JOINT_NAMES}
    for name in JOINT_NAMES:
        bus.write_register(MOTOR_IDS[name], "Homing_Offset", offsets[name])

    recorded = [n for n in JOINT_NAMES if n != FULL_TURN_JOINT]
    log(f"Move every joint except {FULL_TURN_JOINT} through its whole range of motion, one at a time. "
        "Recording positions; press ENTER to stop.")
    done = recording_done or _enter_pressed_flag()
    lows: dict[str, int] = {}
    highs: dict[str, int] = {}
    last_print = 0.0
    while True:
        positions = bus.sync_read_register("Present_Position", ids)
        for name in recorded:
            p = positions[MOTOR_IDS[name]]
            lows[name] = min(lows.get(name, p), p)
            highs[name] = max(highs.get(name, p), p)
        if time.monotonic() - last_print > 0.5:
            last_print = time.monotonic()
            log("  " + "  ".join(f"{n} {lows[n]}..{highs[n]}" for n in recorded))
        if done():
            break
    lows[FULL_TURN_JOINT], highs[FULL_TURN_JOINT] = 0, MAX_RESOLUTION
    unmoved = [n for n in recorded if highs[n] - lows[n] < 20]
    if unmoved:
        raise CalibrationError(f"{bus.port}: joint(s) {', '.join(unmoved)} hardly moved while recording "
                               "(less than 20 steps); run the calibration again and move every joint "
                               "through its full range", port=bus.port)
    calibration = {name: {"id": MOTOR_IDS[name], "drive_mode": 0, "homing_offset": offsets[name],
                          "range_min": lows[name], "range_max": highs[name]} for name in JOINT_NAMES}
    for name in JOINT_NAMES:
        bus.write_register(MOTOR_IDS[name], "Min_Position_Limit", lows[name])
        bus.write_register(MOTOR_IDS[name], "Max_Position_Limit", highs[name])
    for servo_id in ids:
        bus.write_register(servo_id, "Lock", 1)
    return calibration


# ---------------------------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------------------------

def _cmd_calibrate(args: argparse.Namespace) -> int:
    with FeetechBus(args.port, motor_names=MOTOR_NAMES) as bus:
        try:
            calibration = run_calibration(bus)
        except KeyboardInterrupt:
            print("\ncalibration interrupted; nothing written to the calibration file", file=sys.stderr)
            return 130
        finally:
            for servo_id in MOTOR_IDS.values():  # leave the arm limp
                try:
                    bus.write_register(servo_id, "Torque_Enable", 0)
                except FeetechError:
                    pass
    path = Path(args.output or default_calibration_path(args.id)).expanduser()
    existed = path.exists()
    save_calibration(calibration, path)
    for name, c in calibration.items():
        print(f"  {name:>13}: homing_offset {c['homing_offset']:>5}  range {c['range_min']}..{c['range_max']}")
    print(f"calibration written to {path}" + (f" (previous file kept as {path.name}.bak)" if existed else ""))
    return 0


def _print_positions(names: Sequence[str], read: Callable[[], Sequence[float]], once: bool, hz: float) -> None:
    widths = [max(len(n), 8) for n in names]
    print("  ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    try:
        while True:
            cells = [f"{v:>{w}}" if isinstance(v, (int, np.integer)) else f"{v:>{w}.2f}"
                     for v, w in zip(read(), widths)]
            print("  ".join(cells), flush=True)
            if once:
                break
            time.sleep(1 / hz)
    except KeyboardInterrupt:
        pass


def _cmd_read(args: argparse.Namespace) -> int:
    if args.raw:  # no calibration needed: raw Present_Position steps, torque left as it is
        with FeetechBus(args.port, motor_names=MOTOR_NAMES) as bus:
            ids = list(MOTOR_IDS.values())
            check_servos(bus, ids)
            read = lambda: list(bus.sync_read_register("Present_Position", ids).values())  # noqa: E731
            _print_positions(list(JOINT_NAMES), read, args.once, args.hz)
        return 0
    check_arm(args.port)  # the port and the servos first: a wrong port is reported before a missing calibration
    arm = SO100(args.port, calibration=args.calibration, legacy=args.legacy, robot_id=args.id)
    arm.connect(torque=False)
    try:
        _print_positions(arm.state_names, arm.read, args.once, args.hz)
    finally:
        arm.disconnect()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(description="SO-100 arm over raw serial (Feetech STS3215).", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)  # the subcommands' parsers are Parsers too
    p = sub.add_parser("calibrate", help="interactive calibration; writes LeRobot's JSON format",
                       formatter_class=HelpFormatter)
    p.add_argument("--port", required=True)
    p.add_argument("--id", required=True, help="robot id: the file is <calibration dir>/robots/so_follower/<id>.json")
    p.add_argument("--output", help="write the JSON here instead")
    p.set_defaults(func=_cmd_calibrate)
    p = sub.add_parser("read", help="print joint positions (torque stays off)", formatter_class=HelpFormatter)
    p.add_argument("--port", required=True)
    p.add_argument("--id", help="robot id to find the calibration file")
    p.add_argument("--calibration", help="path of a LeRobot calibration JSON")
    p.add_argument("--legacy", action="store_true", help="old main_* dataset units")
    p.add_argument("--raw", action="store_true", help="raw servo steps, no calibration needed")
    p.add_argument("--once", action="store_true", help="print one line and exit")
    p.add_argument("--hz", type=number(above=0), default=10.0, help="lines per second")
    p.set_defaults(func=_cmd_read)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FeetechError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
