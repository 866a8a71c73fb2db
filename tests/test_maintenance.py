"""Table maintenance (issue 12, first part): snapshot expiry with Iceberg's conventions and
metadata hygiene keep a table's history bounded; nothing a reader needs is deleted and nothing
unreferenced is left. Checked with pyiceberg (snapshots, metadata log, every referenced file),
ClickHouse icebergLocal() and DuckDB against the source, never with our own reader."""
import json
import subprocess
import time
from pathlib import Path

from harness import PYTHON, assert_equal_to_source, bronze_table, create_bronze, insert_bronze, now_ms, run, write_config

INSPECT = """
import json, os, sys
import pyiceberg.catalog.sql as s
c = s.SqlCatalog("offload", uri="sqlite:///{tmp}/catalog.db", warehouse="file://{tmp}/warehouse")
t = c.load_table("{table}")
io = t.io
refs = {{t.metadata_location}} | {{m.metadata_file for m in t.metadata.metadata_log}}
for snap in t.metadata.snapshots:
    refs.add(snap.manifest_list)
    for m in snap.manifests(io):
        refs.add(m.manifest_path)
        for e in m.fetch_manifest_entry(io, discard_deleted=False):
            refs.add(e.data_file.file_path)
refs = {{r.removeprefix("file://") for r in refs}}
root = t.metadata.location.removeprefix("file://")
on_disk = set()
for d, _, files in os.walk(root):
    for f in files:
        on_disk.add(os.path.join(d, f))
journal = os.path.join(root, "offload")
print(json.dumps({{
    "snapshots": len(t.metadata.snapshots),
    "current": t.metadata.current_snapshot_id,
    "metadata_log": len(t.metadata.metadata_log),
    "metadata_files": sum(1 for p in on_disk if p.endswith(".metadata.json")),
    "unreferenced": sorted(p for p in on_disk - refs if not p.startswith(journal)),
    "missing": sorted(refs - on_disk),
    "properties": t.metadata.properties,
}}))
"""


def inspect(tmp_path, table="cold.trades"):
    out = subprocess.run([PYTHON, "-c", INSPECT.format(tmp=tmp_path, table=table)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_expiry_keeps_history_bounded_and_deletes_only_what_nothing_references(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_500, now_ms() - 7_200_000, step_ms=1_000)
    t = bronze_table(db, "trades", max_rows_per_commit=10, settle_delay="1s")
    cfg = write_config(tmp_path / "c.toml", gateway, [t], tmp_path)
    cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 5\n')
    run(cfg, "once", check=True)
    before = inspect(tmp_path)
    assert before["snapshots"] == 150, before["snapshots"]
    # Old metadata versions go as they fall out of the log (delete-after-commit, 100 kept).
    assert before["properties"]["write.metadata.delete-after-commit.enabled"] == "true"
    assert before["metadata_log"] <= 100 and before["metadata_files"] <= 101, before
    assert not before["missing"] and not before["unreferenced"], before

    dry = run(cfg, "maintain", "--dry-run", check=True).stdout
    assert "145 of 150 snapshots would expire" in dry, dry
    time.sleep(1.1)
    out = run(cfg, "maintain", "--only", "expire", check=True).stdout
    assert "145 of 150 snapshots expired" in out, out
    after = inspect(tmp_path)
    assert after["snapshots"] == 5, after["snapshots"]
    assert not after["missing"], f"a referenced file was deleted: {after['missing'][:5]}"
    assert not after["unreferenced"], f"files nothing references: {after['unreferenced'][:5]}"
    assert after["metadata_files"] <= 101
    # Every row and value as before, for three readers; the next cycle resumes from W.
    assert_equal_to_source(gateway, tmp_path, db, "trades")
    insert_bronze(gateway, db, "trades", 100, now_ms() - 1_000, step_ms=5, seq_start=10_000)
    time.sleep(2)
    run(cfg, "once", check=True)
    assert_equal_to_source(gateway, tmp_path, db, "trades")
    # Expiry keeps what the table asks for: its own properties win over [maintenance].
    set_keep = f"""
import pyiceberg.catalog.sql as s
c = s.SqlCatalog("offload", uri="sqlite:///{tmp_path}/catalog.db", warehouse="file://{tmp_path}/warehouse")
t = c.load_table("cold.trades")
with t.transaction() as tx:
    tx.set_properties({{"history.expire.min-snapshots-to-keep": "8"}})
"""
    subprocess.run([PYTHON, "-c", set_keep], check=True, capture_output=True)
    time.sleep(1.1)
    run(cfg, "maintain", "--only", "expire", check=True)
    assert inspect(tmp_path)["snapshots"] == 8


def test_expiry_waits_while_a_commit_attempt_is_pending(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 100, now_ms() - 7_200_000, step_ms=1_000)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=10)], tmp_path)
    cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\n')
    run(cfg, "once", check=True)
    table_dir = next(Path(tmp_path / "warehouse").rglob("metadata")).parent
    (table_dir / "offload").mkdir(exist_ok=True)
    # A commit attempt whose outcome is unknown, fenced on the current snapshot (a writer that
    # crashed after sending it): it may still land, so its history must stay decidable.
    (table_dir / "offload" / "attempts.json").write_text(json.dumps([{
        "run_id": "01900000-0000-7000-8000-000000000000", "required_snapshot": inspect(tmp_path)["current"],
        "data_files": [], "commit_files": [], "rows": 1, "bytes": 1, "window_hi": {"cursor_ns": 0, "tiebreak": None},
        "started_at_ms": now_ms(), "cause": None}]))
    time.sleep(1.1)
    out = run(cfg, "maintain", check=True)
    assert "skipped: 1 commit attempts are pending" in out.stdout, out.stdout + out.stderr
    assert inspect(tmp_path)["snapshots"] == 10


CRASHES = [("expire_before_commit", "abort"), ("commit_error", "error"), ("commit_lost", "error"),
           ("commit_unknown", "error"), ("expire_after_commit", "abort")]


def test_a_maintenance_run_killed_or_failing_at_each_step_leaves_the_table_whole(gateway, db, tmp_path):
    """SIGKILL-like aborts and failed or lost commits at each step of an expiry: the table stays
    readable with every row, and the next run removes what was left (pyiceberg's view)."""
    from harness import fault_binary
    for i, (point, action) in enumerate(CRASHES):
        tmp = tmp_path / point
        tmp.mkdir()
        table = f"t{i}"
        create_bronze(gateway, db, table)
        insert_bronze(gateway, db, table, 30, now_ms() - 7_200_000, step_ms=1_000)
        cfg = write_config(tmp / "c.toml", gateway, [bronze_table(db, table, max_rows_per_commit=1)], tmp)
        cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 3\n')
        run(cfg, "once", check=True)
        time.sleep(1.1)
        failed = run(cfg, "maintain", exe=fault_binary(), env={"ICEBERG_OFFLOAD_FAULT": f"{point}:{action}"})
        assert failed.returncode != 0 or point == "commit_unknown", (point, failed.stdout + failed.stderr[-2000:])
        assert_equal_to_source(gateway, tmp, db, table)
        again = run(cfg, "maintain", check=True)
        state = inspect(tmp, f"cold.{table}")
        assert state["snapshots"] == 3, (point, state["snapshots"], again.stdout)
        assert not state["missing"], (point, state["missing"][:3])
        assert not state["unreferenced"], (point, state["unreferenced"][:5])
        assert_equal_to_source(gateway, tmp, db, table)
