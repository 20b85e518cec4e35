"""The Gaussian primitives of derive/gaussian.py (docs/conventions.md section 2).

Each derived primitive is evaluated (sympy lambdify of the derived expression,
and the njit functions of the generated modules) and compared with

- the literature closed forms (Saad & Solla 1995), typed here independently,
  over 50 random positive-definite 4x4 covariances and every index tuple
  (repeated indices included), to ~1e-12;
- Monte Carlo estimates with 2e6 samples, within 5 standard errors, for erf
  and for the linear activation.
"""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import sympy as sp
from scipy.special import erf

from derive import gaussian
from derive.gaussian import LABELS, UnreducibleExpectation, cov_symbol, expectation, primitive

N_COV = 50
DIM = 4
PRIMS = ("I2", "I3", "I4", "J2")
ARITY = {"I2": 2, "I3": 3, "I4": 4, "J2": 2}


# ---------------------------------------------------------------------------
# literature closed forms, docs/conventions.md section 2 (scalar in the indices, vectorised
# over a stack of covariances C[..., n, n])


def _e(C, i, j):
    return C[..., i, j]


def cf_erf_I2(C, a, b):
    return (2 / np.pi) * np.arcsin(_e(C, a, b) / np.sqrt((1 + _e(C, a, a)) * (1 + _e(C, b, b))))


def cf_erf_J2(C, a, b):
    return (2 / np.pi) / np.sqrt((1 + _e(C, a, a)) * (1 + _e(C, b, b)) - _e(C, a, b) ** 2)


def cf_erf_I3(C, a, b, c):
    Caa, Cab, Cac, Cbc, Ccc = _e(C, a, a), _e(C, a, b), _e(C, a, c), _e(C, b, c), _e(C, c, c)
    L3 = (1 + Caa) * (1 + Ccc) - Cac**2
    return (2 / np.pi) / np.sqrt(L3) * (Cbc * (1 + Caa) - Cab * Cac) / (1 + Caa)


def cf_erf_I4(C, a, b, c, d):
    Caa, Cbb, Ccc, Cdd = _e(C, a, a), _e(C, b, b), _e(C, c, c), _e(C, d, d)
    Cab, Cac, Cad = _e(C, a, b), _e(C, a, c), _e(C, a, d)
    Cbc, Cbd, Ccd = _e(C, b, c), _e(C, b, d), _e(C, c, d)
    L4 = (1 + Caa) * (1 + Cbb) - Cab**2
    L0 = L4 * Ccd - Cbc * Cbd * (1 + Caa) - Cac * Cad * (1 + Cbb) + Cab * Cac * Cbd + Cab * Cad * Cbc
    L1 = L4 * (1 + Ccc) - Cbc**2 * (1 + Caa) - Cac**2 * (1 + Cbb) + 2 * Cab * Cac * Cbc
    L2 = L4 * (1 + Cdd) - Cbd**2 * (1 + Caa) - Cad**2 * (1 + Cbb) + 2 * Cab * Cad * Cbd
    return (4 / np.pi**2) / np.sqrt(L4) * np.arcsin(L0 / np.sqrt(L1 * L2))


def cf_lin_I2(C, a, b):
    return _e(C, a, b)


def cf_lin_I3(C, a, b, c):
    return _e(C, b, c)


def cf_lin_I4(C, a, b, c, d):
    return _e(C, c, d)


def cf_lin_J2(C, a, b):
    return np.ones(C.shape[:-2])


CLOSED = {
    "erf": {"I2": cf_erf_I2, "I3": cf_erf_I3, "I4": cf_erf_I4, "J2": cf_erf_J2},
    "linear": {"I2": cf_lin_I2, "I3": cf_lin_I3, "I4": cf_lin_I4, "J2": cf_lin_J2},
}

# the activations, typed here: g, g'
ACT = {
    "erf": (lambda u: erf(u / math.sqrt(2)), lambda u: math.sqrt(2 / math.pi) * np.exp(-(u**2) / 2)),
    "linear": (lambda u: u, lambda u: np.ones_like(u)),
}


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def covariances(random_covariance):
    rng = np.random.default_rng(20240611)
    return np.stack([random_covariance(rng, DIM) for _ in range(N_COV)])


