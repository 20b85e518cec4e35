"""What a model file may declare (derive/model.py, derive/names.py): parameter
ranges, names that do not collide with the generated kernels' own, and the
activations a model is built for."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import sympy as sp

import runtime
from derive import regenerate
from derive.model import Model, Param, TaskVector, Vector
from derive.models import MODEL_NAMES, get_model
from derive.names import RESERVED, reserved_use
from derive.symbols import STUDENT

GENERATED = Path(__file__).resolve().parent.parent / "generated"


# ---------------------------------------------------------------------------
# Param(maximum=...)


def test_maximum_is_checked_like_minimum():
    frac = Param("frac", 0.5, "fraction of the units that learn", maximum=1.0)
    assert frac.check(0.0) == 0.0 and frac.check(1.0) == 1.0
    with pytest.raises(ValueError) as err:
        frac.check(1.5)
    # the parameter, the allowed range and its meaning, in one message
    assert str(err.value) == "parameter frac must be in [0, 1] (fraction of the units that learn), got 1.5"
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        frac.check(-0.1)


def test_maximum_without_minimum_and_infinity():
    cap = Param("cap", 0.0, "a capped shift", minimum=None, maximum=2.0)
    assert cap.check(-100.0) == -100.0
    with pytest.raises(ValueError, match=r"parameter cap must be <= 2 \(a capped shift\), got 3"):
        cap.check(3.0)
    n_max = Param("n_max", 1.0, "support samples", minimum=1.0, maximum=10.0, allow_inf=True)
    with pytest.raises(ValueError, match=r"must be in \[1, 10\]"):
        n_max.check(math.inf)


def test_minimum_message_is_unchanged():
    with pytest.raises(ValueError, match=r"parameter eta must be >= 0 \(.*learning rate.*\), got -1"):
        get_model("scm").param("eta").check(-1.0)


def test_empty_range_is_refused():
    with pytest.raises(ValueError, match="parameter bad: minimum 2 is above maximum 1"):
        Param("bad", 1.0, "nothing fits", minimum=2.0, maximum=1.0)


# ---------------------------------------------------------------------------
# reserved names


@pytest.mark.parametrize("name", ["c", "p"])
def test_kernel_argument_as_parameter_name_is_refused(name):
    with pytest.raises(ValueError) as err:
        Param(name, 1.0, "a rate")
    msg = str(err.value)
    assert msg.startswith(f"parameter name {name!r} is reserved: the generated kernels use it as ")
    assert "kernel argument" in msg and msg.endswith("; choose another name")


@pytest.mark.parametrize(
    "make",
    [
        lambda n: Vector(n, STUDENT, "a readout"),
        lambda n: TaskVector(n, (STUDENT,), "a task readout"),
        lambda n: Param(n, 1.0, "a rate"),
    ],
    ids=["vector", "task vector", "parameter"],
)
@pytest.mark.parametrize("name", ["acc", "s0", "j0", "np", "lambda", "range", "mu_x", "tilt_pref", "i_", "Q"])
def test_reserved_names_are_refused_for_every_kind(make, name):
    with pytest.raises(ValueError, match=rf"name '{name}' is reserved: .*; choose another name"):
        make(name)


@pytest.mark.parametrize("name", ["1eta", "eta-v", ""])
def test_names_must_be_identifiers(name):
    with pytest.raises(ValueError, match="must be a Python identifier"):
        Param(name, 1.0, "a rate")


def test_model_names_in_use_are_not_reserved():
    for model in MODEL_NAMES:
        spec = get_model(model)
        for name in [p.name for p in spec.params] + [v.name for v in spec.vectors]:
            assert reserved_use(name) is None, (model, name)


def test_a_name_declared_twice_or_taking_a_derivatives_name_is_refused():
    spec = get_model("two_layer")
    with pytest.raises(ValueError, match="the name 'eta' is declared twice"):
        dataclasses.replace(spec, params=spec.params + (Param("eta", 1.0, "again"),))
    with pytest.raises(ValueError, match="'dv' is reserved: .*derivative of 'v'"):
        dataclasses.replace(spec, params=spec.params + (Param("dv", 1.0, "a rate"),))


def _kernel_scope_names(path: Path) -> set[str]:
    """Every name read, written or taken as an argument in the functions of a
    generated module that see the model's names: those unpacking the parameter
    vector ``p`` (helpers such as ``I2(C, a, b)`` have scopes of their own, where
    a model name cannot collide)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and "p" in {a.arg for a in node.args.args}:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name):
                    names.add(sub.id)
                elif isinstance(sub, ast.arg):
                    names.add(sub.arg)
    return names


