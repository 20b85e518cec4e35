"""Acceptance of meta-learning architectures added by equations only.

Each model file of tests/acceptance_meta/ (not in the registry) changes what the
engine knew of anil in its own file only: a proximal inner loop (a regulariser
of the support loss), task readouts correlated across teacher units (another
task law). Each is derived and rendered into a temporary folder, and its
right-hand side and metrics (first order) are checked against a Monte Carlo
estimate of its own update rules' expected change at random order parameters,
computed here without the Gaussian engine, the task program or the kernel:

- the task law, the support loss, the update rules' integrands and the metrics
  are the model file's sympy expressions, turned into numpy by sympy.lambdify
  at concrete K and M;
- the population support gradient, ``A c + h0 + B v_task`` (linear in the readout
  and the task, as the support loss is quadratic), is averaged over a large
  sample of fields; the inner loop then runs on it task by task;
- the flows' integrands are averaged over sampled (task, query) pairs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from scipy.special import erf

import derive.codegen as codegen
from derive.simulator import concrete
from derive.activations import get_activation, z
from derive.model import Q as QB
from derive.model import R as RB
from derive.model import T as TB
from derive.symbols import K as KS
from derive.symbols import g, gp, gpp, lam, nu, nu_task, student_index, zeta

HERE = Path(__file__).resolve().parent
MODEL_FILES = sorted((HERE / "acceptance_meta").glob("*.py"))


def _load_model_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"acceptance_meta_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RENDERED: dict[str, object] = {}


def _kernel_module(model, folder: Path):
    """The model rendered into ``folder`` and imported (it is not in the registry);
    a rendering already imported by an earlier test is reused, with what numba
    compiled for it (the tests of one model file share its kernel)."""
    text = codegen.render_model(model, "erf", model_file=f"tests/acceptance_meta/{model.name}.py")
    if text in _RENDERED:
        return _RENDERED[text]
    path = folder / f"{model.name}_erf.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_accept_{model.name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _RENDERED[text] = module
    return module


# -- the model's expressions as numpy functions, at concrete K and M ---------------


def _concrete(expr, K, M, act):
    """Sums written out at K, M (derive/simulator.py); g, g', g'' replaced by the activation."""
    e = concrete(expr, K, M)
    return (
        e.replace(g, lambda x: act.expr.subs(z, x))
        .replace(gp, lambda x: act.d1.subs(z, x))
        .replace(gpp, lambda x: act.d2.subs(z, x))
    )


class Numeric:
    """The model's expressions as functions of arrays (last axis: samples)."""

    def __init__(self, model, K, M, params):
        self.model, self.K, self.M, self.params = model, K, M, params
        self.act = get_activation("erf")
        inner = model.inner_loop
        self.inner = inner
        sub = {p.symbol: params.get(p.name, p.default) for p in model.params}
        self.sub = sub
        self.c = sp.IndexedBase("c")
        self.xi = inner.noise.base
        tvs = {tv.name: tv for tv in model.task_vectors}
        self.v_task_name = next(tv.name for tv in model.task_vectors if tv.law is not None)
        self.v_task = tvs[self.v_task_name].base
        self.adapted = inner.adapted.base
        self.a = inner.start.base
        self.vbar = next(v.base for v in model.const_vectors)
        self.a_best = inner.optimal.base if inner.optimal is not None else sp.IndexedBase("a_best_")
        self.args = (
            lam,
            nu,
            nu_task,
            zeta,
            self.c,
            self.adapted,
            self.v_task,
            self.a,
            self.vbar,
            QB,
            RB,
            TB,
            self.a_best,
        )

    def fn(self, expr):
        e = _concrete(sp.sympify(expr).subs(self.sub), self.K, self.M, self.act)
        return sp.lambdify(self.args, e, modules=[{"erf": erf}, "numpy"])

    def law(self, xi, a, vbar):
        """The task readouts for draws xi (M, n)."""
        if not hasattr(self, "_law"):
            tv = next(tv for tv in self.model.task_vectors if tv.law is not None)
            self._law = [
                sp.lambdify(
                    (self.xi, self.vbar),
                    _concrete(sp.sympify(tv.law(sp.Integer(m))).subs(self.sub), self.K, self.M, self.act),
                    "numpy",
                )
                for m in range(self.M)
            ]
        return np.array([f(xi, vbar) * np.ones(xi.shape[1]) for f in self._law])

    def covariance(self, Q, R, T):
        """The covariance of (lam, nu, nu_task) from the model's blocks."""
        if not hasattr(self, "_cov"):
            K, M = self.K, self.M
            sizes = {lam: K, nu: M, nu_task: M}
            offs, o = {}, 0
            for f in self.model.fields:
                offs[f] = o
                o += sizes[f]
            entries = []
            for (f1, f2), entry in self.model.covariance.items():
                for i in range(sizes[f1]):
                    for j in range(sizes[f2]):
                        e = sp.sympify(entry(sp.Integer(i), sp.Integer(j))).subs(self.sub)
                        entries.append((offs[f1] + i, offs[f2] + j, sp.lambdify((QB, RB, TB), e, "numpy")))
            self._cov = (o, entries)
        n, entries = self._cov
        C = np.zeros((n, n))
        for i, j, f in entries:
            C[i, j] = C[j, i] = f(Q, R, T)
        return C


