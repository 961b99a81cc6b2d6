"""The house rules of the package layout, checked on the source with ``ast`` (no import needed):

* every import of the project's own code goes through the one installed top-level name ``cloudfree``
  (``cloudfree.pipeline``, ``cloudfree.stages``, ...): the folders are mapped by setuptools ``package-dir``, and an
  import of a bare ``pipeline``/``stages``/``models``/``catalogs`` would load a second copy of a module;
* ``catalogs`` imports neither ``stages`` nor ``models`` nor ``cloudfree.pipeline.cli``;
* ``stages`` and ``models`` never import ``cloudfree.pipeline.evaluation`` or ``cloudfree.pipeline.cli`` (nor ``cloudfree.pipeline.progress``,
  the CLI's progress bars: the write stage takes a callback);
* ``cloudfree.pipeline.evaluation`` is imported by none of ``stages``, ``models``, ``catalogs``.

Imports inside functions count too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES = {
    "catalogs": ("cloudfree.stages", "cloudfree.models", "cloudfree.pipeline.cli", "cloudfree.pipeline.evaluation"),
    "stages": ("cloudfree.pipeline.evaluation", "cloudfree.pipeline.cli", "cloudfree.pipeline.progress"),
    "models": ("cloudfree.pipeline.evaluation", "cloudfree.pipeline.cli", "cloudfree.pipeline.progress"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in imported_modules(path):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_rules(package):
    assert (ROOT / package).is_dir()
    assert violations(package, RULES[package]) == []


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom cloudfree.pipeline import cli\n\ndef f():\n    from cloudfree.pipeline.evaluation.metrics import psnr\n")
    mods = imported_modules(f)
    assert {"os", "cloudfree.pipeline.cli", "cloudfree.pipeline.evaluation.metrics"} <= mods


OLD_TOP_LEVEL = ("pipeline", "stages", "models", "catalogs")


def test_no_bare_top_level_imports():
    """Only ``cloudfree.<package>`` imports: a bare ``import stages.load`` would run a second copy of the module."""
    bad = []
    for folder in (*OLD_TOP_LEVEL, "cloudfree", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad += [f"{path.relative_to(ROOT)} imports {m}" for m in imported_modules(path)
                    if m.split(".")[0] in OLD_TOP_LEVEL]
    assert bad == []
