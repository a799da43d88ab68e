"""`llmrun serve` as users meet it: a real subprocess on a port the system picks (read from its
first stderr line), polled on /health, stopped with a signal."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tests.cli.helpers import cli_env

ADDRESS = re.compile(r"serving .* on (http://\S+) ")


class RemoteServer:
    """`python -m llmrun serve MODEL --port 0 ARGS`; `url` once it listens, `wait_ready()` for
    /health 200. stderr is read all along (one log line a request must never fill the pipe)."""

    def __init__(self, model: Path, home: Path, *args, env: dict | None = None, start_timeout_s: float = 300):
        command = [sys.executable, "-m", "llmrun", "serve", str(model), "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(command, env=cli_env(home, **(env or {})), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.url = ""
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._listening.wait(start_timeout_s) or not self.url:
            self.kill()
            raise AssertionError(f"the server did not start listening:\n{self.stderr}")

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = ADDRESS.search(line)
            if found and not self.url:
                self.url = found.group(1)
                self._listening.set()
        self._listening.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def lines_with(self, text: str, timeout_s: float = 10) -> list[str]:
        """The stderr lines holding `text`, waiting up to `timeout_s` for the first: the server
        writes a request's line as it answers, and this process's reader may not have it yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [line for line in self.lines if text in line]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def wait_ready(self, timeout_s: float = 300) -> "RemoteServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.stderr}")
            status, _ = self.get("/health")
            if status == 200:
                return self
            time.sleep(0.1)
        raise AssertionError(f"the server never became ready:\n{self.stderr}")

    def metrics(self) -> dict[str, float]:
        """/metrics as {name: value} for the metrics without labels."""
        status, body = self.get("/metrics")
        assert status == 200
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def post(self, path: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
        """POST raw bytes (or JSON); (status, parsed JSON body, headers)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), dict(err.headers)

    def open_raw(self, path: str, body: dict, headers: dict | None = None) -> socket.socket:
        """A POST written by hand on a socket of its own, so a test can hang up at a moment it
        chooses (close() sends the FIN at once; no client library keeps the connection)."""
        address = urlparse(self.url)
        sock = socket.create_connection((address.hostname, address.port), timeout=60)
        data = json.dumps(body).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n{head}\r\n".encode() + data)
        return sock

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the server did not exit {timeout_s} s after signal {sig}:\n{self.stderr}")
        self._reader.join(10)  # every line it wrote is in `lines` once stop() returns
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
