"""The adaptive integrator: the Dormand-Prince 5(4) pair of derive/integrators.py
and ``run_adaptive`` of the kernels behind ``runtime.flow(method="adaptive")``.

- The tableau is checked against Butcher's order conditions, exactly (sympy
  Rationals): the propagated solution has order 5 and not 6, the embedded one
  order 4 and not 5, and the continuous extension order 4 at every theta.
- The compiled loop is checked against RK4 at a tiny step on two_layer (errors
  that follow the tolerance), for its counts, for records that do not depend on
  the chunking, on interrupts and on divergence.
- Through the plateau of the reference scenario (anil, K = M = 2, alpha to 300)
  it matches RK4 at dt = 0.01 within 1e-6 in eps_meta and Q with over 10x fewer
  right-hand-side evaluations, and escapes at the same alpha
  (benchmarks/adaptive.py prints the numbers for more starts).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import runtime
from derive import integrators as I
from runtime import FlowDiverged, Init, integrate
from runtime.scenarios import REFERENCE, escape_alpha, reference_init
from test_integrators import PARAMS, start

TAB = I.DP54


# --- the tableau -------------------------------------------------------------------


def test_rooted_trees():
    assert [len(I.rooted_trees(n)) for n in range(1, 8)] == [1, 1, 2, 4, 9, 20, 48]
    # the bushy tree of n nodes has gamma = n and sigma = (n-1)!; the tall one gamma = n!
    assert I.gamma(((), (), ())) == 4 and I.sigma(((), (), ())) == 6
    assert I.gamma((((),),)) == 6 and I.sigma((((),),)) == 1


def test_the_pair_has_orders_5_and_4():
    assert TAB.order == 5 and TAB.embedded_order == 4
    assert TAB.fsal
    assert TAB.A.is_lower and all(TAB.A[i, i] == 0 for i in range(TAB.stages))
    for n in range(1, 6):
        assert I.order_defects(TAB.b, TAB.A, n) == [0] * len(I.rooted_trees(n)), n
    assert any(d != 0 for d in I.order_defects(TAB.b, TAB.A, 6)), "order 6: not expected"
    for n in range(1, 5):
        assert I.order_defects(TAB.b_hat, TAB.A, n) == [0] * len(I.rooted_trees(n)), n
    assert any(d != 0 for d in I.order_defects(TAB.b_hat, TAB.A, 5)), "the error estimate would vanish"
    # the nodes: c_2 .. c_7 of the method
    assert list(TAB.c) == [
        0,
        sp.Rational(1, 5),
        sp.Rational(3, 10),
        sp.Rational(4, 5),
        sp.Rational(8, 9),
        1,
        1,
    ]


def test_the_continuous_extension_has_order_4_at_every_theta():
    th = I.THETA
    bt = sp.Matrix(I.dense_weights())
    for n in range(1, 5):
        assert I.order_defects(bt, TAB.A, n, th) == [0] * len(I.rooted_trees(n)), n
    assert list(bt.subs(th, 0)) == [0] * TAB.stages
    assert list(bt.subs(th, 1)) == list(TAB.b)
    # C^1 from step to step: the slope at theta = 0 is k1, at theta = 1 k7 (the next step's k1)
    slope = bt.diff(th)
    assert list(slope.subs(th, 0)) == [1, 0, 0, 0, 0, 0, 0]
    assert list(slope.subs(th, 1)) == [0, 0, 0, 0, 0, 0, 1]
    assert all(sp.Poly(w, th).degree() <= 4 for w in bt if w != 0)
    # and not order 5 (a degree-4 extension of this pair cannot be)
    assert any(d != 0 for d in I.order_defects(bt, TAB.A, 5, th))


def test_the_kernels_print_the_tableau(repo_root):
    """The literals of run_adaptive are the tableau's numbers, correctly rounded."""
    src = (repo_root / "generated" / "two_layer_erf.py").read_text()
    for i in range(1, TAB.stages):
        for j in range(i):
            if TAB.A[i, j] != 0:
                assert repr(float(abs(TAB.A[i, j]))) in src, (i, j)
    for x in TAB.b - TAB.b_hat:
        if x != 0:
            assert repr(float(abs(x))) in src


# --- the compiled loop -------------------------------------------------------------

T_MAX = 2.0


