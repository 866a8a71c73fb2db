"""Both tiers as one table (issue 24, invariant I13): a ClickHouse view per table over the hot rows
above W and the Iceberg snapshot that carries W. ClickHouse itself reads the view; pyiceberg
reads the cold side.

The proof runs from outside: a thread queries the views continuously (count, sum and distinct
keys of the rows at or below a settled bound, and GROUP BY results around the split the view
pins) and compares every answer with the source's at the same bound, while rows keep arriving
and the service commits, is SIGKILLed and restarted, maintains (compaction and expiry), and
shares the tables with a second replica."""
import json
import os
import random
import signal
import subprocess
import threading
import time

import k2data
from harness import PASSWORD, binary, bronze_table, create_bronze, insert_bronze, now_ms, run, verify, view_home, write_config

TABLES = ["trades_a", "trades_b"]
COUNT = "SELECT count(), toString(sum(price)), uniqExact((symbol, sequence_number)) FROM {t} WHERE exchange_timestamp <= fromUnixTimestamp64Milli({bound})"
GROUPS = ("SELECT symbol, count(), toString(sum(quantity)) FROM {t} WHERE exchange_timestamp >= fromUnixTimestamp64Milli({lo}) "
          "AND exchange_timestamp <= fromUnixTimestamp64Milli({hi}) GROUP BY symbol ORDER BY symbol")


def described(gw, table):
    """Names and types, as DESCRIBE gives them (defaults and comments aside)."""
    return [tuple(line.split("\t")[:2]) for line in gw.sql(f"DESCRIBE {table}").splitlines()]


def pinned(gw, db, view):
    comment = gw.sql(f"SELECT comment FROM system.tables WHERE database = '{db}' AND name = '{view}'").strip()
    return json.loads(comment.replace("\\'", "'")) if comment else None


