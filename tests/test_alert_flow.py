"""End to end on loopback with the real Prometheus and Alertmanager (Debian packages) and the
real service: scraping, dashboard queries, recording rules, and an alert that fires when
ClickHouse becomes unreachable, is routed to the critical receivers, and resolves."""
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import guide_doc as g  # noqa: E402
from harness import PASSWORD, ROOT, binary, bronze_table, create_bronze, free_port, insert_bronze, now_ms, run, view_home, \
    write_config

sys.path.insert(0, str(ROOT / "dev"))
from tcp_proxy import FaultProxy  # noqa: E402

DEPLOY = ROOT / "deploy"


def scaled_rules(text):
    """The real rules with minutes turned into seconds (`for: 5m` → 5s, `[15m]` → `[15s]`),
    so an end-to-end run takes seconds. Generated, never maintained by hand."""
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = re.sub(r"^(\d+)m$", r"\1s", rule["for"])
            rule["expr"] = re.sub(r"\[(\d+)m\]", r"[\1s]", rule["expr"]).replace("[1h]", "[60s]")
    return doc


def am_config(webhook_port):
    """The real Alertmanager routing, each receiver replaced by a local webhook of its name."""
    doc = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    doc["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1h")
    for r in doc["receivers"]:
        name = r["name"]
        r.clear()
        r.update(name=name, webhook_configs=[{"url": f"http://127.0.0.1:{webhook_port}/{name}", "send_resolved": True}])
    return doc


class Webhook:
    def __init__(self):
        self.received = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.received.append((self.path.strip("/"), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def got(self, receiver, alertname, status):
        return any(r == receiver and any(a["labels"]["alertname"] == alertname and a["status"] == status for a in b["alerts"])
                   for r, b in self.received)


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def prom_query(port, expr):
    return get_json(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]


def wait_for(what, predicate, timeout=90, step=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def stack(gateway, db, tmp_path):
    procs = []
    proxy = FaultProxy(gateway.port)
    hook = Webhook()
    stop = threading.Event()
    try:
        for t in ("bronze_trades_binance", "bronze_trades_kraken"):
            create_bronze(gateway, db, t)
            insert_bronze(gateway, db, t, 50_000, now_ms() - 3_600_000, step_ms=50)

        def trades_keep_coming():
            seq = 1_000_000
            while not stop.is_set():
                for t in ("bronze_trades_binance", "bronze_trades_kraken"):
                    insert_bronze(gateway, db, t, 2_000, now_ms() - 1_200, step_ms=0.1, seq_start=seq)
                seq += 2_000
                stop.wait(0.5)
        threading.Thread(target=trades_keep_coming, daemon=True).start()

        svc_port, am_port, prom_port = free_port(), free_port(), free_port()
        # The first table has a view and eviction (their metrics are the guide's too); ClickHouse
        # reads the warehouse under its user_files_path.
        home = view_home(gateway, tmp_path)
        cfg = write_config(tmp_path / "c.toml", proxy, [
            bronze_table(db, "bronze_trades_binance", settle_delay="1s", view=f"{db}.trades_binance_all", evict_after="2d"),
            bronze_table(db, "bronze_trades_kraken", settle_delay="1s"),
        ], home, state_url=f"sqlite:{tmp_path / 'state.db'}")
        cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "2s"')
                       .replace('metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{svc_port}"')
                       .replace("retries = 1", "retries = 2"))
        procs.append(subprocess.Popen([binary(), "--config", str(cfg), "run"], env=dict(os.environ, TEST_CH_PASSWORD=PASSWORD),
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "service.log", "w")))

        (tmp_path / "am.yml").write_text(yaml.safe_dump(am_config(hook.port)))
        procs.append(subprocess.Popen(["prometheus-alertmanager", f"--config.file={tmp_path / 'am.yml'}",
                                       f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                                       "--cluster.listen-address="], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "am.log", "w")))

        rules_dir = tmp_path / "rules"
        rules_dir.mkdir()
        rules = scaled_rules((DEPLOY / "prometheus" / "rules" / "iceberg-offload-alerts.yml").read_text())
        (rules_dir / "iceberg-offload-alerts.yml").write_text(yaml.safe_dump(rules))
        prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        prom["global"].update(scrape_interval="1s", evaluation_interval="1s")
        prom["rule_files"] = [str(rules_dir / "*.yml")]
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
        prom["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{svc_port}"]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
        procs.append(subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                                       "--rules.alert.resend-delay=1s"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w")))

        class Stack:
            pass
        s = Stack()
        s.proxy, s.hook, s.rules, s.cfg = proxy, hook, rules, cfg
        s.svc_port, s.am_port, s.prom_port, s.tmp = svc_port, am_port, prom_port, tmp_path
        yield s
    finally:
        stop.set()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        proxy.close()
        hook.server.shutdown()


def test_scrape_dashboard_and_alert_flow(stack):
    s = stack
    # Healthy cycles, scraped.
    wait_for("three successful cycles scraped",
             lambda: float((prom_query(s.prom_port, 'offload_cycles_total{status="success"}') or [{"value": [0, "0"]}])[0]["value"][1]) >= 3)
    time.sleep(4)

    # Every dashboard query returns data.
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "iceberg-offload.json").read_text())
    empty = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"] if not prom_query(s.prom_port, t["expr"])]
    assert not empty, f"dashboard queries without data: {empty}"

    # Every recording rule returns data.
    records = [r["record"] for g in s.rules["groups"] for r in g["rules"] if "record" in r]
    missing = [r for r in records if not prom_query(s.prom_port, r)]
    assert not missing, f"recording rules without data: {missing}"

    # The health check says healthy.
    p = run(s.cfg, "status", "--url", f"http://127.0.0.1:{s.svc_port}", "--prometheus", f"http://127.0.0.1:{s.prom_port}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "HEALTHY" in p.stdout and "none firing" in p.stdout

    # ClickHouse becomes unreachable: the critical alert fires and reaches both critical receivers.
    s.proxy.mode = "refuse"
    wait_for("IcebergOffloadConsecutiveFailures firing in Prometheus",
             lambda: any(a["labels"]["alertname"] == "IcebergOffloadConsecutiveFailures" and a["state"] == "firing"
                         for a in get_json(f"http://127.0.0.1:{s.prom_port}/api/v1/alerts")["data"]["alerts"]))
    wait_for("delivery to slack-critical and pagerduty",
             lambda: s.hook.got("slack-critical", "IcebergOffloadConsecutiveFailures", "firing")
             and s.hook.got("pagerduty", "IcebergOffloadConsecutiveFailures", "firing"))
    assert not s.hook.got("slack-warnings", "IcebergOffloadConsecutiveFailures", "firing"), "critical must not go to warnings"
    p = run(s.cfg, "status", "--url", f"http://127.0.0.1:{s.svc_port}", "--prometheus", f"http://127.0.0.1:{s.prom_port}")
    assert p.returncode == 1 and "IcebergOffloadConsecutiveFailures" in p.stdout, p.stdout

    # ClickHouse is back: the alert resolves, and the receivers are told.
    s.proxy.mode = "pass"
    wait_for("resolution delivered to slack-critical",
             lambda: s.hook.got("slack-critical", "IcebergOffloadConsecutiveFailures", "resolved"))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.svc_port}/metrics").read().decode()
    assert re.search(r'offload_errors_total\{error_type="connection",table="bronze_trades_binance"\} [1-9]', metrics)


