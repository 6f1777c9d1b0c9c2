"""A real S3-compatible server for tests: versitygw (Apache-2.0) with its posix backend, built from the
Go module in this folder by scripts/s3server-build and cached per machine like the control plane.

It listens on a free loopback port with one pair of access keys; objects are files under a
temporary folder. Stopped by its own PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACCESS_KEY = "forgetestaccess"
SECRET_KEY = "forge-test-secret-key-0123456789"
REGION = "us-east-1"


def build() -> Path:
    """The server binary, built (or found in the cache) by scripts/s3server-build."""
    out = subprocess.run([str(ROOT / "scripts" / "s3server-build")], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"the S3 server could not be built:\n{out.stderr}"
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    root: Path
    proc: subprocess.Popen

    @classmethod
    def start(cls, binary: Path, root: Path) -> S3Server:
        data = root / "data"
        data.mkdir(parents=True)
        port = free_port()
        log = open(root / "server.log", "wb")
        proc = subprocess.Popen(
            [str(binary), "--access", ACCESS_KEY, "--secret", SECRET_KEY, "--region", REGION,
             "--port", f"127.0.0.1:{port}", "posix", str(data)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, REGION, root, proc)
        server._wait_ready(port)
        return server

    def _wait_ready(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the S3 server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the S3 server did not listen on port {port} within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-4000:]

    def client(self, secret_key: str | None = None):
        """A boto3 client of this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=Config(s3={"addressing_style": "path"}))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The variables the operator sets from a location's Secret, for a trainer process."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
