"""docs/monitoring.md and docs/runbooks/ held to the code, without services: the seed's
sections, the alerts equal to the rules file, every dashboard panel described, every PromQL
query parsed by promtool, every command a real subcommand with real flags, every log line the
documents grep for written by the code. The live half (metrics equal to a scrape, queries
returning data, read-only commands run) is in tests/test_alert_flow.py."""
import json
import re

import yaml

import guide_doc as g
from harness import ROOT

SEED_SECTIONS = [
    "TL;DR (Quick Reference)", "Table of Contents", "Architecture Overview", "Metrics Reference", "Dashboard Guide",
    "Alert Definitions", "Troubleshooting", "Notification Setup", "SLO & Performance Targets", "Operational Runbooks",
    "Performance Optimization", "Appendix: Prometheus Query Cookbook", "Related Documentation",
]


def rules():
    doc = yaml.safe_load(g.RULES.read_text())
    return [r for grp in doc["groups"] for r in grp["rules"]]


def test_the_guide_has_the_seeds_sections_in_the_seeds_order():
    assert g.h2_titles(g.text()) == SEED_SECTIONS


def test_every_alert_of_the_guide_is_the_rule_of_the_rules_file_and_back():
    documented = g.documented_alerts(g.text())
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(documented) == set(alerts), f"only in the guide: {set(documented) - set(alerts)}; only in the rules: {set(alerts) - set(documented)}"
    for name, (rule, (severity, for_)) in documented.items():
        real = alerts[name]
        assert " ".join(rule["expr"].split()) == " ".join(real["expr"].split()), name
        assert rule["for"] == real["for"] == for_, name
        assert rule["labels"] == real["labels"], name
        assert real["labels"]["severity"] == severity, name
    # The recording rules' table too.
    table = dict(re.findall(r"^\| `([\w:]+)` \| `(.+)` \|$", g.section(g.text(), "Alert Definitions"), re.M))
    records = {r["record"]: r["expr"] for r in rules() if "record" in r}
    assert table == records


def test_every_dashboard_panel_is_described_under_its_number_and_title():
    dash = json.loads(g.DASHBOARD.read_text())
    assert g.documented_panels(g.text()) == {p["id"]: p["title"] for p in dash["panels"]}
    assert f"{len(dash['panels'])} panels" in g.text()


def test_every_promql_query_of_the_guide_parses_with_promtool(tmp_path):
    queries = g.promql_queries(g.text())
    assert len(queries) >= 60, len(queries)
    rule_file = tmp_path / "guide.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "guide", "rules": [
        {"record": f"guide:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}))
    import subprocess
    p = subprocess.run(["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(queries)} rules found" in p.stdout


def test_every_metric_in_the_guide_is_registered_by_the_code():
    """The static half of the metrics check (the live scrape is tests/test_alert_flow.py)."""
    src = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.rs"))
    for name in g.documented_metrics(g.text()):
        if not name.startswith("process_"):
            assert f'"{name}"' in src, f"{name} is in the guide but not registered in src/"


def test_every_command_in_the_guide_and_runbooks_is_real():
    checked = set()
    for doc in g.all_documents():
        for command in g.shell_commands(doc.read_text()):
            if command.startswith("iceberg-offload "):
                checked.add(g.check_flags(command))
            if command.split()[0] in ("systemctl", "journalctl"):
                unit = re.search(r"-u (\S+)|(?:status|restart|is-active|start|stop) (\S+)", command)
                assert unit and g.UNIT in unit.groups(), f"{doc.name}: {command}: the unit is {g.UNIT}"
            if command.startswith("sudo systemctl"):
                assert g.UNIT in command, f"{doc.name}: {command}"
    assert {("status",), ("validate",), ("watermark", "show"), ("audit",), ("maintain",), ("cleanup",)} <= checked


def test_every_log_line_the_documents_grep_for_is_written_by_the_code():
    """`journalctl … | grep -E "A|B"`: each alternative matches a log message of src/."""
    src = "\n".join(g.string_literals("\n".join(p.read_text() for p in (ROOT / "src").rglob("*.rs"))))
    patterns = 0
    for doc in g.all_documents():
        for command in g.shell_commands(doc.read_text()):
            if not command.startswith("journalctl"):
                continue
            for pattern in re.findall(r"grep (?:-E )?[\"']([^\"']+)[\"']", command):
                for alternative in g.top_level_alternatives(pattern):
                    patterns += 1
                    assert re.search(alternative, src), f"{doc.name}: `{alternative}` is logged nowhere in src/"
    assert patterns >= 10, patterns


def test_every_runbook_linked_from_the_guide_exists_and_every_runbook_is_linked():
    linked = set(re.findall(r"\(runbooks/([\w.-]+\.md)\)", g.text()))
    assert linked == {p.name for p in g.RUNBOOKS}
