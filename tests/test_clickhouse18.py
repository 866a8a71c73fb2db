"""The real Debian ClickHouse server (18.16): too old to serve ArrowStream and DateTime64.
The service must say so, naming the version found and the minimum supported."""
import shutil
import subprocess
import time
import urllib.request

import pytest

from harness import bronze_table, free_port, run, write_config


@pytest.fixture(scope="module")
def clickhouse18(tmp_path_factory):
    server = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
    root = tmp_path_factory.mktemp("ch18")
    shutil.copy("/etc/clickhouse-server/config.xml", root / "config.xml")
    shutil.copy("/etc/clickhouse-server/users.xml", root / "users.xml")
    port = free_port()
    proc = subprocess.Popen([server, f"--config-file={root / 'config.xml'}", "--",
                             f"--http_port={port}", f"--tcp_port={free_port()}", f"--interserver_http_port={free_port()}",
                             f"--path={root}/data/", f"--tmp_path={root}/tmp/", f"--user_files_path={root}/uf/",
                             f"--format_schema_path={root}/fs/", f"--logger.log={root}/log", f"--logger.errorlog={root}/err",
                             "--logger.console=0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            version = urllib.request.urlopen(url + "/?query=SELECT%20version()", timeout=2).read().decode().strip()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("clickhouse-server 18.16 did not start")
    assert version.startswith("18.16"), version

    class Server:
        pass
    s = Server()
    s.url, s.version = url, version
    yield s
    proc.terminate()
    proc.wait(20)


def test_old_clickhouse_is_refused_naming_versions(clickhouse18, tmp_path):
    class Gw:
        url = clickhouse18.url
    cfg = write_config(tmp_path / "c.toml", Gw, [bronze_table("k2", "bronze_trades_binance")], tmp_path)
    cfg.write_text(cfg.read_text().replace('password_env = "TEST_CH_PASSWORD"\n', ""))
    p = run(cfg, "once")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"version {clickhouse18.version}" in p.stderr and "needs 23.3 or newer" in p.stderr, p.stderr
    p = run(cfg, "validate")
    assert p.returncode == 1
    assert "clickhouse: FAILED" in p.stdout and clickhouse18.version in p.stdout and "23.3" in p.stdout
    assert not (tmp_path / "warehouse" / "cold").exists()
