"""Acceptance suite for online-SGD model files outside the registry (tests/acceptance/).

Each file in tests/acceptance/ defines ``MODEL = Model(...)`` and its test
settings (``ACTIVATION``, ``K``, ``M``, ``PARAMS``, ``WRONG``: parameters of a flow
that lacks the feature under test); adding an architecture to the suite is adding
one such file. Its kernel is rendered into pytest's temporary folder and loaded
from there (``derive.regenerate.write_module``, ``runtime.kernels.load_path``), and
checked twice:

1. the generated right-hand side and metrics against a Monte Carlo estimate of
   the expected change that the update rules define (docs/conventions.md section 1,
   docs/models/two_layer.md, the docstrings of ``FirstLayer`` and ``ReadoutUpdate``),
   at random order parameters.
   Per sample, with ``G_k = dL/dlambda_k``:
   ``N dR_kn = -rate G_k nu_n - decay R_kn``,
   ``N dQ_kl = -rate (G_k lambda_l + G_l lambda_k) + rate^2 G_k G_l - 2 decay Q_kl``,
   ``N dc_k = -rate dL/dc_k - decay c_k``; the derivatives are sympy's, of the
   model's own loss with the activation written out, turned into numpy by
   ``lambdify`` (neither the kernel nor the Gaussian engine enters the reference);
2. the flow against the finite-N simulation of the same loaded kernel, as in
   tests/test_flow_vs_simulation.py (mean over seeds within 3 s.e.m. plus
   ``C_FINITE_N / sqrt(N)``).

Each check is also run on a wrong flow (perturbed rates, or the ``WRONG``
parameters) and must reject it, so that a pass means something.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import runtime
from derive import symbols
from derive.regenerate import write_module
from runtime import Init
from runtime.kernels import load_path

FILES = sorted((Path(__file__).resolve().parent / "acceptance").glob("*.py"))
NAMES = [p.stem for p in FILES]

# Monte Carlo: samples per state, random states per model, the bound on |z|
SAMPLES = 400_000
STATES = 3
Z_MAX = 5.0
# flow against simulation, as in tests/test_flow_vs_simulation.py. With 32 seeds,
# over 10 seed offsets, the simulated flows used at most 0.68 of the band and
# the WRONG flows left it by 3.2-6.4 times (16 seeds: the flow without noise of
# linear_teacher at sigma = 0.3 stayed inside at 3 offsets of 10)
N = 500
SEEDS = 32
T_MAX = 1.5
RECORD = 0.1
C_FINITE_N = 0.1

# the activations written out here, independently of derive/activations.py
_z = sp.Symbol("z", real=True)
ACTIVATIONS = {"erf": sp.erf(_z / sp.sqrt(2)), "linear": _z}


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"acceptance_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_built: dict = {}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(name)``: (settings module, kernel rendered into a temporary folder)."""

    def get(name):
        if name not in _built:
            path = FILES[NAMES.index(name)]
            mod = _load_file(path)
            folder = tmp_path_factory.mktemp(f"kernel_{name}")
            out = write_module(mod.MODEL, mod.ACTIVATION, folder, model_file=path)
            _built[name] = (mod, load_path(out, mod.MODEL, mod.ACTIVATION))
        return _built[name]

    return get


# --------------------------------------------------------------------------- reference


def unroll(expr, K: int, M: int) -> sp.Expr:
    """Every sum over units written out term by term, at given K and M."""
    sizes = {symbols.K: K, symbols.M: M}

    def walk(e):
        if isinstance(e, sp.Sum):
            out = walk(e.function)
            for idx, lo, hi in e.limits:
                n = int(hi.subs(sizes)) + 1
                assert lo == 0
                out = sp.Add(*[out.xreplace({idx: sp.Integer(i)}) for i in range(n)])
            return out
        if e.args:
            return e.func(*[walk(a) for a in e.args])
        return e

    return walk(sp.sympify(expr)).subs(sizes)


