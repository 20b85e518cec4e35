"""The two paths of the meta-learning simulator (runtime/simulate_meta.py): the
compiled outer loop (``meta_steps`` of the generated module, random draws
included; orders 1 and 2, population and samples mode, with and without feature
variability, erf and linear) against the numpy reference ``MetaStep``, step for
step; which cases run compiled; the formulas both evaluate (derive's, the same
numbers in both paths) and the input norm and update rules' coefficients both
apply (derive/model.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import runtime
from derive.model import FirstLayer, ReadoutUpdate
from derive.models import get_model
from runtime import SimulationDiverged, simulate_meta
from runtime.scenarios import validation_init
from derive.simulator import standard_form
from runtime.simulate_meta import MetaStep, run_seed_meta


# =========================================================================== the compiled outer loop
SPEC = get_model("anil")


def run_loop(path, activation="erf", N=120, n_steps=50, rec=1, seed=3, bar=None, **over):
    """``run_seed_meta`` on a generic network from ``seed``: (records, final W, final a
    record, the next number of the rng: the draws consumed). Records every step by
    default: the two paths are compared step for step."""
    values = SPEC.resolve_params(over)
    rates = [(SPEC.numeric(SPEC.first_layer.rate, values), SPEC.numeric(SPEC.first_layer.decay, values))]
    rates += [(SPEC.numeric(r.rate, values), SPEC.numeric(r.decay, values)) for r in SPEC.readout_updates]
    rng = np.random.default_rng(seed)
    W = 0.7 * rng.standard_normal((2, N))
    B = rng.standard_normal((2, N))
    vec = np.array([0.3, -0.2, 0.4, 0.2])
    overlaps, vecs = run_seed_meta(
        SPEC, W, B, vec, values, rates, N, n_steps, rec, rng, bar, activation, path=path
    )
    return overlaps["Q"], overlaps["R"], vecs["a"], W, rng.standard_normal()


FAST_CASES = [
    {},
    {"n_q": 3, "eta_a": 0.5, "S": 2, "alpha_in": 0.6, "sigma": 0.3, "s": 0.7},
    {"S": 0, "eta_a": 0.8, "n_q": 2},
]


@pytest.mark.parametrize("activation", ["erf", "linear"])
@pytest.mark.parametrize(
    "over", FAST_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_compiled_loop_equals_the_reference_loop(activation, over):
    """Whole outer steps compiled (random draws included) against the numpy loop of
    MetaStep: same seed, same random numbers (numba draws numpy's stream of the
    same Generator), the same records to round-off after every step, and the same
    number of draws consumed."""
    assert standard_form(SPEC) is not None
    comp = run_loop("compiled", activation, **over)
    ref = run_loop("numpy", activation, **over)
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert comp[4] == ref[4]  # the rng stands at the same place
    # the comparison is not empty: the network moved over the records
    assert np.abs(comp[0][-1] - comp[0][0]).max() > 1e-3
    if over.get("eta_a", 0.0):
        assert np.abs(comp[2][-1] - comp[2][0]).max() > 1e-3


def test_the_step_path_is_gone():
    with pytest.raises(ValueError, match="compiled or numpy"):
        run_loop("step", n_steps=2)


# order 2 and feature variability (eps_B > 0): (order, eps_B) with the same draws
NEW_CASES = [(2, 0.0), (1, 0.5), (2, 0.5)]


@pytest.mark.parametrize("activation", ["erf", "linear"])
@pytest.mark.parametrize("S", [0, 1, 2])
@pytest.mark.parametrize("order,eps_B", NEW_CASES)
def test_compiled_loop_equals_numpy_loop_order2_and_feature_variability(order, eps_B, S, activation):
    """Order 2 (reverse mode through the inner loop, the step along grad_W) and
    eps_B > 0 (a fresh task teacher B + eps_B Z drawn each step, between v_task and the
    query) compiled: the numpy loop's records step for step, to round-off, and
    the rng at the same place after 50 steps."""
    over = {"order": order, "eps_B": eps_B, "S": S, "eta_a": 0.5}
    assert standard_form(SPEC) is not None
    comp = run_loop("compiled", activation, **over)
    ref = run_loop("numpy", activation, **over)
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert comp[4] == ref[4]
    assert np.abs(comp[0][-1] - comp[0][0]).max() > 1e-3
    assert np.abs(comp[2][-1] - comp[2][0]).max() > 1e-3
    if order == 2 and S > 0:
        # the part through the inner loop is not empty: order 1 gives other weights
        first = run_loop("compiled", activation, **{**over, "order": 1})
        assert np.abs(first[3] - comp[3]).max() > 1e-6
        assert np.abs(first[2] - comp[2]).max() > 1e-6


@pytest.mark.parametrize("activation", ["erf", "linear"])
def test_compiled_loop_order2_feature_variability_batch_and_noise(activation):
    """The remaining knobs at order 2 with eps_B > 0: a query batch, label noise,
    the inner rate and the task spread."""
    over = {"order": 2, "eps_B": 0.3, "n_q": 3, "eta_a": 0.5, "S": 2, "alpha_in": 0.6, "sigma": 0.3, "s": 0.7}
    comp = run_loop("compiled", activation, **over)
    ref = run_loop("numpy", activation, **over)
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert comp[4] == ref[4]


@pytest.mark.parametrize("activation", ["erf", "linear"])
@pytest.mark.parametrize("S", [0, 1, 2])
@pytest.mark.parametrize("order,eps_B", [(1, 0.0)] + NEW_CASES)
def test_compiled_loop_equals_numpy_loop_samples_mode(order, eps_B, S, activation):
    """Finite support sets (n_s = 4 fresh support samples per task, drawn after
    the task teacher and before the query) compiled, at orders 1 and 2 (grad_W
    through the support fields), with and without feature variability: the numpy
    loop's records step for step, and the rng at the same place."""
    over = {"n_s": 4, "order": order, "eps_B": eps_B, "S": S, "eta_a": 0.5, "eta": 0.5, "alpha_in": 0.5}
    assert standard_form(SPEC) is not None
    comp = run_loop("compiled", activation, **over)
    ref = run_loop("numpy", activation, **over)
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert comp[4] == ref[4]
    assert np.abs(comp[0][-1] - comp[0][0]).max() > 1e-3
    assert np.abs(comp[2][-1] - comp[2][0]).max() > 1e-3
    if order == 2 and S > 0:
        first = run_loop("compiled", activation, **{**over, "order": 1})
        assert np.abs(first[3] - comp[3]).max() > 1e-6
        assert np.abs(first[2] - comp[2]).max() > 1e-6