def scrape_families(text):
    """{family: (type, label names)} of a Prometheus text exposition."""
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))
    labels = {name: set() for name in types}
    for series, names in re.findall(r"^(\w+)\{([^}]*)\}", text, re.M):
        family = next((f for f in (series, re.sub(r"_(bucket|sum|count)$", "", series)) if f in types), None)
        if family:
            labels[family] |= set(re.findall(r"(\w+)=", names)) - {"le", "quantile"}
    return {name: (types[name], labels[name]) for name in types}


def guide_command(command, s):
    """A documented command with its placeholders pointed at the test's stack."""
    command = (command.replace(g.CONFIG_PATH, str(s.cfg)).replace(g.SERVICE, f"127.0.0.1:{s.svc_port}")
               .replace(g.PROMETHEUS, f"127.0.0.1:{s.prom_port}").replace(g.ALERTMANAGER, f"127.0.0.1:{s.am_port}")
               .replace(g.STATE_DB, str(s.tmp / "state.db")))
    return re.sub(r"\bTABLE\b", "bronze_trades_binance", command)


def test_monitoring_guide_and_runbooks_hold_against_a_live_service(stack):
    """docs/monitoring.md against the real service and Prometheus: its metrics are the scrape's
    (names, types, labels) and the other way round; each PromQL query returns data (a
    comparison's left side, when the comparison is rightly empty on a healthy service); and every
    read-only command of the guide and the runbooks runs as written."""
    s = stack
    wait_for("three successful cycles, maintenance and a full audit",
             lambda: float((prom_query(s.prom_port, 'offload_cycles_total{status="success"}') or [{"value": [0, "0"]}])[0]["value"][1]) >= 3
             and prom_query(s.prom_port, "offload_table_metadata_bytes")
             and prom_query(s.prom_port, 'offload_audit_last_timestamp_seconds{scope="full"}'), timeout=120)
    time.sleep(4)
    doc = g.text()

    # Metrics: the guide's and the scrape's, both ways, with their types and labels.
    scrape = scrape_families(urllib.request.urlopen(f"http://127.0.0.1:{s.svc_port}/metrics").read().decode())
    documented = g.documented_metrics(doc)
    assert set(documented) - set(scrape) == set(), "in the guide, not exported"
    assert set(scrape) - set(documented) == set(), "exported, not in the guide"
    for name, (kind, labels) in documented.items():
        real_kind, real_labels = scrape[name]
        assert real_kind == ("gauge" if kind == "info" else kind), f"{name}: the guide says {kind}, the scrape {real_kind}"
        if labels is not None:
            assert labels == real_labels, f"{name}: the guide says {sorted(labels)}, the scrape {sorted(real_labels)}"

    # Every metric an alert, a recording rule, a panel or the guide reads is exported: a rule on
    # a misspelled metric would parse, pass its promtool test on made-up series, and never fire.
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "iceberg-offload-alerts.yml").read_text())
    exprs = [r["expr"] for grp in rules["groups"] for r in grp["rules"]] + g.promql_queries(doc)
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "iceberg-offload.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    read = set().union(*map(g.metric_names, exprs)) - {"up"}
    assert read - set(scrape) == set(), "read by a rule, panel or query, not exported"

    # Every query returns data; a comparison rightly empty on a healthy service has data on both sides.
    empty = []
    for query in g.promql_queries(doc):
        if prom_query(s.prom_port, query):
            continue
        sides = g.top_level_comparison(query)
        if not (sides and all(prom_query(s.prom_port, side) for side in sides)):
            empty.append(query)
    assert not empty, f"guide queries without data: {empty}"

    # Every command that can run here runs as written.
    ran, env = [], dict(os.environ, TEST_CH_PASSWORD=PASSWORD, ICEBERG_OFFLOAD_CONFIG=str(s.cfg))
    for path in g.all_documents():
        for command in g.shell_commands(path.read_text()):
            first = command.split()[0]
            if first == "iceberg-offload" and g.runnable(command):
                words = g.tool_words(guide_command(command, s))
                sub = g.subcommand(words)
                for _ in range(20):
                    p = subprocess.run([binary(), *words], capture_output=True, text=True, env=env, timeout=300)
                    # The daemon holds a table's lease while it runs it (every 2 s here): try again.
                    if not (p.returncode == 4 and sub[0] in g.DRY_RUN):
                        break
                    time.sleep(0.3)
                if sub == ("audit",):
                    # 1 is also "a day is not ok" (rows keep arriving here): a verdict must be printed.
                    assert p.returncode in (0, 1) and re.search(r"\b(ok|missing|extra)\b", p.stdout), f"{path.name}: {command}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
                else:
                    allowed = {0, 4} if sub == ("once",) else {0}
                    assert p.returncode in allowed, f"{path.name}: {command}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
                assert p.stdout.strip() or p.stderr.strip(), f"{path.name}: {command}: no output"
                ran.append(" ".join(sub))
            elif first in ("curl", "promtool", "amtool", "sqlite3"):
                p = subprocess.run(["bash", "-o", "pipefail", "-c", guide_command(command, s)], capture_output=True,
                                   text=True, cwd=ROOT, env=env, timeout=60)
                # `amtool alert add` says nothing; its alert is looked for at the webhook below.
                said = p.stdout.strip() or p.stderr.strip() or command.startswith("amtool alert add")
                assert p.returncode == 0 and said, f"{path.name}: {command}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
                ran.append(first)
            else:
                assert first in g.HOST_COMMANDS or first == "iceberg-offload" or first == "export", f"{path.name}: {command}: neither run nor known as a host command"
    assert {"status", "validate", "watermark show", "audit", "maintain", "cleanup", "repair", "once", "curl", "promtool", "amtool", "sqlite3"} <= set(ran), set(ran)
    # The guide's test notification reached the warning receiver.
    wait_for("the guide's test alert delivered to slack-warnings", lambda: s.hook.got("slack-warnings", "IcebergOffloadTest", "firing"), timeout=30)
