"""SO-100 arm driver over raw serial: six Feetech STS3215 servos on one half-duplex bus.

The Feetech protocol is small. Every message is a packet

    FF FF | id | length | code | params... | checksum       checksum = ~(id + length + code + params) & 0xFF

where length counts code, params and checksum. The computer sends instruction packets: PING, READ
and WRITE to one servo's id, SYNC_READ and SYNC_WRITE to the broadcast id FE with a list of servos.
Each servo addressed answers with a status packet (code = its fault bits, 0 when all is well;
params = the bytes read), except to a SYNC_WRITE, which nothing answers. What a servo knows and
obeys is a table of registers (REGISTERS below), little-endian, a few in sign-magnitude.

Read top to bottom:
  1. the protocol: the control table, packets, registers, and parsing replies out of a byte stream
  2. the errors the driver raises, each naming the port, servo and register
  3. FeetechBus: one transaction = one instruction and its replies, with a timeout and retries
  4. SO100: the arm in LeRobot's units (degrees, gripper percent), with safety limits on write()
Machinery after the core: LeRobot calibration files, the interactive calibration procedure, and the
command line (`python so100.py {calibrate,read}`).

Without hardware: sim.py serves a simulated servo bus on a pseudo-terminal (`python sim.py bus`),
with a MuJoCo arm behind it or simple motors, and fault injection for the tests.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import serial

from cli import HelpFormatter, Parser, number, write_text

# ---------------------------------------------------------------------------------------------
# 1. The Feetech protocol
# ---------------------------------------------------------------------------------------------

# name: (address, size in bytes, sign bit or None). STS registers are little-endian; a few are
# sign-magnitude (the sign is one bit, the rest is the magnitude), with the sign bit given here.
REGISTERS: dict[str, tuple[int, int, int | None]] = {
    "Firmware_Major_Version": (0, 1, None),
    "Firmware_Minor_Version": (1, 1, None),
    "Model_Number": (3, 2, None),
    "ID": (5, 1, None),
    "Baud_Rate": (6, 1, None),
    "Return_Delay": (7, 1, None),
    "Response_Status_Level": (8, 1, None),
    "Min_Position_Limit": (9, 2, None),
    "Max_Position_Limit": (11, 2, None),
    "Max_Temperature_Limit": (13, 1, None),
    "Max_Voltage_Limit": (14, 1, None),
    "Min_Voltage_Limit": (15, 1, None),
    "Max_Torque_Limit": (16, 2, None),
    "Phase": (18, 1, None),
    "P_Coefficient": (21, 1, None),
    "D_Coefficient": (22, 1, None),
    "I_Coefficient": (23, 1, None),
    "Protection_Current": (28, 2, None),
    "Homing_Offset": (31, 2, 11),
    "Operating_Mode": (33, 1, None),
    "Overload_Torque": (36, 1, None),
    "Torque_Enable": (40, 1, None),
    "Acceleration": (41, 1, None),
    "Goal_Position": (42, 2, 15),
    "Goal_Time": (44, 2, None),
    "Goal_Velocity": (46, 2, 15),
    "Torque_Limit": (48, 2, None),
    "Lock": (55, 1, None),
    "Present_Position": (56, 2, 15),
    "Present_Velocity": (58, 2, 15),
    "Present_Load": (60, 2, 10),
    "Present_Voltage": (62, 1, None),
    "Present_Temperature": (63, 1, None),
    "Moving": (66, 1, None),
    "Present_Current": (69, 2, None),
    "Maximum_Acceleration": (85, 1, None),
}
EEPROM_END = 40  # addresses below Torque_Enable live in EEPROM: writable only with Lock 0
STS3215_MODEL = 777
PHASE_MULTI_TURN = 0x10  # Phase bit 4: multi-turn mode, which breaks the single-turn calibration
STEPS_PER_TURN = 4096
MAX_RESOLUTION = 4095  # LeRobot's unit conversions divide by 4095, not 4096
HALF_TURN = 2047  # calibration puts the middle pose at this raw position

BROADCAST_ID = 0xFE  # SYNC_READ and SYNC_WRITE go to every servo through this id
PING, READ, WRITE, REG_WRITE, ACTION, RESET, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x0A, 0x82, 0x83

# The error byte of a status packet.
FAULT_BITS: dict[int, str] = {
    0x01: "voltage", 0x02: "angle sensor", 0x04: "overheat", 0x08: "over-current", 0x20: "overload"}


def checksum(body: bytes) -> int:
    """~(id + len + instruction/error + params) & 0xFF, over everything after the FF FF header."""
    return ~sum(body) & 0xFF


def encode_packet(servo_id: int, code: int, params: bytes = b"") -> bytes:
    """An instruction packet (code: the instruction) or a servo's status packet (code: its error
    byte): the two have one layout."""
    body = bytes([servo_id, len(params) + 2, code]) + bytes(params)
    return b"\xff\xff" + body + bytes([checksum(body)])


# A servo's reply: sim.py sends these and the tests build expected replies with it.
status_packet = encode_packet


def ping_packet(servo_id: int) -> bytes:
    return encode_packet(servo_id, PING)


def read_packet(servo_id: int, address: int, size: int) -> bytes:
    return encode_packet(servo_id, READ, bytes([address, size]))


def write_packet(servo_id: int, address: int, data: bytes) -> bytes:
    return encode_packet(servo_id, WRITE, bytes([address]) + bytes(data))


def sync_read_packet(servo_ids: Sequence[int], address: int, size: int) -> bytes:
    return encode_packet(BROADCAST_ID, SYNC_READ, bytes([address, size, *servo_ids]))


def sync_write_packet(address: int, size: int, data: Mapping[int, bytes]) -> bytes:
    params = bytearray([address, size])
    for servo_id, value in data.items():
        if len(value) != size:
            raise ValueError(f"SYNC_WRITE data for servo {servo_id} is {len(value)} bytes, expected {size}")
        params += bytes([servo_id]) + bytes(value)
    return encode_packet(BROADCAST_ID, SYNC_WRITE, bytes(params))


def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    magnitude = abs(value)
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit a sign-magnitude value with the sign at bit {sign_bit}")
    return magnitude | (1 << sign_bit) if value < 0 else magnitude


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def encode_register(name: str, value: int) -> bytes:
    _, size, sign_bit = REGISTERS[name]
    value = int(value)
    if sign_bit is not None:
        value = encode_sign_magnitude(value, sign_bit)
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{value} does not fit register {name} ({size} byte{'s' * (size > 1)})")
    return value.to_bytes(size, "little")


def decode_register(name: str, data: bytes) -> int:
    _, size, sign_bit = REGISTERS[name]
    if len(data) != size:
        raise ValueError(f"register {name} is {size} bytes, got {len(data)}")
    value = int.from_bytes(data, "little")
    return decode_sign_magnitude(value, sign_bit) if sign_bit is not None else value


def decode_error_byte(error: int) -> list[str]:
    """Names of the faults set in a status packet's error byte; unknown bits are named by value."""
    names = [name for bit, name in FAULT_BITS.items() if error & bit]
    names += [f"unknown bit 0x{bit:02X}" for bit in (0x10, 0x40, 0x80) if error & bit]
    return names



