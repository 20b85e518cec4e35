"""The compiled first-order population step of the meta-learning simulator
(runtime/simulate_meta.py: _first_order_population) against its numpy path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.simulate_meta import Activation, MetaStep


@pytest.mark.parametrize("activation", ["erf", "linear"])
@pytest.mark.parametrize("S", [0, 1, 3])
@pytest.mark.parametrize("K,M,n_q", [(2, 2, 1), (3, 2, 3), (1, 3, 2)])
def test_compiled_step_equals_numpy_step(activation, S, K, M, n_q):
    rng = np.random.default_rng(K * 100 + M * 10 + S)
    N = 60
    W = 0.7 * rng.standard_normal((K, N))
    B = rng.standard_normal((M, N))
    a, vbar = rng.standard_normal(K), rng.standard_normal(M)
    params = dict(alpha_in=0.6, S=S, order=1, n_q=n_q, n_s=math.inf, s=0.8, eps_B=0.0, sigma=0.3)
    step = MetaStep(Activation(activation), params)
    step.use_teacher(B)
    task = step.draw_task(rng, B, vbar)
    G_fast, none, ga_fast = step.gradients(W, a, task, fast=True)
    G_ref, _, ga_ref = step.gradients(W, a, task, fast=False)
    assert none is None
    np.testing.assert_allclose(G_fast, G_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ga_fast, ga_ref, rtol=1e-12, atol=1e-14)
    # the comparison is not empty: the step is not zero
    assert np.abs(G_ref).max() > 1e-3


def test_fast_path_is_not_used_with_feature_variability():
    rng = np.random.default_rng(0)
    W, B = rng.standard_normal((2, 40)), rng.standard_normal((2, 40))
    params = dict(alpha_in=1.0, S=1, order=1, n_q=1, n_s=math.inf, s=1.0, eps_B=0.5, sigma=0.0)
    step = MetaStep(Activation("erf"), params)
    step.use_teacher(B)
    task = step.draw_task(rng, B, np.zeros(2))
    assert task[1] is not B  # the task's teacher differs: the numpy path runs
    G1, _, g1 = step.gradients(W, np.ones(2), task, fast=True)
    G2, _, g2 = step.gradients(W, np.ones(2), task, fast=False)
    np.testing.assert_array_equal(G1, G2)
    np.testing.assert_array_equal(g1, g2)