@pytest.mark.parametrize("activation", ["erf", "linear"])
def test_compiled_loop_samples_mode_batch_noise_one_sample(activation):
    """One support sample, a query batch, label noise, order 2 with eps_B."""
    over = {"n_s": 1, "order": 2, "eps_B": 0.3, "n_q": 3, "S": 2, "alpha_in": 0.3, "sigma": 0.3, "eta_a": 0.5}
    comp = run_loop("compiled", activation, **over)
    ref = run_loop("numpy", activation, **over)
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert comp[4] == ref[4]


COMPILED = [
    {},
    {"order": 2},
    {"eps_B": 0.3},
    {"order": 2, "eps_B": 0.2, "n_q": 2, "S": 0},
    {"n_s": 5},
    {"n_s": 3, "order": 2},
    {"order": 2, "n_s": 4, "eps_B": 0.2, "n_q": 2},
]


@pytest.mark.parametrize("over", COMPILED, ids=str)
def test_which_cases_run_compiled(over, monkeypatch):
    """Every case the model allows (orders 1 and 2, population mode n_s = inf and
    finite support sets, any eps_B) runs whole outer steps compiled: the Python
    step (``MetaStep.gradients``) is never called, while the numpy path calls it
    once per step."""
    assert standard_form(SPEC) is not None
    calls = []
    original = MetaStep.gradients
    monkeypatch.setattr(MetaStep, "gradients", lambda *a, **k: calls.append(1) or original(*a, **k))
    run_loop("compiled", n_steps=10, rec=5, **over)
    assert calls == []
    run_loop("numpy", n_steps=10, rec=5, **over)
    assert len(calls) == 10


def test_a_model_the_compiled_loop_does_not_run_is_not_compiled():
    """The selection reads the model: an inner loop with a regulariser (another
    algorithm than the compiled loop's) is recognised as such and simulated by the
    reference, which reads its model file."""
    import dataclasses

    import sympy as sp

    from derive.symbols import student_index, student_sum

    j = student_index("j")
    inner = dataclasses.replace(SPEC.inner_loop, regulariser=lambda c: student_sum(c[j] ** 2, j) / 2)
    fl = dataclasses.replace(SPEC.first_layer, meta=dataclasses.replace(SPEC.first_layer.meta, inner=inner))
    other = dataclasses.replace(SPEC, inner_loop=inner, first_layer=fl)
    assert standard_form(SPEC) is not None and standard_form(other) is None
    assert sp.sympify(other.inner_loop.regulariser(sp.IndexedBase("c"))) != 0