@dataclass(frozen=True)
class Packet:
    servo_id: int
    code: int  # the instruction of an instruction packet, the error byte of a status packet
    params: bytes
    raw: bytes  # the whole packet, header and checksum included


MAX_STATUS_LENGTH = 130  # len field bound: no register block we read is longer than 128 bytes


def parse_packet(buffer: bytearray, params_length: int | None = None, *, instruction: bool = False) -> Packet | None:
    """Take the first valid packet out of `buffer` (consumed in place): a servo's status packet, or
    with instruction=True an instruction packet (what a servo receives; sim.py's simulated bus).

    Bytes before an FF FF header are dropped. Returns None when no complete packet is there yet,
    keeping the bytes that may start one. A header that cannot be real is treated as noise: one byte
    is dropped and the search goes on, which resynchronises on the next FF FF. Not real: id FF; for
    a status packet also the broadcast id, a length over MAX_STATUS_LENGTH, or one that is not
    `params_length` + 2 when the caller knows what it expects. A complete packet with a bad checksum
    raises ChecksumError after dropping its first byte, so the caller can note it and call again to
    resynchronise.
    """
    highest_id, longest = (BROADCAST_ID, 255) if instruction else (BROADCAST_ID - 1, MAX_STATUS_LENGTH)
    while True:
        start = buffer.find(b"\xff\xff")
        if start < 0:
            del buffer[: len(buffer) - 1 if buffer.endswith(b"\xff") else len(buffer)]
            return None
        del buffer[:start]
        if len(buffer) < 4:
            return None
        servo_id, length = buffer[2], buffer[3]
        plausible = servo_id <= highest_id and 2 <= length <= longest
        if plausible and params_length is not None:
            plausible = length == params_length + 2
        if not plausible:
            del buffer[:1]
            continue
        total = 4 + length
        if len(buffer) < total:
            return None
        packet = bytes(buffer[:total])
        if checksum(packet[2:-1]) != packet[-1]:
            del buffer[:1]
            kind = "instruction" if instruction else "status"
            raise ChecksumError(f"{kind} packet {packet.hex(' ')} from id {servo_id} fails its checksum",
                                servo_id=servo_id)
        del buffer[:total]
        return Packet(servo_id=servo_id, code=packet[4], params=packet[5:-1], raw=packet)


