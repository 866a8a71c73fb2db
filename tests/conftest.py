import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Gateway  # noqa: E402


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
