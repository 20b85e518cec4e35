"""generated/ is a pure, reproducible function of derive/ (derive/regenerate.py,
derive/codegen.py): the committed tree is up to date, rendering does not depend
on hash randomisation, and ``check`` sees every kind of drift.

Everything that modifies files works on a temporary copy of generated/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import sympy as sp

from derive import codegen, regenerate
from derive.flow import build_flow
from derive.models import MODEL_NAMES

RENDER_SCRIPT = (
    "import json, sys\nfrom derive.regenerate import render_all\njson.dump(render_all(), sys.stdout)\n"
)


def _env(**extra):
    env = dict(os.environ)
    env.update(extra)
    return env


def test_check_cli_passes_on_committed_tree(repo_root):
    r = subprocess.run(
        [sys.executable, "-m", "derive", "check"], cwd=repo_root, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"python -m derive check failed:\n{r.stdout}\n{r.stderr}"
    assert "up to date" in r.stdout


def test_render_is_identical_across_hash_seeds(repo_root):
    seeds = ("0", "2718281")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RENDER_SCRIPT],
            cwd=repo_root,
            env=_env(PYTHONHASHSEED=s),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in seeds
    ]
    outs = []
    for s, p in zip(seeds, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"render with PYTHONHASHSEED={s} failed:\n{err}"
        outs.append(json.loads(out))
    a, b = outs
    assert sorted(a) == sorted(b)
    expected = {"__init__.py"} | {f"{m}_{act}.py" for m, act in regenerate.targets()}
    assert set(a) == expected
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"rendering depends on PYTHONHASHSEED: {differing}"


# ---------------------------------------------------------------------------
# check() and regenerate() on a temporary copy


@pytest.fixture
def generated_copy(tmp_path, repo_root):
    out = tmp_path / "generated"
    out.mkdir()
    for p in (repo_root / "generated").glob("*.py"):
        shutil.copyfile(p, out / p.name)
    return out


def test_check_passes_on_unmodified_copy(generated_copy):
    ok, report = regenerate.check(out=generated_copy)
    assert ok, report
    assert "up to date" in report


def test_check_reports_modified_file(generated_copy):
    target = generated_copy / "two_layer_erf.py"
    lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(3, "# edited by hand\n")
    target.write_text("".join(lines), encoding="utf-8")
    ok, report = regenerate.check(out=generated_copy)
    assert not ok
    assert "--- generated/two_layer_erf.py (committed)" in report
    assert "+++ generated/two_layer_erf.py (regenerated)" in report
    assert "\n-# edited by hand" in report
    assert "python -m derive regenerate" in report
    # only the edited file is reported
    for other in ("scm_erf.py", "scm_linear.py", "two_layer_linear.py", "__init__.py"):
        assert f"generated/{other}" not in report


def test_check_cli_exits_1_on_modified_file(generated_copy, monkeypatch, capsys):
    from derive.__main__ import main

    target = generated_copy / "scm_erf.py"
    text = target.read_text(encoding="utf-8")
    assert "acc += eta**2*sigma**2*tilt_pref" in text
    target.write_text(
        text.replace("acc += eta**2*sigma**2*tilt_pref", "acc += eta*sigma**2*tilt_pref"),
        encoding="utf-8",
    )
    monkeypatch.setattr(regenerate, "check", functools.partial(regenerate.check, out=generated_copy))
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "-            acc += eta*sigma**2*tilt_pref" in out
    assert "+            acc += eta**2*sigma**2*tilt_pref" in out


def test_check_reports_orphan_file(generated_copy):
    (generated_copy / "old_model_erf.py").write_text("# left over\n", encoding="utf-8")
    ok, report = regenerate.check(out=generated_copy)
    assert not ok
    assert "orphan (no model produces it): generated/old_model_erf.py" in report


def test_check_reports_missing_file(generated_copy):
    (generated_copy / "scm_linear.py").unlink()
    ok, report = regenerate.check(out=generated_copy)
    assert not ok
    assert "missing: generated/scm_linear.py" in report
    assert "two_layer_erf" not in report


def test_regenerate_into_copy_restores_and_prunes(generated_copy, repo_root):
    (generated_copy / "scm_erf.py").write_text("broken\n", encoding="utf-8")
    (generated_copy / "two_layer_linear.py").unlink()
    (generated_copy / "stale_erf.py").write_text("# stale\n", encoding="utf-8")
    names = regenerate.regenerate(out=generated_copy)
    assert sorted(names) == sorted(p.name for p in generated_copy.glob("*.py"))
    assert not (generated_copy / "stale_erf.py").exists()
    for name in names:
        assert (generated_copy / name).read_bytes() == (repo_root / "generated" / name).read_bytes(), name
    ok, report = regenerate.check(out=generated_copy)
    assert ok, report


# ---------------------------------------------------------------------------
# the template context


@pytest.fixture
def context():
    return codegen.context(build_flow("scm", "linear"))


def test_template_context_complete(context):
    codegen.check_context(codegen.environment(), codegen.KERNEL_TEMPLATE, context)


def test_template_context_missing_key(context):
    del context["primitives"]
    with pytest.raises(ValueError, match=r"missing \['primitives'\], unused \[\]"):
        codegen.check_context(codegen.environment(), codegen.KERNEL_TEMPLATE, context)


def test_template_context_extra_key(context):
    context["timestamp"] = "2024-01-01"
    with pytest.raises(ValueError, match=r"missing \[\], unused \['timestamp'\]"):
        codegen.check_context(codegen.environment(), codegen.KERNEL_TEMPLATE, context)


# ---------------------------------------------------------------------------
# one model at a time: per-model inputs hash, MODEL arguments, error lines


def _copy_derive(src, dst):
    shutil.copytree(src / "derive", dst / "derive", ignore=shutil.ignore_patterns("__pycache__"))
    return dst / "derive"


def test_inputs_hash_covers_the_models_own_file_only(repo_root, tmp_path):
    """Adding a model file, or editing another model, changes no other model's hash."""
    before = codegen.inputs_hash("two_layer", "erf")
    derive_copy = _copy_derive(repo_root, tmp_path)
    assert codegen.inputs_hash("two_layer", "erf", root=tmp_path) == before
    (derive_copy / "models" / "extra_model.py").write_text('"""a new model"""\n', encoding="utf-8")
    init = derive_copy / "models" / "__init__.py"
    init.write_text(init.read_text(encoding="utf-8").replace('"anil")', '"anil", "extra_model")'))
    scm = derive_copy / "models" / "scm.py"
    scm.write_text(scm.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    assert codegen.inputs_hash("two_layer", "erf", root=tmp_path) == before
    assert codegen.inputs_hash("scm", "erf", root=tmp_path) != codegen.inputs_hash("scm", "erf")
    own = derive_copy / "models" / "two_layer.py"
    own.write_text(own.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    assert codegen.inputs_hash("two_layer", "erf", root=tmp_path) != before


def test_inputs_hash_covers_the_engine_and_the_templates(repo_root, tmp_path):
    before = codegen.inputs_hash("scm", "linear")
    derive_copy = _copy_derive(repo_root, tmp_path)
    for edited in (derive_copy / "gaussian.py", derive_copy / "templates" / codegen.KERNEL_TEMPLATE):
        edited.write_text(edited.read_text(encoding="utf-8") + "\n", encoding="utf-8")
        assert codegen.inputs_hash("scm", "linear", root=tmp_path) != before, edited.name
        before = codegen.inputs_hash("scm", "linear", root=tmp_path)
    # the command line, `show` and `docs` do not shape the generated text, nor do the docs templates
    for skipped in ("__main__.py", "show.py", "docs.py", "templates/docs/model.md.jinja"):
        (derive_copy / skipped).write_text("# edited\n", encoding="utf-8")
    assert codegen.inputs_hash("scm", "linear", root=tmp_path) == before
    assert codegen.inputs_hash("scm", "erf", root=tmp_path) != before


def test_regenerate_one_model_leaves_the_others_alone(generated_copy, repo_root, monkeypatch):
    from derive.models import scm

    (generated_copy / "two_layer_erf.py").write_text("# another model's file, stale\n", encoding="utf-8")
    (generated_copy / "newmodel_erf.py").write_text("# a model another branch adds\n", encoding="utf-8")
    (generated_copy / "scm_erf.py").write_text("broken\n", encoding="utf-8")
    # scm drops an activation: its file of that activation is scm's orphan
    monkeypatch.setattr(scm, "MODEL", dataclasses.replace(scm.MODEL, activations=("erf",)))
    names = regenerate.regenerate(out=generated_copy, models=("scm",))
    assert names == ["__init__.py", "scm_erf.py"]
    assert (generated_copy / "scm_erf.py").read_bytes() == (
        repo_root / "generated" / "scm_erf.py"
    ).read_bytes()
    assert not (generated_copy / "scm_linear.py").exists()
    assert (generated_copy / "two_layer_erf.py").read_text() == "# another model's file, stale\n"
    assert (generated_copy / "newmodel_erf.py").exists()
    assert (generated_copy / "anil_linear.py").exists()


def test_check_one_model(generated_copy, monkeypatch, capsys):
    from derive.__main__ import main

    (generated_copy / "two_layer_erf.py").write_text("# stale\n", encoding="utf-8")
    (generated_copy / "newmodel_erf.py").write_text("# a model another branch adds\n", encoding="utf-8")
    ok, report = regenerate.check(out=generated_copy, models=("scm",))
    assert ok, report
    ok, report = regenerate.check(out=generated_copy, models=("scm", "two_layer"))
    assert not ok
    assert "generated/two_layer_erf.py (committed)" in report and "newmodel" not in report
    assert report.endswith("fix with: python -m derive regenerate scm two_layer")
    monkeypatch.setattr(regenerate, "check", functools.partial(regenerate.check, out=generated_copy))
    assert main(["check", "scm"]) == 0
    assert main(["check", "two_layer"]) == 1
    capsys.readouterr()


@pytest.mark.parametrize("command", ["regenerate", "check", "docs", "show"])
def test_unknown_model_is_one_line_exit_2(command, capsys):
    from derive.__main__ import main

    args = [command, "scm", "nosuchmodel"] if command != "show" else [command, "nosuchmodel"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown model 'nosuchmodel'; known models: {', '.join(MODEL_NAMES)}\n"


@pytest.fixture
def tanh(monkeypatch):
    """An activation the engine has no rule for (g' even: Price's theorem does not apply)."""
    from derive import activations, flow, gaussian

    monkeypatch.setitem(
        activations.ACTIVATIONS, "tanh", activations.Activation("tanh", sp.tanh(activations.z), "tanh(z)")
    )
    yield "tanh"
    flow._BY_OBJECT.clear()
    for cached in (flow._build_named, gaussian.expectation, gaussian.directional, gaussian.tilt_split):
        cached.cache_clear()


@pytest.mark.parametrize("command", ["regenerate", "check", "show"])
def test_unreducible_expectation_is_one_line_exit_2(command, tanh, generated_copy, monkeypatch, capsys):
    from derive.__main__ import main
    from derive.models import scm

    monkeypatch.setattr(scm, "MODEL", dataclasses.replace(scm.MODEL, activations=("linear", tanh)))
    for name in ("regenerate", "check"):
        monkeypatch.setattr(
            regenerate, name, functools.partial(getattr(regenerate, name), out=generated_copy)
        )
    before = {p.name: p.read_bytes() for p in generated_copy.glob("*.py")}
    args = ["show", "scm", "--activation", tanh] if command == "show" else [command, "scm"]
    assert main(args) == 2
    captured = capsys.readouterr()
    # regenerate reports its progress on stderr too
    lines = [line for line in captured.err.splitlines() if not line.startswith("  deriving ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("error: model scm, activation tanh: no rule reduces E[")
    assert "tanh(u_a)" in lines[0]
    assert {p.name: p.read_bytes() for p in generated_copy.glob("*.py")} == before