# ---------------------------------------------------------------------------------------------
# 2. Errors
# ---------------------------------------------------------------------------------------------

class FeetechError(Exception):
    """Base of every error this driver raises about the bus, the servos or the calibration."""

    def __init__(self, message: str, *, port: str | None = None, servo_id: int | None = None,
                 register: str | None = None):
        super().__init__(message)
        self.port, self.servo_id, self.register = port, servo_id, register


class NoReplyError(FeetechError):
    """A servo did not answer within the timeout, on every attempt."""


class CorruptReplyError(FeetechError):
    """Bytes came back but no valid status packet (truncated, wrong length, wrong id)."""


class ChecksumError(CorruptReplyError):
    """A complete status packet whose checksum does not match."""


class ServoFaultError(FeetechError):
    """A servo answered with error bits set (voltage, angle sensor, overheat, over-current, overload)."""

    def __init__(self, message: str, *, faults: dict[int, list[str]] | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.faults = faults or {}


class CalibrationError(FeetechError):
    """A calibration file is missing, malformed, or does not match the servos' registers."""



# ---------------------------------------------------------------------------------------------
# 3. FeetechBus: transactions with a bounded timeout and retries
# ---------------------------------------------------------------------------------------------

try:  # pyserial's POSIX backend lets termios.error (not an OSError) through, e.g. on a vanished adapter
    import termios

    SERIAL_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError, termios.error)
except ImportError:  # Windows
    SERIAL_ERRORS = (serial.SerialException, OSError)


