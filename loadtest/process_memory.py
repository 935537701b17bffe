"""A local server process's resident memory, sampled on a thread (what a container limit counts on CPU)."""

from __future__ import annotations

import threading
import time

import psutil


class RssSampler:
    """Samples a process's RSS every `interval_s` from construction until `stop()`; keeps the latest and the peak."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.last_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last_bytes = self.process.memory_info().rss
            except psutil.Error:  # the process exited
                return
            self.peak_bytes = max(self.peak_bytes, self.last_bytes)
            time.sleep(self.interval_s)

    def stop(self) -> int:
        """Stop sampling; the peak RSS seen, in bytes."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_bytes
