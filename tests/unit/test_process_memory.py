"""`RssSampler`: the peak and latest resident memory of a local process, sampled on a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from fitserve.loadtest.process_memory import RssSampler


def test_the_peak_covers_memory_the_process_held_for_a_moment() -> None:
    allocate = (
        "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5); "
        "del b; time.sleep(0.5)"
    )
    process = subprocess.Popen([sys.executable, "-c", allocate])
    sampler = RssSampler(process.pid, interval_s=0.01)
    process.wait(timeout=30)
    peak = sampler.stop()
    assert peak >= 200 << 20  # the 200 MiB it touched, then gave back before it exited
    assert sampler.last_bytes < peak


def test_sampling_this_process_reports_its_rss() -> None:
    sampler = RssSampler(os.getpid(), interval_s=0.01)
    try:
        time.sleep(0.1)
        assert sampler.last_bytes > 0 and sampler.peak_bytes >= sampler.last_bytes
    finally:
        assert sampler.stop() > 0