class SampleRule:
    """Per-sample loss derivatives of a model at given K, M, as numpy functions of
    (lambda (S, K), nu (S, M), zeta (S,), vectors, params)."""

    def __init__(self, model, activation: str, K: int, M: int):
        self.model, self.K, self.M = model, K, M
        L = model.loss(model.student_output, model.teacher_output + model.noise * symbols.zeta)
        L = unroll(L, K, M)
        L = L.replace(symbols.g, sp.Lambda(_z, ACTIVATIONS[activation]))
        lam = [sp.Symbol(f"lam{k}", real=True) for k in range(K)]
        nu = [sp.Symbol(f"nu{n}", real=True) for n in range(M)]
        vec = {
            v.name: [sp.Symbol(f"{v.name}{i}", real=True) for i in range(K if v.over == "student" else M)]
            for v in model.vectors
        }
        names = {symbols.lam: lam, symbols.nu: nu, **{sp.IndexedBase(n): s for n, s in vec.items()}}
        sub = {}
        for x in L.atoms(sp.Indexed):
            sub[x] = names[x.base][int(x.indices[0])]
        L = L.xreplace(sub)
        self.vec_names = [v.name for v in model.vectors]
        self.args = lam + nu + [symbols.zeta] + [s for n in self.vec_names for s in vec[n]]
        self.args += [p.symbol for p in model.params]
        self.G = [self._fn(sp.diff(L, x)) for x in lam]
        self.H = {}
        for rule in model.readout_updates:
            assert rule.gradient is None, "the reference differentiates the loss itself"
            self.H[rule.vector.name] = [self._fn(sp.diff(L, x)) for x in vec[rule.vector.name]]
        self.metrics = {}
        for name, integrand in model.metrics.items():
            e = unroll(integrand, K, M)
            e = e.replace(symbols.g, sp.Lambda(_z, ACTIVATIONS[activation]))
            e = e.xreplace({x: names[x.base][int(x.indices[0])] for x in e.atoms(sp.Indexed)})
            self.metrics[name] = self._fn(e)

    def _fn(self, expr):
        f = sp.lambdify(self.args, expr, modules=["scipy", "numpy"])

        def call(cols):
            out = np.asarray(f(*cols), dtype=np.float64)
            return np.broadcast_to(out, cols[0].shape)

        return call

    def columns(self, lam, nu, zeta, vectors, params):
        cols = [lam[:, k] for k in range(self.K)] + [nu[:, n] for n in range(self.M)] + [zeta]
        cols += [x for n in self.vec_names for x in np.asarray(vectors[n], dtype=float)]
        return cols + [params[p.name] for p in self.model.params]

    def grads(self, cols):
        G = np.stack([f(cols) for f in self.G], axis=-1)
        H = {name: np.stack([f(cols) for f in fs], axis=-1) for name, fs in self.H.items()}
        return G, H


def increments(rule: SampleRule, state, params, rng, n):
    """Per-sample increments N dX of every state array, and metric integrands, over n samples."""
    model, K, M = rule.model, rule.K, rule.M
    Q, R, T, vectors = state
    fl = model.first_layer
    assert fl.meta is None and fl.batch == 1, "the reference covers plain online SGD"
    C = np.block([[Q, R], [R.T, T]])
    u = rng.standard_normal((n, K + M)) @ np.linalg.cholesky(C).T
    lam, nu = u[:, :K], u[:, K:]
    zeta = rng.standard_normal(n)
    cols = rule.columns(lam, nu, zeta, vectors, params)
    G, H = rule.grads(cols)
    r, d = model.numeric(fl.rate, params), model.numeric(fl.decay, params)
    out = {
        "Q": -r * (G[:, :, None] * lam[:, None, :] + G[:, None, :] * lam[:, :, None])
        + r**2 * G[:, :, None] * G[:, None, :]
        - 2 * d * Q,
        "R": -r * G[:, :, None] * nu[:, None, :] - d * R,
    }
    for ru in model.readout_updates:
        name = ru.vector.name
        rate, decay = model.numeric(ru.rate, params), model.numeric(ru.decay, params)
        out[name] = -rate * H[name] - decay * vectors[name]
    for v in model.state_vectors:  # a readout without an update rule stays put
        out.setdefault(v.name, np.zeros((n, K)))
    metrics = {name: f(cols) for name, f in rule.metrics.items()}
    return out, metrics


def random_state(rng, model, K, M):
    n = K + M
    A = rng.normal(size=(n, n)) * rng.uniform(0.4, 1.5, size=(n, 1))
    C = A @ A.T / n + 0.05 * np.eye(n)
    vectors = {v.name: rng.uniform(-1.2, 1.2, K if v.over == "student" else M) for v in model.vectors}
    return C[:K, :K].copy(), C[:K, K:].copy(), C[K:, K:].copy(), vectors


