"""The private third-party APIs cloudfree uses are listed in one module (cloudfree.pipeline.private_api), exist in
the installed versions with the call shapes relied on, and their distributions are bounded from above."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

from cloudfree.pipeline.private_api import PRIVATE_APIS, check

ROOT = Path(__file__).resolve().parents[1]


def test_every_private_api_is_there_as_checked():
    problems = check()
    assert problems == [], "a private API moved (see cloudfree/pipeline/private_api.py):\n" + "\n".join(problems)


def test_every_private_import_in_the_code_is_listed():
    listed = {api.module for api in PRIVATE_APIS}
    found = set()
    for folder in ("pipeline", "stages", "models", "catalogs", "cloudfree"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from|import)\s+((?!cloudfree\b)[\w.]*\._\w+)", path.read_text(), re.M):
                found.add(m.group(1))
    assert found <= listed, f"private modules imported but not listed in private_api.py: {sorted(found - listed)}"
    assert listed <= found, f"listed but no longer imported (drop them): {sorted(listed - found)}"


def test_their_distributions_are_bounded_and_installed_within_bounds():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {Requirement(d).name: Requirement(d) for d in deps}
    for api in PRIVATE_APIS:
        req = reqs.get(api.distribution)
        assert req is not None, f"{api.distribution} is not a declared dependency"
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{req} has no upper bound"
        assert req.specifier.contains(version(api.distribution)), (api.distribution, version(api.distribution))
        assert req.specifier.contains(api.checked_on), f"{req} excludes the checked version {api.checked_on}"


def test_the_check_names_what_moved(monkeypatch):
    import odc.geo.cog._tifffile as tf

    monkeypatch.delattr(tf, "_patch_hdr")
    problems = check()
    assert len(problems) == 1 and "_patch_hdr" in problems[0] and "odc-geo" in problems[0] and "stages/cog.py" in problems[0]