class ViewProbe:
    """Queries each view against its source, over and over, in a thread (I13): every answer at a
    settled bound must equal the source's, since no row at or below the bound can still arrive
    (rows are stamped by ClickHouse as they are inserted)."""

    def __init__(self, gw, db):
        self.gw, self.db = gw, db
        self.queries = self.wrong = self.boundary_checks = 0
        self.errors, self.mistakes = [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(120)

    def loop(self):
        while not self.stop.is_set():
            for t in TABLES:
                try:
                    self.check(t)
                except Exception as e:  # noqa: BLE001 - counted, reported at the end
                    self.errors.append(f"{t}: {e}")

    def compare(self, what, t, sql):
        view = self.gw.sql(sql.format(t=f"{self.db}.{t}_all"))
        source = self.gw.sql(sql.format(t=f"{self.db}.{t}"))
        self.queries += 1
        if view != source:
            self.wrong += 1
            self.mistakes.append(f"{t} {what}: view {view!r} source {source!r}")

    def check(self, t):
        # Rows are stamped as they are inserted: none at or below this bound can still arrive.
        bound = now_ms() - 1_500
        self.compare("count/sum/keys", t, COUNT.replace("{bound}", str(bound)))
        pin = pinned(self.gw, self.db, f"{t}_all")
        if pin and pin["watermark"]:
            w_ms = pin["watermark"]["cursor_ns"] // 1_000_000
            lo, hi = w_ms - 3_000, min(w_ms + 3_000, bound)
            if lo < w_ms <= hi:
                self.boundary_checks += 1
            self.compare("GROUP BY at the split", t, GROUPS.replace("{lo}", str(lo)).replace("{hi}", str(hi)))


def config(tmp_path, gateway, db, maintenance):
    tables = [bronze_table(db, t, view=f"{db}.{t}_all", settle_delay="1s", max_rows_per_commit=3000,
                           partition=["hour(exchange_timestamp)"]) for t in TABLES]
    warehouse_home = view_home(gateway, tmp_path)
    cfg = write_config(tmp_path / "c.toml", gateway, tables, warehouse_home,
                       extra_service='lease_ttl = "30s"\nmember_timeout = "3s"')
    text = cfg.read_text().replace('interval = "15m"', 'interval = "1s"')
    if maintenance:
        text += ('\n[maintenance]\nexpire_every_commits = 3\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 1\n'
                 'compact_after = "0s"\nmanifests_max = 2\n')
    else:
        text += "\n[maintenance]\nenabled = false\n"
    cfg.write_text(text)
    return cfg, warehouse_home


def start(cfg, log):
    return subprocess.Popen([binary(), "--config", str(cfg), "run"], env=dict(os.environ, TEST_CH_PASSWORD=PASSWORD),
                            stdout=subprocess.DEVNULL, stderr=open(log, "a"))


def test_the_view_returns_every_settled_row_once_under_commits_kills_maintenance_and_replicas(gateway, db, tmp_path):
    """I13 from outside, in three phases of at least 25 s and 350 view queries each: (1) one replica committing every second,
    SIGKILLed and restarted at random; (2) the same with maintenance after every third commit
    (manifests merged into a new snapshot, snapshots expired after 1 s); (3) two replicas
    sharing the tables, one of them killed at random. Over 1,000 view queries: no wrong
    answer, no failed query."""
    rng = random.Random(20261206)
    for t in TABLES:
        create_bronze(gateway, db, t)
        insert_bronze(gateway, db, t, 20_000, now_ms() - 2 * 3_600_000, step_ms=300)
    stop = threading.Event()
    seq = [1_000_000]

    def rows_keep_coming():
        while not stop.is_set():
            for t in TABLES:
                k2data.insert_bronze_arriving_now(gateway.sql, db, t, rng.randint(20, 200), seq_start=seq[0])
                seq[0] += 1_000
            stop.wait(0.2)

    writer = threading.Thread(target=rows_keep_coming, daemon=True)
    writer.start()
    log = tmp_path / "service.log"
    procs = []
    per_phase = {}
    try:
        # The views exist once the first run has started.
        cfg, warehouse_home = config(tmp_path, gateway, db, maintenance=False)
        run(cfg, "once", check=True)
        with ViewProbe(gateway, db) as probe:
            for phase, (maintenance, replicas) in enumerate([(False, 1), (True, 1), (True, 2)], 1):
                cfg, warehouse_home = config(tmp_path, gateway, db, maintenance)
                procs = [start(cfg, log) for _ in range(replicas)]
                before = probe.queries
                # 25 s at least, and 350 view queries (more time on a loaded machine), 120 s at most.
                starts = time.time()
                while time.time() < starts + 120 and (time.time() < starts + 25 or probe.queries - before < 350):
                    time.sleep(rng.uniform(0.5, 3.0))
                    i = rng.randrange(len(procs))
                    procs[i].send_signal(signal.SIGKILL)
                    procs[i].wait()
                    procs[i] = start(cfg, log)
                per_phase[phase] = probe.queries - before
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait(60)
                procs = []
        stop.set()
        writer.join()
        log_text = log.read_text()
        print(f"view queries per phase: {per_phase}; boundary GROUP BY checks: {probe.boundary_checks}; "
              f"wrong: {probe.wrong}; failed: {len(probe.errors)}")
        for e in probe.errors[:5]:
            print("failed query:", e[:1500])
        assert probe.wrong == 0, probe.mistakes[:5]
        assert not probe.errors, probe.errors[:5]
        assert probe.queries >= 1_000, per_phase
        assert probe.boundary_checks >= 100
        causes = {c: log_text.count(f"rewritten ({c})") for c in
                  ("a commit moved the watermark", "maintenance replaced the current snapshot",
                   "the table's current snapshot differs from the one it read")}
        print("view rewrites by cause:", causes)
        assert causes["a commit moved the watermark"] and causes["maintenance replaced the current snapshot"], causes
        # The cold side, read by pyiceberg, is the source up to the W the view pins.
        final = run(cfg, "once", check=True)
        assert "CYCLE COMPLETED: status=success" in final.stderr
        for t in TABLES:
            assert described(gateway, f"{db}.{t}_all") == described(gateway, f"{db}.{t}")
            pin = pinned(gateway, db, f"{t}_all")
            got = verify(warehouse_home, f"cold.{t}", clickhouse=False, spark=False)["pyiceberg"]
            src = k2data.source_stats(gateway.scalar, db, t, json.dumps(pin["watermark"]))
            assert got["count"] == src["count"] and got["duplicates"] == 0, (t, got["count"], src)
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()


def small_config(tmp_path, gateway, db, view, **extra):
    home = view_home(gateway, tmp_path)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", view=view, **extra)], home)
    return cfg, home


def test_a_name_that_is_taken_is_never_replaced_by_a_view(gateway, db, tmp_path):
    """A view name that is already a table (or someone else's view) is refused: the offload goes
    on, the table keeps its rows, and `validate` names the conflict."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1000, now_ms() - 3_600_000, step_ms=1000)
    gateway.sql(f"CREATE TABLE {db}.taken (x UInt8) ENGINE = MergeTree ORDER BY x")
    gateway.sql(f"INSERT INTO {db}.taken VALUES (1), (2)")
    cfg, _ = small_config(tmp_path, gateway, db, f"{db}.taken")
    p = run(cfg, "once", check=True)
    assert f"{db}.taken exists and is not a view this service wrote (engine MergeTree); it is never replaced" in p.stderr
    assert gateway.sql(f"SELECT count() FROM {db}.taken").strip() == "2"
    v = run(cfg, "validate")
    assert v.returncode == 1 and f"view {db}.taken: FAILED: {db}.taken exists and is not a view this service wrote" in v.stdout, v.stdout


def test_expiry_keeps_the_snapshot_the_view_reads_and_validate_checks_the_view(gateway, db, tmp_path):
    """Expiry never removes the snapshot the view pins, even when it is older than the retention:
    the view is set back from outside onto the first of four snapshots (a process that lost its
    lease, an operator), and a dry run of expiry with a 1-second retention expires none of them;
    without a pin it would expire two. A real run moves the view first, then expires."""
    create_bronze(gateway, db, "trades")
    cfg, home = small_config(tmp_path, gateway, db, f"{db}.trades_all", settle_delay="1s")
    cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 1\n')
    first_view = None
    for i in range(4):
        insert_bronze(gateway, db, "trades", 100, now_ms(), step_ms=1, seq_start=i * 1000)
        time.sleep(1.5)  # settled (1 s); above the W of the previous run
        run(cfg, "once", check=True)
        first_view = first_view or gateway.sql(f"SHOW CREATE TABLE {db}.trades_all FORMAT TSVRaw").strip()
    assert pinned(gateway, db, "trades_all")["sequence_number"] == 4
    old = first_view.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1)
    gateway.sql(old)
    assert pinned(gateway, db, "trades_all")["sequence_number"] == 1
    time.sleep(1.5)
    dry = run(cfg, "maintain", "--only", "expire", "--dry-run", check=True).stdout
    assert "0 of 4 snapshots would expire" in dry, dry
    done = run(cfg, "maintain", "--only", "expire", check=True).stdout
    assert "2 of 4 snapshots expired" in done, done
    assert pinned(gateway, db, "trades_all")["sequence_number"] == 4
    stats = COUNT.replace("{bound}", str(now_ms()))
    assert gateway.sql(stats.format(t=f"{db}.trades_all")) == gateway.sql(stats.format(t=f"{db}.trades"))
    v = run(cfg, "validate", check=True).stdout
    for line in ("ClickHouse reads an Iceberg snapshot by id", f"database {db} exists", "is this service's view",
                 f"may create, replace and drop views in {db}", "ClickHouse reads files under", "the view's query runs (400 rows now)"):
        assert f"view {db}.trades_all: ok: " in v and line in v, (line, v)
