import fcntl
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Gateway  # noqa: E402


def shared_dir(tmp_path_factory=None):
    """A folder every test process on this machine shares (the workers of a run, and another run
    at the same time): the machine has one PostgreSQL server, so its lock and the test role's
    password live here."""
    path = Path(tempfile.gettempdir()) / "iceberg-offload-tests"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """When the suite runs in parallel (dev/test.sh: pytest-xdist, each test file on one
    worker), the tests that use the machine's one PostgreSQL server run one at a time: they
    hold a lock shared by every test process of the machine from their set-up to their tear-down
    (test_postgres stops and restarts the server, and the fixture that starts it and sets the
    test role's password must not run meanwhile)."""
    if "postgres" not in item.fixturenames:
        yield
        return
    lock_path = shared_dir(item.config._tmp_path_factory) / "postgres.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("clickhouse")
    gw = Gateway(root / "data")
    yield gw
    gw.stop()


_counter = [0]


@pytest.fixture
def db(gateway):
    """A fresh ClickHouse database per test."""
    _counter[0] += 1
    name = f"t{_counter[0]}"
    gateway.sql(f"CREATE DATABASE IF NOT EXISTS {name}")
    return name