def monte_carlo_flow(model, Q, R, T, a, vbar, params, n_fields=400_000, n_pairs=400_000, seed=0):
    """Means and standard errors of the update rules' increments and of the metrics."""
    K, M = R.shape
    num = Numeric(model, K, M, params)
    rng = np.random.default_rng(seed)
    C = num.covariance(Q, R, T)
    w, V = np.linalg.eigh(C)  # C is singular when nu_task = nu (eps_B = 0): a square root, not Cholesky
    Lc = V * np.sqrt(np.clip(w, 0.0, None))

    def fields(n):
        u = Lc @ rng.standard_normal((C.shape[0], n))
        return u[:K], u[K : K + M], u[K + M :], rng.standard_normal(n)

    # the population support gradient A c + h0 + B v_task, averaged over the fields
    inner = model.inner_loop
    c = num.c
    lf, nf, ntf, zf = fields(n_fields)

    def linear_gradient(sl):
        A, h0, B = np.zeros((K, K)), np.zeros(K), np.zeros((K, M))
        zc, zv = np.zeros(K), np.zeros(M)
        for kk in range(K):
            gk = sp.diff(_concrete(sl, K, M, num.act), c[kk])
            for ll in range(K):
                f = num.fn(sp.diff(gk, c[ll]))
                A[kk, ll] = np.mean(f(lf, nf, ntf, zf, zc, zc, zv, a, vbar, Q, R, T, zc) * np.ones(n_fields))
            f = num.fn(gk)
            h0[kk] = np.mean(f(lf, nf, ntf, zf, zc, zc, zv, a, vbar, Q, R, T, zc) * np.ones(n_fields))
            for m in range(M):
                e = np.eye(M)[m]
                B[kk, m] = (
                    np.mean(f(lf, nf, ntf, zf, zc, zc, e, a, vbar, Q, R, T, zc) * np.ones(n_fields)) - h0[kk]
                )
        return A, h0, B

    A, h0, B = linear_gradient(inner.loss(c) + inner.regulariser(c))
    # the best readout minimises the support loss without the regulariser
    A0, h00, B0 = linear_gradient(inner.loss(c))

    # tasks, the inner loop on each, and one query sample per task
    steps, rate = int(params["S"]), float(sp.sympify(inner.rate).subs(num.sub))
    xi = rng.standard_normal((M, n_pairs))
    v_task = num.law(xi, a, vbar)
    adapted = np.repeat(a[:, None], n_pairs, axis=1).astype(float)
    for _ in range(steps):
        adapted = adapted - rate * (A @ adapted + h0[:, None] + B @ v_task)
    a_best = -np.linalg.pinv(A0) @ (h00[:, None] + B0 @ v_task)
    lq, nq, ntq, zq = fields(n_pairs)
    zc = np.zeros((K, n_pairs))
    out = {}
    loss = model.sample_loss if hasattr(model, "sample_loss") else model.loss
    for rule in (model.first_layer, *model.readout_updates):
        for name, (free, integrand, deterministic) in rule.flows(loss).items():
            shape = tuple(K if str(i.label) in ("k", "l") else M for i in free)
            mean, sem = np.zeros(shape), np.zeros(shape)
            for idx in np.ndindex(shape):
                at = dict(zip(free, [sp.Integer(i) for i in idx]))
                f = num.fn(sp.sympify(integrand).xreplace(at))
                d = num.fn(sp.sympify(deterministic).xreplace(at))
                x = f(lq, nq, ntq, zq, zc, adapted, v_task, a, vbar, Q, R, T, a_best) * np.ones(n_pairs)
                mean[idx] = x.mean() + float(
                    np.mean(d(lq, nq, ntq, zq, zc, adapted, v_task, a, vbar, Q, R, T, a_best))
                )
                sem[idx] = x.std() / math.sqrt(n_pairs)
            out[name] = (mean, sem)
    for name, integrand in model.metrics.items():
        x = num.fn(integrand)(lq, nq, ntq, zq, zc, adapted, v_task, a, vbar, Q, R, T, a_best) * np.ones(
            n_pairs
        )
        out[name] = (np.array(x.mean()), np.array(x.std() / math.sqrt(n_pairs)))
    return out, (A, h0, B)


