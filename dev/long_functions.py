#!/usr/bin/env python3
"""Lists the functions under src/ longer than a limit (default 80 lines), longest first, test
modules aside: the ones to read for a split (ARCHITECTURE.md says which were kept whole, and why).

Usage: dev/long_functions.py [--over N]"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_layers import code_only  # noqa: E402

FN = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?(?:const\s+)?(?:async\s+)?fn\s+([a-z_0-9]+)", re.MULTILINE)
TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{")


def body_end(text, start):
    """Index just past the `}` closing the first `{` at or after `start` (None for a declaration)."""
    i = start
    while i < len(text) and text[i] not in "{;":
        i += 1
    if i == len(text) or text[i] == ";":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += text[j] == "{"
        depth -= text[j] == "}"
        if depth == 0:
            return j + 1
    return None


def functions(path):
    text = code_only(path.read_text())
    m = TEST_MOD.search(text)
    if m:
        text = text[: m.start()]
    for f in FN.finditer(text):
        end = body_end(text, f.end())
        if end:
            first = text.count("\n", 0, f.start()) + 1
            yield f.group(1), first, text.count("\n", 0, end) + 1 - first + 1


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--over", type=int, default=80)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    found = [(n, f"{p.relative_to(root)}:{line}", name) for p in sorted((root / "src").rglob("*.rs"))
             for name, line, n in functions(p) if n > args.over]
    for n, where, name in sorted(found, reverse=True):
        print(f"{n:4d}  {where}  {name}")
    print(f"{len(found)} function(s) over {args.over} lines", file=sys.stderr)


if __name__ == "__main__":
    main()
