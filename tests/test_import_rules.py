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


# -- transitive imports: what importing a package really loads ------------------------------------------------------
#: what importing every module of a package may NOT load, directly or through any chain of imports.
TRANSITIVE_RULES = {
    "cloudfree.models": ("cloudfree.stages", "cloudfree.pipeline.training", "cloudfree.pipeline.evaluation",
                         "cloudfree.pipeline.cli", "cloudfree.pipeline.runner", "cloudfree.catalogs"),
    "cloudfree.catalogs": ("cloudfree.stages", "cloudfree.models", "cloudfree.pipeline.cli",
                           "cloudfree.pipeline.evaluation", "cloudfree.pipeline.training"),
    "cloudfree.stages": ("cloudfree.pipeline.evaluation", "cloudfree.pipeline.cli", "cloudfree.pipeline.training",
                         "cloudfree.pipeline.progress"),
}

_PROBE = """
import importlib, json, pkgutil, sys
pkg, forbidden = sys.argv[1], tuple(sys.argv[2].split(","))
root = importlib.import_module(pkg)
for m in pkgutil.walk_packages(root.__path__, pkg + "."):
    importlib.import_module(m.name)
print(json.dumps(sorted(k for k in sys.modules if k.startswith(forbidden) and not k.startswith(pkg + "."))))
"""


def transitive_violations(package: str, forbidden: tuple[str, ...], extra_path: str | None = None) -> list[str]:
    """Modules matching ``forbidden`` that importing every module of ``package`` loads, in a fresh interpreter
    (``sys.modules`` is the truth: lazy imports inside functions are checked by the ``ast`` rules above)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _PROBE, package, ",".join(forbidden)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(TRANSITIVE_RULES))
def test_transitive_import_rules(package):
    assert transitive_violations(package, TRANSITIVE_RULES[package]) == []


def test_transitive_checker_catches_an_edge_added_back(tmp_path):
    """The checker fails when a model module pulls in a stage through another module (the edge that used to be
    ``models -> pipeline.training.weights -> stages.publish``), and when one imports training."""
    pkg = tmp_path / "fakemodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "weights.py").write_text("from cloudfree.stages.publish import file_sha256  # noqa\n")
    (pkg / "net.py").write_text("from fakemodels import weights  # noqa\n")
    (pkg / "learned.py").write_text("from cloudfree.pipeline.training import api  # noqa\n")
    bad = transitive_violations("fakemodels", TRANSITIVE_RULES["cloudfree.models"], extra_path=str(tmp_path))
    assert "cloudfree.stages.publish" in bad and "cloudfree.pipeline.training.api" in bad
