"""The derivation owns every formula of the kernels (a test of the test suite).

- A deliberately wrong engine rule (a doubled Schur complement in the tilt, a
  wrong sign in Stein's lemma, a wrong tilt prefactor) is derived and rendered
  into a temporary folder; the right-hand-side tests of tests/test_generated_rhs.py,
  run on that module, must fail. Without the mutation the same rendering equals
  the committed module and the same tests pass. So the kernels' numbers come out
  of the engine's rules, and the tests would see a change to them.
- Every function of a generated module is reached from its entry points.
- The templates compute no special function of their own.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import derive.gaussian as gaussian
import test_generated_rhs as rhs_tests
from derive import codegen, flow, tables

ROOT = Path(__file__).resolve().parent.parent
GENERATED = sorted(p for p in (ROOT / "generated").glob("*.py") if p.name != "__init__.py")
TEMPLATES = sorted((ROOT / "derive" / "templates").glob("*.jinja"))


def _clear_caches():
    for mod in (gaussian, tables, flow, codegen):
        for obj in vars(mod).values():
            if hasattr(obj, "cache_clear"):
                obj.cache_clear()


def _render_and_import(model: str, activation: str, folder: Path, tag: str):
    text = codegen.render(model, activation)
    path = folder / f"{model}_{activation}_{tag}.py"
    path.write_text(text)
    name = f"_mutant_{model}_{activation}_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return text, module


def _doubled_schur(original):
    # C_xy - 2 C_xS (P + C_SS)^-1 C_Sy
    return lambda Cxy, cx, cy, inv: 2 * original(Cxy, cx, cy, inv) - Cxy


def _stein_sign(original):
    return lambda self, *args: -original(self, *args)


def _prefactor_doubled(original):
    return lambda amplitudes, widths, CSS: 2 * original(amplitudes, widths, CSS)


MUTANTS = {
    "doubled Schur complement": (gaussian, "tilted_entry", _doubled_schur),
    "wrong sign in Stein's lemma": (gaussian._Engine, "_stein", _stein_sign),
    "doubled tilt prefactor": (gaussian, "tilt_prefactor", _prefactor_doubled),
}

# states of the right-hand-side test that the mutant must fail on (several, so
# that a mutant cannot hide behind one special state)
STATES = (0, 3, 7, 11)


@pytest.fixture
def fresh_derivation():
    _clear_caches()
    yield
    _clear_caches()


def test_unmutated_rendering_is_the_committed_module_and_passes(tmp_path, monkeypatch, fresh_derivation):
    text, module = _render_and_import("two_layer", "erf", tmp_path, "plain")
    assert text == (ROOT / "generated" / "two_layer_erf.py").read_text()
    monkeypatch.setattr(rhs_tests, "load", lambda name: module)
    for i in STATES:
        rhs_tests.test_two_layer_rhs_matches_reference("two_layer_erf", i)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_wrong_engine_rule_fails_the_rhs_tests(mutant, tmp_path, monkeypatch, fresh_derivation):
    owner, attr, make = MUTANTS[mutant]
    monkeypatch.setattr(owner, attr, make(getattr(owner, attr)))
    text, module = _render_and_import("two_layer", "erf", tmp_path, re.sub(r"\W", "_", mutant))
    assert text != (ROOT / "generated" / "two_layer_erf.py").read_text(), "the mutant changed nothing"
    monkeypatch.setattr(rhs_tests, "load", lambda name: module)
    failures = 0
    for i in STATES:
        try:
            rhs_tests.test_two_layer_rhs_matches_reference("two_layer_erf", i)
        except AssertionError:
            failures += 1
    assert failures == len(STATES), f"{mutant}: the rhs test passed on {len(STATES) - failures} states"


def _reachable(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(all top-level functions, those reached from ENTRY_POINTS), computed here
    independently of derive.codegen.prune."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    entry = None
    for n in tree.body:
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "ENTRY_POINTS" for t in n.targets):
            entry = [e.value for e in n.value.elts]
    assert entry, "the module declares no ENTRY_POINTS"
    seen = set()
    stack = [e for e in entry if e in defs]
    while stack:
        f = stack.pop()
        if f in seen:
            continue
        seen.add(f)
        for node in ast.walk(defs[f]):
            if isinstance(node, ast.Name) and node.id in defs:
                stack.append(node.id)
    return set(defs), seen


@pytest.mark.parametrize("path", GENERATED, ids=lambda p: p.name)
def test_every_generated_function_is_called_from_an_entry_point(path):
    defs, reached = _reachable(ast.parse(path.read_text()))
    assert defs - reached == set(), f"{path.name}: functions nothing calls: {sorted(defs - reached)}"


def test_the_entry_points_are_what_the_runtime_calls():
    for path in GENERATED:
        tree = ast.parse(path.read_text())
        defs, _ = _reachable(tree)
        for name in ("rhs", "rhs_ws", "metrics", "run_euler", "run_rk4", "workspace"):
            assert name in defs, f"{path.name} lacks {name}"


FORBIDDEN = ("sqrt", "asin", "exp", "erf", "det", "inv", "pinv", "arcsin", "cholesky", "solve", "eye")


def test_templates_compute_no_special_function_of_their_own():
    found = set()
    for path in TEMPLATES:
        for line in path.read_text().splitlines():
            code_part = line.split("#", 1)[0]
            for name in FORBIDDEN:
                if re.search(rf"\b{name}\s*\(", code_part) or re.search(rf"\.{name}\b", code_part):
                    found.add((path.name, name))
    assert found == set()


def test_field_families_and_their_rows_are_declared_once():
    """Field kinds come from their declaration, rows from the model's field order."""
    import sympy as sp

    from derive.model import Model
    from derive.models import get_model
    from derive.printer import field_rows
    from derive.symbols import STUDENT, TEACHER, K, M, field_family, field_kind, lam, nu

    anil = get_model("anil")
    assert [(str(f), at, n) for f, at, n in anil.layout] == [
        ("lambda", 0, K),
        ("nu", K, M),
        ("nu_task", K + M, M),
    ]
    assert list(field_rows(anil.layout).values()) == ["", "K + ", "K + M + "]
    extra = field_family("nu_extra_test", TEACHER, "a second teacher's fields")
    assert field_kind(extra) == TEACHER and field_kind(lam) == STUDENT
    with pytest.raises(ValueError, match="already declared"):
        field_family("nu_extra_test", STUDENT, "")
    with pytest.raises(ValueError, match="not a declared field family"):
        field_kind(sp.IndexedBase("undeclared"))
    two = get_model("two_layer")
    fields = dict(
        name="t", doc="", section="", params=(), vectors=(), student_output=two.student_output,
        teacher_output=two.teacher_output, noise=0, first_layer=two.first_layer,
    )  # fmt: skip
    with pytest.raises(ValueError, match="first field family must be the student"):
        Model(**fields, fields=(nu, lam))
    with pytest.raises(ValueError, match="no covariance block"):
        Model(**fields, fields=(lam, nu, extra))
