"""What every test module shares: Ctrl-C reaches the commands the tests start, and none outlives its test."""

import os
import signal
import subprocess

import pytest

# A suite started from a script as a background job (`nohup python -m pytest &`) begins with SIGINT
# ignored, and an ignored signal is inherited across exec: every command a test starts would then
# ignore Ctrl-C too (Python installs no KeyboardInterrupt handler where SIGINT starts ignored), and
# the tests that stop a command with Ctrl-C would wait for it in vain. Tests run as a user runs the
# commands, from a terminal: with Ctrl-C delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def spawn():
    """spawn(argv, **popen_kwargs) -> subprocess.Popen. Each command runs in a session of its own, and
    whatever the test's outcome, the command and anything it started are killed and reaped when the
    test ends: no process outlives the test that started it."""
    started: list[subprocess.Popen] = []

    def start(argv, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, start_new_session=True, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the command's own children too (its session)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
