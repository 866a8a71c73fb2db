"""Reading docs/monitoring.md and docs/runbooks/ as data, so that tests can hold them to the
code: the metrics, alerts, panels, PromQL queries and commands they name."""
import re
import shlex
import subprocess

import yaml

from harness import ROOT, binary

GUIDE = ROOT / "docs" / "monitoring.md"
RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
RULES = ROOT / "deploy" / "prometheus" / "rules" / "iceberg-offload-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "iceberg-offload.json"
UNIT = "iceberg-offload-scheduler"

# The placeholders the documents use, and what a test puts in their place.
CONFIG_PATH = "/etc/iceberg-offload/config.toml"
SERVICE = "localhost:8000"
PROMETHEUS = "localhost:9090"
ALERTMANAGER = "localhost:9093"

# Commands a test can run against a live service, by what they may change: nothing.
READ_ONLY = {("status",), ("validate",), ("audit",), ("watermark", "show")}
DRY_RUN = {"maintain", "cleanup", "repair", "evict"}
# Host commands (systemd, ClickHouse's or PostgreSQL's own clients, sudo): not run here;
# what they grep for is checked against the code instead.
HOST_COMMANDS = {"systemctl", "journalctl", "sudo", "timedatectl", "date", "printf", "clickhouse-client", "psql"}
# The state store of the documents, for the `sqlite3` queries the runbooks give.
STATE_DB = "/var/lib/iceberg-offload/state.db"


def text():
    return GUIDE.read_text()


def section(doc, title):
    """The text of the `## title` section, up to the next `## `."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", doc, re.S | re.M)
    assert m, f"no section '## {title}'"
    return m.group(1)


def h2_titles(doc):
    return re.findall(r"^## (.+)$", doc, re.M)


def documented_metrics(doc):
    """{name: (type, labels)} from the Metrics Reference: `#### \\`name{labels}\\`` headings (two
    names joined by "and" share a block) and the rows of the process-metrics table."""
    ref = section(doc, "Metrics Reference")
    out = {}
    blocks = re.split(r"^#### ", ref, flags=re.M)[1:]
    for block in blocks:
        heading = block.splitlines()[0]
        kind = re.search(r"\*\*Type:\*\* (\w+)", block)
        for name, labels in re.findall(r"`([a-z_]+)(?:\{([^}]*)\})?`", heading):
            if kind:
                out[name] = (kind.group(1), {x.strip() for x in labels.split(",") if x.strip()})
        for name, kind_ in re.findall(r"^\| `([a-z_]+)` \| (\w+) \|", block, re.M):
            out[name] = (kind_, None)
    return out


def documented_alerts(doc):
    """{alert: (rule dict from its yaml block, severity and `for` stated in the prose)}."""
    part = section(doc, "Alert Definitions")
    out = {}
    for block in re.split(r"^#### ", part, flags=re.M)[1:]:
        name = re.match(r"`(\w+)`", block)
        if not name:
            continue
        rule = re.search(r"```yaml\n(.*?)```", block, re.S)
        assert rule, f"{name.group(1)}: no rule block"
        stated = re.search(r"\*\*Severity:\*\* (\w+) · \*\*For:\*\* (\w+)", block)
        assert stated, f"{name.group(1)}: no severity/for line"
        out[name.group(1)] = (yaml.safe_load(rule.group(1))[0], stated.groups())
    return out


def documented_panels(doc):
    return {int(n): t.strip() for n, t in re.findall(r"^#### Panel (\d+): (.+)$", section(doc, "Dashboard Guide"), re.M)}


def promql_queries(doc):
    """Every query of the ```promql blocks (one per line; `#` lines are comments)."""
    return [line.strip() for b in re.findall(r"```promql\n(.*?)```", doc, re.S)
            for line in b.splitlines() if line.strip() and not line.strip().startswith("#")]


def shell_commands(doc):
    """Every command line of the ```bash and ```sh blocks (continuations joined)."""
    out = []
    for b in re.findall(r"```(?:bash|sh)\n(.*?)```", doc, re.S):
        joined = re.sub(r"\\\n\s*", " ", b)
        out += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


def all_documents():
    return [GUIDE, *RUNBOOKS]


def tool_words(command):
    """The words of an `iceberg-offload …` command, without the global `--config FILE`."""
    words = shlex.split(command.split("#")[0] if " #" in command else command)
    assert words[0] == "iceberg-offload"
    words = words[1:]
    if words[:1] == ["--config"]:
        words = words[2:]
    return words


def subcommand(words):
    return tuple(words[:2]) if words[0] == "watermark" else tuple(words[:1])


def check_flags(command):
    """The subcommand exists and takes every flag the command uses."""
    words = tool_words(command)
    sub = subcommand(words)
    help_text = subprocess.run([binary(), *sub, "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0, f"{command}: {help_text.stderr}"
    for flag in [w.split("=")[0] for w in words if w.startswith("--")]:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text.stdout), f"{command}: {flag} is not an option of `{' '.join(sub)}`"
    return sub


def runnable(command):
    """Whether a test may run the command against a live service: it only reads."""
    words = tool_words(command)
    sub = subcommand(words)
    return sub in READ_ONLY or sub == ("once",) or (sub[0] in DRY_RUN and "--dry-run" in words)


def top_level_alternatives(pattern):
    """`a|b(c|d)` → [`a`, `b(c|d)`]."""
    out, depth, cur = [], 0, ""
    for ch in pattern:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "|" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def top_level_comparison(query):
    """The two sides of a comparison at the top level of a query, or None."""
    depth, quote = 0, None
    for i, ch in enumerate(query):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and (ch in "<>" or query[i:i + 2] in ("==", "!=")):
            width = 2 if query[i:i + 2] in ("==", "!=", ">=", "<=") else 1
            return query[:i].strip(), query[i + width:].strip()
    return None


METRIC_NAME = re.compile(r"\b((?:offload|process)_[a-z0-9_]+|watermark_timestamp_seconds|up)\b")


def metric_names(expr):
    """The exported metric families an expression reads (histogram and summary series folded)."""
    names = set()
    for name in METRIC_NAME.findall(re.sub(r'"[^"]*"', '""', expr)):
        names.add(re.sub(r"_(bucket|sum|count)$", "", name) if not name.endswith("_total") else name)
    return names


def string_literals(rust_source):
    """The string literals of Rust source (where log messages live): a small lexer that skips
    comments and char literals (`'"'`), and reads `r#"…"#` raw strings."""
    out, i, n, src = [], 0, len(rust_source), rust_source
    while i < n:
        if src.startswith("//", i):
            i = src.find("\n", i)
            i = n if i < 0 else i
        elif src.startswith('r#"', i):
            end = src.find('"#', i + 3)
            out.append(src[i + 3:end])
            i = end + 2
        elif src[i] == '"':
            j, buf = i + 1, []
            while src[j] != '"':
                if src[j] == "\\":
                    buf.append(src[j:j + 2])
                    j += 2
                else:
                    buf.append(src[j])
                    j += 1
            out.append("".join(buf))
            i = j + 1
        elif src[i] == "'" and re.match(r"'(\\.|[^\\'])'", src[i:i + 4]):
            i += len(re.match(r"'(\\.|[^\\'])'", src[i:i + 4]).group(0))
        else:
            i += 1
    return out
