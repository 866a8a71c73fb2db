"""Bad and unusual input: NULL cursors, timestamps before 1970 and far in the future, NaN and
infinities, very long strings; HTTPS with a custom CA; and a scan of every output for the
ClickHouse password."""
import math
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request

from harness import (PASSWORD, ROOT, binary, bronze_table, create_bronze, free_port, insert_bronze, now_ms, run, verify,
                     write_config)

sys.path.insert(0, str(ROOT / "dev"))
from tcp_proxy import FaultProxy  # noqa: E402


def test_null_cursor_old_and_future_timestamps_nan_inf_long_strings(gateway, db, tmp_path):
    gateway.sql(f"""CREATE TABLE {db}.odd (ts Nullable(DateTime64(3)), id UInt64, x Float64, s String)
                    ENGINE = MergeTree ORDER BY id""")
    long = "x" * 1_000_000
    gateway.sql(f"""INSERT INTO {db}.odd VALUES
        ('1965-03-01 12:00:00.001', 1, nan, 'before 1970'),
        ('1969-12-31 23:59:59.999', 2, inf, '{long}'),
        ('2026-01-01 00:00:00.000', 3, -inf, ''),
        (NULL, 4, 1.0, 'no cursor'),
        (NULL, 5, 2.0, 'no cursor either'),
        ('2250-01-01 00:00:00.000', 6, 3.0, 'far future: not settled until then')""")
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "odd", target="cold.odd", cursor="ts", tiebreak="id", partition=["year(ts)"])], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 rows of odd have a NULL ts" in p.stderr, p.stderr
    got = verify(tmp_path, "cold.odd", key="id", sums=("id",), rows=True)
    rows = {int(r["id"]): r for r in got["pyiceberg"]["rows"]}
    assert sorted(rows) == [1, 2, 3], "NULL cursors never, the far future not yet"
    assert rows[1]["x"] == "nan" and rows[2]["x"] == "inf" and rows[3]["x"] == "-inf"
    assert len(rows[2]["s"]) == 1_000_000 and rows[1]["ts"].startswith("1965-03-01 12:00:00.001")
    assert got["clickhouse"]["count"] == 3
    p = run(cfg, "watermark", "show", "--json", check=True)
    assert '"rows_behind": "1"' in p.stdout  # the 2250 row waits (NULL cursors are never "after" it)


def make_ca_and_cert(d):
    def sh(*a):
        subprocess.run(a, check=True, capture_output=True, cwd=d)
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
       "-subj", "/CN=iceberg-offload test CA")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    sh("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "srv.pem", "-days", "2", "-extfile", "san.ext")


def test_https_to_clickhouse_with_a_custom_ca(gateway, db, tmp_path):
    make_ca_and_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    proxy = FaultProxy(gateway.port, tls=ctx)
    try:
        create_bronze(gateway, db, "trades")
        insert_bronze(gateway, db, "trades", 1_000, now_ms() - 3_600_000, step_ms=100)

        class Via:
            url = proxy.url
        cfg = write_config(tmp_path / "c.toml", Via, [bronze_table(db, "trades")], tmp_path)
        # Without the CA the server is not trusted: a clear connection error, nothing committed.
        p = run(cfg, "once")
        assert p.returncode == 3 and "[connection]" in p.stdout and re.search(r"(?i)certificate|unknown ?issuer", p.stdout), p.stdout
        cfg.write_text(cfg.read_text().replace('compression = "lz4"', f'compression = "lz4"\nca_file = "{tmp_path / "ca.pem"}"'))
        p = run(cfg, "once")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "1000 rows" in p.stdout
    finally:
        proxy.close()


def test_the_password_never_appears_in_any_output(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 3_600_000, step_ms=100)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    cfg.write_text(cfg.read_text().replace('metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{port}"')
                   .replace('interval = "15m"', 'interval = "1s"'))
    outputs = []
    for args in (["validate"], ["once"], ["watermark", "show"], ["watermark", "show", "--json"]):
        p = run(cfg, *args)
        outputs += [p.stdout, p.stderr]
    log = tmp_path / "run.log"
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD, RUST_BACKTRACE="1")
    proc = subprocess.Popen([binary(), "--config", str(cfg), "--log-file", str(log), "--log-format", "json", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        outputs.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
        p = run(cfg, "status", "--url", f"http://127.0.0.1:{port}", "--json")
        outputs += [p.stdout, p.stderr]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        outputs += [out, err, log.read_text()]
    # Failures print errors: a wrong password, and a config error.
    p = run(cfg, "once", env={"TEST_CH_PASSWORD": PASSWORD + "x"})
    outputs += [p.stdout, p.stderr]
    for f in tmp_path.glob("*.db"):
        outputs.append(f.read_bytes().decode("latin-1"))
    leaked = [o for o in outputs if PASSWORD in o]
    assert not leaked, f"the password leaked into {len(leaked)} outputs"
    assert any("offload_rows_total" in o for o in outputs)
