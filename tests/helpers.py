"""Shared test helpers: running real multi-process launches on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], processes: int = 2, extra: list[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` N real processes on this CPU machine (torchrun-style launcher;
    pipeline.training.distributed turns it into a gloo job). ``args`` follow the launcher, e.g. ["-m", "x"]."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launch, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
