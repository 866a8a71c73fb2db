"""The REST catalog, the recommended production catalog: the service talks the Iceberg REST
protocol (bearer token from the environment) to dev/rest_catalog.py, which puts the REST spec
in front of pyiceberg's SQL catalog, so requirement checks and compare-and-swap are pyiceberg's.
What lands is read back by pyiceberg and ClickHouse icebergLocal()."""
import time

import pytest

import k2data
from harness import (assert_equal_to_source, bronze_table, create_bronze, insert_bronze, now_ms, run,
                     start_rest_catalog, write_config)

TOKEN = "rest-token-Hq27vB"


@pytest.fixture()
def rest(tmp_path):
    url, proc = start_rest_catalog(tmp_path, token=TOKEN)
    yield url
    proc.terminate()
    proc.wait(10)


def rest_config(tmp_path, gateway, tables, url):
    cfg = write_config(tmp_path / "c.toml", gateway, tables, tmp_path)
    text = cfg.read_text().replace('type = "sql"', 'type = "rest"').replace(
        f'uri = "sqlite:{tmp_path / "catalog.db"}"', f'uri = "{url}"\ntoken_env = "TEST_REST_TOKEN"')
    assert 'type = "rest"' in text and url in text
    cfg.write_text(text)
    return cfg


def test_rest_catalog_cycles_land_every_row_once(gateway, db, tmp_path, rest):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 25_000, now_ms() - 7_200_000, step_ms=100)
    cfg = rest_config(tmp_path, gateway, [bronze_table(db, "trades", max_rows_per_commit=10_000, settle_delay="1s")], rest)
    env = {"TEST_REST_TOKEN": TOKEN}
    first = run(cfg, "once", env=env, check=True)
    k2data.insert_bronze_arriving_now(gateway.sql, db, "trades", 3_000, seq_start=1_000_000)
    time.sleep(1.5)
    second = run(cfg, "once", env=env, check=True)
    # Spark reads through the REST catalog itself (Iceberg Java's RESTCatalog, with the token).
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades",
                                      spark_catalog={"type": "rest", "uri": rest, "token": TOKEN})
    assert src["count"] == 28_000
    commits = [s for s in got["pyiceberg"]["snapshots"] if s.get("offload.run-id")]
    assert len(commits) == 4, commits
    shown = run(cfg, "watermark", "show", env=env, check=True).stdout
    assert "trades" in shown and got["pyiceberg"]["properties"]["offload.watermark"] in shown, shown
    for out in (first, second):
        assert TOKEN not in out.stdout + out.stderr, "the catalog token must never be printed"


def test_rest_catalog_refuses_a_wrong_token_clearly(gateway, db, tmp_path, rest):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 7_200_000, step_ms=100)
    cfg = rest_config(tmp_path, gateway, [bronze_table(db, "trades")], rest)
    out = run(cfg, "once", env={"TEST_REST_TOKEN": "wrong-token-value"})
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "refused our credentials (HTTP 401 Unauthorized)" in text and "token_env" in text, text[-2000:]
    assert "wrong-token-value" not in text
