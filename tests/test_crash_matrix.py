"""Crash-recovery matrix (exactly-once.md, proof obligations): a fault at every step of one
window's offload — the process aborted on the spot, or the step failing — then a restart.
Afterwards the Iceberg table equals the source up to W for pyiceberg and ClickHouse
icebergLocal(): same count, same sums, no duplicate key, no gap."""
import pytest

from harness import (assert_directory_reader_sees_the_catalog, assert_equal_to_source, bronze_table, create_bronze,
                     fault_binary, insert_bronze, now_ms, run, write_config)

POINTS = ["after_read_start", "mid_stream", "after_files_written", "before_commit",
          "commit_error", "commit_unknown", "after_commit", "state_update"]
ROWS, PER_COMMIT = 30_000, 10_000


@pytest.mark.parametrize("action", ["abort", "error"])
@pytest.mark.parametrize("point", POINTS)
def test_fault_then_restart_leaves_iceberg_equal_to_source(gateway, db, tmp_path, point, action):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", ROWS, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=PER_COMMIT)], tmp_path)
    # The fault strikes the second window: the first one is committed by then.
    first = run(cfg, "once", exe=fault_binary(), env={"ICEBERG_OFFLOAD_FAULT": f"{point}:{action}:2"})
    if action == "abort":
        assert first.returncode < 0 or first.returncode == 134, (first.returncode, first.stderr[-2000:])
        assert f"fault injection: abort at {point}" in first.stderr
    elif point in ("commit_unknown", "state_update"):
        # The commit landed; I5 resolves the unknown outcome, a failed mirror update is only logged.
        assert first.returncode == 0, first.stdout + first.stderr[-2000:]
    elif point == "commit_error":
        # The catalog call failed after the commit was sent: unknown outcome, so the attempt is
        # pending (files kept), and the retry lands the window (I5).
        assert first.returncode == 0, first.stdout + first.stderr[-2000:]
        assert "outcome of commit" in first.stderr and "is unknown" in first.stderr
    else:
        assert first.returncode == 3 and f"fault injected at {point}" in first.stdout, first.stdout + first.stderr[-2000:]
    second = run(cfg, "once", exe=fault_binary())
    assert second.returncode == 0, second.stdout + second.stderr[-2000:]
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == ROWS, "every row must be offloaded after the restart"
    assert_directory_reader_sees_the_catalog(tmp_path)
    if point == "commit_unknown" and action == "error":
        assert "resolved as committed" in first.stderr


def test_cleanup_removes_the_files_of_a_crashed_attempt_and_nothing_else(gateway, db, tmp_path):
    """I8 for attempts that died before cleaning up: their data files are unreferenced and
    invisible; `cleanup` finds and deletes exactly those."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", ROWS, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=PER_COMMIT)], tmp_path)
    first = run(cfg, "once", exe=fault_binary(), env={"ICEBERG_OFFLOAD_FAULT": "after_files_written:abort:2"})
    assert first.returncode != 0
    run(cfg, "once", check=True)
    data = tmp_path / "warehouse" / "cold" / "trades" / "data"
    files_before = set(data.rglob("*.parquet"))
    dry = run(cfg, "cleanup", "--older-than", "0s", "--allow-below-floor", "--dry-run", check=True)
    orphans = {line.strip() for line in dry.stdout.splitlines() if line.startswith("  ")}
    assert orphans and all(o.endswith(".parquet") for o in orphans), dry.stdout
    assert set(map(str, data.rglob("*.parquet"))) == set(map(str, files_before)), "a dry run deletes nothing"
    # A recent orphan is protected by the age floor.
    assert "0 orphans" in run(cfg, "cleanup", check=True).stdout
    run(cfg, "cleanup", "--older-than", "0s", "--allow-below-floor", check=True)
    assert {str(p) for p in data.rglob("*.parquet")} == {str(p) for p in files_before} - orphans
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == ROWS


def test_a_commit_reported_but_not_persisted_is_pending_then_cleaned_once_the_retry_lands(gateway, db, tmp_path):
    """I5 for a reported success: iceberg-catalog-sql ignores the error of its own SQL COMMIT
    and reports success (rust-stack.md §8.8). The service re-reads the catalog and does not
    find its snapshot: the attempt is pending (a lagging replica would look the same), its rows
    are not counted, the window is retried, and once the retry lands the pending attempt can
    never land: its files are deleted."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", ROWS, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=PER_COMMIT)], tmp_path)
    first = run(cfg, "once", exe=fault_binary(), env={"ICEBERG_OFFLOAD_FAULT": "commit_lost:error:2"})
    assert first.returncode == 0, first.stdout + first.stderr[-2000:]
    assert "does not show the commit when read again" in first.stderr, first.stderr[-2000:]
    assert "can never land" in first.stderr, first.stderr[-2000:]
    assert f"{ROWS} rows in" in first.stdout, "rows of the lost commit must not be counted: " + first.stdout
    dry = run(cfg, "cleanup", "--older-than", "0s", "--allow-below-floor", "--dry-run", check=True)
    assert "0 orphans" in dry.stdout, "the lost attempt's files must be deleted: " + dry.stdout
    # The run history has one row per attempt, the failed one with the window it did commit.
    import sqlite3
    runs = sqlite3.connect(tmp_path / "state.db").execute(
        "SELECT status, error_kind, rows_written FROM offload_runs ORDER BY started_at_ms").fetchall()
    assert runs == [("failed", "commit_pending", PER_COMMIT), ("success", None, ROWS - PER_COMMIT)], runs
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == ROWS
