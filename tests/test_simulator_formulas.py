"""The meta-learning simulator takes its formulas from derive (derive/simulator.py):

- the compiled path's ``g``, ``gp``, ``I2_value`` and ``I2_partials`` (printed into
  the generated module) give the reference path's numbers (lambdified from the same
  sympy expressions);
- a wrong formula given to one path makes the two paths disagree, so the test that
  they agree step for step (tests/test_simulator_fast_path.py) would see it;
- a new activation needs no edit in runtime/: an activation that is only an entry
  of derive.activations.ACTIVATIONS (here ``g(z) = erf(z / 2)``) gets its I2 and
  partial derivatives in the reference path, checked here against a Monte Carlo
  estimate, finite differences and its closed form typed here; the gradient of the
  reference step is checked against finite differences of the query loss; and the
  module rendered for it runs the compiled loop equal to the reference loop.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import sympy as sp

from derive import activations, codegen
from derive.model import FirstLayer
from derive.models import get_model
from runtime import load, simulate_meta
from runtime.simulate_meta import Activation, MetaStep, run_seed_meta

SPEC = get_model("anil")
NEW = "erf_half"


def random_triples(rng, n):
    """(a, b, c): variances and a covariance of a positive-definite 2x2 matrix."""
    a = rng.uniform(0.05, 3.0, n)
    b = rng.uniform(0.05, 3.0, n)
    c = rng.uniform(-0.95, 0.95, n) * np.sqrt(a * b)
    return a, b, c


@pytest.fixture
def new_activation(monkeypatch):
    """A third odd activation, g(z) = erf(z / 2), known to derive only."""
    act = activations.Activation(NEW, sp.erf(activations.z / 2), "g(z) = erf(z/2)")
    monkeypatch.setitem(activations.ACTIVATIONS, NEW, act)
    simulate_meta._numpy_formulas.cache_clear()
    yield NEW
    simulate_meta._numpy_formulas.cache_clear()


def run_loop(path, activation, N=80, n_steps=30, seed=3, **over):
    """``run_seed_meta`` recording every step: (Q, R, a records, final W, next rng draw)."""
    values = SPEC.resolve_params(over)
    rates = [(SPEC.numeric(SPEC.first_layer.rate, values), SPEC.numeric(SPEC.first_layer.decay, values))]
    rates += [(SPEC.numeric(r.rate, values), SPEC.numeric(r.decay, values)) for r in SPEC.readout_updates]
    rng = np.random.default_rng(seed)
    W = 0.7 * rng.standard_normal((2, N))
    B = rng.standard_normal((2, N))
    vec = np.array([0.3, -0.2, 0.4, 0.2])
    overlaps, vecs = run_seed_meta(
        SPEC, W, B, vec, values, rates, N, n_steps, 1, rng, None, activation, path=path
    )
    return overlaps["Q"], overlaps["R"], vecs["a"], W, rng.standard_normal()


def assert_same_run(comp, ref):
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert comp[4] == ref[4]


# --------------------------------------------------------------------------- both paths, one set of formulas
@pytest.mark.parametrize("act", ["erf", "linear"])
def test_module_formulas_are_the_reference_formulas(act):
    module = load("anil", act).module
    ref = Activation(act)
    rng = np.random.default_rng(1)
    x = rng.uniform(-4, 4, 50)
    np.testing.assert_allclose([module.g(v) for v in x], ref.g(x), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose([module.gp(v) for v in x], ref.gp(x), rtol=1e-14, atol=1e-15)
    a, b, c = random_triples(rng, 50)
    np.testing.assert_allclose(
        [module.I2_value(*t) for t in zip(a, b, c)], ref.I2(a, b, c), rtol=1e-14, atol=1e-15
    )
    got = np.array([module.I2_partials(*t) for t in zip(a, b, c)]).T
    np.testing.assert_allclose(got, np.array(ref.I2_partials(a, b, c)), rtol=1e-13, atol=1e-15)


def _doubled(diagonal):
    """The reference's ``_Concrete`` with the derivatives of the population support
    gradient in the diagonal (variances) or the off-diagonal (covariances) entries
    of the realised covariance doubled."""
    original = simulate_meta._Concrete

    class Wrong(original):
        def __init__(self, *args):
            super().__init__(*args)
            right = self.support_mean_d
            n = len(self.cov_entries)
            scale = np.array([2.0 if (i == j) == diagonal else 1.0 for i, j in self.cov_entries])

            def wrong(*a):
                d = np.array(right(*a), dtype=float).reshape(-1, n)
                return list((d * scale).ravel())

            self.support_mean_d = wrong

    return Wrong


@pytest.mark.parametrize("diagonal", [True, False], ids=["variances", "covariances"])
def test_a_wrong_partial_derivative_in_one_path_breaks_their_agreement(diagonal, monkeypatch):
    """Order 2 in population mode reads the derivatives of the population support
    gradient in the overlaps: the reference given a doubled one no longer equals
    the compiled loop."""
    over = {"order": 2, "S": 2, "eta_a": 0.5}
    comp = run_loop("compiled", "erf", **over)
    assert_same_run(comp, run_loop("numpy", "erf", **over))
    monkeypatch.setattr(simulate_meta, "_Concrete", _doubled(diagonal))
    wrong = run_loop("numpy", "erf", **over)
    assert np.abs(wrong[3] - comp[3]).max() > 1e-8


def test_both_paths_take_the_input_norm_of_the_model(monkeypatch):
    """The fields are x.w / FirstLayer.input_norm(N) in both paths: another norm moves
    both alike."""
    over = {"order": 2, "n_s": 3, "eps_B": 0.2, "S": 1, "eta_a": 0.5, "eta": 0.5, "alpha_in": 0.5}
    plain = run_loop("compiled", "erf", **over)
    monkeypatch.setattr(FirstLayer, "input_norm", staticmethod(lambda N: 1.3 * math.sqrt(N)))
    comp = run_loop("compiled", "erf", **over)
    assert_same_run(comp, run_loop("numpy", "erf", **over))
    assert np.abs(comp[3] - plain[3]).max() > 1e-3


# --------------------------------------------------------------------------- a new activation
def test_new_activation_reference_formulas(new_activation):
    """g(z) = erf(z / 2) is only a sympy expression in ACTIVATIONS: the reference path's
    g, g', I2 and partials of I2 are right for it (Monte Carlo, finite differences,
    and I2 = 2/pi asin(c / sqrt((2 + a)(2 + b))), typed here)."""
    act = Activation(new_activation)
    rng = np.random.default_rng(7)
    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(act.g(x), [math.erf(v / 2) for v in x], rtol=1e-15, atol=1e-16)
    h = 1e-5
    np.testing.assert_allclose(act.gp(x), (act.g(x + h) - act.g(x - h)) / (2 * h), rtol=1e-8, atol=1e-10)
    n = 400_000
    for a, b, c in zip(*random_triples(rng, 6)):
        L = np.linalg.cholesky(np.array([[a, c], [c, b]]))
        u = rng.standard_normal((n, 2)) @ L.T
        prod = act.g(u[:, 0]) * act.g(u[:, 1])
        mc, se = prod.mean(), prod.std() / math.sqrt(n)
        assert abs(act.I2(a, b, c) - mc) < 5 * se, (a, b, c, act.I2(a, b, c), mc, se)
    a, b, c = random_triples(rng, 40)
    closed = 2 / np.pi * np.arcsin(c / np.sqrt((2 + a) * (2 + b)))
    np.testing.assert_allclose(act.I2(a, b, c), closed, rtol=1e-13)
    assert np.abs(closed - Activation("erf").I2(a, b, c)).max() > 1e-2  # not erf's I2
    fd = [
        (act.I2(a + h, b, c) - act.I2(a - h, b, c)) / (2 * h),
        (act.I2(a, b + h, c) - act.I2(a, b - h, c)) / (2 * h),
        (act.I2(a, b, c + h) - act.I2(a, b, c - h)) / (2 * h),
    ]
    for name, an, num in zip(("a", "b", "c"), act.I2_partials(a, b, c), fd):
        assert np.shape(an) == np.shape(a), name
        np.testing.assert_allclose(an, num, rtol=1e-7, atol=1e-9, err_msg=f"dI2/d{name}")


@pytest.mark.parametrize("n_s", [math.inf, 4])
def test_new_activation_gradient_matches_finite_differences(new_activation, n_s):
    """The reference step at order 2 for the new activation: grad_W (along the query
    inputs and through the inner loop) and A^T dL/da' are the derivatives of the
    query loss."""
    rng = np.random.default_rng(11)
    N, K, M = 40, 2, 2
    params = {**SPEC.resolve_params({}), "order": 2, "S": 2, "alpha_in": 0.7, "n_q": 2, "n_s": n_s}
    params.update(eps_B=0.3, sigma=0.2, s=0.8)
    step = MetaStep(SPEC, new_activation, params)
    W, B = rng.standard_normal((K, N)), rng.standard_normal((M, N))
    a = rng.standard_normal(K)
    task = step.draw_task(rng, B, {"vbar": rng.standard_normal(M)})
    G, grad_W2, grad_a = step.gradients(W, a, task)
    Xq = task[4]
    grad_W = G.T @ Xq / (Xq.shape[0] * math.sqrt(N)) + grad_W2
    h = 1e-5
    for _ in range(3):
        D = rng.standard_normal(W.shape)
        fd = (step.query_loss(W + h * D, a, task) - step.query_loss(W - h * D, a, task)) / (2 * h)
        assert abs(fd - np.sum(grad_W * D)) < 1e-6 * max(1.0, abs(fd)), (fd, np.sum(grad_W * D))
    for k in range(K):
        e = np.eye(K)[k]
        fd = (step.query_loss(W, a + h * e, task) - step.query_loss(W, a - h * e, task)) / (2 * h)
        assert abs(fd - grad_a[k]) < 1e-6 * max(1.0, abs(fd)), (k, fd, grad_a[k])


def test_new_activation_compiled_loop_equals_the_reference(new_activation, tmp_path, monkeypatch):
    """The module rendered for the new activation (derive only) runs the compiled loop;
    it equals the reference step for step at orders 1 and 2, in population and samples
    mode, with feature variability."""
    path = tmp_path / f"anil_{NEW}.py"
    path.write_text(codegen.render("anil", NEW))
    name = f"_anil_{NEW}_rendered"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.ACTIVATION == NEW
    monkeypatch.setattr(
        simulate_meta,
        "load",
        lambda model, act: SimpleNamespace(module=module) if act == NEW else load(model, act),
    )
    for over in (
        {"order": 2, "S": 2, "eps_B": 0.3, "eta_a": 0.5},
        {"order": 2, "n_s": 3, "S": 1, "eta_a": 0.5, "eta": 0.5, "alpha_in": 0.5},
        {"order": 1, "n_q": 2, "eta_a": 0.5},
    ):
        comp = run_loop("compiled", NEW, **over)
        assert_same_run(comp, run_loop("numpy", NEW, **over))
        assert np.abs(comp[0][-1] - comp[0][0]).max() > 1e-3
        # not erf's simulation
        assert np.abs(comp[3] - run_loop("compiled", "erf", **over)[3]).max() > 1e-3
