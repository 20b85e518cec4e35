"""The flow front end (runtime/integrate.py): Euler and RK4, recording, the trajectory, invariants.

Convergence orders are measured, not assumed: at fixed ``t_max`` the error
against a fine RK4 reference must halve with ``dt`` for Euler (order 1) and
drop about 16-fold for RK4 (order 4). The invariants are those of STYLE.md
("Tests at three levels", level 3): symmetric ``Q`` stays symmetric, the error
is never negative, a teacher-equal start is a fixed point at zero noise, and
``scm`` is ``two_layer`` with unit readouts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import runtime
from runtime import FlowDiverged, Init, integrate

T_MAX = 2.0
PARAMS = {"eta": 1.0, "eta_v": 0.5, "sigma": 0.2, "kappa": 0.05}


def start(K=3, M=2, seed=0):
    """A two_layer start with distinct units, away from the symmetric plateau."""
    rng = np.random.default_rng(seed)
    R = rng.uniform(-0.4, 0.4, (K, M)) + 0.3 * np.eye(K, M)
    A = 0.4 * rng.normal(size=(K, K))
    Q = R @ R.T + A @ A.T + 0.2 * np.eye(K)
    return Init(Q, R, np.eye(M), {"v": rng.uniform(0.5, 1.3, K), "vs": rng.uniform(0.6, 1.2, M)})


def final_error(traj, ref):
    return max(np.abs(getattr(traj, k)[-1] - getattr(ref, k)[-1]).max() for k in ("Q", "R", "v"))


@pytest.fixture(scope="module")
def reference():
    """RK4 with dt = 1/1600: its own error (~ (dt/0.05)^4 x that of dt = 0.05) is below 1e-15."""
    return runtime.flow(
        "two_layer", start(), PARAMS, t_max=T_MAX, dt=T_MAX / 3200, method="rk4", record_every=T_MAX
    )


def observed_orders(method, dts, reference):
    errors = [
        final_error(
            runtime.flow("two_layer", start(), PARAMS, t_max=T_MAX, dt=dt, method=method, record_every=T_MAX),
            reference,
        )
        for dt in dts
    ]
    return errors, [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_euler_is_first_order(reference):
    errors, orders = observed_orders("euler", [0.02, 0.01, 0.005], reference)
    assert errors[0] > 1e-5, "the test problem is too easy to measure an order"
    for p in orders:
        assert 0.8 < p < 1.2, f"Euler errors {errors}: observed orders {orders}"


def test_rk4_is_fourth_order(reference):
    errors, orders = observed_orders("rk4", [0.2, 0.1, 0.05], reference)
    assert errors[-1] > 1e-12, "the reference is not fine enough to measure RK4's error"
    for p in orders:
        assert p > 3.5, f"RK4 errors {errors}: observed orders {orders}"
    assert errors[-1] * 16**0.5 < errors[-2], "RK4 error did not drop by far more than Euler's"


def test_rk4_and_euler_agree_on_the_limit(reference):
    """Both methods approach the same curve: a fine Euler run is within O(dt) of RK4."""
    fine = runtime.flow(
        "two_layer", start(), PARAMS, t_max=T_MAX, dt=0.001, method="euler", record_every=T_MAX
    )
    assert final_error(fine, reference) < 1e-3


# --- recording --------------------------------------------------------------


def test_record_every_step_by_default():
    traj = runtime.flow("two_layer", start(), PARAMS, t_max=0.5, dt=0.01)
    n_steps = 50
    assert traj.alpha.shape == (n_steps + 1,)
    assert traj.Q.shape[0] == n_steps + 1
    np.testing.assert_allclose(traj.alpha, np.linspace(0.0, 0.5, n_steps + 1), rtol=0, atol=1e-12)
    every = runtime.flow("two_layer", start(), PARAMS, t_max=0.5, dt=0.01, record_every=0.01)
    for k in ("alpha", "Q", "R", "v", "eps_g"):
        assert np.array_equal(getattr(every, k), getattr(traj, k)), k


@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("record_every", [0.1, 0.25, 1.0])
def test_coarse_records_are_the_every_step_records(method, record_every):
    dt, t_max = 0.01, 1.0
    fine = runtime.flow("two_layer", start(), PARAMS, t_max=t_max, dt=dt, method=method)
    coarse = runtime.flow(
        "two_layer", start(), PARAMS, t_max=t_max, dt=dt, method=method, record_every=record_every
    )
    stride = round(record_every / dt)
    n = round(t_max / record_every) + 1
    assert coarse.alpha.shape == (n,)
    np.testing.assert_allclose(coarse.alpha, fine.alpha[::stride], rtol=0, atol=1e-12)
    assert coarse.alpha[0] == 0.0 and abs(coarse.alpha[-1] - t_max) < 1e-12
    for k in ("Q", "R", "v", "eps_g"):
        assert np.array_equal(getattr(coarse, k), getattr(fine, k)[::stride]), k


def test_progress_bar_chunks_do_not_change_the_result():
    """With a progress bar the loop runs in chunks; the records must be the same bits."""
    args = ("two_layer", start(), PARAMS)
    kw = {"t_max": 2.0, "dt": 0.01, "record_every": 0.02, "method": "rk4"}  # 100 records, chunks of 2
    plain = runtime.flow(*args, **kw)
    chunked = runtime.flow(*args, progress=True, **kw)
    for k in ("alpha", "Q", "R", "v", "eps_g"):
        assert np.array_equal(getattr(plain, k), getattr(chunked, k)), k


@pytest.mark.parametrize("chunk_seconds", [1e-9, 1e9])  # chunks of one step; of as many as allowed
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_chunks_give_the_records_of_one_compiled_call(method, chunk_seconds, monkeypatch):
    """The loop runs in chunks of about CHUNK_SECONDS (whole recording intervals or
    parts of one), so that an interrupt is seen between them; the records must be
    those of a single call of the compiled loop, to the bit."""
    monkeypatch.setattr(integrate, "CHUNK_SECONDS", chunk_seconds)
    dt, rec, n_rec = 0.01, 7, 30
    traj = runtime.flow(
        "two_layer", start(), PARAMS, t_max=rec * n_rec * dt, dt=dt, method=method, record_every=rec * dt
    )
    kernel = runtime.load("two_layer")
    init = start().validate(kernel.model)
    K, M = init.K, init.M
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(kernel.model.resolve_params(PARAMS))
    records = np.empty((n_rec + 1, y.size))
    records[0] = y
    assert getattr(kernel.module, f"run_{method}")(y, c, p, K, M, dt, rec * n_rec, rec, records, 0) == -1
    state = np.concatenate([traj.arrays[k].reshape(n_rec + 1, -1) for k, _ in kernel.module.STATE], axis=1)
    assert np.array_equal(state, records)


def test_interrupt_between_chunks_gives_a_partial_trajectory_that_resumes(monkeypatch):
    """A KeyboardInterrupt between chunks raises FlowInterrupted with the records so
    far, marked partial; given back as ``resume`` they are continued to the same bits."""
    kw = {"t_max": 1.0, "dt": 0.01, "record_every": 0.05}
    full = runtime.flow("two_layer", start(), PARAMS, **kw)
    monkeypatch.setattr(integrate, "CHUNK_SECONDS", 1e-9)  # one step per chunk
    real_perf_counter, calls = integrate.time.perf_counter, [0]

    def interrupting_clock():  # the 2 x 43rd reading: after 42 steps and a bit
        calls[0] += 1
        if calls[0] == 87:
            raise KeyboardInterrupt
        return real_perf_counter()

    monkeypatch.setattr(integrate.time, "perf_counter", interrupting_clock)
    with pytest.raises(integrate.FlowInterrupted) as info:
        runtime.flow("two_layer", start(), PARAMS, **kw)
    monkeypatch.setattr(integrate.time, "perf_counter", real_perf_counter)
    part = info.value.trajectory
    assert info.value.alpha == pytest.approx(0.4) and part.alpha[-1] == pytest.approx(0.4)
    assert part.metadata["complete"] is False and part.metadata["alpha_reached"] == pytest.approx(0.4)
    for k in ("Q", "R", "v", "eps_g"):
        assert np.array_equal(part.arrays[k], full.arrays[k][:9]), k
    resumed = runtime.flow("two_layer", start(), PARAMS, resume=part, **kw)
    assert resumed.metadata["complete"] is True
    assert resumed.metadata["resumed_from_alpha"] == pytest.approx(0.4)
    for k in ("Q", "R", "v", "eps_g"):
        assert np.array_equal(resumed.arrays[k], full.arrays[k]), k
    # a partial run of other arguments is not continued
    other = runtime.flow("two_layer", start(), {**PARAMS, "eta": 0.5}, resume=part, **kw)
    assert "resumed_from_alpha" not in other.metadata
    assert not np.array_equal(other.Q[:9], part.Q)


# --- the trajectory object --------------------------------------------------------


def test_trajectory_has_the_interface_arrays():
    K, M = 3, 2
    init = start(K, M)
    traj = runtime.flow("two_layer", init, PARAMS, t_max=1.0, dt=0.01, record_every=0.1)
    n = 11
    expected = {"alpha": (n,), "Q": (n, K, K), "R": (n, K, M), "T": (M, M), "v": (n, K), "eps_g": (n,)}
    for name, shape in expected.items():
        assert name in traj.arrays, name
        assert getattr(traj, name).shape == shape, name
    assert isinstance(traj, runtime.Trajectory)
    # the first record is the start itself
    np.testing.assert_array_equal(traj.Q[0], init.Q)
    np.testing.assert_array_equal(traj.R[0], init.R)
    np.testing.assert_array_equal(traj.v[0], init.vectors["v"])
    np.testing.assert_array_equal(traj.T, init.T)
    with pytest.raises(AttributeError):
        traj.no_such_array


def test_scm_trajectory_arrays():
    traj = runtime.flow("scm", Init(np.eye(2) * 0.5, np.full((2, 3), 0.1), np.eye(3)), t_max=0.5, dt=0.05)
    n = 11
    assert traj.alpha.shape == (n,)
    assert traj.Q.shape == (n, 2, 2)
    assert traj.R.shape == (n, 2, 3)
    assert traj.T.shape == (3, 3)
    assert traj.eps_g.shape == (n,)
    assert "v" not in traj.arrays


# --- invariants -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_symmetric_q_stays_symmetric(method):
    traj = runtime.flow("two_layer", start(4, 3, seed=5), PARAMS, t_max=5.0, dt=0.01, method=method)
    asym = np.abs(traj.Q - np.swapaxes(traj.Q, 1, 2)).max()
    assert asym <= 1e-12 * np.abs(traj.Q).max()


@pytest.mark.parametrize(
    "model,params,activation",
    [
        ("scm", {"eta": 1.0}, "erf"),
        ("scm", {"eta": 2.0, "sigma": 0.5}, "erf"),
        ("two_layer", PARAMS, "erf"),
        ("two_layer", {"eta": 0.5, "eta_v": 0.3, "sigma": 0.3}, "linear"),
    ],
)
def test_generalisation_error_is_never_negative(model, params, activation):
    for seed in range(3):
        init = start(3, 2, seed)
        if model == "scm":
            init = Init(init.Q, init.R, init.T)
        traj = runtime.flow(model, init, params, t_max=5.0, dt=0.01, activation=activation, record_every=0.05)
        assert np.all(traj.eps_g >= 0)
        assert traj.eps_g[-1] < traj.eps_g[0]  # and learning happens, so eps_g is not trivially 0


TEACHERS = {"identity": np.eye(2), "correlated": np.array([[1.0, 0.3], [0.3, 0.8]])}


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("model", ["scm", "two_layer"])
def test_teacher_equal_start_is_a_fixed_point(model, teacher):
    T = TEACHERS[teacher]
    vectors, params = {}, {"eta": 1.5}
    if model == "two_layer":
        vs = np.array([0.7, 1.3])
        vectors, params = {"v": vs.copy(), "vs": vs}, {"eta": 1.5, "eta_v": 0.8}
    traj = runtime.flow(
        model, Init(T.copy(), T.copy(), T.copy(), vectors), params, t_max=5.0, dt=0.01, method="rk4"
    )
    assert np.abs(traj.Q - T).max() < 1e-12
    assert np.abs(traj.R - T).max() < 1e-12
    assert np.abs(traj.eps_g).max() < 1e-12
    if model == "two_layer":
        assert np.abs(traj.v - vectors["vs"]).max() < 1e-12


def test_teacher_equal_start_moves_with_noise():
    """The same start is not fixed with label noise (the fixed-point test can fail)."""
    traj = runtime.flow("scm", Init(np.eye(2), np.eye(2), np.eye(2)), {"sigma": 0.3}, t_max=1.0, dt=0.01)
    assert np.abs(traj.Q[-1] - np.eye(2)).max() > 1e-3
    assert traj.eps_g[-1] > 1e-4


# --- divergence -----------------------------------------------------------------

DIVERGING = [
    # linear activation: the eta^2 term makes Q grow like exp(eta^2 alpha), overflow well before alpha = 2
    ("scm", {"eta": 100.0}, "linear", "euler"),
    ("two_layer", {"eta": 100.0, "eta_v": 1.0}, "linear", "rk4"),
    # erf, readout rate far beyond Euler's stability (eta_v dt = 3 > 2): v oscillates with growing
    # amplitude and overflows. (scm with erf stays bounded at any rate: its integrals are bounded, and
    # since dQ is computed as an exactly symmetric matrix the Euler step no longer leaves the
    # positive-definite region, which is what made eta = 300 produce NaNs before.)
    ("two_layer", {"eta": 30.0, "eta_v": 300.0}, "erf", "euler"),
]


@pytest.mark.parametrize("model,params,activation,method", DIVERGING)
def test_diverging_flow_raises_with_alpha(model, params, activation, method):
    init = Init(np.array([[0.5, 0.1], [0.1, 0.4]]), np.array([[0.3, 0.05], [-0.1, 0.2]]), np.eye(2))
    kw = {"t_max": 2.0, "dt": 0.01, "activation": activation, "method": method}
    with pytest.raises(FlowDiverged) as info:
        runtime.flow(model, init, params, record_every=0.5, **kw)
    exc = info.value
    assert isinstance(exc, RuntimeError)
    assert "alpha" in str(exc)
    assert 0 < exc.alpha <= 2.0
    steps = round(exc.alpha / 0.01)
    assert abs(steps * 0.01 - exc.alpha) < 1e-9, "alpha is not at a step"
    assert f"{exc.alpha:.6g}" in str(exc)
    # the records before it, marked partial
    part = exc.trajectory
    assert part.metadata["complete"] is False and part.metadata["stopped"] == "diverged"
    assert part.alpha[-1] == part.metadata["alpha_reached"] < exc.alpha
    assert exc.alpha - part.alpha[-1] <= 0.5 + 1e-12 and np.all(np.isfinite(part.Q))
    # alpha is the first step with a non-finite state, whatever the recording interval or chunking
    with pytest.raises(FlowDiverged) as again:
        runtime.flow(model, init, params, progress=True, record_every=0.01, **kw)
    assert again.value.alpha == pytest.approx(exc.alpha, abs=1e-12)
    if steps > 1:
        ok = runtime.flow(model, init, params, **{**kw, "t_max": (steps - 1) * 0.01})
        assert np.all(np.isfinite(ok.Q[-1]))


# --- determinism and the scm / two_layer identity ----------------------------------


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_same_inputs_give_bit_identical_outputs(method):
    runs = [runtime.flow("two_layer", start(), PARAMS, t_max=1.0, dt=0.01, method=method) for _ in range(2)]
    for k in runs[0].arrays:
        assert np.array_equal(runs[0].arrays[k], runs[1].arrays[k]), k


@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("sigma", [0.0, 0.4])
def test_scm_is_two_layer_with_unit_readouts(method, sigma):
    init = start(3, 3, seed=2)
    scm = runtime.flow(
        "scm", Init(init.Q, init.R, init.T), {"eta": 1.2, "sigma": sigma}, t_max=3.0, dt=0.01, method=method
    )
    ones = {"v": np.ones(3), "vs": np.ones(3)}
    two = runtime.flow(
        "two_layer",
        Init(init.Q, init.R, init.T, ones),
        {"eta": 1.2, "sigma": sigma, "eta_v": 0.0, "kappa": 0.0},
        t_max=3.0,
        dt=0.01,
        method=method,
    )
    assert np.abs(scm.Q[-1] - scm.Q[0]).max() > 0.05  # a real trajectory
    for k in ("alpha", "Q", "R", "eps_g"):
        assert np.abs(getattr(scm, k) - getattr(two, k)).max() < 1e-12, k
    assert np.array_equal(two.v, np.ones_like(two.v))


@pytest.mark.parametrize(
    "model, params, method",
    [
        ("two_layer", PARAMS, "euler"),
        ("anil", {"order": 2, "S": 2}, "rk4"),
        ("anil", {}, "euler"),
    ],
)
def test_threaded_rhs_gives_the_same_bits(model, params, method):
    """rhs_parallel computes each element of dQ with the code of rhs, so the
    trajectories agree to the last bit, threads or not."""
    if model == "two_layer":
        init = start(K=4, M=3)
    else:
        init = runtime.sampled_init(model, 3, 2, 500, seed=1)
    kw = {"t_max": 0.5, "dt": 0.05, "method": method}
    serial = runtime.flow(model, init, params, parallel=False, **kw)
    threaded = runtime.flow(model, init, params, parallel=True, **kw)
    for name in ("Q", "R"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(threaded, name))
    assert np.abs(serial.Q[-1] - serial.Q[0]).max() > 1e-6  # the flow moved


def test_threaded_rhs_with_several_pairs_per_chunk():
    """K = 12: 78 pairs in 64 chunks, so some chunks run two pairs in turn with one
    set of buffers; two threads share them (a race on the buffers shows here)."""
    import numba

    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: the threads cannot race")
    rng = np.random.default_rng(5)
    K, M = 12, 2
    R = rng.uniform(-0.3, 0.3, (K, M))
    A = 0.3 * rng.normal(size=(K, K))
    vectors = {"v": rng.uniform(0.3, 1, K), "vs": np.ones(M)}
    init = Init(R @ R.T + A @ A.T + 0.3 * np.eye(K), R, np.eye(M), vectors)
    kw = {"t_max": 0.2, "dt": 0.05}
    serial = runtime.flow("two_layer", init, PARAMS, parallel=False, **kw)
    threaded = runtime.flow("two_layer", init, PARAMS, parallel=True, **kw)
    np.testing.assert_array_equal(serial.Q, threaded.Q)
    np.testing.assert_array_equal(serial.R, threaded.R)


def test_automatic_choice_estimates_without_touching_the_state(monkeypatch):
    import numba

    from runtime import integrate, load

    kernel = load("two_layer")
    K, M = 3, 2
    init = start(K, M).validate(kernel.model)
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(kernel.model.resolve_params(PARAMS))
    y0, c0, p0 = y.copy(), c.copy(), p.copy()
    seconds = integrate._serial_estimate(kernel.module.run_euler, y, c, p, K, M, 0.05, 10**6)()
    assert 0 < seconds < 1e3
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(c, c0)
    np.testing.assert_array_equal(p, p0)
    # the automatic choice takes the threaded loop for a long run, with the same result
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    monkeypatch.setattr(integrate, "PARALLEL_FROM_K", 1)
    taken = []
    real = integrate.use_parallel
    # as if the threaded loops were not compiled yet: the estimate decides
    monkeypatch.setattr(integrate, "use_parallel", lambda *a: taken.append(real(*a[:3])) or taken[-1])
    monkeypatch.setattr(integrate, "PARALLEL_MIN_SECONDS", 0.0)
    auto = runtime.flow("two_layer", start(K, M), PARAMS, t_max=0.2, dt=0.05)
    monkeypatch.setattr(integrate, "PARALLEL_MIN_SECONDS", 1e9)
    auto_serial = runtime.flow("two_layer", start(K, M), PARAMS, t_max=0.2, dt=0.05)
    assert taken == [True, False]
    np.testing.assert_array_equal(auto.Q, auto_serial.Q)


def test_parallel_choice(monkeypatch):
    import numba

    from runtime.integrate import PARALLEL_FROM_K, PARALLEL_MIN_SECONDS, use_parallel

    assert use_parallel(True, 2) and not use_parallel(False, 64)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    assert not use_parallel(None, PARALLEL_FROM_K - 1, lambda: 1e9)
    assert use_parallel(None, PARALLEL_FROM_K, lambda: 2 * PARALLEL_MIN_SECONDS)
    assert not use_parallel(None, PARALLEL_FROM_K, lambda: 0.5 * PARALLEL_MIN_SECONDS)
    # once compiled (cached), the threaded loops are taken from PARALLEL_FROM_K whatever the
    # length, when a few timed steps find them faster
    assert use_parallel(None, PARALLEL_FROM_K, lambda: 0.0, compiled=True)
    assert use_parallel(None, PARALLEL_FROM_K, lambda: 0.0, True, lambda: True)
    assert not use_parallel(None, PARALLEL_FROM_K, lambda: 1e9, True, lambda: False)
    assert not use_parallel(None, PARALLEL_FROM_K - 1, lambda: 1e9, compiled=True)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)
    assert not use_parallel(None, 64, lambda: 1e9)
    with pytest.raises(ValueError, match="parallel must be"):
        use_parallel("yes", 4)
