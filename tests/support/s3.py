"""A local S3 server for tests: moto's server mode (``moto[server]``, a test
dependency from pyproject, so a fresh ``.venv`` has it and no service has to be
started beforehand).

* :class:`MotoS3` runs it in this process, in a thread (``ThreadedMotoServer``). Its
  buckets live in the process's memory, so it can be stopped and started again on
  the same port and still hold what it was given: a store that goes down and comes
  back.
* :class:`MotoS3Process` runs ``python -m moto.server`` as its own process, with
  environment variables of its own: ``INITIAL_NO_AUTH_ACTION_COUNT=0`` makes it check
  credentials (moto's IAM), which the in-process server cannot do without changing
  every other test's server.
* :class:`CorruptingProxy` forwards TCP to a server and flips one byte in the body
  of the next ``n`` PUT requests: a network that damages data, to show the checksums
  catch it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from . import stop_process
from .dcmtk import free_port

KEY_ID, SECRET = "testing-key-id", "testing-secret"
REGION = "us-east-1"


def client(url: str, key_id: str = KEY_ID, secret: str = SECRET) -> Any:
    """A plain boto3 client of the server at ``url`` (the oracle: what it holds)."""
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"no S3 server on port {port} after {timeout}s")


class MotoS3:
    """moto's S3 in a thread of this process, on ``port`` (a free one by default)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> MotoS3:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _wait_listening(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        return client(self.url)

    def bucket(self) -> str:
        """A new, empty bucket (each test its own)."""
        name = f"test-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The environment of a router process using this server's test credentials."""
        return {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
        }


class MotoS3Process:
    """``python -m moto.server`` in a process of its own, with ``env`` added."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoS3Process:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        _wait_listening(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process, 10)


class CorruptingProxy:
    """TCP from a local port to ``target_port``; the bodies of the next ``corrupt``
    PUT requests get one byte flipped (in their middle) on the way."""

    def __init__(self, target_port: int, corrupt: int = 1) -> None:
        self.target_port = target_port
        self.corrupt = corrupt
        self.corrupted = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._requests, args=(down, up), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _take(self) -> bool:
        with self._lock:
            if self.corrupted < self.corrupt:
                self.corrupted += 1
                return True
            return False

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward requests one by one (HTTP/1.1, Content-Length bodies)."""
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = src.recv(65536)
                    if not data:
                        raise OSError("closed")
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                dst.sendall(head + b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                flip = length // 2 if head.startswith(b"PUT ") and length and self._take() else -1
                sent = 0
                while sent < length:
                    if not buffer:
                        buffer = src.recv(65536)
                        if not buffer:
                            raise OSError("closed")
                    piece, buffer = buffer[: length - sent], buffer[length - sent :]
                    if sent <= flip < sent + len(piece):
                        at = flip - sent
                        piece = piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1 :]
                    dst.sendall(piece)
                    sent += len(piece)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
