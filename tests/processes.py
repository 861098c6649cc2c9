"""Stopping a `chatforge run` child process the way a service manager does."""

from __future__ import annotations

import signal
import subprocess


def terminate(process: subprocess.Popen, grace: float = 15) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; the exit status (as it was, if it had already exited)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)
    return process.returncode
