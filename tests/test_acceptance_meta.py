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
- the population support gradient, ``A c + h0 + B vt`` (linear in the readout
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
from derive.activations import get_activation, z
from derive.model import Q as QB
from derive.model import R as RB
from derive.model import T as TB
from derive.symbols import K as KS
from derive.symbols import M as MS
from derive.symbols import g, gp, gpp, lam, nu, nut, student_index, zeta

HERE = Path(__file__).resolve().parent
MODEL_FILES = sorted((HERE / "acceptance_meta").glob("*.py"))


def _load_model_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"acceptance_meta_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_module(model, folder: Path):
    """The model rendered into ``folder`` and imported (it is not in the registry)."""
    text = codegen.render_model(model, "erf", model_file=f"tests/acceptance_meta/{model.name}.py")
    path = folder / f"{model.name}_erf.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_accept_{model.name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the model's expressions as numpy functions, at concrete K and M ---------------


def _expand_sums(e):
    """Every Sum written out term by term (its limits are numbers by now)."""
    while True:
        sums = [x for x in sp.preorder_traversal(e) if isinstance(x, sp.Sum)]
        if not sums:
            return e
        s_ = sums[0]
        body = s_.function
        for idx, lo, hi in reversed(s_.limits):
            label = idx.label if isinstance(idx, sp.Idx) else idx

            def at(e_, i, label=label):
                # the index by its label: substituting K, M changes the range an Idx carries
                return e_.replace(
                    lambda x: isinstance(x, (sp.Idx, sp.Symbol)) and getattr(x, "label", x) == label,
                    lambda x: sp.Integer(i),
                )

            body = sp.Add(*[at(body, i) for i in range(int(lo), int(hi) + 1)])
        e = e.xreplace({s_: body})


def _concrete(expr, K, M, act):
    """Sums written out at K, M; g, g', g'' replaced by the activation."""
    e = _expand_sums(sp.sympify(expr).subs({KS: K, MS: M}))
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
        self.vt_name = next(tv.name for tv in model.task_vectors if tv.law is not None)
        self.vt = tvs[self.vt_name].base
        self.ap = inner.adapted.base
        self.a = inner.start.base
        self.vbar = next(v.base for v in model.const_vectors)
        self.aopt = inner.optimal.base if inner.optimal is not None else sp.IndexedBase("aopt_")
        self.args = (lam, nu, nut, zeta, self.c, self.ap, self.vt, self.a, self.vbar, QB, RB, TB, self.aopt)

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
        """The covariance of (lam, nu, nut) from the model's blocks."""
        if not hasattr(self, "_cov"):
            K, M = self.K, self.M
            sizes = {lam: K, nu: M, nut: M}
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
    w, V = np.linalg.eigh(C)  # C is singular when nut = nu (eps_B = 0): a square root, not Cholesky
    Lc = V * np.sqrt(np.clip(w, 0.0, None))

    def fields(n):
        u = Lc @ rng.standard_normal((C.shape[0], n))
        return u[:K], u[K : K + M], u[K + M :], rng.standard_normal(n)

    # the population support gradient A c + h0 + B vt, averaged over the fields
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
    vt = num.law(xi, a, vbar)
    ap = np.repeat(a[:, None], n_pairs, axis=1).astype(float)
    for _ in range(steps):
        ap = ap - rate * (A @ ap + h0[:, None] + B @ vt)
    aopt = -np.linalg.pinv(A0) @ (h00[:, None] + B0 @ vt)
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
                x = f(lq, nq, ntq, zq, zc, ap, vt, a, vbar, Q, R, T, aopt) * np.ones(n_pairs)
                mean[idx] = x.mean() + float(np.mean(d(lq, nq, ntq, zq, zc, ap, vt, a, vbar, Q, R, T, aopt)))
                sem[idx] = x.std() / math.sqrt(n_pairs)
            out[name] = (mean, sem)
    for name, integrand in model.metrics.items():
        x = num.fn(integrand)(lq, nq, ntq, zq, zc, ap, vt, a, vbar, Q, R, T, aopt) * np.ones(n_pairs)
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


# -- flow against a finite-N simulation of the model's own algorithm -----------------


class ComponentValue:
    """A component of the task program (H_s, mu_h: the population support gradient)
    evaluated at numbers: each term's coefficient and primitive turned into numpy by
    sympy at concrete indices. The primitives are the engine's closed forms
    (derive/gaussian.py), the population expectations that define the inner loop;
    nothing of the code generator or the kernel is used."""

    def __init__(self, component, model, K, M, params, rows, arrays):
        import itertools

        from derive.gaussian import PRIMITIVES, expectation, name_of

        def size(i):
            return K if str(i.upper) == str(KS - 1) else M

        self.shape = tuple(size(i) for i in component.free)
        sub = {p.symbol: params.get(p.name, p.default) for p in model.params}
        bases = [sp.IndexedBase(n) for n in arrays]
        self.parts = []
        for idx in np.ndindex(self.shape):
            at = {f: sp.Integer(i) for f, i in zip(component.free, idx)}
            for t in component.terms:
                for vals in itertools.product(*[range(size(s)) for s in t.sums]):
                    where = {**at, **{s: sp.Integer(v) for s, v in zip(t.sums, vals)}}
                    coeff = sp.lambdify(bases, sp.sympify(t.coeff).xreplace(where).subs(sub), "numpy")
                    prim = None
                    if t.primitive is not None:
                        kinds = PRIMITIVES.get(t.primitive) or tuple(
                            t.primitive.removeprefix("E_").split("_")
                        )
                        d = expectation(kinds, "erf", name_of(kinds))
                        fields = [rows[a.xreplace(where)] for a in t.args]
                        syms = sorted(d.expr.free_symbols, key=str)
                        slots = []
                        for s_ in syms:  # C_xy -> the rows of the fields in positions x, y
                            x, y = str(s_)[2], str(s_)[3]
                            slots.append((fields[d.labels.index(x)], fields[d.labels.index(y)]))
                        prim = (sp.lambdify(syms, d.expr, "numpy"), slots)
                    self.parts.append((idx, coeff, prim))

    def __call__(self, C, values):
        out = np.zeros(self.shape)
        for idx, coeff, prim in self.parts:
            c = float(coeff(*values))
            if prim is not None:
                fn, slots = prim
                c *= float(fn(*[C[r] for r in slots]))
            out[idx] += c
        return out


def simulate_meta_reference(model, params, Q0, R0, a0, vbar, N, steps, seed, record):
    """The model's algorithm at first order on real vectors (docs/models/anil.md, population
    inner loop): draw a task from the law, adapt c from a by the population support
    gradient at the current overlaps, one query sample, then the model's update
    rules (FirstLayer.step, ReadoutUpdate.step) with the query gradients of its loss."""
    from derive import meta
    from derive.flow import build_flow
    from runtime.init import Init, realise

    K, M = R0.shape
    rng = np.random.default_rng(seed)
    W, B = realise(Init(Q0, R0, np.eye(M), {}), N, rng)
    a = a0.astype(float).copy()
    num = Numeric(model, K, M, params)
    ir = build_flow(model, "erf")
    comps = {st.out: st.component for st in ir.program.statements if isinstance(st, meta.Assign)}
    rows = {}
    for f, at, n in model.layout:
        o = int(sp.sympify(at).subs({KS: K, MS: M}))
        for i in range(int(sp.sympify(n).subs({KS: K, MS: M}))):
            rows[f[sp.Integer(i)]] = o + i
    tv = next(t for t in model.task_vectors if t.law is not None)
    names = [f"mu_{tv.name}", model.inner_loop.start.name, *[v.name for v in model.const_vectors]]
    H_s = ComponentValue(comps["H_s"], model, K, M, params, rows, names)
    # the support force h = h0 + J vt at the task's own readouts (h is affine in them)
    h0 = ComponentValue(comps["mu_h0"], model, K, M, params, rows, names)
    J = ComponentValue(comps[f"H_{tv.name}"], model, K, M, params, rows, names)
    inner = model.inner_loop
    rate = float(sp.sympify(inner.rate).subs(num.sub))
    S = int(params["S"])
    loss = model.sample_loss if hasattr(model, "sample_loss") else model.loss
    k = student_index("k")
    G = [num.fn(sp.diff(loss, lam[kk])) for kk in range(K)]
    rule = model.readout_updates[0]
    Hr = [num.fn(rule.grad(loss, k).xreplace({k: sp.Integer(kk)})) for kk in range(K)]
    fl_rate = float(sp.sympify(model.first_layer.rate).subs(num.sub))
    ro_rate = float(sp.sympify(rule.rate).subs(num.sub))
    Qs, Rs, As = [], [], []
    for step in range(steps + 1):
        if step % record == 0:
            Qs.append(W @ W.T / N)
            Rs.append(W @ B.T / N)
            As.append(a.copy())
        if step == steps:
            break
        Qn, Rn, Tn = W @ W.T / N, W @ B.T / N, B @ B.T / N
        C = num.covariance(Qn, Rn, Tn)
        vt = num.law(rng.standard_normal((M, 1)), a, vbar)[:, 0]
        values = (vt, a, vbar)
        Hm, hv = H_s(C, values), h0(C, values) + J(C, values) @ vt
        c = a.copy()
        for _ in range(S):
            c = c - rate * (Hm @ c - hv)
        x = rng.standard_normal(N)
        zq = rng.standard_normal()
        lq, nq = W @ x / math.sqrt(N), B @ x / math.sqrt(N)
        args = (lq, nq, nq, zq, np.zeros(K), c, vt, a, vbar, Qn, Rn, Tn, np.zeros(K))
        g_ = np.array([float(f(*args)) for f in G])
        hr = np.array([float(f(*args)) for f in Hr])
        model.first_layer.step(W, g_, x, fl_rate, 0.0)
        rule.step(a, hr, N, ro_rate, 0.0)
    return np.array(Qs), np.array(Rs), np.array(As)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_meta_model_flow_matches_its_simulation(path, tmp_path):
    """The flow of the rendered kernel against the mean of the model's algorithm
    on real vectors (N = 400, 12 seeds, alpha up to 1) from explicit overlaps."""
    from runtime import Init, flow
    from runtime.kernels import Kernel

    spec = _load_model_file(path)
    model, params = spec.MODEL, spec.PARAMS
    module = _kernel_module(model, tmp_path)
    M = 2
    Q0 = np.array([[0.5, 0.1], [0.1, 0.4]])
    R0 = np.array([[0.3, 0.05], [0.02, 0.25]])
    a0, vbar = np.array([0.3, -0.2]), np.array([0.4, 0.2])
    N, seeds, t_max = 400, 12, 1.0
    steps, record = int(t_max * N), N // 4
    runs = [
        simulate_meta_reference(model, params, Q0, R0, a0, vbar, N, steps, s, record) for s in range(seeds)
    ]
    kern = Kernel(module, model, "erf")
    init = Init(Q0, R0, np.eye(M), {"a": a0, "vbar": vbar})

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
