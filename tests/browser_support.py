"""Running the dashboard for a real browser: a free localhost port, the server, chromium, settling.

Shared by the browser tests and bench/load_test.py. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@dataclass(frozen=True)
class App:
    url: str
    process: subprocess.Popen
    command: list[str]


def app_command(port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
            "--server.port", str(port), "--server.address", HOST]


@contextmanager
def streamlit_app(env: Mapping[str, str], log: Path) -> Iterator[App]:
    """``streamlit run dashboard.py`` on a free localhost port, healthy on entry, always stopped on exit."""
    port = free_port()
    command = app_command(port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            app = App(f"http://{HOST}:{port}", process, command)
            wait_until_healthy(app.url, process)
            yield app
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def launch_chromium(playwright):
    """Headless Debian chromium; works with the sync API and (awaited) with the async one."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def settle(page, timeout_ms: float = 240_000) -> None:
    """Wait until Streamlit has finished the current run (sync API)."""
    page.wait_for_timeout(300)
    page.get_by_test_id("stStatusWidget").wait_for(state="hidden", timeout=timeout_ms)
    page.wait_for_timeout(500)
