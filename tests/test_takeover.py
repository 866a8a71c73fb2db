"""Tables a replica gains run at once, not at the next boundary (issue 23): two `run` replicas on
one SQLite state store with a daily interval (the boundary never falls inside the test), the second on another host name
(its own UTS namespace, `unshare -u`, so that its death is found by the member timeout, as for a
replica on another machine). When it leaves (SIGTERM) or dies (SIGKILL, five times), the first
runs its tables within seconds in an off-schedule cycle, while the tables it kept wait for the
boundary."""
import os
import re
import signal
import subprocess
import time

import k2data
from harness import PASSWORD, assert_equal_to_source, binary, bronze_table, create_bronze, insert_bronze, now_ms, \
    write_config
from test_restart import away_from_the_boundary, wait_for_line

TABLES = [f"trades_{i}" for i in range(6)]
MEMBER_TIMEOUT_S = 3
OFF_SCHEDULE = r"off-schedule cycle: running at once the (\d+) tables this replica gained \(([^)]*)\)"


def start(cfg, log, host=None):
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD)
    cmd = [binary(), "--config", str(cfg), "run"]
    if host:
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def nth_line(log, pattern, n, proc, timeout):
    """The n-th (1-based) match of `pattern` in `log`, waited for while `proc` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(re.finditer(pattern, log.read_text()))
        if len(found) >= n:
            return found[n - 1]
        assert proc.poll() is None, f"the service ended:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} lines matching {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def count(log, pattern):
    return len(re.findall(pattern, log.read_text()))


def iceberg_count(gateway, tmp_path, db, t):
    got, _ = assert_equal_to_source(gateway, tmp_path, db, t, spark=False)
    return got["pyiceberg"]["count"]


def test_a_replica_that_leaves_or_dies_has_its_tables_run_at_once_by_the_other(gateway, db, tmp_path):
    for t in TABLES:
        create_bronze(gateway, db, t)
        insert_bronze(gateway, db, t, 600, now_ms() - 3_600_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, t, settle_delay="1s") for t in TABLES], tmp_path,
                       extra_service=f'member_timeout = "{MEMBER_TIMEOUT_S}s"')
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "24h"'))
    away_from_the_boundary(seconds=300)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = start(cfg, a_log)
    b = None
    seq = 100_000
    takeovers = []
    try:
        wait_for_line(a_log, r"CYCLE COMPLETED: status=success tables ok=6", a)
        for round_ in range(6):
            # b joins; a hands it about half the tables at its next look; b runs its share at start.
            handed = count(a_log, r"handed over: (?!none)")
            b_log.write_text("")
            b = start(cfg, b_log, host="replica-b")
            wait_for_line(b_log, r"CYCLE COMPLETED: status=success", b)
            handover = nth_line(a_log, r"handed over: (?!none)([^)]*)\)", handed + 1, a, timeout=30)
            b_tables = set(handover.group(1).split(", "))
            # Rows arrive for every table, settled before b goes.
            for t in TABLES:
                k2data.insert_bronze_arriving_now(gateway.sql, db, t, 100, seq_start=seq)
            seq += 100
            time.sleep(1.2)
            before = {t: iceberg_count(gateway, tmp_path, db, t) for t in TABLES}
            offs, completed = count(a_log, OFF_SCHEDULE), count(a_log, r"CYCLE COMPLETED")
            gone = time.time()
            b.send_signal(signal.SIGTERM if round_ == 0 else signal.SIGKILL)
            b.wait(60)
            m = nth_line(a_log, OFF_SCHEDULE, offs + 1, a, timeout=MEMBER_TIMEOUT_S + 30)
            nth_line(a_log, r"CYCLE COMPLETED", completed + 1, a, timeout=60)
            took = time.time() - gone
            takeovers.append(took)
            gained = set(m.group(2).split(", "))
            assert gained == b_tables and len(gained) < len(TABLES), (round_, gained, b_tables)
            # The tables gained hold the rows that arrived before b went; the tables a kept wait
            # for the boundary (15 minutes away).
            for t in TABLES:
                assert iceberg_count(gateway, tmp_path, db, t) == before[t] + (100 if t in gained else 0), (round_, t)
            b = None
            print(f"round {round_} ({'SIGTERM' if round_ == 0 else 'SIGKILL'}): b's {len(gained)} tables run by a "
                  f"{took:.1f} s after b went")
            bound = 10 if round_ == 0 else MEMBER_TIMEOUT_S + 30
            assert took < bound, f"round {round_}: b's tables moved after {took:.1f} s"
    finally:
        for p in (a, b):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    print("takeover times (s):", [round(t, 1) for t in takeovers])
    assert len(takeovers) == 6