@pytest.mark.parametrize("model,activation", regenerate.targets())
def test_reserved_set_covers_every_name_the_kernels_use(model, activation):
    """Fails when the templates start using a name derive/names.py does not
    reserve: a model could then take that name and rebind it."""
    spec = get_model(model)
    own = {p.name for p in spec.params} | {v.name for v in spec.vectors}
    own |= {t.name for t in spec.random_families}
    own |= {f"d{v.name}" for v in spec.state_vectors}  # refused by Model itself
    names = _kernel_scope_names(GENERATED / f"{regenerate.module_name(model, activation)}.py")
    assert {"y", "c", "p", "K", "M"} <= names
    uncovered = sorted(n for n in names - own if reserved_use(n) is None)
    assert not uncovered, f"generated names not in derive/names.py: {uncovered}"


def test_reserved_set_names_the_kernel_arguments():
    for name in ("y", "c", "p", "K", "M", "dy", "C", "out", "acc", "o", "math", "np", "prange"):
        assert name in RESERVED, name


# ---------------------------------------------------------------------------
# activations declared per model


def test_models_declare_both_activations_by_default():
    default = {f.name: f.default for f in dataclasses.fields(Model)}["activations"]
    assert default == ("erf", "linear")
    for model in ("scm", "two_layer", "anil"):
        assert get_model(model).activations == default


def test_unknown_activation_in_a_model_is_refused():
    with pytest.raises(ValueError, match=r"model 'scm': unknown activation 'tanh'; known: erf, linear"):
        dataclasses.replace(get_model("scm"), activations=("erf", "tanh"))
    with pytest.raises(ValueError, match="must be distinct"):
        dataclasses.replace(get_model("scm"), activations=("erf", "erf"))


def test_targets_read_the_models_activations(monkeypatch):
    from derive.models import scm

    monkeypatch.setattr(scm, "MODEL", dataclasses.replace(scm.MODEL, activations=("linear",)))
    assert regenerate.targets(["scm", "two_layer"]) == [
        ("scm", "linear"),
        ("two_layer", "erf"),
        ("two_layer", "linear"),
    ]


def test_load_refuses_an_activation_the_model_is_not_built_for(monkeypatch):
    from derive.models import scm

    monkeypatch.setattr(scm, "MODEL", dataclasses.replace(scm.MODEL, activations=("linear",)))
    runtime.kernels.load.cache_clear()
    try:
        with pytest.raises(
            ValueError, match=r"model 'scm' is not built for activation 'erf'; its activations: linear"
        ):
            runtime.kernels.load("scm", "erf")
    finally:
        runtime.kernels.load.cache_clear()


def test_a_gradient_through_the_inner_loop_needs_its_sensitivities():
    """A MetaGradient of nonzero weight, or a readout rule reading da'/da, with an
    inner loop whose second_order is 0 would read sensitivities nobody computes:
    refused when the model is defined, naming what to set."""
    anil = get_model("anil")
    inner = dataclasses.replace(anil.inner_loop, second_order=sp.S.Zero)
    fl = dataclasses.replace(anil.first_layer, meta=dataclasses.replace(anil.first_layer.meta, inner=inner))
    with pytest.raises(ValueError, match="second_order"):
        dataclasses.replace(anil, inner_loop=inner, first_layer=fl)
    # the readout rule alone (anil's reads da'/da at order 2) is caught as well
    fl0 = dataclasses.replace(fl, meta=dataclasses.replace(fl.meta, weight=sp.S.Zero))
    with pytest.raises(ValueError, match="sensitivities"):
        dataclasses.replace(anil, inner_loop=inner, first_layer=fl0)