def derived_numeric(name: str, activation: str):
    """The derived primitive as a function ``f(Cstack, *indices)`` via lambdify.

    The covariance symbol of labels (x, y) is looked up with derive's own
    ``cov_symbol``, the value taken from the entry (index of x, index of y).
    """
    d = primitive(name, activation)
    labels = d.labels
    assert labels == tuple(LABELS[: ARITY[name]])
    syms = list(d.cov_symbols)
    assert d.expr.free_symbols <= set(syms), f"{name}: stray symbols {d.expr.free_symbols - set(syms)}"
    fn = sp.lambdify(syms, d.expr, modules="numpy")
    where = {}
    for (ia, la), (ib, lb) in itertools.combinations_with_replacement(enumerate(labels), 2):
        where[cov_symbol(la, lb)] = (ia, ib)
    assert set(where) == set(syms)

    def f(C, *idx):
        args = [C[..., idx[where[s][0]], idx[where[s][1]]] for s in syms]
        out = fn(*args)
        return np.broadcast_to(np.asarray(out, dtype=float), C.shape[:-2])

    return f


def assert_close(got, want, rtol=1e-12, atol=1e-13, what=""):
    got, want = np.asarray(got, float), np.asarray(want, float)
    err = np.abs(got - want)
    tol = atol + rtol * np.abs(want)
    bad = np.argwhere(~(err <= tol))
    assert bad.size == 0, (
        f"{what}: {len(bad)} mismatches, first at {tuple(bad[0])}: "
        f"got {got[tuple(bad[0])]!r}, want {want[tuple(bad[0])]!r}"
    )


# ---------------------------------------------------------------------------
# derived expressions against the closed forms


@pytest.mark.parametrize("name", PRIMS)
def test_erf_primitive_equals_literature_closed_form(name, covariances):
    f = derived_numeric(name, "erf")
    ref = CLOSED["erf"][name]
    n_tuples = 0
    for idx in itertools.product(range(DIM), repeat=ARITY[name]):
        assert_close(f(covariances, *idx), ref(covariances, *idx), what=f"{name}{idx}")
        n_tuples += 1
    assert n_tuples == DIM ** ARITY[name]


@pytest.mark.parametrize(
    "name, idx",
    [
        ("I4", (1, 1, 2, 2)),
        ("I4", (0, 1, 1, 0)),
        ("I4", (3, 3, 3, 3)),
        ("I4", (2, 0, 0, 0)),
        ("I3", (1, 1, 1)),
        ("I3", (0, 0, 2)),
        ("I3", (2, 1, 2)),
        ("I2", (3, 3)),
        ("J2", (2, 2)),
    ],
)
def test_erf_repeated_indices(name, idx, covariances):
    """Named repeated-index cases (also covered by the exhaustive test above)."""
    f = derived_numeric(name, "erf")
    assert_close(f(covariances, *idx), CLOSED["erf"][name](covariances, *idx), what=f"{name}{idx}")


@pytest.mark.parametrize("name", PRIMS)
def test_linear_primitive_equals_isserlis(name, covariances):
    f = derived_numeric(name, "linear")
    ref = CLOSED["linear"][name]
    for idx in itertools.product(range(DIM), repeat=ARITY[name]):
        assert_close(f(covariances, *idx), ref(covariances, *idx), rtol=0, atol=0, what=f"{name}{idx}")


@pytest.mark.parametrize("module", ["two_layer_erf", "scm_erf", "two_layer_linear", "scm_linear"])
def test_generated_primitives_equal_closed_form(module, covariances):
    """The njit primitives the generated modules carry. A module carries only those
    its kernels call: a primitive folded into a constant (J2 for the linear
    activation) or evaluated through a hoisted tilt (I3, I4, J2 for erf, through
    tilt1_all and tilt2_table, tested in tests/test_special.py) is absent."""
    mod = importlib.import_module(f"generated.{module}")
    act = mod.ACTIVATION
    present = [n for n in PRIMS if hasattr(mod, n)]
    assert {"I2", "I3", "I4"} <= set(present) if act == "linear" else present == ["I2"]
    rng = np.random.default_rng(7)
    for name in present:
        fn = getattr(mod, name)
        ref = CLOSED[act][name]
        for idx in itertools.product(range(DIM), repeat=ARITY[name]):
            # every tuple on 10 covariances, keeping the Python-level call count small
            for ci in rng.choice(N_COV, size=10, replace=False):
                C = np.ascontiguousarray(covariances[ci])
                got = fn(C, *idx)
                assert_close(got, ref(C, *idx), what=f"{module}.{name}{idx} cov #{ci}")


# ---------------------------------------------------------------------------
# Monte Carlo

MC_SAMPLES = 2_000_000
MC_TUPLES = {
    "I2": [(0, 1), (2, 2), (0, 3)],
    "J2": [(0, 1), (3, 3)],
    "I3": [(0, 1, 2), (1, 1, 1), (0, 0, 2), (2, 1, 1), (0, 3, 0)],
    "I4": [(0, 1, 2, 3), (1, 1, 2, 2), (0, 1, 1, 0), (2, 2, 2, 2), (0, 0, 0, 3), (3, 1, 0, 0)],
}
# factor of each argument position: "g", "gp" or the bare field "id"
KINDS = {"I2": ("g", "g"), "I3": ("gp", "id", "g"), "I4": ("gp", "gp", "g", "g"), "J2": ("gp", "gp")}