@pytest.fixture(scope="module")
def reference():
    return runtime.flow(
        "two_layer", start(), PARAMS, t_max=T_MAX, dt=T_MAX / 3200, method="rk4", record_every=0.1
    )


def adaptive(rtol, atol=None, **kw):
    kw = {"t_max": T_MAX, "dt": 0.01, "record_every": 0.1, **kw}
    return runtime.flow("two_layer", start(), PARAMS, method="adaptive", rtol=rtol, atol=atol, **kw)


def test_error_follows_the_tolerance(reference):
    """At every record (dense output between the steps) the error is about the
    tolerance, and a tighter tolerance costs more evaluations."""
    errors, evals = [], []
    for rtol in (1e-6, 1e-8, 1e-10):
        tr = adaptive(rtol, rtol * 1e-2)
        np.testing.assert_allclose(tr.alpha, reference.alpha, rtol=0, atol=1e-12)
        assert tr.alpha[-1] == T_MAX
        errors.append(
            max(np.abs(getattr(tr, k) - getattr(reference, k)).max() for k in ("Q", "R", "v", "eps_g"))
        )
        evals.append(tr.metadata["rhs_evaluations"])
        assert errors[-1] < 100 * rtol, (rtol, errors[-1])
    assert errors[0] > errors[1] > errors[2]
    assert evals[0] < evals[1] < evals[2]


def test_counts_and_metadata():
    tr = adaptive(1e-9, 1e-12)
    md = tr.metadata
    assert md["method"] == "adaptive" and md["rtol"] == 1e-9 and md["atol"] == 1e-12 and md["dt"] == 0.01
    # FSAL: one evaluation at the start, six per step tried
    assert md["rhs_evaluations"] == 1 + 6 * (md["steps_accepted"] + md["steps_rejected"])
    assert md["steps_accepted"] > 0 and md["complete"] is True
    # a first step far too large is rejected until it fits
    big = adaptive(1e-9, 1e-12, dt=2.0)
    assert big.metadata["steps_rejected"] >= 1
    assert np.abs(big.Q - tr.Q).max() < 1e-7


def test_records_need_not_be_a_multiple_of_dt():
    tr = runtime.flow("two_layer", start(), PARAMS, t_max=1.0, dt=0.3, method="adaptive", record_every=0.25)
    np.testing.assert_allclose(tr.alpha, [0, 0.25, 0.5, 0.75, 1.0], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="record_every"):
        runtime.flow("two_layer", start(), PARAMS, t_max=1.0, dt=0.1, method="adaptive", record_every=0.3)
    with pytest.raises(ValueError, match="rtol and atol are for method='adaptive'"):
        runtime.flow("two_layer", start(), PARAMS, t_max=1.0, dt=0.1, method="rk4", rtol=1e-6)
    with pytest.raises(ValueError, match="rtol"):
        adaptive(0.0)


@pytest.mark.parametrize("chunk_seconds", [1e-9, 1e9])  # a step per chunk; one chunk
def test_chunks_give_the_same_records(chunk_seconds, monkeypatch):
    """The slope k1, the step and the controller's state are carried from chunk to
    chunk, so the records are those of one compiled call, to the bit."""
    plain = adaptive(1e-8)
    monkeypatch.setattr(integrate, "CHUNK_SECONDS", chunk_seconds)
    chunked = adaptive(1e-8, progress=True)
    for k in ("alpha", "Q", "R", "v", "eps_g"):
        assert np.array_equal(getattr(plain, k), getattr(chunked, k)), k
    for k in integrate.COUNTS:
        assert plain.metadata[k] == chunked.metadata[k], k


