import fcntl
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Gateway  # noqa: E402


def shared_dir(tmp_path_factory):
    """A folder every test process of this run shares (the workers' temporary folders' parent)."""
    return Path(tmp_path_factory.getbasetemp()).parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """When the suite runs in parallel (dev/test.sh: pytest-xdist, each test file on one
    worker), the tests that use the machine's one PostgreSQL server run one at a time: they
    hold a lock shared by the workers from their set-up to their tear-down (test_postgres stops
    and restarts the server, and the fixture that starts it must not run meanwhile)."""
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

