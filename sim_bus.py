"""A simulated SO-100 servo bus: six STS3215 register tables answering Feetech packets on a
pseudo-terminal, so that so100.SO100 talks to it exactly as to a real arm.

Without a scene each servo moves toward its goal at a fixed speed (the driver's tests, and `python
sim.py bus` to try the driver's command line without hardware). With a scene (sim_so100.Scene, the
SO-100 in MuJoCo) the encoders read the physics (Present_Position from the joint angle) and
Goal_Position / Torque_Enable drive the joints. Faults can be injected into any servo's replies. No
MuJoCo here: the scene is anything with joint_angles(), joint_ranges, goal, torque, set_torque() and
a lock.

    with SimulatedBus() as bus, so100.SO100(bus.port, calibration=bus.calibration) as arm:
        arm.read()
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections import deque
from typing import Sequence

import feetech
import so100

JOINTS = so100.JOINT_NAMES  # shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper

FAULTS = ("no_reply", "bad_checksum", "truncated", "noise", "error", "wrong_id")
NOISE = b"\x00\xff\x13\xff\xfe\x37"  # garbage before a reply, with lone FF bytes to test resync

# A plausible calibrated arm: (homing_offset, range_min, range_max) per joint.
BUS_CALIBRATION = {
    "shoulder_pan": (120, 780, 3310),
    "shoulder_lift": (-850, 830, 3240),
    "elbow_flex": (1015, 900, 3120),
    "wrist_flex": (-310, 850, 3260),
    "wrist_roll": (600, 0, so100.MAX_RESOLUTION),
    "gripper": (-1200, 2020, 3420),
}
TICKS_PER_RADIAN = feetech.STEPS_PER_TURN / (2 * math.pi)
CENTRE_TICKS = 2048  # a joint angle of 0 rad reads here: the scene's joint ranges fit inside one turn


def radians_to_ticks(angle: float) -> float:
    return CENTRE_TICKS + angle * TICKS_PER_RADIAN


def ticks_to_radians(ticks: float) -> float:
    return (ticks - CENTRE_TICKS) / TICKS_PER_RADIAN


def physics_calibration(joint_ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[int, int, int]]:
    """The calibration of a simulated arm whose joints move within `joint_ranges` (radians): each
    joint's range of motion in ticks, as the real calibration records it by moving every joint
    through its range."""
    out = {}
    for offset, name in zip((150, -900, 1000, -300, 600, -1150), JOINTS):
        low, high = joint_ranges[name]
        out[name] = (offset, math.ceil(radians_to_ticks(low)), math.floor(radians_to_ticks(high)))
    return out


class SimulatedServo:
    """One STS3215's register table and shaft. Registers hold what a real servo would report;
    the shaft's `actual` angle (raw encoder steps, float) is the physical truth."""

    def __init__(self, servo_id: int):
        self.id = servo_id
        self.registers = bytearray(256)
        self.actual = 2048.0
        defaults = {
            "Firmware_Major_Version": 3, "Firmware_Minor_Version": 10, "Model_Number": feetech.STS3215_MODEL,
            "ID": servo_id, "Baud_Rate": 0, "Return_Delay": 250, "Response_Status_Level": 1,
            "Min_Position_Limit": 0, "Max_Position_Limit": so100.MAX_RESOLUTION, "Max_Temperature_Limit": 70,
            "Max_Voltage_Limit": 140, "Min_Voltage_Limit": 40, "Max_Torque_Limit": 1000, "Phase": 0x0C,
            "P_Coefficient": 32, "D_Coefficient": 32, "I_Coefficient": 0, "Protection_Current": 500,
            "Homing_Offset": 0, "Operating_Mode": 0, "Overload_Torque": 80, "Torque_Enable": 0,
            "Acceleration": 0, "Goal_Position": 0, "Torque_Limit": 1000, "Lock": 1,
            "Present_Voltage": 120, "Present_Temperature": 28, "Maximum_Acceleration": 0,
        }
        for name, value in defaults.items():
            self.set(name, value)
        self.set("Goal_Position", self.present())

    def get(self, name: str) -> int:
        address, size, _ = feetech.REGISTERS[name]
        return feetech.decode_register(name, bytes(self.registers[address:address + size]))

    def set(self, name: str, value: int) -> None:
        address, size, _ = feetech.REGISTERS[name]
        self.registers[address:address + size] = feetech.encode_register(name, value)

    def present(self) -> int:
        """Present = Actual - Homing_Offset, wrapped to one turn (single-turn mode)."""
        return int(round(self.actual - self.get("Homing_Offset"))) % feetech.STEPS_PER_TURN

    def set_present(self, present: float) -> None:
        self.actual = (present + self.get("Homing_Offset")) % feetech.STEPS_PER_TURN

    def goal(self) -> int:
        """Goal_Position inside the position limits (the servo itself keeps goals there)."""
        goal = self.get("Goal_Position")
        low, high = self.get("Min_Position_Limit"), self.get("Max_Position_Limit")
        return min(max(goal, low), high) if low < high else goal

    def advance(self, dt: float, speed: float) -> None:
        """Move toward the goal at `speed` steps/s while torque is on; refresh the Present_* registers."""
        velocity = 0
        if self.get("Torque_Enable"):
            offset = self.get("Homing_Offset")
            present = (self.actual - offset) % feetech.STEPS_PER_TURN
            error = self.goal() - present
            step = min(abs(error), speed * dt)
            if step > 0:
                present += step if error > 0 else -step
                self.actual = (present + offset) % feetech.STEPS_PER_TURN
                velocity = int(round(step / dt)) * (1 if error > 0 else -1) if dt > 0 else 0
        self.refresh(velocity)

    def refresh(self, velocity: int = 0) -> None:
        self.set("Present_Position", self.present())
        self.set("Present_Velocity", max(-32767, min(32767, velocity)))
        self.set("Moving", int(velocity != 0))

    def write(self, address: int, data: bytes) -> None:
        for offset, byte in enumerate(data):
            a = address + offset
            if a < feetech.REGISTERS["Return_Delay"][0]:
                continue  # firmware, model, id and baud rate stay fixed in the simulator
            if a < feetech.EEPROM_END and self.get("Lock"):
                continue  # EEPROM is write-protected while locked (simplification: ignored, no error)
            if a < len(self.registers):
                self.registers[a] = byte


