#!/usr/bin/env python3
"""Keeps ARCHITECTURE.md true: every module under src/ has one layer in its map, and every
`crate::` path (in `use` lines and inline) runs to the module's own layer or one below it.
Modules of one layer may use each other, but never in a circle.

Usage: dev/check_layers.py [--root DIR]   (exit 0: the map holds; 1: it does not, with why)
"""
import argparse
import re
import sys
from pathlib import Path

MAP_ROW = re.compile(r"^\|\s*`([a-z_]+)`\s*\|\s*([a-z ]+?)\s*\|")
LAYERS_LINE = re.compile(r"^Layers, bottom to top:\s*(.+)$", re.MULTILINE)
USE_STMT = re.compile(r"\b(?:pub(?:\([a-z]+\))?\s+)?use\s+crate::([^;]+);", re.DOTALL)
# `crate::x`, and `$crate::x` in a macro (a dependency of the module that defines the macro).
INLINE_PATH = re.compile(r"(?<![\w:])\$?crate::([a-z_][a-z0-9_]*)")
CRATE_ALIAS = re.compile(r"\buse\s+crate\s+as\s+([a-z_][a-z0-9_]*)\s*;")
SUPER_PATH = re.compile(r"(?<![\w:])((?:super::)+)([a-z_][a-z0-9_]*)")
# A path in an attribute's string (`#[serde(with = "crate::x::y")]`), blanked with the strings.
ATTRIBUTE_PATH = re.compile(r"#\[[^\]]*?\"crate::([a-z_][a-z0-9_]*)")
EXPORTED_MACRO = re.compile(r"#\[macro_export\]\s*macro_rules!\s*([a-z_][a-z0-9_]*)")
MACRO_CALL = re.compile(r"(?<![\w$])(?:crate::)?([a-z_][a-z0-9_]*)!")
# Comments, strings and char literals, in the order a Rust lexer meets them (a `//` inside a
# string is not a comment; a `"` inside a comment is not a string).
NOT_CODE = re.compile(r'//[^\n]*|/\*.*?\*/|r(#*)".*?"\1|b?"(?:\\.|[^"\\])*"|\'(?:\\.|[^\\\'\n])\'', re.DOTALL)


def code_only(text):
    """The text with comments and literals blanked, newlines kept (for line numbers)."""
    return NOT_CODE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def read_map(architecture):
    """(ordered layer names, {module: layer}) from ARCHITECTURE.md."""
    text = architecture.read_text()
    m = LAYERS_LINE.search(text)
    if not m:
        sys.exit(f"{architecture}: no line 'Layers, bottom to top: a → b → …'")
    layers = [name.strip().strip("`") for name in re.split(r"→|->", m.group(1))]
    modules = {}
    for line in text.splitlines():
        row = MAP_ROW.match(line)
        if row:
            modules[row.group(1)] = row.group(2)
    return layers, modules


def source_modules(src):
    """Top-level modules of the library: src/x.rs and/or src/x/ (lib.rs and main.rs aside),
    each with its files and each file's depth in the module tree (src/x.rs and src/x/mod.rs: 1)."""
    found = {}
    for path in sorted(src.iterdir()):
        if path.suffix == ".rs" and path.stem not in ("lib", "main"):
            found.setdefault(path.stem, []).append((path, 1))
        elif path.is_dir():
            for f in sorted(path.rglob("*.rs")):
                parts = f.relative_to(src).with_suffix("").parts
                found.setdefault(path.name, []).append((f, len(parts) - (parts[-1] == "mod")))
    return found


def exported_macros(modules):
    """{macro name: the module that defines it} for `#[macro_export]` macros (they live at the
    crate's root, `crate::name!`, whichever module defines them)."""
    return {m.group(1): name for name, files in modules.items() for path, _ in files
            for m in EXPORTED_MACRO.finditer(code_only(path.read_text()))}


def first_segments(use_tree):
    """The top modules a `use crate::…;` tree names: `a::{b, c}` → a; `{a::x, b}` → a, b."""
    tree = use_tree.strip()
    if not tree.startswith("{"):
        return {re.split(r"::|\s", tree, maxsplit=1)[0]}
    inner, depth, part, parts = tree[1:-1], 0, "", []
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        part += ch
    parts.append(part)
    return {seg for p in parts if p.strip() for seg in first_segments(p)}


def imports_of(files, root, macros=None):
    """{imported top module: ['file:line', …] where it is named}: `use crate::…` trees, inline
    `crate::x` and `$crate::x` paths, `super::` chains that climb to the crate's root, paths
    through `use crate as alias`, paths in attribute strings, and calls of exported macros."""
    found = {}
    for path, depth in files:
        raw = path.read_text()
        text = code_only(raw)
        named = [(m.start(), module) for m in USE_STMT.finditer(text) for module in first_segments(m.group(1))]
        named += [(m.start(), m.group(1)) for m in INLINE_PATH.finditer(text)]
        named += [(m.start(), m.group(2)) for m in SUPER_PATH.finditer(text) if m.group(1).count("super") >= depth]
        for alias in CRATE_ALIAS.findall(text):
            named += [(m.start(), m.group(1)) for m in re.finditer(rf"(?<![\w:]){alias}::([a-z_][a-z0-9_]*)", text)]
        named += [(m.start(), m.group(1)) for m in ATTRIBUTE_PATH.finditer(raw)]
        named += [(m.start(), (macros or {})[m.group(1)]) for m in MACRO_CALL.finditer(text) if m.group(1) in (macros or {})]
        for start, module in sorted(named):
            where = f"{path.relative_to(root)}:{text.count(chr(10), 0, start) + 1}"
            found.setdefault(module, [])
            if where not in found[module]:
                found[module].append(where)
    return found


def circles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root):
    layers, mapped = read_map(root / "ARCHITECTURE.md")
    modules = source_modules(root / "src")
    problems = []
    for name in sorted(set(modules) - set(mapped)):
        problems.append(f"src/{name}: not in ARCHITECTURE.md's map (give it a layer)")
    for name in sorted(set(mapped) - set(modules)):
        problems.append(f"ARCHITECTURE.md maps `{name}`, which is not a module under src/")
    for name, layer in sorted(mapped.items()):
        if layer not in layers:
            problems.append(f"ARCHITECTURE.md: `{name}` is in layer '{layer}', not one of {layers}")
    graph = {}
    macros = exported_macros(modules)
    for name, files in modules.items():
        if mapped.get(name) not in layers:
            continue
        rank = layers.index(mapped[name])
        for target, places in sorted(imports_of(files, root, macros).items()):
            if target == name or target not in modules:
                continue
            graph.setdefault(name, set()).add(target)
            target_layer = mapped.get(target)
            if target_layer in layers and layers.index(target_layer) > rank:
                for where in places:
                    problems.append(f"{where}: `{name}` ({mapped[name]}) uses `{target}` ({target_layer}), a layer above it")
    for component in circles(graph):
        problems.append("import circle: " + " ↔ ".join(component))
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    problems = check(args.root)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"check_layers: {len(problems)} problem(s); the map is ARCHITECTURE.md", file=sys.stderr)
        return 1
    print("check_layers: every import runs down or across ARCHITECTURE.md's layers, with no circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