def kernel_rhs(kernel, state, params, K, M):
    Q, R, T, vectors = state
    arrays = {"Q": Q, "R": R, "T": T, **vectors}
    y = kernel.pack_state(arrays, K, M)
    c = kernel.pack_consts(arrays, K, M)
    p = kernel.param_vector(params)
    dy = np.full_like(y, np.nan)
    kernel.module.rhs(y, c, p, K, M, dy)
    mets = kernel.metrics(y, c, p, K, M)
    return kernel.unpack_state(dy, K, M), dict(zip(kernel.metric_names, mets))


def monte_carlo(rule, state, params, seed, n=SAMPLES):
    """name -> (mean, standard error) of every per-sample increment and metric integrand."""
    inc, mets = increments(rule, state, params, np.random.default_rng(seed), n)
    return {
        name: (x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(n))
        for name, x in list(inc.items()) + list(mets.items())
    }


def z_scores(mc, kernel, state, params, K, M):
    """|kernel - MC mean| / MC standard error, per output array."""
    got, got_m = kernel_rhs(kernel, state, params, K, M)
    out = {}
    for name, (want, se) in mc.items():
        have = got[name] if name in got else got_m[name]
        assert np.all(np.isfinite(have)), f"{name}: kernel gives {have}"
        # deterministic entries (a decay only, a frozen readout) have no scatter
        out[name] = np.abs(have - want) / np.maximum(se, 1e-9 * max(1.0, np.abs(want).max()))
    return out


def random_params(rng, model):
    return {p.name: float(rng.uniform(0.1, 1.0)) for p in model.params}


@pytest.mark.parametrize("name", NAMES)
def test_rhs_matches_monte_carlo_of_the_update_rules(name, build):
    mod, kernel = build(name)
    model, K, M = mod.MODEL, mod.K, mod.M
    rule = SampleRule(model, mod.ACTIVATION, K, M)
    rng = np.random.default_rng(2024)
    worst, worst_wrong = 0.0, np.inf
    for i in range(STATES):
        state = random_state(rng, model, K, M)
        params = random_params(rng, model)
        mc = monte_carlo(rule, state, params, seed=77 + i)
        z = z_scores(mc, kernel, state, params, K, M)
        report = ", ".join(f"{k} {float(a.max()):.2f}" for k, a in z.items())
        print(f"{name}, state {i}: max |z| {report}")
        assert all(a.max() < Z_MAX for a in z.values()), f"{name}, state {i}: max |z| {report}"
        worst = max(worst, max(float(a.max()) for a in z.values()))
        # the same comparison rejects the kernel at a first parameter 20 % off
        first = model.params[0].name
        wrong = params | {first: 1.2 * params[first]}
        zw = z_scores(mc, kernel, state, wrong, K, M)
        worst_wrong = min(worst_wrong, max(float(a.max()) for a in zw.values()))
    print(f"{name}: max |z| {worst:.2f} over {STATES} states; {first} 20 % off: max |z| >= {worst_wrong:.1f}")
    assert worst_wrong > 2 * Z_MAX


def test_sample_gradients_match_the_loss_derivatives(build):
    """The kernel's per-sample gradients (what the simulator applies) equal sympy's."""
    for name in NAMES:
        mod, kernel = build(name)
        model, K, M = mod.MODEL, mod.K, mod.M
        rule = SampleRule(model, mod.ACTIVATION, K, M)
        rng = np.random.default_rng(5)
        state = random_state(rng, model, K, M)
        params = random_params(rng, model)
        lam, nu, zeta = rng.normal(size=(1, K)), rng.normal(size=(1, M)), rng.normal(size=1)
        G, H = rule.grads(rule.columns(lam, nu, zeta, state[3], params))
        vec = np.concatenate([state[3][v.name] for v in model.state_vectors + model.const_vectors])
        out = np.full(K * (1 + len(model.readout_updates)), np.nan)
        kernel.module.sample_gradients(lam[0], nu[0], zeta[0], vec, kernel.param_vector(params), K, M, out)
        want = np.concatenate([G[0]] + [H[r.vector.name][0] for r in model.readout_updates])
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------- simulation