class SimulatedBus:
    """A simulated SO-100 servo bus served by a thread on a pseudo-terminal.

    `with SimulatedBus() as sim: SO100(sim.port, calibration=sim.calibration)` talks to it exactly as
    to a real arm. It answers PING, READ, WRITE, SYNC_READ and SYNC_WRITE (bad-checksum instruction
    packets are ignored, as servos do). With `scene`, the servos are the scene's joints; without,
    they move toward their goal at `speed` steps/s while torque is on. `inject(servo_id, fault,
    count)` corrupts that servo's next replies. With calibrated=False the registers hold factory
    values (no offset, full range) for calibration tests.
    """

    def __init__(self, calibrated: bool = True, speed: float = 3000.0,
                 servo_ids: Sequence[int] = tuple(so100.MOTOR_IDS.values()), scene: "sim_so100.Scene | None" = None):
        self.speed, self.scene = speed, scene
        self.servos = {i: SimulatedServo(i) for i in servo_ids}
        layout = physics_calibration(scene.joint_ranges) if scene is not None else BUS_CALIBRATION
        self._calibration = {
            name: {"id": so100.MOTOR_IDS[name], "drive_mode": 0, "homing_offset": offset,
                   "range_min": low, "range_max": high}
            for name, (offset, low, high) in layout.items()}
        for name, (offset, low, high) in layout.items():
            servo = self.servos.get(so100.MOTOR_IDS[name])
            if servo is None:
                continue
            if calibrated:
                servo.set("Homing_Offset", offset)
                servo.set("Min_Position_Limit", low)
                servo.set("Max_Position_Limit", high)
            servo.actual = ((low + high) // 2 + offset) % feetech.STEPS_PER_TURN  # rest pose: mid-range
            servo.set("Goal_Position", servo.present())
            servo.advance(0.0, speed)
        self._faults: dict[int, deque] = {i: deque() for i in servo_ids}
        self.log: deque = deque(maxlen=10000)  # (servo id, instruction) of each packet received
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified each time _working turns False
        self._last_advance = time.monotonic()
        self._stop = threading.Event()
        self._working = False  # bytes taken from the port and not yet answered
        self._thread: threading.Thread | None = None
        self._master = self._slave = -1
        self.port = ""
        if scene is not None:
            self._read_physics()

    @property
    def calibration(self) -> dict[str, dict[str, int]]:
        """A LeRobot-format calibration matching the registers of a calibrated simulator."""
        return copy.deepcopy(self._calibration)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "SimulatedBus":
        import tty  # POSIX only

        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)  # bytes pass unchanged: no echo, no newline translation
        self.port = os.ttyname(self._slave)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="so100-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        for fd in (self._master, self._slave):  # the slave stays open meanwhile so the master never sees EIO
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> "SimulatedBus":
        return self.start()

    def __exit__(self, *exc_info) -> bool:
        self.stop()
        return False

    def settle(self) -> None:
        """Return once every byte written to the port so far has been acted on. A SYNC_WRITE has no
        reply, so without this the physics could move on before the new goals arrive."""
        import select

        with self._lock:
            while self._thread is not None and (self._working or select.select([self._master], [], [], 0)[0]):
                # woken when the serving thread has acted on what it read (the timeout only guards)
                self._idle.wait(0.05)

    # -- test hooks -------------------------------------------------------------------------------

    def inject(self, servo_id: int, fault: str, count: int = 1, bits: int = 0x20) -> None:
        """Corrupt the next `count` replies of `servo_id`: no_reply, bad_checksum, truncated, noise
        (garbage before the header), error (status error byte = `bits`), wrong_id (reply from id+1)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
        with self._lock:
            self._faults[servo_id].append([fault, count, bits])

    def send_raw(self, data: bytes) -> None:
        """Put bytes on the wire unasked, e.g. a stale reply that arrived after its timeout."""
        self._send(bytes(data))

    def clear_faults(self) -> None:
        with self._lock:
            for queue in self._faults.values():
                queue.clear()

    def _with_state(self, servo_id: int):
        self._advance()
        return self.servos[servo_id]

    def registers(self, servo_id: int) -> bytes:
        with self._lock:
            return bytes(self._with_state(servo_id).registers)

    def register(self, servo_id: int, name: str) -> int:
        with self._lock:
            return self._with_state(servo_id).get(name)

    def set_register(self, servo_id: int, name: str, value: int) -> None:
        """Set a register directly (ignores Lock): to set up a scenario in a test."""
        with self._lock:
            self._with_state(servo_id).set(name, value)
            self._drive_physics()

    def position(self, servo_id: int) -> int:
        """Present_Position in steps (after the homing offset)."""
        with self._lock:
            return self._with_state(servo_id).present()

    def set_position(self, servo_id: int, present: float) -> None:
        """Move the shaft by hand so that Present_Position reads `present`."""
        if self.scene is not None:
            raise RuntimeError("with a scene, move the joints in the physics (scene.data.qpos)")
        with self._lock:
            servo = self._with_state(servo_id)
            servo.set_present(present)
            servo.advance(0.0, self.speed)

    def torque_enabled(self, servo_id: int) -> bool:
        return bool(self.register(servo_id, "Torque_Enable"))

    # -- the servos' shafts: a fixed-speed motor, or the physics ----------------------------------

    def _advance(self) -> None:
        if self.scene is not None:
            self._read_physics()
            return
        now = time.monotonic()
        dt, self._last_advance = now - self._last_advance, now
        for servo in self.servos.values():
            servo.advance(dt, self.speed)

    def _read_physics(self) -> None:
        angles = self.scene.joint_angles()
        for j, name in enumerate(JOINTS):
            servo = self.servos.get(so100.MOTOR_IDS[name])
            if servo is not None:
                servo.actual = (radians_to_ticks(angles[j]) + servo.get("Homing_Offset")) % feetech.STEPS_PER_TURN
                servo.refresh()

    def _drive_physics(self) -> None:
        """Goal_Position and Torque_Enable of each servo into the scene's actuators."""
        if self.scene is None:
            return
        with self.scene.lock:
            for j, name in enumerate(JOINTS):
                servo = self.servos.get(so100.MOTOR_IDS[name])
                if servo is None:
                    continue
                self.scene.goal[j] = ticks_to_radians(servo.goal())
                torque = bool(servo.get("Torque_Enable"))
                if torque != self.scene.torque[j]:
                    self.scene.set_torque(j, torque)

    # -- serving ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        import select

        buffer = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.02)
            if not ready:
                buffer.clear()  # a packet left incomplete this long is abandoned, as a servo's timeout does
                continue
            # Working from the read until every whole packet read is acted on (its reply sent): the bytes
            # have left the port by then, and settle() must not take the port's silence for "done".
            with self._lock:
                self._working = True
            try:
                buffer += os.read(self._master, 4096)
                while (packet := self._take_instruction(buffer)) is not None:
                    with self._lock:
                        self._advance()
                        try:
                            reply = self._handle(*packet)
                        except (ValueError, IndexError):
                            reply = b""  # a malformed instruction is ignored, as a servo would
                        self._drive_physics()
                    if reply:
                        self._send(reply)
            except OSError:
                time.sleep(0.01)
            finally:
                with self._lock:
                    self._working = False
                    self._idle.notify_all()

    @staticmethod
    def _take_instruction(buffer: bytearray) -> tuple[int, int, bytes] | None:
        """The next whole instruction packet in `buffer`; one with a bad checksum is dropped unanswered,
        as a servo drops it."""
        while True:
            try:
                packet = feetech.parse_packet(buffer, instruction=True)
            except feetech.ChecksumError:
                continue
            return None if packet is None else (packet.servo_id, packet.code, packet.params)

    def _handle(self, servo_id: int, instruction: int, params: bytes) -> bytes:
        """Apply one instruction packet; return the bytes the bus answers with."""
        self.log.append((servo_id, instruction))
        if instruction == feetech.SYNC_READ and servo_id == feetech.BROADCAST_ID and len(params) >= 2:
            address, size = params[0], params[1]
            return b"".join(self._reply(i, bytes(self.servos[i].registers[address:address + size]))
                            for i in params[2:] if i in self.servos)
        if instruction == feetech.SYNC_WRITE and servo_id == feetech.BROADCAST_ID and len(params) >= 2:
            address, size = params[0], params[1]
            body = params[2:]
            for k in range(0, len(body) - size, size + 1):
                target = body[k]
                if target in self.servos:
                    self.servos[target].write(address, body[k + 1:k + 1 + size])
            return b""
        servo = self.servos.get(servo_id)
        if servo is None:
            return b""
        if instruction == feetech.PING:
            return self._reply(servo_id, b"")
        if instruction == feetech.READ and len(params) == 2:
            address, size = params
            return self._reply(servo_id, bytes(servo.registers[address:address + size]))
        if instruction == feetech.WRITE and len(params) >= 2:
            servo.write(params[0], params[1:])
            return self._reply(servo_id, b"")
        return b""

    def _reply(self, servo_id: int, data: bytes) -> bytes:
        queue = self._faults[servo_id]
        if not queue:
            return feetech.status_packet(servo_id, 0, data)
        entry = queue[0]
        fault, bits = entry[0], entry[2]
        entry[1] -= 1
        if entry[1] <= 0:
            queue.popleft()
        packet = feetech.status_packet(servo_id, bits if fault == "error" else 0, data)
        if fault == "no_reply":
            return b""
        if fault == "bad_checksum":
            return packet[:-1] + bytes([packet[-1] ^ 0x5A])
        if fault == "truncated":
            return packet[: len(packet) // 2]
        if fault == "noise":
            return NOISE + packet
        if fault == "wrong_id":
            return feetech.status_packet((servo_id % 253) + 1, 0, data)
        return packet

    def _send(self, data: bytes) -> None:
        while data:
            try:
                written = os.write(self._master, data)
            except OSError:
                return
            data = data[written:]
