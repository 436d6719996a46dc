"""Run `memedit serve` as a real subprocess on a free loopback port (for the server, proxy,
LangChain and example tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A `memedit serve` process; `url` is its root (``http://127.0.0.1:PORT``)."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "memedit.cli", "serve", "--port", str(self.port), *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        pause = threading.Event()
        while True:
            if self.proc.poll() is not None:
                msg = f"memedit serve exited {self.proc.returncode}:\n{self.log.read_text()}"
                raise RuntimeError(msg)
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            pause.wait(0.2)

    def terminate(self) -> int:
        """SIGTERM and wait for a graceful exit; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
