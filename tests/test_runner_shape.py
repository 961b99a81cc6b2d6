"""The runner reads as the data flow (issue 23): no function in pipeline/runner.py takes more than 8 parameters
(state travels in a ``TargetContext``, not in long argument lists)."""

import ast
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1] / "pipeline" / "runner.py"
MAX_PARAMS = 8


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    return (len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None)
            + (a.kwarg is not None))


def too_many(source: str) -> list[str]:
    return [f"{n.name} ({_params(n)} parameters, line {n.lineno})" for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _params(n) > MAX_PARAMS]


def test_no_runner_function_takes_more_than_8_parameters():
    assert too_many(RUNNER.read_text()) == []


def test_the_check_catches_a_long_signature():
    assert too_many("def f(a, b, c, d, e, g, h, i, j):\n    pass\n") == ["f (9 parameters, line 1)"]
    assert too_many("def f(a, *args, b, **kw):\n    def g(x, y, z, u, v, w, p, q, r): pass\n") == [
        "g (9 parameters, line 2)"]


def test_target_context_carries_the_steps():
    from cloudfree.pipeline.runner import TargetContext

    assert {"stack", "layers", "ref_masks", "coreg", "sar", "ds", "prov"} <= set(TargetContext.__dataclass_fields__)


def test_composite_uses_only_public_stage_functions():
    """pipeline/composite.py takes the masks stage's in-task path (stages.masks.in_task_masks) and public
    stages.remove functions, never a private ``_name`` of a stage module."""
    src = (RUNNER.parent / "composite.py").read_text()
    private = [f"{n.module}.{a.name}" for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)
               and (n.module or "").startswith("cloudfree.stages") for a in n.names if a.name.startswith("_")]
    assert private == []
    assert "in_task_masks" in src and "assemble_windows" in src
