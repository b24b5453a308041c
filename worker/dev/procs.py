"""Child processes for the demo, benchmarks and tests: redis-server, fake upstream, workers.

Each is a real process on a free loopback port; :class:`Proc` stops it (and its children).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from producer import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: object, *, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not come up within {timeout} s")


@dataclass
class Proc:
    """A started child process; ``stop()`` is idempotent."""

    popen: subprocess.Popen[bytes]
    url: str = ""
    log_path: Path | None = None
    cleanup: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL the process group: no warm shutdown, nothing acknowledged."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 20.0, *, keep_logs: bool = False) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if keep_logs:
            return
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def spawn(argv: list[str], *, env: Mapping[str, str] | None = None, log_name: str) -> Proc:
    log_dir = Path(tempfile.mkdtemp(prefix="coalesce-"))
    log_path = log_dir / f"{log_name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Proc(popen, log_path=log_path, cleanup=[log_dir])


def start_redis(port: int | None = None, *, appendonly: bool = False) -> Proc:
    """A private redis-server on a free loopback port; memory-only unless ``appendonly``.

    With ``appendonly`` its data survives a restart from the same ``argv`` (``popen.args``).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            "no Redis answered and there is no redis-server binary to start one; install it "
            "(Debian: apt-get install redis-server) or set COALESCE_REDIS_URL"
        )
    port = port or free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="coalesce-redis-"))
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--dir",
        str(data_dir),
        "--protected-mode",
        "yes",
    ]
    proc = spawn(argv, log_name="redis")
    proc.cleanup.append(data_dir)
    proc.url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(proc.url)
    wait_until(client.ping, timeout=10, what=f"redis-server on port {port}")
    client.close()
    return proc


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def start_fake_llm(port: int | None = None, **knobs: float | str | bool) -> Proc:
    """``coalesce fake-llm`` in a child process; ``url`` is its OpenAI base URL (…/v1)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "worker.cli", "fake-llm", "--port", str(port)]
    for name, value in knobs.items():
        option = name.replace("_", "-")
        if isinstance(value, bool):  # a switch: --prompt-cache / --no-prompt-cache
            argv.append(f"--{option}" if value else f"--no-{option}")
        else:
            argv += [f"--{option}", str(value)]
    proc = spawn(argv, log_name="fake-llm")
    proc.url = f"http://127.0.0.1:{port}/v1"
    return wait_serving(proc, proc.url + "/models", what="fake upstream", timeout=20)


def wait_serving(proc: Proc, probe: str, *, what: str, timeout: float) -> Proc:
    """``proc`` once ``GET probe`` answers 200; stopped, with its log's tail, if it never does."""
    try:
        wait_until(
            lambda: httpx.get(probe, timeout=1).status_code == 200, timeout=timeout, what=what
        )
    except TimeoutError:
        tail = proc.log_tail()
        proc.stop()
        raise TimeoutError(f"{what} did not start:\n{tail}") from None
    return proc


def start_worker(
    env: Mapping[str, str],
    *,
    name: str = "w1",
    queues: str | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    app: str = "worker.app",
) -> Proc:
    """A real Celery worker process (``celery -A <app> worker``) with the given settings."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-n",
        f"{name}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "-E",
    ]
    if queues:
        argv += ["-Q", queues]
    if concurrency:
        argv += ["-c", str(concurrency)]
    return spawn(argv, env=env, log_name=f"worker-{name}")


def wait_for_workers(redis_url: str, count: int, *, timeout: float = 30.0) -> None:
    """Block until ``count`` workers answer a ping on this broker."""
    from celery import Celery

    app = Celery(broker=redis_url, backend=redis_url, set_as_current=False)
    try:
        wait_until(
            lambda: len(app.control.ping(timeout=0.5) or []) >= count,
            timeout=timeout,
            what=f"{count} worker(s)",
            interval=0.2,
        )
    finally:
        app.close()