def test_interrupt_gives_a_partial_trajectory_that_resumes(monkeypatch):
    full = adaptive(1e-9, 1e-12, t_max=4.0)
    monkeypatch.setattr(integrate, "CHUNK_SECONDS", 1e-9)
    real, calls = integrate.time.perf_counter, [0]

    def interrupting_clock():
        calls[0] += 1
        if calls[0] == 31:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(integrate.time, "perf_counter", interrupting_clock)
    with pytest.raises(integrate.FlowInterrupted) as info:
        adaptive(1e-9, 1e-12, t_max=4.0)
    monkeypatch.setattr(integrate.time, "perf_counter", real)
    part = info.value.trajectory
    n = len(part.alpha)
    assert 1 < n < len(full.alpha) and part.metadata["complete"] is False
    assert part.alpha[-1] == info.value.alpha
    assert np.array_equal(part.Q, full.Q[:n])  # the records before the interrupt, to the bit
    resumed = adaptive(1e-9, 1e-12, t_max=4.0, resume=part)
    assert resumed.metadata["resumed_from_alpha"] == part.alpha[-1]
    assert np.array_equal(resumed.Q[:n], part.Q)
    assert np.abs(resumed.Q - full.Q).max() < 1e-8  # restarted at a record: within the tolerance
    assert resumed.metadata["rhs_evaluations"] > part.metadata["rhs_evaluations"] > 0


def test_divergence_stops_with_alpha():
    init = Init(np.array([[0.5, 0.1], [0.1, 0.4]]), np.array([[0.3, 0.05], [-0.1, 0.2]]), np.eye(2))
    kw = {"t_max": 2.0, "dt": 0.01, "activation": "linear", "record_every": 0.01}
    with pytest.raises(FlowDiverged) as info:
        runtime.flow("scm", init, {"eta": 100.0}, method="adaptive", **kw)
    exc = info.value
    assert 0 < exc.alpha < 2.0 and "step size underflow" in str(exc)
    part = exc.trajectory
    assert part.metadata["stopped"] == "diverged" and part.alpha[-1] <= exc.alpha
    assert np.all(np.isfinite(part.Q))
    # where the fixed-step loops see the state overflow too (within a step of RK4)
    with pytest.raises(FlowDiverged) as fixed:
        runtime.flow("scm", init, {"eta": 100.0}, method="rk4", **{**kw, "dt": 0.0001, "record_every": 0.01})
    assert abs(fixed.value.alpha - exc.alpha) < 0.01


# --- through the plateau of the reference scenario ----------------------------------


@pytest.fixture(scope="module")
def symmetric():
    """The exactly symmetric start stays on the plateau: its eps_meta is the level."""
    return runtime.flow(
        "anil", reference_init(0.0), REFERENCE["params"], t_max=300, dt=0.01, method="rk4", record_every=0.5
    )


@pytest.mark.parametrize("d", [1e-3, 1e-5])
def test_reference_scenario_matches_rk4_through_the_plateau(d, symmetric):
    kw = {"t_max": 300.0, "record_every": 0.5}
    rk4 = runtime.flow("anil", reference_init(d), REFERENCE["params"], dt=0.01, method="rk4", **kw)
    ada = runtime.flow("anil", reference_init(d), REFERENCE["params"], dt=0.01, method="adaptive", **kw)
    assert ada.metadata["rtol"] == 1e-8
    assert np.abs(ada.eps_meta - rk4.eps_meta).max() < 1e-6
    assert np.abs(ada.Q - rk4.Q).max() < 1e-6
    assert ada.metadata["rhs_evaluations"] * 10 < 4 * round(300 / 0.01)
    escape = escape_alpha(rk4, symmetric)
    assert 10 < escape < 250, "no escape from the plateau to compare"
    assert abs(escape_alpha(ada, symmetric) - escape) < 1e-3
    # a first step of a third of the run is cut down by the controller: no escape skipped
    big = runtime.flow("anil", reference_init(d), REFERENCE["params"], dt=100.0, method="adaptive", **kw)
    assert big.metadata["steps_rejected"] >= 3
    assert np.abs(big.Q - rk4.Q).max() < 1e-6
    assert abs(escape_alpha(big, symmetric) - escape) < 1e-3


def test_threaded_loop_gives_the_same_bits():
    """run_adaptive_parallel calls rhs_parallel, which computes every element with
    the code of rhs: the same steps, records and counts."""
    kw = {"t_max": 1.0, "dt": 0.05, "record_every": 0.25}
    serial = runtime.flow("two_layer", start(4, 3), PARAMS, method="adaptive", parallel=False, **kw)
    threaded = runtime.flow("two_layer", start(4, 3), PARAMS, method="adaptive", parallel=True, **kw)
    for k in ("Q", "R", "v"):
        np.testing.assert_array_equal(getattr(serial, k), getattr(threaded, k))
    for k in integrate.COUNTS:
        assert serial.metadata[k] == threaded.metadata[k], k
