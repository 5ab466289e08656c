"""Fault injection for the failure tests and the scale benchmark: SIGKILL a Ray Train worker once a run
has written some checkpoints (a real process death, as when a server fails)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil


class WorkerKiller(threading.Thread):
    """Watches ``run_dir`` and SIGKILLs one training worker once ``checkpoints`` checkpoint folders exist
    (the last but one is then registered: every report is a barrier). ``killed``: the pids it killed."""

    def __init__(self, run_dir: str | Path, *, checkpoints: int = 2, timeout: float = 600.0):
        super().__init__(daemon=True)
        self.run_dir, self.checkpoints, self.timeout = Path(run_dir), checkpoints, timeout
        self.killed: list[int] = []
        self.start()

    def run(self) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if len(list(self.run_dir.glob("checkpoint_*"))) >= self.checkpoints:
                for proc in psutil.process_iter(["name", "cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or ""):
                        os.kill(proc.pid, signal.SIGKILL)
                        self.killed.append(proc.pid)
                        return
            time.sleep(0.1)