def test_compiled_loop_is_reproducible_and_seeded():
    one = run_loop("compiled", n_steps=40, rec=40)
    again = run_loop("compiled", n_steps=40, rec=40)
    other = run_loop("compiled", n_steps=40, rec=40, seed=4)
    for x, y in zip(one, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(one[3], other[3])


def test_seeded_first_order_simulation_is_reproducible_and_independent_of_workers():
    kw = dict(N=100, seeds=3, t_max=0.3, init=validation_init(), record_every=0.1, seed=7)
    params = {"order": 1, "eta_a": 0.5, "S": 2, "sigma": 0.2}
    one = runtime.simulate("anil", params, workers=1, **kw)
    two = runtime.simulate("anil", params, workers=2, **kw)
    again = runtime.simulate("anil", params, workers=1, **kw)
    for name in ("Q", "R", "a", "eps_meta"):
        np.testing.assert_array_equal(one.arrays[name], two.arrays[name], err_msg=name)
        np.testing.assert_array_equal(one.arrays[name], again.arrays[name], err_msg=name)
    assert not np.array_equal(one.Q[0, -1], one.Q[1, -1])


@pytest.mark.parametrize("over", [{"eta_a": 0.5, "n_q": 2}, {"eta_a": 0.5, "order": 2, "S": 2, "eps_B": 0.3}])
def test_the_compiled_loop_takes_the_update_rules_coefficients(monkeypatch, over):
    """The compiled loop has no scalings of its own: changing the coefficients of
    FirstLayer / ReadoutUpdate (derive/model.py) changes it exactly as it changes
    the Python loop, which applies them through ``step`` and ``step_weights``."""
    plain = run_loop("compiled", **over)
    fl_coef, ro_coef = FirstLayer.coefficients, ReadoutUpdate.coefficients
    monkeypatch.setattr(FirstLayer, "coefficients", staticmethod(lambda *a: (0.97, 1.7 * fl_coef(*a)[1])))
    monkeypatch.setattr(ReadoutUpdate, "coefficients", staticmethod(lambda *a: (0.95, 0.6 * ro_coef(*a)[1])))
    monkeypatch.setattr(FirstLayer, "weights_coefficient", staticmethod(lambda rate: 2.5 * rate))
    comp = run_loop("compiled", **over)
    ref = run_loop("numpy", **over)
    for x, y in zip(comp[:4], ref[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    assert np.abs(comp[3] - plain[3]).max() > 1e-2
    assert np.abs(comp[2][-1] - plain[2][-1]).max() > 1e-3
    if over.get("order") == 2:
        # the weight-space coefficient alone moves both loops alike
        monkeypatch.setattr(FirstLayer, "coefficients", staticmethod(fl_coef))
        monkeypatch.setattr(ReadoutUpdate, "coefficients", staticmethod(ro_coef))
        comp = run_loop("compiled", **over)
        ref = run_loop("numpy", **over)
        for x, y in zip(comp[:4], ref[:4]):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
        assert np.abs(comp[3] - plain[3]).max() > 1e-6


def test_coefficients_are_the_documented_rules():
    """w_k <- (1 - decay/N) w_k - rate/(sqrt(N) n) sum_mu G_mu,k x_mu and
    c <- (1 - decay/N) c - (rate/N) H, through ``step`` (per sample and batch)."""
    rng = np.random.default_rng(0)
    N, rate, decay = 50, 0.7, 0.3
    assert FirstLayer.coefficients(N, rate, decay, 4) == (1 - decay / N, rate / (math.sqrt(N) * 4))
    assert ReadoutUpdate.coefficients(N, rate, decay) == (1 - decay / N, rate / N)
    fl = SPEC.first_layer
    W0, G, X = rng.standard_normal((2, N)), rng.standard_normal((4, 2)), rng.standard_normal((4, N))
    W = W0.copy()
    fl.step(W, G, X, rate, decay)
    np.testing.assert_allclose(W, (1 - decay / N) * W0 - rate / (math.sqrt(N) * 4) * G.T @ X, rtol=1e-13)
    W = W0.copy()
    fl.step(W, G[0], X[0], rate, decay)
    np.testing.assert_allclose(
        W, (1 - decay / N) * W0 - rate / math.sqrt(N) * np.outer(G[0], X[0]), rtol=1e-13
    )
    assert FirstLayer.weights_coefficient(rate) == rate
    W, gW = W0.copy(), rng.standard_normal((2, N))
    fl.step_weights(W, gW, rate)
    np.testing.assert_array_equal(W, W0 - rate * gW)
    c0, H = rng.standard_normal(2), rng.standard_normal(2)
    c = c0.copy()
    SPEC.readout_updates[0].step(c, H, N, rate, decay)
    np.testing.assert_allclose(c, (1 - decay / N) * c0 - rate / N * H, rtol=1e-14)


@pytest.mark.parametrize("over", [{}, {"order": 2, "eps_B": 0.3}], ids=str)
def test_divergence_is_reported_at_the_same_record_by_both_loops(over):
    """A learning rate far too large: both loops raise SimulationDiverged at the
    first record where W is not finite, the same alpha (records every 50 steps)."""
    alphas = []
    for path in ("compiled", "numpy"):
        with pytest.raises(SimulationDiverged) as info, np.errstate(all="ignore"):
            run_loop(path, "linear", N=50, n_steps=4000, rec=50, eta=40.0, **over)
        alphas.append(info.value.alpha)
    assert alphas[0] == alphas[1]
    assert 1 <= alphas[0] < 4000 / 50 and alphas[0] == int(alphas[0])  # a record, rec / N = 1


class CountingBar:
    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


def test_progress_bar_moves_every_chunk(monkeypatch):
    monkeypatch.setattr(simulate_meta, "CHUNK", 7)
    bar = CountingBar()
    run_loop("compiled", n_steps=50, rec=25, bar=bar)
    assert sum(bar.updates) == 50 and max(bar.updates) <= 7 and len(bar.updates) == 8
