"""Start a real Prometheus (the Debian `prometheus` binary) on a free 127.0.0.1 port for the metrics tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.live_server import free_port


def start_prometheus(workdir: Path, config: dict[str, Any]) -> tuple[str, subprocess.Popen, Path]:
    """Write `config` to workdir/prometheus.yml and start Prometheus on it; returns (URL, process, log path).

    AssertionError when the binary is missing (install it: apt-get install -y prometheus).
    """
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).is_file(), "the prometheus binary is missing: apt-get install -y prometheus"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return f"http://127.0.0.1:{port}", process, log_path
