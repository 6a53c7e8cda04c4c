"""runtime.StopFlag: the first SIGTERM / Ctrl-C asks for a checkpoint at the next step boundary, a
second one more than a second later stops the process at once, even while the main thread is inside
one long C++ call (where Python's own signal handlers cannot run until it returns)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One float64 matmul of 10240 x 10240 on one thread: ~2.1 TFLOP, minutes on a CPU core, all of it
# inside a single C++ call. "done" is printed only if the process lives until it returns.
LONG_CALL = """
import os, signal, sys, time, torch
import runtime
torch.set_num_threads(1)
stop = runtime.StopFlag()
previous = stop.install()
os.kill(os.getpid(), signal.{sig})  # the first: handled at once, between bytecodes
while not stop.requested:
    time.sleep(0.01)
a = torch.randn(10240, 10240, dtype=torch.float64)
print("computing", flush=True)
a @ a
print("done", flush=True)
"""


@pytest.mark.parametrize("sig, name, code", [("SIGTERM", "SIGTERM", 143), ("SIGINT", "Ctrl-C", 130)])
def test_a_second_signal_stops_the_process_during_a_long_cpp_call(sig, name, code):
    proc = subprocess.Popen(
        [sys.executable, "-c", LONG_CALL.format(sig=sig)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "computing"
        # More than SAME_PRESS_SECONDS after the first: a new request, not the first one delivered twice.
        time.sleep(1.5)
        proc.send_signal(getattr(signal, sig))
        # With the handler alone the process would run on until the matmul returns, minutes here.
        code_seen = proc.wait(timeout=30)
        out, err = proc.communicate()
    finally:
        proc.kill()
    assert code_seen == code and "done" not in out, (out, err)
    assert f"second {name}: stopping now, without a checkpoint" in err


def test_uninstall_puts_back_the_handlers_and_the_wakeup_fd():
    import runtime

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    stop = runtime.StopFlag()
    previous = stop.install()
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    stop.uninstall(previous)
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # none left behind (and none set by this check)
