"""The Feetech STS3215 servo protocol and bus over raw serial (pyserial alone): what so100.py drives
the SO-100's six servos with, and what sim_bus.py emulates.

The protocol is small. Every message is a packet

    FF FF | id | length | code | params... | checksum       checksum = ~(id + length + code + params) & 0xFF

where length counts code, params and checksum. The computer sends instruction packets: PING, READ
and WRITE to one servo's id, SYNC_READ and SYNC_WRITE to the broadcast id FE with a list of servos.
Each servo addressed answers with a status packet (code = its fault bits, 0 when all is well;
params = the bytes read), except to a SYNC_WRITE, which nothing answers. What a servo knows and
obeys is a table of registers (REGISTERS below), little-endian, a few in sign-magnitude.

Read top to bottom:
  1. the protocol: the control table, packets, registers, and parsing replies out of a byte stream
  2. the errors the bus raises, each naming the port, servo and register
  3. FeetechBus: one transaction = one instruction and its replies, with a timeout and retries
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import serial

from cli import UserError

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

BROADCAST_ID = 0xFE  # SYNC_READ and SYNC_WRITE go to every servo through this id
PING, READ, WRITE, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x82, 0x83  # the instructions this driver sends

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


# A servo's reply: sim_bus.py sends these and the tests build expected replies with it.
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
    with instruction=True an instruction packet (what a servo receives; sim_bus.py's simulated bus).

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

class FeetechError(UserError):
    """Base of every error raised about the bus, the servos or (so100.py) the calibration: each is the
    user's to fix (power, cable, port, ids, calibration), so the command lines print it in one line."""

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
        self.port, self.baudrate, self.reply_timeout, self.attempts = port, baudrate, reply_timeout, attempts
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

    # -- the instructions, on registers named as in REGISTERS --------------------------------------

    def ping(self, servo_id: int) -> None:
        self.transaction(ping_packet(servo_id), [servo_id], 0)

    def read_register(self, servo_id: int, name: str) -> int:
        address, size, _ = REGISTERS[name]
        replies = self.transaction(read_packet(servo_id, address, size), [servo_id], size, name)
        return decode_register(name, replies[servo_id].params)

    def write_register(self, servo_id: int, name: str, value: int) -> None:
        self.transaction(write_packet(servo_id, REGISTERS[name][0], encode_register(name, value)), [servo_id], 0, name)

    def sync_read_register(self, name: str, servo_ids: Sequence[int]) -> dict[int, int]:
        address, size, _ = REGISTERS[name]
        replies = self.transaction(sync_read_packet(servo_ids, address, size), list(servo_ids), size, name)
        return {i: decode_register(name, replies[i].params) for i in servo_ids}

    def sync_write_register(self, name: str, values: Mapping[int, int]) -> None:
        """No servo answers a SYNC_WRITE, so there is nothing to check or retry."""
        address, size, _ = REGISTERS[name]
        with self._lock:
            self._send(sync_write_packet(address, size, {i: encode_register(name, v) for i, v in values.items()}),
                       expect_reply=False)


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