@pytest.mark.parametrize("activation", ["erf", "linear"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_primitives_against_monte_carlo(activation, seed, random_covariance):
    rng = np.random.default_rng(1000 + seed)
    C = random_covariance(rng, DIM, eps=0.05)
    u = rng.standard_normal((MC_SAMPLES, DIM)) @ np.linalg.cholesky(C).T
    g, gp = ACT[activation]
    cols = {"g": g(u), "gp": gp(u), "id": u}
    failures = []
    for name, tuples in MC_TUPLES.items():
        f = derived_numeric(name, activation)
        for idx in tuples:
            prod = np.ones(MC_SAMPLES)
            for kind, i in zip(KINDS[name], idx):
                prod = prod * cols[kind][:, i]
            mean = prod.mean()
            se = prod.std(ddof=1) / math.sqrt(MC_SAMPLES)
            value = float(f(C, *idx))
            if not abs(value - mean) <= 5 * se + 1e-12:
                failures.append(f"{name}{idx}: derived {value:.6g}, MC {mean:.6g} +- {se:.2g}")
    assert not failures, "; ".join(failures)


def test_monte_carlo_check_can_fail(random_covariance):
    """The Monte Carlo test above has the power to see a wrong formula: I4 with
    the two g' factors replaced by g (a plausible slip) is many standard errors off."""
    rng = np.random.default_rng(99)
    C = random_covariance(rng, DIM, eps=0.05)
    u = rng.standard_normal((MC_SAMPLES, DIM)) @ np.linalg.cholesky(C).T
    g = ACT["erf"][0](u)
    prod = g[:, 0] * g[:, 1] * g[:, 2] * g[:, 3]
    se = prod.std(ddof=1) / math.sqrt(MC_SAMPLES)
    assert abs(cf_erf_I4(C, 0, 1, 2, 3) - prod.mean()) > 5 * se


# ---------------------------------------------------------------------------
# structural facts and errors


def test_linear_closed_forms_exact():
    assert sp.simplify(primitive("I2", "linear").expr - cov_symbol("a", "b")) == 0
    assert sp.simplify(primitive("I3", "linear").expr - cov_symbol("b", "c")) == 0
    assert sp.simplify(primitive("I4", "linear").expr - cov_symbol("c", "d")) == 0
    assert primitive("J2", "linear").expr == 1


@pytest.mark.parametrize("kinds", [("g",), ("gp", "g"), ("g", "g", "g"), ("id",), ("gp", "gp", "g")])
def test_odd_patterns_vanish(kinds):
    assert expectation(kinds, "erf").expr == 0
    assert expectation(kinds, "linear").expr == 0


def test_even_pattern_with_one_factor_nonzero():
    """E[g'(u_a)] = sqrt(2/pi) / sqrt(1 + C_aa) for erf: not every pattern is odd."""
    e = expectation(("gp",), "erf").expr
    caa = cov_symbol("a", "a")
    val = float(e.subs(caa, 0.7))
    assert val == pytest.approx(math.sqrt(2 / math.pi) / math.sqrt(1.7), rel=1e-14)


def test_primitive_names_and_kinds():
    assert gaussian.PRIMITIVES["I3"] == ("gp", "id", "g")
    for name in PRIMS:
        d = primitive(name, "erf")
        assert d.name == name
        assert d.kinds == KINDS[name]
        assert d.provenance, f"{name}: no provenance recorded"


def test_unknown_primitive_name():
    with pytest.raises(ValueError, match=r"unknown primitive 'I5'.*I2"):
        primitive("I5", "erf")


def test_unknown_factor_kind():
    with pytest.raises(ValueError, match=r"unknown factor kind 'relu'"):
        expectation(("gp", "relu"), "erf")


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'.*erf"):
        primitive("I2", "tanh")


def test_unreducible_pattern_is_reported(monkeypatch):
    """An activation the rules cannot handle (tanh: its derivative is not Gaussian,
    so Price's base case finds no tilt): the engine says which pattern it cannot
    reduce. (G4 for erf, which has no closed form, is an integral along Price's path:
    tests/test_g4.py.)"""
    from derive import activations

    z = activations.z
    tanh = activations.Activation("tanh_test", sp.tanh(z), "g(z) = tanh(z)")
    monkeypatch.setitem(activations.ACTIVATIONS, "tanh_test", tanh)
    with pytest.raises(UnreducibleExpectation, match=r"no rule reduces E\[.*tanh_test"):
        expectation(("g", "g"), "tanh_test")