class FeetechBus:
    """Feetech protocol transactions on one serial port.

    Every transaction discards stale input, sends one instruction packet and collects the status
    packets it expects within `reply_timeout` seconds; a missing, corrupt or faulted reply is
    retried, `attempts` tries in all, then raised as an error naming the port, servo and register.
    A lock makes each transaction atomic, so several threads may share one bus.
    """

    def __init__(self, port: str, *, baudrate: int = 1_000_000, reply_timeout: float = 0.05,
                 attempts: int = 3, motor_names: Mapping[int, str] | None = None):
        self.port = port
        self.baudrate = baudrate
        self.reply_timeout = reply_timeout
        self.attempts = attempts
        self.motor_names = dict(motor_names or {})
        self.retries = 0  # failed attempts that were retried, for diagnostics
        self._serial: serial.Serial | None = None
        self._lock = threading.RLock()

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def open(self) -> None:
        if self._serial is None:
            self._serial = open_serial_port(self.port, self.baudrate, self.reply_timeout)

    def close(self) -> None:
        with self._lock:
            if self._serial is not None:
                try:
                    self._serial.close()
                except SERIAL_ERRORS:
                    pass  # an unplugged adapter cannot be closed cleanly; the handle is dropped anyway
                finally:
                    self._serial = None

    def __enter__(self) -> "FeetechBus":
        self.open()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def who(self, servo_id: int) -> str:
        name = self.motor_names.get(servo_id)
        return f"servo {servo_id} ({name})" if name else f"servo {servo_id}"

    def _port(self) -> serial.Serial:
        if self._serial is None:
            raise FeetechError(f"serial port {self.port} is not open", port=self.port)
        return self._serial

    def _send(self, packet: bytes, expect_reply: bool) -> None:
        port = self._port()
        try:
            if expect_reply:
                port.reset_input_buffer()  # stale bytes from an earlier timed-out reply must not be read as ours
            port.write(packet)
            port.flush()
        except SERIAL_ERRORS as e:
            raise FeetechError(f"{self.port}: serial write failed: {e}", port=self.port) from e

    def _exchange(self, packet: bytes, servo_ids: Sequence[int], params_length: int):
        """One attempt: send `packet`, collect replies from `servo_ids` until all came or time is up."""
        self._send(packet, expect_reply=True)
        port = self._port()
        replies: dict[int, Packet] = {}
        conflicts: set[int] = set()  # ids that answered twice: neither answer can be trusted
        notes: list[str] = []
        buffer = bytearray()
        reply_size = 6 + params_length
        deadline = time.monotonic() + self.reply_timeout
        while len(replies) + len(conflicts) < len(servo_ids):
            try:
                reply = parse_packet(buffer, params_length)
            except ChecksumError as e:
                notes.append(f"checksum mismatch in a reply from id {e.servo_id}")
                continue
            if reply is not None:
                if reply.servo_id not in servo_ids:
                    notes.append(f"unexpected reply from id {reply.servo_id} (two servos with one id?)")
                elif reply.servo_id in replies or reply.servo_id in conflicts:
                    notes.append(f"two replies from id {reply.servo_id} (two servos with one id?)")
                    replies.pop(reply.servo_id, None)
                    conflicts.add(reply.servo_id)
                else:
                    replies[reply.servo_id] = reply
                continue
            # The port's read timeout stays at reply_timeout (changing it reconfigures the adapter, which
            # costs a USB round trip on some): an attempt lasts at most about twice reply_timeout.
            if time.monotonic() >= deadline:
                break
            wanted = max(1, reply_size * (len(servo_ids) - len(replies)) - len(buffer))
            try:
                buffer += port.read(wanted)
            except SERIAL_ERRORS as e:
                raise FeetechError(f"{self.port}: serial read failed: {e}", port=self.port) from e
        if buffer and len(replies) < len(servo_ids):
            notes.append(f"incomplete bytes left over: {bytes(buffer).hex(' ')}")
        return replies, notes

    def transaction(self, packet: bytes, servo_ids: Sequence[int], params_length: int,
                    register: str | None = None) -> dict[int, Packet]:
        """Send `packet` and return the status packet of each of `servo_ids`, retrying failures."""
        with self._lock:
            for attempt in range(self.attempts):
                replies, notes = self._exchange(packet, servo_ids, params_length)
                missing = [i for i in servo_ids if i not in replies]
                faults = {i: decode_error_byte(r.code) for i, r in replies.items() if r.code}
                if not missing and not faults:
                    return replies
                if attempt + 1 < self.attempts:
                    self.retries += 1
            raise self._failure(packet[4], missing, faults, notes, register)

    def _failure(self, instruction: int, missing: list[int], faults: dict[int, list[str]], notes: list[str],
                 register: str | None) -> FeetechError:
        verb = {PING: "ping", READ: "reading", SYNC_READ: "reading", WRITE: "writing"}.get(instruction, "instruction")
        where = f" {verb} register {register} (address {REGISTERS[register][0]})" if register else f" {verb}"
        tries = f"after {self.attempts} attempt{'s' * (self.attempts > 1)} of {self.reply_timeout * 1000:.0f} ms"
        detail = f" ({'; '.join(notes)})" if notes else ""
        servo_id = missing[0] if missing else next(iter(faults))
        if missing:
            who = ", ".join(self.who(i) for i in missing)
            if notes:
                return (ChecksumError if any("checksum" in n for n in notes) else CorruptReplyError)(
                    f"{self.port}: {who}{where}: no valid reply {tries}{detail}. "
                    "Hint: noise on the bus, a loose cable, or two servos sharing one id.",
                    port=self.port, servo_id=servo_id, register=register)
            return NoReplyError(
                f"{self.port}: {who}{where}: no reply {tries}. Hint: is the arm's power supply on "
                "(USB alone does not power the servos), is the cable to this servo plugged in, and is "
                "its id right?", port=self.port, servo_id=servo_id, register=register)
        who = "; ".join(f"{self.who(i)}: {', '.join(names)}" for i, names in faults.items())
        return ServoFaultError(
            f"{self.port}:{where}: servo fault {tries}: {who}. Hint: overload means a blocked joint or a "
            "gripper squeezing too hard; voltage means a wrong or weak power supply; overheat means let "
            "it cool down.", faults=faults, port=self.port, servo_id=servo_id, register=register)

    # -- instructions -----------------------------------------------------------------------------

    def ping(self, servo_id: int) -> None:
        self.transaction(ping_packet(servo_id), [servo_id], 0)

    def read(self, servo_id: int, address: int, size: int, register: str | None = None) -> bytes:
        replies = self.transaction(read_packet(servo_id, address, size), [servo_id], size, register)
        return replies[servo_id].params

    def write(self, servo_id: int, address: int, data: bytes, register: str | None = None) -> None:
        self.transaction(write_packet(servo_id, address, data), [servo_id], 0, register)

    def sync_read(self, servo_ids: Sequence[int], address: int, size: int,
                  register: str | None = None) -> dict[int, bytes]:
        replies = self.transaction(sync_read_packet(servo_ids, address, size), list(servo_ids), size, register)
        return {i: replies[i].params for i in servo_ids}

    def sync_write(self, address: int, size: int, data: Mapping[int, bytes]) -> None:
        """No servo answers a SYNC_WRITE, so there is nothing to check or retry."""
        with self._lock:
            self._send(sync_write_packet(address, size, data), expect_reply=False)

    # -- registers by name ------------------------------------------------------------------------

    def read_register(self, servo_id: int, name: str) -> int:
        address, size, _ = REGISTERS[name]
        return decode_register(name, self.read(servo_id, address, size, name))

    def write_register(self, servo_id: int, name: str, value: int) -> None:
        self.write(servo_id, REGISTERS[name][0], encode_register(name, value), name)

    def sync_read_register(self, name: str, servo_ids: Sequence[int]) -> dict[int, int]:
        address, size, _ = REGISTERS[name]
        data = self.sync_read(servo_ids, address, size, name)
        return {i: decode_register(name, value) for i, value in data.items()}

    def sync_write_register(self, name: str, values: Mapping[int, int]) -> None:
        address, size, _ = REGISTERS[name]
        self.sync_write(address, size, {i: encode_register(name, v) for i, v in values.items()})