def start(model, K, M, seed):
    """Explicit overlaps away from the symmetric plateau, readouts of order one."""
    rng = np.random.default_rng(seed)
    R = 0.4 * rng.uniform(-1, 1, (K, M))
    A = 0.4 * rng.normal(size=(K, K))
    Q = R @ R.T + A @ A.T + 0.2 * np.eye(K)
    vectors = {v.name: rng.uniform(0.5, 1.2, K if v.over == "student" else M) for v in model.vectors}
    return Init(Q, R, np.eye(M), vectors)


_runs: dict = {}


def run_case(name, build):
    """(settings, kernel, init, flow, simulation) of a model file, once per session."""
    if name not in _runs:
        mod, kernel = build(name)
        init = start(mod.MODEL, mod.K, mod.M, seed=1)
        fl = runtime.flow(kernel, init, mod.PARAMS, t_max=T_MAX, dt=0.01, method="rk4", record_every=RECORD)
        sim = runtime.simulate(
            kernel, mod.PARAMS, N=N, seeds=SEEDS, t_max=T_MAX, init=init, record_every=RECORD, seed=1000
        )
        _runs[name] = (mod, kernel, init, fl, sim)
    return _runs[name]


def violations(fl, sim, keys):
    """Entries where the flow leaves the band 3 sem + C_FINITE_N / sqrt(N) around the mean."""
    bad = {}
    for key in keys:
        dev = np.abs(sim.arrays[f"{key}_mean"] - fl.arrays[key])
        band = 3 * sim.arrays[f"{key}_sem"] + C_FINITE_N / np.sqrt(N)
        if np.any(dev > band):
            i = np.unravel_index(np.argmax(dev - band), dev.shape)
            bad[key] = f"worst at alpha = {fl.alpha[i[0]]:.2f}, entry {i[1:]}: |{dev[i]:.4f}| > {band[i]:.4f}"
    return bad


def compared(kernel):
    return ["Q", "R", *[v.name for v in kernel.model.state_vectors], *kernel.metric_names]


@pytest.mark.parametrize("name", NAMES)
def test_flow_matches_simulation_mean(name, build):
    mod, kernel, init, fl, sim = run_case(name, build)
    np.testing.assert_allclose(sim.alpha, fl.alpha, rtol=0, atol=1e-12)
    assert np.abs(sim.Q[:, 0] - init.Q).max() < 1e-12
    # the dynamics move by much more than the tolerance, else the comparison is empty
    assert np.abs(fl.Q[-1] - fl.Q[0]).max() > 10 * C_FINITE_N / np.sqrt(N)
    bad = violations(fl, sim, compared(kernel))
    assert not bad, f"{name}: flow outside the simulation's band: {bad}"


@pytest.mark.parametrize("name", NAMES)
def test_criterion_rejects_a_flow_without_the_feature(name, build):
    mod, kernel, init, _, sim = run_case(name, build)
    other = runtime.flow(kernel, init, mod.WRONG, t_max=T_MAX, dt=0.01, method="rk4", record_every=RECORD)
    assert violations(other, sim, compared(kernel)), f"{name}: the criterion cannot tell {mod.WRONG} apart"


def test_simulation_of_a_loaded_kernel_in_worker_processes(build):
    """Forked seed workers run a kernel loaded from a file, with the results of one process."""
    mod, kernel = build(NAMES[0])
    init = start(mod.MODEL, mod.K, mod.M, seed=2)
    runs = [
        runtime.simulate(kernel, mod.PARAMS, N=100, seeds=2, t_max=0.2, init=init, seed=3, workers=w)
        for w in (1, 2)
    ]
    for key in compared(kernel):
        assert np.array_equal(runs[0].arrays[key], runs[1].arrays[key]), key


# --------------------------------------------------------------------------- the object path


def test_a_model_object_renders_as_its_registered_name():
    """``render_model`` on a registered model's object, given its file, gives the
    module of ``render`` to the byte (the inputs hash covers the same files)."""
    from derive.codegen import render, render_model
    from derive.flow import build_flow
    from derive.models import get_model

    spec = get_model("scm")
    assert build_flow(spec, "linear") is build_flow(spec, "linear")  # cached by identity
    assert render_model(spec, "linear", "derive/models/scm.py") == render("scm", "linear")