def random_point(rng, K, M):
    n = K + M
    X = rng.normal(size=(n, n)) * rng.uniform(0.4, 1.2, size=(n, 1))
    Cm = X @ X.T / n + 0.05 * np.eye(n)
    return Cm[:K, :K], Cm[:K, K:], Cm[K:, K:], 0.4 * rng.normal(size=K), 0.5 * rng.normal(size=M)


def kernel_flow(module, Q, R, T, a, vbar, params, model):
    K, M = R.shape
    arrays = {"Q": Q, "R": R, "a": a, "T": T, "vbar": vbar}
    y = np.concatenate([np.ravel(arrays[n]) for n, _ in module.STATE])
    cst = np.concatenate([np.ravel(arrays[n]) for n, _ in module.CONSTS])
    values = model.resolve_params(params)
    p = np.array([values[n] for n in module.PARAMS])
    dy = np.full_like(y, np.nan)
    module.rhs(y, cst, p, K, M, dy)
    met = np.full(len(module.METRICS), np.nan)
    module.metrics(y, cst, p, K, M, met)
    out = {
        "Q": dy[: K * K].reshape(K, K),
        "R": dy[K * K : K * K + K * M].reshape(K, M),
        "a": dy[K * K + K * M :],
    }
    out.update({name: met[i] for i, name in enumerate(module.METRICS)})
    return out


def _check(got, mc, tol_z=5.0, rel=3e-3):
    bad = []
    for name, (mean, sem) in mc.items():
        g_ = np.asarray(got[name])
        scale = max(1e-2, float(np.max(np.abs(mean))))
        ok = np.abs(g_ - mean) <= tol_z * sem + rel * scale
        if not np.all(ok):
            bad.append(f"{name}: kernel {g_} vs MC {mean} +- {sem}")
    return bad


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_meta_model_rhs_matches_monte_carlo_of_its_update_rules(path, tmp_path):
    spec = _load_model_file(path)
    model, params = spec.MODEL, spec.PARAMS
    module = _kernel_module(model, tmp_path)
    rng = np.random.default_rng(11)
    for K, M in ((2, 2), (3, 2)):
        Q, R, T, a, vbar = random_point(rng, K, M)
        got = kernel_flow(module, Q, R, T, a, vbar, params, model)
        mc, _ = monte_carlo_flow(model, Q, R, T, a, vbar, params, seed=K)
        bad = _check(got, mc)
        assert not bad, f"{model.name} K,M={K},{M}:\n" + "\n".join(bad)
        # the check can fail: a flow with the task spread off by 10 % is told apart
        wrong = kernel_flow(module, Q, R, T, a, vbar, {**params, "s": 1.1 * params["s"]}, model)
        assert _check(wrong, mc), f"{model.name}: a 10 % wrong task spread passed the check"


