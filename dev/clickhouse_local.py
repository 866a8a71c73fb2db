"""Starts the chdb-backed ClickHouse HTTP gateway (clickhouse_gateway.py) as a child
process and talks to it. Used by the demo, the tests and the benchmarks."""
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
PASSWORD = "Test-Pa55word-Never-Logged"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """The chdb-backed ClickHouse HTTP gateway (dev/clickhouse_gateway.py)."""

    def __init__(self, data_dir, password=PASSWORD, port=None):
        self.data_dir = Path(data_dir)
        self.password = password
        self.port = port or free_port()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        pw = self.data_dir.parent / "gateway-password"
        pw.touch(mode=0o600)
        pw.write_text(password)
        self.log = open(self.data_dir.parent / "gateway.log", "ab")
        # ClickHouse reads files (icebergLocal) only under its user_files_path; chdb's is its
        # working directory. A warehouse that views read lives below this one.
        self.user_files = self.data_dir.parent / "user_files"
        self.user_files.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [PYTHON, str(HERE / "clickhouse_gateway.py"), "--data", str(self.data_dir),
             "--port", str(self.port), "--password-file", str(pw)],
            stdout=self.log, stderr=self.log, cwd=self.user_files)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.sql("SELECT 1").strip() == "1":
                    return
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.data_dir.parent / 'gateway.log'}")
                time.sleep(0.2)
        raise RuntimeError("gateway did not start")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def sql(self, query, params=None):
        qs = {f"param_{k}": v for k, v in (params or {}).items()}
        req = urllib.request.Request(
            self.url + "/?" + urllib.parse.urlencode(qs), data=query.encode(),
            headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": self.password})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ClickHouse error: {e.read().decode()}") from None

    def scalar(self, query, params=None):
        return self.sql(query, params).strip()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
