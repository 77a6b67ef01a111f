"""so100.py: Feetech protocol bytes (the example packets of the STS3215 protocol: PING, READ,
SYNC_READ, SYNC_WRITE), LeRobot's units and calibration files, and the SO100 driver against the
simulated servo bus over a real pseudo-terminal."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sim_bus import SimulatedBus  # noqa: E402
import feetech  # noqa: E402
import so100  # noqa: E402


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# ---------------------------------------------------------------------------------------------
# Packets: the protocol's documented example byte strings, and replies computed by hand
# ---------------------------------------------------------------------------------------------

def test_ping_packet_and_reply():
    assert feetech.ping_packet(1) == h("FF FF 01 02 01 FB")
    assert feetech.status_packet(1, 0) == h("FF FF 01 02 00 FC")
    reply = feetech.parse_packet(bytearray(h("FF FF 01 02 00 FC")))
    assert (reply.servo_id, reply.code, reply.params) == (1, 0, b"")


def test_read_packet_and_reply():
    assert feetech.read_packet(1, 56, 2) == h("FF FF 01 04 02 38 02 BE")
    # Present_Position 2048 = 0x0800 from id 1: checksum ~(01+04+00+00+08) = ~0x0D = 0xF2.
    reply = feetech.parse_packet(bytearray(h("FF FF 01 04 00 00 08 F2")), params_length=2)
    assert reply.params == h("00 08")
    assert feetech.decode_register("Present_Position", reply.params) == 2048


def test_write_packet():
    # WRITE Goal_Position (42 = 0x2A) 2048 to id 1: ~(01+05+03+2A+00+08) = ~0x3B = 0xC4.
    assert feetech.write_packet(1, 42, feetech.encode_register("Goal_Position", 2048)) == h("FF FF 01 05 03 2A 00 08 C4")


def test_sync_read_packet_and_replies():
    assert feetech.sync_read_packet([1, 2, 3, 4, 5, 6], 56, 2) == h("FF FF FE 0A 82 38 02 01 02 03 04 05 06 26")
    # One reply per servo, in order; positions 2048 + id, checksums by hand: ~(id + 4 + 0 + id + 8).
    stream = bytearray()
    for i in range(1, 7):
        stream += bytes([0xFF, 0xFF, i, 4, 0, i, 8, ~(i + 4 + i + 8) & 0xFF])
    got = []
    while (reply := feetech.parse_packet(stream, params_length=2)) is not None:
        got.append((reply.servo_id, feetech.decode_register("Present_Position", reply.params)))
    assert got == [(i, 2048 + i) for i in range(1, 7)]


def test_sync_write_packet():
    goal = feetech.encode_register("Goal_Position", 2048)
    packet = feetech.sync_write_packet(42, 2, {i: goal for i in range(1, 7)})
    assert packet == h("FF FF FE 16 83 2A 02 01 00 08 02 00 08 03 00 08 04 00 08 05 00 08 06 00 08 F7")


def test_sign_magnitude_by_hand():
    assert feetech.encode_sign_magnitude(-100, 11) == 0x800 + 100
    assert feetech.decode_sign_magnitude(0x800 + 100, 11) == -100
    assert feetech.decode_sign_magnitude(100, 11) == 100
    assert feetech.encode_sign_magnitude(-5, 15) == 0x8005
    assert feetech.decode_sign_magnitude(0x8005, 15) == -5
    assert feetech.decode_sign_magnitude(0x0405, 10) == -5  # Present_Load: sign at bit 10
    assert feetech.encode_register("Homing_Offset", -100) == bytes([0x64, 0x08])  # little-endian
    assert feetech.decode_register("Homing_Offset", bytes([0x64, 0x08])) == -100
    assert feetech.encode_register("Goal_Position", -1) == bytes([0x01, 0x80])
    with pytest.raises(ValueError):
        feetech.encode_sign_magnitude(2048, 11)  # 11 bits of magnitude: at most 2047
    with pytest.raises(ValueError):
        feetech.encode_register("Lock", 256)


def test_error_byte_names_faults():
    assert feetech.decode_error_byte(0) == []
    assert feetech.decode_error_byte(0x25) == ["voltage", "overheat", "overload"]
    assert feetech.decode_error_byte(0x0A) == ["angle sensor", "over-current"]


def test_parser_discards_noise_and_resyncs():
    good = h("FF FF 01 04 00 00 08 F2")
    # Noise with lone FF bytes, a header whose id is FF (FF FF FF ...), then the packet.
    buffer = bytearray(h("00 13 FF 37 FF") + h("FF") + good)
    reply = feetech.parse_packet(buffer, params_length=2)
    assert reply.raw == good and buffer == bytearray()


def test_parser_bad_checksum_raises_then_resyncs():
    bad = h("FF FF 01 04 00 00 08 F3")
    good = h("FF FF 02 04 00 00 08 F1")  # ~(02+04+00+00+08) = ~0x0E = 0xF1
    buffer = bytearray(bad + good)
    with pytest.raises(feetech.ChecksumError):
        feetech.parse_packet(buffer, params_length=2)
    reply = feetech.parse_packet(buffer, params_length=2)
    assert reply.servo_id == 2 and reply.raw == good


def test_parser_reads_instruction_packets_too():
    """What a servo receives: a broadcast SYNC_READ is an instruction, never a status packet."""
    sync_read = feetech.sync_read_packet([1, 2], 56, 2)
    assert feetech.parse_packet(bytearray(sync_read)) is None  # id FE: no servo sends that
    buffer = bytearray(h("00 FF") + sync_read + feetech.ping_packet(3))
    packet = feetech.parse_packet(buffer, instruction=True)
    assert (packet.servo_id, packet.code, packet.params) == (0xFE, feetech.SYNC_READ, bytes([56, 2, 1, 2]))
    assert feetech.parse_packet(buffer, instruction=True).raw == feetech.ping_packet(3) and buffer == bytearray()
    corrupt = bytearray(feetech.ping_packet(3)[:-1] + b"\x00")
    with pytest.raises(feetech.ChecksumError, match="instruction packet"):
        feetech.parse_packet(corrupt, instruction=True)


def test_parser_waits_on_truncated_packet_and_skips_wrong_length():
    truncated = bytearray(h("FF FF 01 04 00 00"))
    assert feetech.parse_packet(truncated, params_length=2) is None
    assert truncated == bytearray(h("FF FF 01 04 00 00"))  # kept: the rest may still come
    # A PING-sized reply where a 2-byte READ reply is expected is not taken for it.
    assert feetech.parse_packet(bytearray(h("FF FF 01 02 00 FC")), params_length=2) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(0, 8)))
def test_fuzz_parser_random_bytes(data, params_length):
    buffer = bytearray(data)
    _drain_and_check(buffer, params_length)


valid_packets = st.builds(
    lambda i, e, p: feetech.status_packet(i, e, p),
    st.integers(0, 253), st.integers(0, 255), st.binary(max_size=6))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(valid_packets, st.binary(max_size=4), st.integers(0, 12))), st.none())
def test_fuzz_parser_truncated_and_noisy_streams(pieces, params_length):
    stream = b"".join(noise + packet[:cut] for packet, noise, cut in pieces)
    _drain_and_check(bytearray(stream), params_length)


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_packets, max_size=8))
def test_fuzz_parser_recovers_clean_streams(packets):
    buffer = bytearray(b"".join(packets))
    assert [r.raw for r in _drain_and_check(buffer, None)] == packets


def _drain_and_check(buffer: bytearray, params_length):
    """Parse until nothing is left; only the driver's errors may escape, and every packet returned
    must carry a correct checksum (recomputed here from its raw bytes)."""
    found = []
    for _ in range(len(buffer) + 2):
        try:
            reply = feetech.parse_packet(buffer, params_length)
        except feetech.ChecksumError:
            continue
        if reply is None:
            break
        raw = reply.raw
        assert raw[:2] == b"\xff\xff" and raw[3] == len(raw) - 4
        assert (~sum(raw[2:-1])) & 0xFF == raw[-1]
        assert reply.servo_id == raw[2] and reply.code == raw[4] and reply.params == raw[5:-1]
        if params_length is not None:
            assert len(reply.params) == params_length
        found.append(reply)
    else:
        pytest.fail("parser did not make progress")
    return found


# ---------------------------------------------------------------------------------------------
# Units: hand-computed values
# ---------------------------------------------------------------------------------------------

def test_degrees_by_hand():
    # mid = (1000 + 3000) / 2 = 2000; 113 steps * 360 / 4095 = 40680 / 4095 degrees.
    assert so100.ticks_to_degrees(2113, 1000, 3000) == pytest.approx(40680 / 4095)
    assert so100.ticks_to_degrees(2000, 1000, 3000) == 0.0
    # 10 deg * 4095 / 360 = 113.75 -> 2113.75 -> truncated to 2113.
    assert so100.degrees_to_ticks(10, 1000, 3000) == 2113
    assert so100.degrees_to_ticks(-10, 1000, 3000) == 1886  # 1886.25
    # Truncation toward zero, not floor: -1 deg around mid 1 -> -11.375 + 1 = -10.375 -> -10.
    assert so100.degrees_to_ticks(-1, 0, 2) == -10
    # No clamp on DEGREES.
    assert so100.ticks_to_degrees(0, 1000, 3000) == pytest.approx(-2000 * 360 / 4095)


def test_read_then_write_back_keeps_every_tick():
    # The 1e-6 rounding before truncation: without it, float noise sends some ticks to tick - 1 (in
    # percent, range 303..3885: tick 3875 -> 3874), and a gripper told to hold its position creeps.
    for low, high in [(780, 3310), (830, 3240), (0, 4095), (2020, 3420), (303, 3885)]:
        for tick in range(low, high + 1):
            assert so100.degrees_to_ticks(so100.ticks_to_degrees(tick, low, high), low, high) == tick
            assert so100.percent_to_ticks(so100.ticks_to_percent(tick, low, high), low, high) == tick


def test_percent_by_hand():
    assert so100.ticks_to_percent(2500, 2000, 3000) == 50.0
    assert so100.ticks_to_percent(1990, 2000, 3000) == 0.0  # clamped to the range
    assert so100.ticks_to_percent(3010, 2000, 3000) == 100.0
    assert so100.percent_to_ticks(37.5, 2000, 2010) == 2003  # 2003.75 truncated
    assert so100.percent_to_ticks(150, 2000, 3000) == 3000


def test_legacy_conversion_by_hand():
    current = np.array([1.0, 30.0, -20.0, 4.0, 5.0, 60.0])
    legacy = so100.to_legacy(current)
    assert legacy.tolist() == [1.0, 60.0, 70.0, 4.0, 5.0, 60.0]
    assert so100.from_legacy(legacy).tolist() == current.tolist()


# ---------------------------------------------------------------------------------------------
# Calibration files
# ---------------------------------------------------------------------------------------------

# A LeRobot calibration as its tools write it (json.dump with indent 4), typed out by hand.
LEROBOT_FILE = """{
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": 120, "range_min": 780, "range_max": 3310},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": -850, "range_min": 830, "range_max": 3240},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": 1015, "range_min": 900, "range_max": 3120},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": -310, "range_min": 850, "range_max": 3260},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": 600, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": -1200, "range_min": 2020, "range_max": 3420}
}"""


def test_calibration_from_path_and_dict(tmp_path):
    path = tmp_path / "arm.json"
    path.write_text(LEROBOT_FILE)
    calibration, source = so100.load_calibration(path)
    assert source == str(path)
    assert calibration["shoulder_lift"] == {"id": 2, "drive_mode": 0, "homing_offset": -850,
                                            "range_min": 830, "range_max": 3240}
    assert so100.load_calibration(json.loads(LEROBOT_FILE))[0] == calibration


def test_calibration_default_locations(tmp_path, monkeypatch):
    for var in ("HF_LEROBOT_CALIBRATION", "HF_LEROBOT_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(so100.CalibrationError) as e:
        so100.SO100("/dev/null", robot_id="blue")
    message = str(e.value)
    assert str(tmp_path / ".cache/huggingface/lerobot/calibration/robots/so100_follower/blue.json") in message
    assert "robots/so_follower/blue.json" in message and "python so100.py calibrate" in message

    old = tmp_path / ".cache/huggingface/lerobot/calibration/robots/so100_follower/blue.json"
    old.parent.mkdir(parents=True)
    old.write_text(LEROBOT_FILE)
    assert so100.SO100("/dev/null", robot_id="blue").calibration_source == str(old)
    assert so100.SO100("/dev/null").calibration_source == str(old)  # the only file: no id needed

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    new = tmp_path / "hf/lerobot/calibration/robots/so_follower/blue.json"
    new.parent.mkdir(parents=True)
    new.write_text(LEROBOT_FILE)
    assert so100.SO100("/dev/null", robot_id="blue").calibration_source == str(new)

    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "cal"))
    assert so100.default_calibration_path("x") == tmp_path / "cal/robots/so_follower/x.json"


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("gripper"), "gripper"),
    (lambda c: c["elbow_flex"].pop("range_max"), "elbow_flex lacks range_max"),
    (lambda c: c["wrist_flex"].update(drive_mode=1), "wrist_flex.drive_mode"),
    (lambda c: c["shoulder_pan"].update(id=7), "shoulder_pan.id"),
    (lambda c: c["shoulder_lift"].update(range_min=4000), "shoulder_lift range"),
    (lambda c: c["wrist_roll"].update(homing_offset="12"), "wrist_roll.homing_offset"),
])
def test_calibration_errors_name_the_key(tmp_path, edit, words):
    calibration = json.loads(LEROBOT_FILE)
    edit(calibration)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(calibration))
    with pytest.raises(so100.CalibrationError, match=words) as e:
        so100.load_calibration(path)
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# The driver against the simulator over a pseudo-terminal
# ---------------------------------------------------------------------------------------------

FAST = dict(reply_timeout=0.05, attempts=3)


@pytest.fixture
def sim():
    with SimulatedBus(speed=50000.0) as arm:
        yield arm


def instructions(sim, kind):
    return sum(1 for _, instruction in sim.log if instruction == kind)


def settle(arm):
    """The simulator handles packets in order: once a PING is answered, earlier SYNC_WRITEs are applied."""
    arm.bus.ping(1)


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_sim_calibration_matches_hand_written_file(sim):
    assert sim.calibration == json.loads(LEROBOT_FILE)
    assert sim.register(4, "Homing_Offset") == -310 and sim.register(6, "Min_Position_Limit") == 2020
    assert sim.register(1, "Model_Number") == 777


def test_sim_homing_offset_applies_to_present_position(sim):
    # Present = Actual - Offset: shoulder_pan has offset 120, so an actual 2620 reads 2500.
    sim.set_register(1, "Homing_Offset", 0)
    sim.set_position(1, 2620)
    sim.set_register(1, "Homing_Offset", 120)
    assert sim.position(1) == 2500
    assert sim.register(1, "Present_Position") == 2500


def test_connect_configures_servos(sim):
    sim.set_register(2, "Phase", 0x1C)  # multi-turn bit set: must be cleared
    sim.set_register(3, "Goal_Position", 100)  # a stale goal must not make the arm jump on torque on
    with so100.SO100(sim.port, calibration=sim.calibration, **FAST):
        for i in range(1, 7):
            assert sim.register(i, "Return_Delay") == 0
            assert sim.register(i, "Maximum_Acceleration") == 254
            assert sim.register(i, "Acceleration") == 254
            assert sim.register(i, "Operating_Mode") == 0
            assert (sim.register(i, "P_Coefficient"), sim.register(i, "I_Coefficient"),
                    sim.register(i, "D_Coefficient")) == (16, 0, 32)
            assert sim.register(i, "Phase") & 0x10 == 0
            assert sim.register(i, "Lock") == 1
            assert sim.torque_enabled(i)
            assert sim.register(i, "Goal_Position") == sim.position(i)
        assert sim.register(2, "Phase") == 0x0C  # the other bits are kept
        assert sim.register(6, "Max_Torque_Limit") == 500
        assert sim.register(6, "Protection_Current") == 250
        assert sim.register(6, "Overload_Torque") == 25
        assert sim.register(1, "Max_Torque_Limit") == 1000  # only the gripper is limited


def test_read_positions_by_hand(sim):
    # shoulder_pan 780..3310: mid 2045, +455 steps = 455 * 360 / 4095 = 40 degrees.
    sim.set_position(1, 2500)
    sim.set_position(2, 2035 + 455)  # shoulder_lift 830..3240, mid 2035: +40
    sim.set_position(3, 2010 - 455)  # elbow_flex 900..3120, mid 2010: -40
    sim.set_position(4, 2055)  # wrist_flex 850..3260, mid 2055: 0
    sim.set_position(5, 0)  # wrist_roll 0..4095, mid 2047.5: -180
    sim.set_position(6, 2720)  # gripper 2020..3420: 700 / 1400 = 50 %
    with so100.SO100(sim.port, calibration=sim.calibration, **FAST) as arm:
        sim.log.clear()
        values = arm.read()
        assert [(i, kind) for i, kind in sim.log] == [(0xFE, 0x82)]  # one SYNC_READ
        np.testing.assert_allclose(values, [40, 40, -40, 0, -180, 50], atol=1e-4)
        assert arm.joint_names == ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
    with so100.SO100(sim.port, calibration=sim.calibration, legacy=True, **FAST) as arm:
        # legacy: shoulder_lift 90 - 40 = 50, elbow_flex -40 + 90 = 50.
        np.testing.assert_allclose(arm.read(), [40, 50, 50, 0, -180, 50], atol=1e-4)
        assert arm.state_names[0] == "main_shoulder_pan"


def test_write_ramps_then_moves_to_goal(sim):
    with so100.SO100(sim.port, calibration=sim.calibration, ramp_step=3.0, **FAST) as arm:
        start = arm.read()
        sim.log.clear()
        sent = arm.write([40, 0, 0, 0, 0, 50])
        settle(arm)
        assert [(i, kind) for i, kind in sim.log] == [(0xFE, 0x83), (1, 0x01)]  # one SYNC_WRITE
        # First write: at most 3 degrees from the present pose; 3 deg = 34.125 steps -> 2045 + 34.
        assert sent[0] == pytest.approx(start[0] + 3)
        assert sim.register(1, "Goal_Position") == 2045 + 34
        for _ in range(20):
            sent = arm.write([40, 0, 0, 0, 0, 50])
        settle(arm)
        np.testing.assert_allclose(sent, [40, 0, 0, 0, 0, 50], atol=1e-5)
        assert sim.register(1, "Goal_Position") == 2500  # 40 deg = 455 steps past mid 2045
        assert wait_until(lambda: sim.position(1) == 2500)
        np.testing.assert_allclose(arm.read()[0], 40, atol=1e-4)
        # Ramp over: a jump of 20 degrees now goes straight out.
        arm.write([20, 0, 0, 0, 0, 50])
        settle(arm)
        assert sim.register(1, "Goal_Position") == 2272  # 20 * 4095 / 360 = 227.5 -> 2272.5 -> 2272


def test_write_clips_and_rejects_non_finite(sim):
    with so100.SO100(sim.port, calibration=sim.calibration, ramp_step=1000, **FAST) as arm:
        arm.write([500, 0, 0, 0, 0, 150])
        settle(arm)
        assert sim.register(1, "Goal_Position") == 3310  # shoulder_pan range_max
        assert sim.register(6, "Goal_Position") == 3420  # gripper 100 %
        sim.log.clear()
        with pytest.raises(ValueError, match="elbow_flex"):
            arm.write([0, 0, np.nan, 0, 0, 50])
        with pytest.raises(ValueError, match="gripper"):
            arm.write([0, 0, 0, 0, 0, np.inf])
        with pytest.raises(ValueError):
            arm.write([0, 0, 0])
        settle(arm)
        assert instructions(sim, 0x83) == 0  # nothing was sent


def test_max_relative_target(sim):
    with so100.SO100(sim.port, calibration=sim.calibration, max_relative_target=5.0, ramp_step=1000, **FAST) as arm:
        present = arm.read()
        sent = arm.write(present + np.array([30, -30, 0, 0, 0, 0]))
        settle(arm)
        np.testing.assert_allclose(sent[:2], present[:2] + [5, -5], atol=1e-4)
        # 5 deg = 56.875 steps: 2045 + 56.875 -> 2101; shoulder_lift mid 2035 - 56.875 -> 1978.
        assert sim.register(1, "Goal_Position") == 2101
        assert sim.register(2, "Goal_Position") == 1978


def test_legacy_write(sim):
    with so100.SO100(sim.port, calibration=sim.calibration, legacy=True, ramp_step=1000, **FAST) as arm:
        arm.write([0, 90 - 40, -40 + 90, 0, 0, 50])  # legacy units for lift +40, elbow -40
        settle(arm)
        assert sim.register(2, "Goal_Position") == 2035 + 455
        assert sim.register(3, "Goal_Position") == int(2010 - 455)


def test_torque_off_on_disconnect_and_on_exception(sim):
    with so100.SO100(sim.port, calibration=sim.calibration, **FAST):
        assert all(sim.torque_enabled(i) for i in range(1, 7))
    assert not any(sim.torque_enabled(i) for i in range(1, 7))

    with pytest.raises(RuntimeError, match="boom"):
        with so100.SO100(sim.port, calibration=sim.calibration, **FAST) as arm:
            arm.write([10, 0, 0, 0, 0, 50])
            raise RuntimeError("boom")
    assert not any(sim.torque_enabled(i) for i in range(1, 7))

    with pytest.raises(KeyboardInterrupt):
        with so100.SO100(sim.port, calibration=sim.calibration, **FAST):
            raise KeyboardInterrupt
    assert not any(sim.torque_enabled(i) for i in range(1, 7))


def test_torque_off_and_on(sim):
    with so100.SO100(sim.port, calibration=sim.calibration, **FAST) as arm:
        arm.torque_off()
        assert not sim.torque_enabled(3)
        with pytest.raises(feetech.FeetechError, match="torque is off"):
            arm.write([0, 0, 0, 0, 0, 50])
        sim.set_position(1, 2300)  # moved by hand while limp
        arm.torque_on()
        assert sim.torque_enabled(3) and sim.register(1, "Goal_Position") == 2300


def test_missing_servos_are_all_named():
    with SimulatedBus(servo_ids=(1, 2, 4, 6)) as sim:
        arm = so100.SO100(sim.port, calibration=sim.calibration, reply_timeout=0.02, attempts=2)
        with pytest.raises(feetech.NoReplyError) as e:
            arm.connect()
        message = str(e.value)
        assert "servo 3 (elbow_flex)" in message and "servo 5 (wrist_roll)" in message
        assert sim.port in message and "servo 1 " not in message
        assert not arm.bus.is_open


def test_wrong_model_is_named(sim):
    sim.set_register(4, "Model_Number", 1234)
    with pytest.raises(feetech.FeetechError, match=r"servo 4 \(wrist_flex\) reports model number 1234"):
        so100.SO100(sim.port, calibration=sim.calibration, **FAST).connect()


def test_calibration_mismatch_is_detected_and_named(sim):
    calibration = sim.calibration
    calibration["wrist_flex"]["homing_offset"] = -300
    calibration["gripper"]["range_max"] = 3400
    arm = so100.SO100(sim.port, calibration=calibration, **FAST)
    with pytest.raises(so100.CalibrationError) as e:
        arm.connect()
    message = str(e.value)
    assert "wrist_flex (id 4) Homing_Offset is -310 on the servo, -300 in the file" in message
    assert "gripper (id 6) Max_Position_Limit is 3420 on the servo, 3400 in the file" in message
    assert "shoulder_pan" not in message
    assert not any(sim.torque_enabled(i) for i in range(1, 7))

    with so100.SO100(sim.port, calibration=calibration, calibration_mismatch="write", **FAST):
        assert sim.register(4, "Homing_Offset") == -300
        assert sim.register(6, "Max_Position_Limit") == 3400


def test_calibrate_flow_writes_lerobot_json(tmp_path):
    with SimulatedBus(calibrated=False, speed=50000.0) as sim:
        middle = {1: 2100, 2: 1500, 3: 2600, 4: 2000, 5: 3000, 6: 1000}  # raw: offsets are 0 now
        ranges = {1: (700, 3300), 2: (800, 3200), 3: (900, 3100), 4: (850, 3250), 6: (1900, 3400)}

        def wait_for_enter(prompt):
            assert "middle" in prompt
            for i, raw in middle.items():
                sim.set_position(i, raw)

        # Each poll moves one joint to one end of its range (in positions after the new offsets).
        poses = [(i, end) for i, (low, high) in ranges.items() for end in (low, high)]
        poses.append((1, 2047))

        def recording_done():
            if not poses:
                return True
            sim.set_position(*poses.pop(0))
            return False

        bus = feetech.FeetechBus(sim.port, **FAST)
        bus.open()
        try:
            calibration = so100.run_calibration(bus, wait_for_enter=wait_for_enter,
                                                recording_done=recording_done, log=lambda _: None)
        finally:
            bus.close()
        path = so100.save_calibration(calibration, tmp_path / "robots/so_follower/lab.json")

        data = json.loads(path.read_text())
        assert list(data) == ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
        assert list(data["elbow_flex"]) == ["id", "drive_mode", "homing_offset", "range_min", "range_max"]
        # Homing offset = raw middle - 2047: the middle pose then reads 2047.
        assert data["shoulder_pan"] == {"id": 1, "drive_mode": 0, "homing_offset": 53,
                                        "range_min": 700, "range_max": 3300}
        assert data["shoulder_lift"]["homing_offset"] == 1500 - 2047
        assert data["wrist_roll"] == {"id": 5, "drive_mode": 0, "homing_offset": 953, "range_min": 0, "range_max": 4095}
        assert data["gripper"] == {"id": 6, "drive_mode": 0, "homing_offset": -1047,
                                   "range_min": 1900, "range_max": 3400}
        assert path.read_text().startswith('{\n    "shoulder_pan": {\n        "id": 1,')  # indent 4, like LeRobot
        # The servos hold the same values, so the file connects without a mismatch.
        assert sim.register(3, "Homing_Offset") == 2600 - 2047
        assert sim.register(3, "Min_Position_Limit") == 900 and sim.register(3, "Max_Position_Limit") == 3100
        with so100.SO100(sim.port, calibration=path, **FAST) as arm:
            assert arm.read().shape == (6,)

        # Calibrating again keeps the previous file as .bak.
        so100.save_calibration(calibration, path)
        assert path.with_name("lab.json.bak").is_file()


def test_calibrate_refuses_unmoved_joints_and_restores_registers():
    with SimulatedBus(calibrated=True) as sim:
        bus = feetech.FeetechBus(sim.port, **FAST)
        bus.open()
        try:
            with pytest.raises(so100.CalibrationError, match="shoulder_pan, shoulder_lift"):
                so100.run_calibration(bus, wait_for_enter=lambda _: None, recording_done=lambda: True,
                                      log=lambda _: None)
        finally:
            bus.close()
        # The old calibration is still in the servos: nothing lost.
        assert sim.register(1, "Homing_Offset") == 120 and sim.register(6, "Max_Position_Limit") == 3420
        assert sim.register(6, "Lock") == 1


def test_cli_read_once(sim, tmp_path, capsys):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(sim.calibration))
    sim.set_position(1, 2500)
    assert so100.main(["read", "--port", sim.port, "--calibration", str(path), "--once"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == list(so100.JOINT_NAMES)
    assert float(out[1].split()[0]) == 40.0
    assert not sim.torque_enabled(1)


# Fault injection: every fault is retried; a transient one then succeeds with the right values, a
# persistent one ends in a clear error naming the port, servo and register.

TRANSIENT = ["no_reply", "bad_checksum", "truncated", "error", "wrong_id"]
PERSISTENT = [
    ("no_reply", feetech.NoReplyError, "no reply"),
    ("bad_checksum", feetech.ChecksumError, "checksum"),
    ("truncated", feetech.CorruptReplyError, "no valid reply"),
    ("wrong_id", feetech.CorruptReplyError, "two replies from id 4"),
    ("error", feetech.ServoFaultError, "overload"),
]


@pytest.fixture
def connected(sim):
    sim.set_position(3, 2010 - 455)  # elbow_flex reads -40 degrees (and holds it once torque is on)
    arm = so100.SO100(sim.port, calibration=sim.calibration, reply_timeout=0.03, attempts=3)
    arm.connect()
    yield sim, arm
    arm.disconnect()


@pytest.mark.parametrize("fault", TRANSIENT)
def test_transient_fault_is_retried(connected, fault):
    sim, arm = connected
    sim.inject(3, fault)
    sim.log.clear()
    retries = arm.bus.retries
    values = arm.read()
    assert values[2] == pytest.approx(-40, abs=1e-4)
    assert instructions(sim, 0x82) >= 2 and arm.bus.retries > retries


def test_noise_before_header_needs_no_retry(connected):
    sim, arm = connected
    sim.inject(3, "noise", count=3)
    sim.log.clear()
    assert arm.read()[2] == pytest.approx(-40, abs=1e-4)
    assert arm.bus.read_register(3, "Present_Position") == 2010 - 455
    assert instructions(sim, 0x82) == 1


@pytest.mark.parametrize("fault, error, words", PERSISTENT)
def test_persistent_fault_gives_clear_error(connected, fault, error, words):
    sim, arm = connected
    sim.inject(3, fault, count=3)
    sim.log.clear()
    with pytest.raises(error) as e:
        arm.read()
    message = str(e.value)
    assert words in message and sim.port in message
    assert "servo 3 (elbow_flex)" in message and "Present_Position" in message
    assert e.value.servo_id == 3 and e.value.register == "Present_Position"
    assert instructions(sim, 0x82) == 3  # tried three times, no more
    if fault == "error":
        assert e.value.faults == {3: ["overload"]}
    # The bus recovers: the next read is right, not a leftover of the failed ones.
    assert arm.read()[2] == pytest.approx(-40, abs=1e-4)


@pytest.mark.parametrize("fault, error, words", PERSISTENT)
def test_persistent_fault_on_single_read(connected, fault, error, words):
    sim, arm = connected
    sim.inject(5, fault, count=3, bits=0x05)
    with pytest.raises(error) as e:
        arm.bus.read_register(5, "Homing_Offset")
    assert "servo 5 (wrist_roll)" in str(e.value) and "Homing_Offset" in str(e.value)
    if fault == "error":
        assert e.value.faults == {5: ["voltage", "overheat"]}
    assert arm.bus.read_register(5, "Homing_Offset") == 600


def test_cli_read_raw(sim, capsys):
    sim.set_position(6, 2222)
    assert so100.main(["read", "--port", sim.port, "--raw", "--once"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[5] == "2222"


@pytest.mark.parametrize("command", [["read", "--raw", "--once"], ["calibrate", "--id", "blue", "--output", "cal.json"]])
def test_cli_errors_are_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert so100.main([*command, "--port", "/nonexistent/ttyACM9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open serial port /nonexistent/ttyACM9") and "brltty" in err
    assert err.count("\n") == 1 and not (tmp_path / "cal.json").exists()


def test_cli_read_reports_a_wrong_port_before_a_missing_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "empty"))  # no calibration anywhere
    assert so100.main(["read", "--port", "/nonexistent/ttyACM9", "--id", "blue", "--once"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open serial port /nonexistent/ttyACM9") and "calibration" not in err


def test_check_arm_needs_no_calibration_and_names_a_silent_servo(sim, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "empty"))
    so100.check_arm(sim.port)  # six STS3215s answer: nothing raised, no calibration looked for
    sim.inject(4, "no_reply", count=100)
    with pytest.raises(feetech.NoReplyError, match=r"servo 4 \(wrist_flex\): no reply"):
        so100.check_arm(sim.port, reply_timeout=0.02, attempts=2)


def test_sim_bus_command_serves_until_interrupted(tmp_path, spawn):
    import signal
    import subprocess

    calibration_path = tmp_path / "sim.json"
    process = spawn(
        [sys.executable, str(Path(so100.__file__).with_name("sim.py")), "bus", "--calibration-out", str(calibration_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        assert port.startswith("/dev/")
        with so100.SO100(port, calibration=calibration_path, **FAST) as arm:
            np.testing.assert_allclose(arm.read()[5], 50.0)  # the sim rests at mid-range
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


def test_vanished_adapter_gives_clear_error_and_disconnect_still_closes():
    sim = SimulatedBus().start()
    arm = so100.SO100(sim.port, calibration=sim.calibration, **FAST)
    arm.connect()
    sim.stop()  # like pulling the USB cable: the pseudo-terminal's other end is gone
    with pytest.raises(feetech.FeetechError, match=sim.port):
        arm.read()
    with pytest.warns(RuntimeWarning, match="could not confirm torque off"):
        arm.disconnect()
    assert not arm.bus.is_open and not arm.is_connected


def test_stale_input_is_discarded(connected):
    sim, arm = connected
    # A late reply from an earlier transaction sits in the input: Present_Position 100 from id 3.
    sim.send_raw(feetech.status_packet(3, 0, feetech.encode_register("Present_Position", 100)))
    time.sleep(0.01)
    assert arm.bus.read_register(3, "Present_Position") == 2010 - 455


@pytest.mark.parametrize("fault", ["no_reply", "bad_checksum", "truncated", "error"])
def test_connect_survives_transient_faults(sim, fault):
    sim.inject(2, fault)
    sim.inject(6, fault)
    with so100.SO100(sim.port, calibration=sim.calibration, **FAST) as arm:
        assert arm.bus.retries >= 2
        assert sim.register(6, "Overload_Torque") == 25 and sim.torque_enabled(2)