def _second_order(model, support):
    """``model`` with the gradient through its inner loop switched on (the start's
    update ``(da'/da)^T dL/da'``) and ``support`` samples per task."""
    import dataclasses

    inner = dataclasses.replace(model.inner_loop, support=sp.sympify(support), second_order=sp.S.One)
    meta = dataclasses.replace(model.first_layer.meta, inner=inner, weight=sp.S.One)
    jj = student_index("jj")
    rule = dataclasses.replace(
        model.readout_updates[0],
        gradient=lambda loss, k: sp.Sum(
            inner.da.base[jj, k] * sp.diff(loss, inner.adapted.base[jj]), (jj, 0, KS - 1)
        ),
    )
    return dataclasses.replace(
        model,
        inner_loop=inner,
        first_layer=dataclasses.replace(model.first_layer, meta=meta),
        readout_updates=(rule,),
    )


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_meta_model_flow_matches_its_simulation(path, order, tmp_path):
    """The flow of the rendered kernel against the mean of the model's algorithm
    on real vectors (N = 400, 12 seeds, alpha up to 1) from explicit overlaps; at
    order 2 the model with the gradient through its inner loop switched on (its
    sensitivities derived with its own regulariser and task law)."""
    from runtime import Init, flow, simulate
    from runtime.kernels import Kernel

    spec = _load_model_file(path)
    model, params = spec.MODEL, spec.PARAMS
    if order == 2:
        model = _second_order(model, math.inf)
    module = _kernel_module(model, tmp_path)
    M = 2
    Q0 = np.array([[0.5, 0.1], [0.1, 0.4]])
    R0 = np.array([[0.3, 0.05], [0.02, 0.25]])
    a0, vbar = np.array([0.3, -0.2]), np.array([0.4, 0.2])
    N, seeds, t_max = 400, 12, 1.0
    kern = Kernel(module, model, "erf")
    init = Init(Q0, R0, np.eye(M), {"a": a0, "vbar": vbar})
    # the runtime's simulator: the model is not of the compiled loop's form, so each
    # step is the numpy reference reading this model file (runtime/simulate_meta.py)
    assert not hasattr(module, "meta_steps")
    sim = simulate(kern, params, N=N, seeds=seeds, t_max=t_max, init=init, record_every=0.25)
    runs = [(sim.arrays["Q"][s], sim.arrays["R"][s], sim.arrays["a"][s]) for s in range(seeds)]

    def worst(prm):
        fl = flow(kern, init, prm, t_max=t_max, dt=0.005, record_every=0.25)
        out = 0.0
        for j, name in enumerate(("Q", "R", "a")):
            sims = np.array([r[j] for r in runs])
            mean, sem = sims.mean(0), sims.std(0, ddof=1) / math.sqrt(seeds)
            dev = np.abs(mean - fl.arrays[name]) / (3 * sem + 0.1 / math.sqrt(N) + 1e-12)
            out = max(out, float(dev.max()))
        return out

    right = worst(params)
    assert right < 1.0, f"{model.name}: flow and simulation differ by {right:.2f} of the allowance"
    # the check can fail: the flow without the model's own feature (WRONG) leaves the band
    wrong = worst({**params, **spec.WRONG})
    assert wrong > 1.0, f"{model.name}: the flow with {spec.WRONG} stayed within {wrong:.2f} of the band"


@pytest.mark.parametrize("support", [math.inf, 7], ids=["population", "n_s=7"])
@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_reference_simulator_gradients_are_the_derivatives_of_the_query_loss(path, support):
    """The runtime's reference simulator reads the model file: at second order its
    weight gradient (along the query inputs plus through the inner loop, into the
    realised covariance or the support fields) and the start's gradient are the
    derivatives of the model's query loss through its own inner loop (regulariser
    and task law included), by central differences."""
    from runtime.simulate_meta import MetaStep

    spec = _load_model_file(path)
    model = _second_order(spec.MODEL, support)
    step = MetaStep(model, "erf", model.resolve_params(spec.PARAMS))
    assert step.order == 2 and step.population == math.isinf(support)
    rng = np.random.default_rng(5)
    K, M, N = 3, 2, 40
    W, B = 0.8 * rng.standard_normal((K, N)), rng.standard_normal((M, N))
    a, vbar = 0.5 * rng.standard_normal(K), 0.4 * rng.standard_normal(M)
    task = step.draw_task(rng, B, {"vbar": vbar, "a": a})
    G, grad_W2, grad_a = step.gradients(W, a, task)
    grad_W = G.T @ task.Xq / (G.shape[0] * math.sqrt(N)) + grad_W2
    h = 1e-4

    def fd(f, X, D):
        return (8 * (f(X + h * D) - f(X - h * D)) - (f(X + 2 * h * D) - f(X - 2 * h * D))) / (12 * h)

    through = []
    for _ in range(3):
        D = rng.standard_normal(W.shape)
        D /= np.linalg.norm(D)
        num = fd(lambda X: step.query_loss(X, a, task), W, D)
        an = float(np.sum(grad_W * D))
        tol = 1e-6 * max(abs(num), 1e-3 * np.linalg.norm(grad_W))
        assert abs(num - an) <= tol, (num, an)
        through.append(abs(float(np.sum(grad_W2 * D))) / tol)
    assert max(through) > 1e3, through  # the part through the inner loop is visible
    for k in range(K):
        e = np.eye(K)[k]
        num = fd(lambda x: step.query_loss(W, x, task), a, e)
        assert abs(num - grad_a[k]) <= 1e-6 * max(abs(num), 1e-3 * np.linalg.norm(grad_a)), (k, num, grad_a)
