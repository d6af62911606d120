"""A real ``knnclip serve`` in a subprocess on a free loopback port, for the serving tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "test-token-0123456789abcdef"


def token_file(directory: Path, token: str = TOKEN) -> Path:
    path = directory / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


class ServerProcess:
    """``python -m knnclip.engine.cli serve ... --port 0``; ``url`` once it listens."""

    def __init__(self, models: Path, db: Path, *args: str, log: Path | None = None, env: dict | None = None) -> None:
        command = [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "serve",
            "--models",
            str(models),
            "--db",
            str(db),
            "--device",
            "cpu",
            "--port",
            "0",
            *args,
        ]
        self.log_path = log or db.parent / f"{db.name}.server.log"
        self._log = self.log_path.open("wb")  # a restart's log starts afresh
        # Both streams go to the file: a pipe nobody reads would fill with access-log lines and
        # stall the server.
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.url = self._listening_url(timeout=60.0)

    def _listening_url(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.log().splitlines():
                if line.startswith("knnclip serve: listening on "):
                    return line.rsplit(" ", 1)[1].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.proc.kill()
        raise RuntimeError(f"the server did not start\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5, headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready within {timeout} s\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL)


def read_metrics(url: str) -> dict[str, float]:
    """The server's requests in flight (this scrape included) and answered segment requests."""
    out = {"in_flight": 0.0, "segmented": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("knnclip_requests_in_flight "):
            out["in_flight"] = float(line.split()[1])
        elif line.startswith("knnclip_requests_total{") and 'route="/v1/segment"' in line:
            out["segmented"] += float(line.rsplit(" ", 1)[1])
    return out


def wait_for_metrics(url: str, condition, timeout: float = 60.0) -> dict[str, float]:
    """Poll ``/metrics`` until ``condition(read_metrics(url))`` holds; the metrics that met it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        metrics = read_metrics(url)
        if condition(metrics):
            return metrics
        time.sleep(0.01)
    raise AssertionError(f"the server's metrics never met the condition; last {metrics}")


def answers_ok(url: str, timeout: float) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout`` seconds (polled; refused connections retried)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False