def open_serial_port(port: str, baudrate: int, timeout: float = 0.05) -> serial.Serial:
    """Open `port` raw at `baudrate`, turning the usual failures into advice."""
    try:
        return serial.Serial(port, baudrate=baudrate, timeout=timeout, write_timeout=1.0)
    except serial.SerialException as e:
        code = getattr(e, "errno", None)
        hint = "list the serial ports with `python -m serial.tools.list_ports -v`"
        if code == errno.EACCES:
            hint = ("permission denied: add yourself to the dialout group "
                    "(`sudo usermod -aG dialout $USER`, then log out and back in)")
        elif code == errno.ENOENT:
            hint = ("no such device: check the USB cable; on Ubuntu the brltty service can grab CH340 "
                    "adapters (`sudo apt remove brltty`); " + hint)
        elif code == errno.EBUSY:
            hint = "the port is busy: another program has it open"
        raise FeetechError(f"cannot open serial port {port}: {e}. Hint: {hint}", port=port) from e


# ---------------------------------------------------------------------------------------------
# 4. The SO-100 arm: layout, units, the driver
# ---------------------------------------------------------------------------------------------

JOINT_NAMES: tuple[str, ...] = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
MOTOR_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(JOINT_NAMES)}
MOTOR_NAMES: dict[int, str] = {i: name for name, i in MOTOR_IDS.items()}  # for error messages
FULL_TURN_JOINT = "wrist_roll"  # turns freely: calibrated to the whole 0..4095 range
GRIPPER = "gripper"

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
    `<calibration dir>/robots/{so_follower,so100_follower}/<id>.json` (id= or robot_id=). On
    connect the file is compared with the servos' registers 9/11/31; a difference raises
    CalibrationError unless calibration_mismatch="write", which writes the file's values to the
    servos (what LeRobot does when you accept the file).
    """

    joint_names: list[str] = list(JOINT_NAMES)

    def __init__(self, port: str, calibration: str | os.PathLike | Mapping | None = None, legacy: bool = False,
                 max_relative_target: float | Sequence[float] | Mapping[str, float] | None = None, *,
                 id: str | None = None, robot_id: str | None = None, calibration_mismatch: str = "raise",
                 ramp_step: float = 3.0, reply_timeout: float = 0.05, attempts: int = 3):
        if calibration_mismatch not in ("raise", "write"):
            raise ValueError(f"calibration_mismatch must be 'raise' or 'write', got {calibration_mismatch!r}")
        if not ramp_step > 0:
            raise ValueError(f"ramp_step must be positive, got {ramp_step}")
        self.port = port
        self.robot_id = robot_id if robot_id is not None else id
        self.legacy = legacy
        self.calibration, self.calibration_source = load_calibration(calibration, self.robot_id)
        self.calibration_mismatch = calibration_mismatch
        self.ramp_step = float(ramp_step)
        self.max_relative_target = self._per_joint(max_relative_target)
        self.joint_names = list(JOINT_NAMES)
        self.bus = FeetechBus(port, reply_timeout=reply_timeout, attempts=attempts,
                              motor_names=MOTOR_NAMES)
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
# 5. Calibration files: LeRobot's format and where its versions keep them
# ---------------------------------------------------------------------------------------------

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
                "say which with id=... (CLI: --id) or pass the file's path")
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
# 6. Calibration procedure (LeRobot's: middle pose -> homing offsets, then ranges of motion)
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
# 7. Command line
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
    arm = SO100(args.port, calibration=args.calibration, legacy=args.legacy, id=args.id)
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
        return 1


if __name__ == "__main__":
    sys.exit(main())
