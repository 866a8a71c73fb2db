"""ARCHITECTURE.md's layers hold in src/, and dev/check_layers.py would notice if they did not:
an upward import, a circle within a layer, a module missing from the map (no services)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "dev" / "check_layers.py"


def check(root):
    return subprocess.run([sys.executable, str(CHECK), "--root", str(root)], capture_output=True, text=True)


def tree(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "ARCHITECTURE.md", tmp_path / "ARCHITECTURE.md")
    return tmp_path


def append(path, text):
    path.write_text(path.read_text() + text)


def test_the_tree_keeps_its_layers():
    p = check(ROOT)
    assert p.returncode == 0, p.stderr


def test_an_upward_import_fails(tmp_path):
    root = tree(tmp_path)
    append(root / "src" / "config.rs", "\n#[allow(unused_imports)]\nuse crate::scheduler::Scheduler;\n")
    p = check(root)
    assert p.returncode == 1
    assert "src/config.rs" in p.stderr and "`config` (ground) uses `scheduler` (service)" in p.stderr, p.stderr


def test_an_inline_upward_path_and_a_grouped_use_fail(tmp_path):
    root = tree(tmp_path)
    append(root / "src" / "window.rs", "\nfn _f() -> Option<crate::audit::Audits> { None }\n")
    append(root / "src" / "error.rs", "\nuse crate::{util, sink::catalog};\n")
    p = check(root)
    assert p.returncode == 1
    assert "`window` (ground) uses `audit` (operations)" in p.stderr, p.stderr
    assert "`error` (ground) uses `sink` (io)" in p.stderr, p.stderr


def test_a_circle_within_a_layer_fails(tmp_path):
    root = tree(tmp_path)
    append(root / "src" / "state" / "mod.rs", "\nuse crate::sink::catalog;\n")
    append(root / "src" / "sink" / "mod.rs", "\nuse crate::state::StateStore;\n")
    p = check(root)
    assert p.returncode == 1
    assert "import circle: sink ↔ state" in p.stderr, p.stderr


def test_comments_and_strings_are_not_imports(tmp_path):
    root = tree(tmp_path)
    append(root / "src" / "util.rs", '\n// see crate::scheduler::Scheduler\nconst _S: &str = "crate::offload";\n')
    assert check(root).returncode == 0


def test_a_module_missing_from_the_map_fails(tmp_path):
    root = tree(tmp_path)
    (root / "src" / "newthing.rs").write_text("//! new\n")
    p = check(root)
    assert p.returncode == 1 and "src/newthing: not in ARCHITECTURE.md's map" in p.stderr, p.stderr


def test_paths_by_super_crate_aliases_macros_and_attributes_fail(tmp_path):
    """The other ways Rust names a module: `super::` climbing to the crate's root, `use crate as`,
    `$crate::` in a macro, a path in an attribute's string, and a call of an exported macro
    (which lives at the crate's root, whichever module defines it)."""
    root = tree(tmp_path)
    append(root / "src" / "util.rs", "\n#[allow(unused_imports)]\nuse super::scheduler;\n")
    append(root / "src" / "sink" / "days.rs", "\n#[allow(unused_imports)]\nuse super::super::offload;\n")
    append(root / "src" / "window.rs", "\nuse crate as root;\nfn _g() -> Option<root::status::Report> { None }\n")
    append(root / "src" / "error.rs", "\nmacro_rules! up { () => { $crate::replicas::assign(&[], &[]) }; }\n")
    append(root / "src" / "database.rs", '\n#[derive(serde::Deserialize)]\nstruct _S { #[serde(with = "crate::adopt::x")] _a: u8 }\n')
    (root / "src" / "scheduler.rs").write_text((root / "src" / "scheduler.rs").read_text()
                                               + "\n#[macro_export]\nmacro_rules! from_the_top { () => {} }\n")
    append(root / "src" / "config.rs", "\nfn _h() { crate::from_the_top!(); }\n")
    p = check(root)
    assert p.returncode == 1
    for upward in ("`util` (ground) uses `scheduler`", "`sink` (io) uses `offload`", "`window` (ground) uses `status`",
                   "`error` (ground) uses `replicas`", "`database` (ground) uses `adopt`", "`config` (ground) uses `scheduler`"):
        assert upward in p.stderr, (upward, p.stderr)


def test_a_test_module_that_uses_its_parent_is_not_an_import(tmp_path):
    root = tree(tmp_path)
    append(root / "src" / "window.rs", "\n#[cfg(test)]\nmod more_tests {\n    use super::*;\n}\n")
    assert check(root).returncode == 0
