"""The finite-N simulator of meta-learning on streaming tasks (docs/models/anil.md).

The real algorithm of a model with an inner loop, on real vectors, one task per
step, as its model file declares it:

1. task: the task noise ``xi ~ N(0, I)`` and the task law (``TaskVector(law=...)``,
   for anil ``v_task = vbar + s xi``); each teacher field family realised from the
   teacher ``B`` plus a fresh isotropic perturbation whose variance the model's
   covariance blocks state (``derive.simulator.field_sources``; anil's task teacher
   ``B + eps_B Z``);
2. inner loop from ``c = start`` (``InnerLoop``), ``steps`` steps
   ``c <- c - rate (H c - f)`` on the gradient of the per-sample support loss plus
   the regulariser: with ``InnerLoop.support`` infinite (population mode) ``H`` and
   ``f`` are the expectations of the per-sample ones over Gaussian fields with the
   covariance the vectors realise (the engine's Gaussian integrals at the current
   overlaps); with a finite support, their averages over that many fresh samples;
3. query: ``n_q`` (``FirstLayer.batch``) fresh samples, the model's per-sample
   loss ``L`` at the adapted readout; the outer step ``W <- W - eta grad_W L``
   (``FirstLayer.step``) and the start's update rule (``ReadoutUpdate.step``, its
   gradient read from the model with ``da'/da`` by forward mode), with ``grad_W``
   at fixed ``a'`` (order 1) or also through the inner loop (order 2: the model's
   ``MetaGradient`` weight; reverse mode through the inner loop, into the realised
   covariance or the support fields).

Two paths run it. ``MetaStep`` is the numpy reference, one step at a time; it
reads any model: every model-specific number is an expression of its model file,
written out at the network's K and M and turned into numpy by sympy
(``_Concrete``), and the Gaussian integrals of the population mode are the
engine's (derive/simulator.py ``field_mean``). The compiled path runs whole outer
steps (``meta_steps`` of the generated module, rendered from
derive/templates/meta_simulator.py.jinja) for the models whose algorithm the
derivation recognises as that loop's (``derive.simulator.standard_form``: square
loss, the same loss in the inner loop without a regulariser, ``v_task = vbar + s xi``;
anil), with its numbers read from the model's expressions: the same random draws
from the same numpy Generator (numba reproduces its stream) and tested equal to
the reference step for step. Any other model (a proximal inner loop, a correlated
task law) runs the reference. The simulation does not use the flow's algebra (the
task moments, the sensitivities): it runs the algorithm on real vectors, and its
gradients are tested against finite differences of the query loss. The input
norm ``sqrt(N)`` and the coefficients of the update rules are those of
derive/model.py.

Finite support sets (docs/models/anil.md 5.6-5.7) have a Monte Carlo over tasks and
support sets of their own, at given field covariances and with no input vector:
``draw_adapted`` (tasks, support fields Gaussian at the covariance, the inner loop),
``metric_estimate`` and ``realised_metrics`` (eps_meta after adapting on ``n_s``
samples, the query expectation exact: what a simulation records with finite
``n_s``), and ``expected_update`` (the flow at given order parameters, no closure:
the reference the finite-``n_s`` flow is tested against; at order 2 the gradient
through the inner loop into each support sample's fields, ``support_sensitivities``,
with the support-direction parts of ``dQ`` and ``dR`` reported apart). Each takes
the query expectation of the model's integrands with the engine's Gaussian
integrals (``_Concrete.field_mean``) and a control variate (``_controlled``).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property, lru_cache
from typing import NamedTuple

import numpy as np
import sympy as sp

from derive.activations import get_activation, z
from derive.expand import expand
from derive.model import STATE_OVERLAPS, FirstLayer
from derive.model import Q as Q_SYMBOL
from derive.model import R as R_SYMBOL
from derive.model import T as T_SYMBOL
from derive.simulator import COV, concrete, field_mean, field_sources, formulas, inner_law, standard_form
from derive.simulator import _block as covariance_block
from derive.symbols import K as K_SYMBOL
from derive.symbols import M as M_SYMBOL
from derive.symbols import STUDENT, g, gp, gpp, index_kind, student_index, zeta

from .integrate import SimulationDiverged
from .kernels import load

# numpy and scipy.special for lambdify (sympy's erf is scipy.special.erf)
MODULES = ["scipy", "numpy"]


def _broadcasting(f):
    """``f`` with its result broadcast to its arguments' shape, as floats (a constant
    expression, g' of a linear activation, lambdifies to a scalar)."""

    def call(*args):
        return np.asarray(f(*args), dtype=float) + np.zeros(np.broadcast(*args).shape)

    return call


@lru_cache(maxsize=None)
def _numpy_formulas(name: str):
    """(g, g', I2, (dI2/da, dI2/db, dI2/dc)) of activation ``name`` as numpy functions
    of derive's expressions (derive/simulator.py), derived once per activation."""
    f = formulas(name)
    g = _broadcasting(sp.lambdify(f.z, f.g, MODULES))
    gp = _broadcasting(sp.lambdify(f.z, f.gp, MODULES))
    I2 = _broadcasting(sp.lambdify(f.variables, f.I2, MODULES))
    partials = tuple(_broadcasting(sp.lambdify(f.variables, e, MODULES)) for e in f.partials)
    return g, gp, I2, partials


class Activation:
    """g, g' and I2(a, b, c) = E[g(u) g(v)] for Var u = a, Var v = b, Cov = c, with its
    partial derivatives: derive's expressions (derive/simulator.py) as numpy
    functions, derived on first use (the compiled path does not need them)."""

    def __init__(self, name: str):
        get_activation(name)  # an unknown activation is refused here
        self.name = name

    @cached_property
    def _fns(self):
        return _numpy_formulas(self.name)

    def g(self, x):
        return self._fns[0](x)

    def gp(self, x):
        return self._fns[1](x)

    def I2(self, a, b, c):
        return self._fns[2](a, b, c)

    def I2_partials(self, a, b, c):
        """(dI2/da, dI2/db, dI2/dc)."""
        return tuple(d(a, b, c) for d in self._fns[3])


class Task(NamedTuple):
    """One task's draws: the task readouts ``v_task`` (the law's vector), the task
    teacher ``Bt`` (the last teacher family the model perturbs, else ``B``), the
    support inputs and noise (samples mode; None in population mode), the query
    inputs and noise; ``teachers``: every teacher family's vectors by name; ``xi``
    the task noise the law read, ``vectors`` the model's vectors it was drawn with."""

    v_task: np.ndarray
    Bt: np.ndarray
    Xs: np.ndarray | None
    zs: np.ndarray | None
    Xq: np.ndarray
    zq: np.ndarray
    teachers: dict
    xi: np.ndarray
    vectors: dict


def _lambdify(args, exprs):
    """numpy function of ``args`` returning the list of ``exprs`` (constants broadcast
    by the caller)."""
    return sp.lambdify(args, list(exprs), MODULES)


class _Concrete:
    """The model's expressions written out at K student and M teacher units
    (derive/simulator.py ``concrete``) and turned into numpy functions, once per
    (K, M): task law, support gradient (per sample, its population mean over the
    realised covariance of the fields and the derivatives the second-order
    gradient needs), regulariser, query gradients and metrics."""

    def __init__(self, model, activation, values, K, M):
        inner = model.inner_loop
        self.K, self.M = K, M
        sub = {p.symbol: values[p.name] for p in model.params}
        self.sources = field_sources(model)
        fams = [s_.family for s_ in self.sources]
        c = sp.IndexedBase("c_inner")
        self.law_vector = next(tv for tv in model.task_vectors if tv.law is not None)
        vectors = [v.base for v in model.vectors]
        tasks = [tv.base for tv in model.task_vectors]
        self.args = (*fams, zeta, c, *vectors, *tasks, inner.noise.base, inner.da.base)

        def conc(e, act=activation):
            return concrete(sp.sympify(e).subs(sub), K, M, act)

        self.rows = {}
        row = 0
        for s_ in self.sources:
            n = K if s_.kind == "student" else M
            for i in range(n):
                self.rows[s_.family[sp.Integer(i)]] = row + i
            row += n
        self.n_rows = row
        lam_ = fams[0]
        ks = range(K)
        # the task law
        self.law = _lambdify(self.args, [conc(inner_law(self.law_vector, m)) for m in range(M)])
        # support loss per sample: its gradient in c is Hs c - fs (checked linear)
        Ls = conc(inner.loss(c), None)
        grad = [sp.diff(Ls, c[k]) for k in ks]
        Hs = [sp.diff(grad[k], c[l_]) for k in ks for l_ in ks]
        if any(h.has(c) for h in Hs):
            raise ValueError(f"model {model.name!r}: the support loss must be quadratic in the readout")
        zero = {c[k]: 0 for k in ks}
        fs = [-gr.xreplace(zero) for gr in grad]
        act = get_activation(activation)

        def with_act(e):
            return (
                e.replace(g, lambda x: act.expr.subs(z, x))
                .replace(gp, lambda x: act.d1.subs(z, x))
                .replace(gpp, lambda x: act.d2.subs(z, x))
            )

        self.support_samples = _lambdify(self.args, [with_act(e) for e in Hs + fs])
        self.support_samples_d = _lambdify(
            self.args, [with_act(sp.diff(e, lam_[sp.Integer(r)])) for e in Hs + fs for r in ks]
        )
        means = [field_mean(e, self.rows, activation) for e in Hs + fs]
        cov_args = (*self.args, COV)
        self.support_mean = _lambdify(cov_args, means)
        # the entries of the covariance the weights move: those with a student row
        self.cov_entries = [(i, j) for i in range(K) for j in range(i, self.n_rows)]
        self.support_mean_d = _lambdify(
            cov_args, [sp.diff(e, COV[i, j]) for e in means for (i, j) in self.cov_entries]
        )
        # the regulariser: its gradient Hr c - fr, fr affine in the start a
        Lr = conc(inner.regulariser(c), None)
        gr = [sp.diff(Lr, c[k]) for k in ks]
        Hr = [sp.diff(gr[k], c[l_]) for k in ks for l_ in ks]
        if any(h.has(c) or h.has(inner.start.base) for h in Hr):
            raise ValueError(f"model {model.name!r}: the regulariser must be quadratic in the readout")
        fr = [-e.xreplace(zero) for e in gr]
        a_ = inner.start.base
        self.regulariser = _lambdify(self.args, Hr + fr)
        self.regulariser_da = _lambdify(self.args, [sp.diff(f, a_[sp.Integer(j)]) for f in fr for j in ks])
        # the query: G_k = dL/dlambda_k, dL/da'_k, the start's update, the metrics
        loss = model.sample_loss
        adapted = inner.adapted.base
        k_ = student_index("k")
        (_, Gk) = model.first_layer.sample_gradient(loss)
        self.query_G = _lambdify(self.args, [conc(Gk.xreplace({k_: sp.Integer(k)})) for k in ks])
        self.query_b = _lambdify(self.args, [conc(sp.diff(loss, adapted[sp.Integer(k)])) for k in ks])
        self.query_loss = _lambdify(self.args, [conc(loss)])
        rules = model.readout_updates
        if len(rules) > 1 or (rules and rules[0].vector != inner.start):
            raise ValueError(
                f"model {model.name!r}: the meta-learning simulator updates the inner loop's start only"
            )
        self.rule = rules[0] if rules else None
        if self.rule is not None:
            self.readout = _lambdify(self.args, [conc(self.rule.grad(loss, sp.Integer(k))) for k in ks])
        self.metric_names = tuple(model.metrics)
        self.metrics = _lambdify(self.args, [conc(e) for e in model.metrics.values()])
        self._model, self._activation, self._sub, self._conc = model, activation, sub, conc
        self._means: dict = {}

    def covariance(self):
        """``(Q, R, T) -> Cov``: the covariance of the field rows that the model's
        covariance blocks give at these order parameters (docs/models/anil.md 5.1), as a
        numpy function (the Monte Carlo of ``expected_update`` samples fields from it)."""
        if "covariance" not in self._means:
            sizes = {K_SYMBOL: self.K, M_SYMBOL: self.M}
            rows = [(f, i) for f, _, n in self._model.layout for i in range(sizes[n])]
            entries = [
                [sp.sympify(covariance_block(self._model, f1, f2)(i, k)).subs(self._sub) for (f2, k) in rows]
                for (f1, i) in rows
            ]
            fn = sp.lambdify((Q_SYMBOL, R_SYMBOL, T_SYMBOL), sp.Matrix(entries), MODULES)
            self._means["covariance"] = lambda Qv, Rv, Tv: np.asarray(fn(Qv, Rv, Tv), dtype=float)
        return self._means["covariance"]

    def task_degree(self, key, exprs) -> int:
        """The largest total degree of ``exprs`` in the task quantities (cached by
        ``key``), read from the terms of derive's expansion (derive/expand.py)."""
        key = ("degree", key)
        if key not in self._means:
            bases = {tv.base for tv in self._model.random_families}
            deg = 0
            for e in exprs:
                for term in expand(sp.sympify(e).xreplace(self._sub)):
                    n = 0
                    for f in sp.Mul.make_args(term.coeff):
                        base, power = f.as_base_exp()
                        if isinstance(base, sp.Indexed) and base.base in bases:
                            n += int(power)
                    deg = max(deg, n)
            self._means[key] = deg
        return self._means[key]

    def field_mean(self, key, exprs):
        """The expectations of ``exprs`` (integrands of the model: metrics, update
        rules) over the query sample's fields and label noise at the covariance ``Cov``,
        given the task quantities: the engine's Gaussian integrals
        (derive/simulator.py ``field_mean``), a numpy function of ``(*args, Cov)``,
        derived once per ``key``."""
        if key not in self._means:
            # xreplace, not subs: the parameters are plain symbols, and subs is slow on these sums
            at = [concrete(sp.sympify(e).xreplace(self._sub), self.K, self.M) for e in exprs]
            means = [field_mean(e, self.rows, self._activation) for e in at]
            self._means[key] = sp.lambdify((*self.args, COV), means, MODULES, cse=True)
        return self._means[key]

    def field_mean_path(self, key, exprs):
        """``field_mean`` for integrands whose expectation the engine reduces to an
        integral over Price's path (four ``g`` factors: ``G4``, docs/conventions.md 2):
        each ``Integral(f(t), (t, 0, 1))`` is the kernels' rule (derive/quadrature.py
        ``path_rule``, the count of ``RULES`` for the largest variance of ``Cov``, chosen
        at each call), ``f`` evaluated at all nodes at once on a leading axis. A numpy
        function of ``(*args, Cov)``, derived once per ``key``."""
        if key not in self._means:
            from derive.quadrature import nodes_for, path_rule

            at = [concrete(sp.sympify(e).xreplace(self._sub), self.K, self.M) for e in exprs]
            means = [field_mean(e, self.rows, self._activation) for e in at]
            tp, wp = sp.Symbol("t_path_"), sp.Symbol("w_path_")  # the rule's nodes and weights
            path_sum = sp.Function("path_sum_")

            def as_sum(integral):
                ((var, lo, hi),) = integral.limits
                if (lo, hi) != (0, 1):
                    raise ValueError(f"an integral over [{lo}, {hi}], not Price's path [0, 1]")
                return path_sum(integral.function.xreplace({var: tp}), wp)

            means = [m.replace(lambda e: isinstance(e, sp.Integral), as_sum) for m in means]

            def rule(x, weights):
                x = np.asarray(x, dtype=float)
                return np.tensordot(weights, np.broadcast_to(x, (weights.size, *x.shape[1:])), axes=1)

            fn = sp.lambdify((*self.args, COV, tp, wp), means, [{"path_sum_": rule}, *MODULES], cse=True)

            def mean(*args):
                largest = float(np.max(np.diagonal(np.asarray(args[-1], dtype=float))))
                nodes, weights = (np.array(x) for x in path_rule(nodes_for(largest)))
                return fn(*args, nodes.reshape(-1, 1), weights)

            self._means[key] = mean
        return self._means[key]


def _values(fn, args, n=None, shape=None):
    """The list ``fn(*args)`` as one float array (entries broadcast to ``n`` samples)."""
    out = [np.asarray(x, dtype=float) for x in fn(*args)]
    if n is not None:
        out = [np.broadcast_to(x, (n,)) for x in out]
        arr = np.array(out)
        return arr.reshape((*shape, n)) if shape else arr
    arr = np.array(out, dtype=float)
    return arr.reshape(shape) if shape else arr


_CONCRETE: dict = {}


def _expression_params(model) -> tuple[str, ...]:
    """The parameters that the expressions ``_Concrete`` writes out read: all but the
    support size, unless an expression reads it (the support size sets how many
    samples are drawn, not an expression), so that steps at several ``n_s`` share one."""
    inner = model.inner_loop
    names = tuple(sorted(p.name for p in model.params))
    support = sp.sympify(inner.support) if inner is not None else sp.S.Zero
    if not isinstance(support, sp.Symbol):
        return names
    c = sp.IndexedBase("c_inner")
    i, k = sp.symbols("i_ k_", integer=True)
    exprs = [model.sample_loss, inner.loss(c), inner.regulariser(c), *model.metrics.values()]
    exprs += [inner.steps, inner.rate, inner.second_order, model.first_layer.rate, model.first_layer.batch]
    exprs += [model.first_layer.decay] + [e for r in model.readout_updates for e in (r.rate, r.decay)]
    exprs += [r.grad(model.sample_loss, student_index("k")) for r in model.readout_updates]
    exprs += [tv.law(i) for tv in model.task_vectors if tv.law is not None]
    exprs += [entry(i, k) for entry in model.covariance.values()]
    if any(sp.sympify(e).has(support) for e in exprs):
        return names
    return tuple(n for n in names if sp.Symbol(n, real=True) != support)


class MetaStep:
    """One outer step of a meta-learning model, read from its model file (the numpy
    reference): ``query_loss`` and ``gradients`` are exposed separately so that the
    gradient can be checked by finite differences.

    Everything model-specific is an expression of the model file written out at the
    network's K and M and turned into numpy (``_Concrete``): the task law, the
    per-sample support loss and regulariser (the inner loop runs on their gradient
    ``H c - f``), the first layer's per-sample gradient, the start's update and the
    metrics. In population mode (``InnerLoop.support`` infinite) ``H`` and ``f`` are
    the expectations of the per-sample ones over fields with the covariance realised
    by the vectors (the engine's Gaussian integrals); with support samples, their
    averages over the samples. The order-2 gradient is reverse mode through the
    inner loop, into the support fields or the realised covariance."""

    def __init__(self, model, activation: str, params: dict):
        if model.inner_loop is None:
            raise ValueError(f"model {model.name!r} has no inner loop")
        get_activation(activation)  # an unknown activation is refused here
        self.model, self.activation, self.values = model, activation, params
        inner = model.inner_loop
        self.S = int(model.numeric(inner.steps, params))
        self.alpha_in = model.numeric(inner.rate, params)
        self.n_q = int(model.numeric(model.first_layer.batch, params))
        self.n_s = model.numeric(inner.support, params)
        self.population = not math.isfinite(self.n_s)
        meta = model.first_layer.meta
        self.weight = model.numeric(meta.weight, params) if meta is not None else 0.0
        self.order = 2 if self.weight != 0 else 1
        self.sources = field_sources(model)
        self.spreads = [math.sqrt(model.numeric(s_.spread2, params)) for s_ in self.sources]
        self._at: dict = {}
        self._laws: dict = {}

    def concrete(self, K: int, M: int) -> _Concrete:
        if (K, M) not in self._at:
            # shared by the steps of one model, activation and parameters in this process
            # (and, built before a fork, by the workers): deriving them takes seconds
            used = _expression_params(self.model)
            key = (_Concrete, id(self.model), self.activation, tuple((k, self.values[k]) for k in used), K, M)
            hit = _CONCRETE.get(key)
            if hit is None or hit[0] is not self.model:
                hit = (self.model, _Concrete(self.model, self.activation, self.values, K, M))
                _CONCRETE[key] = hit
            self._at[(K, M)] = hit[1]
        return self._at[(K, M)]

    def _args(self, cc, fields=None, zeta_=0.0, c=None, vectors=None, tasks=None, xi=None, da=None):
        """The argument tuple of ``cc``'s functions, by name."""
        K, M = cc.K, cc.M
        fields = fields or [np.zeros(K)] + [np.zeros(M)] * (len(cc.sources) - 1)
        vectors = vectors or {}
        tasks = tasks or {}
        vec = [vectors.get(v.name, np.zeros(K if v.over == "student" else M)) for v in self.model.vectors]
        tks = [tasks.get(tv.name, np.zeros((K,) * len(tv.kinds))) for tv in self.model.task_vectors]
        return (
            *fields,
            zeta_,
            np.zeros(K) if c is None else c,
            *vec,
            *tks,
            np.zeros(M) if xi is None else xi,
            np.zeros((K, K)) if da is None else da,
        )

    def draw_task(self, rng, B, vectors: dict) -> Task:
        """The task's draws in a fixed order: the task noise and its law, each perturbed
        teacher family, the support inputs and noise (samples mode), the query
        inputs and noise."""
        M, N = B.shape
        xi = rng.standard_normal(M)
        teachers = {}
        Bt = B
        for s_, spread in zip(self.sources[1:], self.spreads[1:]):
            if spread > 0:
                Bt = B + spread * rng.standard_normal((M, N))
                teachers[str(s_.family)] = Bt
            else:
                teachers[str(s_.family)] = B
        Xs = zs = None
        if not self.population:
            ns = int(self.n_s)
            Xs = rng.standard_normal((ns, N))
            zs = rng.standard_normal(ns)
        Xq = rng.standard_normal((self.n_q, N))
        zq = rng.standard_normal(self.n_q)
        law = self._law(xi, vectors)
        return Task(law, Bt, Xs, zs, Xq, zq, teachers, xi, dict(vectors))

    def _law(self, xi, vectors):
        """The law's vector for the task noise ``xi`` (written out at M, and at the K of
        a student vector in ``vectors`` if the law reads one)."""
        M = xi.size
        K = next((np.size(v) for k, v in vectors.items() if self._over(k) == "student"), 1)
        key = (K, M)
        if key not in self._laws:
            tv = next(tv for tv in self.model.task_vectors if tv.law is not None)
            sub = _sub(self)
            args = (self.model.inner_loop.noise.base, *[v.base for v in self.model.vectors])
            exprs = [concrete(inner_law(tv, m).subs(sub), K, M) for m in range(M)]
            self._laws[key] = (_lambdify(args, exprs), args)
        fn, _ = self._laws[key]
        vec = [
            np.asarray(vectors.get(v.name, np.zeros(K if v.over == "student" else M)), dtype=float)
            for v in self.model.vectors
        ]
        return np.array([np.broadcast_to(np.asarray(x, dtype=float), ()) for x in fn(xi, *vec)], dtype=float)

    def _over(self, name):
        return next((v.over for v in self.model.vectors if v.name == name), None)

    def _fields(self, W, task, X):
        """The fields of every family at inputs X (n, N): a list of (rows, n) arrays."""
        norm = FirstLayer.input_norm(W.shape[1])
        out = [W @ X.T / norm]
        for s_ in self.sources[1:]:
            out.append(task.teachers[str(s_.family)] @ X.T / norm)
        return out

    def _vectors_matrix(self, W, task):
        return np.vstack([W] + [task.teachers[str(s_.family)] for s_ in self.sources[1:]])

    # -- inner loop -----------------------------------------------------------
    def support(self, W, task):
        """(H, f, cache) of the support loss's gradient ``H c - f`` (without the
        regulariser, which ``adapt`` adds)."""
        K, M = W.shape[0], task.v_task.size
        cc = self.concrete(K, M)
        tasks = {cc.law_vector.name: task.v_task}
        if self.population:
            V = self._vectors_matrix(W, task)
            C = V @ V.T / W.shape[1]
            args = (*self._args(cc, tasks=tasks), C)
            vals = _values(cc.support_mean, args)
            return vals[: K * K].reshape(K, K), vals[K * K :], (C, args)
        fields = self._fields(W, task, task.Xs)
        ns = task.Xs.shape[0]
        args = self._args(cc, fields=fields, zeta_=task.zs, tasks=tasks)
        per = _values(cc.support_samples, args, n=ns)
        Hs, fs = per[: K * K].reshape(K, K, ns), per[K * K :]
        return Hs.mean(-1), fs.mean(-1), (args, Hs, fs)

    def _regulariser(self, cc, a, task):
        K = cc.K
        args = self._args(cc, vectors={**task.vectors, self.model.inner_loop.start.name: a})
        r = _values(cc.regulariser, args)
        return r[: K * K].reshape(K, K), r[K * K :], _values(cc.regulariser_da, args).reshape(K, K)

    def adapt(self, C, h, a, task=None):
        """c^(0..S) of the inner loop from ``c = a`` on ``H c - f`` plus the regulariser."""
        if task is not None:
            cc = self.concrete(a.size, task.v_task.size)
            Hr, fr, _ = self._regulariser(cc, a, task)
            C, h = C + Hr, h + fr
        cs = [a.copy()]
        for _ in range(self.S):
            cs.append(cs[-1] - self.alpha_in * (C @ cs[-1] - h))
        return cs

    # -- query ----------------------------------------------------------------
    def _query_args(self, W, c, task, a=None, da=None, optimal=None):
        K, M = W.shape[0], task.v_task.size
        cc = self.concrete(K, M)
        inner = self.model.inner_loop
        tasks = {cc.law_vector.name: task.v_task, inner.adapted.name: c}
        if optimal is not None and inner.optimal is not None:
            tasks[inner.optimal.name] = optimal
        vectors = dict(task.vectors)
        if a is not None:
            vectors[inner.start.name] = a
        fields = self._fields(W, task, task.Xq)
        return cc, self._args(cc, fields=fields, zeta_=task.zq, tasks=tasks, vectors=vectors, da=da)

    def query_loss(self, W, a, task) -> float:
        """The mean per-sample loss over the query samples, through the inner loop."""
        C, h, _ = self.support(W, task)
        return self.query_loss_at(W, self.adapt(C, h, a, task)[-1], task, a)

    def query_loss_at(self, W, c, task, a=None) -> float:
        """The mean per-sample loss over the query samples with the adapted readout
        held at ``c`` (the inner loop frozen)."""
        cc, args = self._query_args(W, c, task, a=a)
        return float(np.mean(_values(cc.query_loss, args, n=self.n_q)))

    def metric_samples(self, W, a, task, optimal=None):
        """The model's metrics on the query samples of ``task`` (mean over them), with
        the start ``a``, the adapted readout and the optimal readout ``optimal``."""
        C, h, _ = self.support(W, task)
        adapted = self.adapt(C, h, a, task)[-1]
        cc, args = self._query_args(W, adapted, task, a=a, optimal=optimal)
        return dict(zip(cc.metric_names, _values(cc.metrics, args, n=self.n_q).mean(-1)))

    def gradients(self, W, a, task):
        """(G (n_q, K), grad_W through the inner loop or None, the start's gradient).

        ``G`` is the coefficient of x in the first-order gradient,
        ``dL/dw_k = mean_mu G[mu, k] x_mu / sqrt(N)``."""
        K, N = W.shape
        cc = self.concrete(K, task.v_task.size)
        C, h, cache = self.support(W, task)
        Hr, fr, fr_da = self._regulariser(cc, a, task)
        Ct, ht = C + Hr, h + fr
        cs = self.adapt(Ct, ht, a)
        adapted = cs[-1]
        # forward mode: A = da'/da (the start enters c^(0) and the regulariser's force)
        A = np.eye(K)
        for _ in range(self.S):
            A = A - self.alpha_in * (Ct @ A - fr_da)
        _, args = self._query_args(W, adapted, task, a=a, da=A)
        nq = self.n_q
        G = _values(cc.query_G, args, n=nq).T
        grad_a = _values(cc.readout, args, n=nq).mean(-1) if cc.rule is not None else np.zeros(K)
        if self.order == 1:
            return G, None, grad_a
        b = _values(cc.query_b, args, n=nq).mean(-1)  # dL/da'
        # reverse mode through c^(s+1) = c^(s) - alpha_in (Ct c^(s) - ht)
        adj = b.copy()
        dC = np.zeros((K, K))
        dh = np.zeros(K)
        for s_ in range(self.S - 1, -1, -1):
            dC -= self.alpha_in * np.outer(adj, cs[s_])
            dh += self.alpha_in * adj
            adj = adj - self.alpha_in * (Ct.T @ adj)
        if self.population:
            Cf, cargs = cache
            d = _values(cc.support_mean_d, cargs).reshape(K * K + K, len(cc.cov_entries))
            weights = np.concatenate([dC.ravel(), dh])
            Gc = np.zeros((cc.n_rows, cc.n_rows))
            for (i, j), x in zip(cc.cov_entries, weights @ d):
                Gc[i, j] += x
            V = self._vectors_matrix(W, task)
            grad_W = ((Gc + Gc.T)[:K] @ V) / N
        else:
            sargs, _, _ = cache
            ns = task.Xs.shape[0]
            d = _values(cc.support_samples_d, sargs, n=ns).reshape(K * K + K, K, ns)
            weights = np.concatenate([dC.ravel(), dh])
            dLam = np.einsum("e,ern->nr", weights, d) / ns
            grad_W = dLam.T @ task.Xs / FirstLayer.input_norm(N)
        return G, self.weight * grad_W, grad_a


def _sub(step):
    return {p.symbol: step.values[p.name] for p in step.model.params}


class SeedInterrupted(KeyboardInterrupt):
    """An interrupt during one seed's run: ``records`` are (overlaps, readouts) so far."""

    def __init__(self, records):
        self.records = records
        super().__init__("interrupted")


# at most this many steps per call of the compiled loop (the progress bar moves
# at least this often); its results do not depend on it
CHUNK = 4096


def run_seed_meta(
    model,
    W,
    B,
    vec,
    values,
    rates,
    N,
    n_steps,
    rec,
    rng,
    bar,
    activation,
    path="compiled",
    module=None,
    stop=None,
    metric_tasks=0,
    metric_rng=None,
):
    """One seed: ``n_steps`` outer steps, the order parameters every ``rec`` steps.

    ``path``: ``"compiled"`` runs whole outer steps compiled (``meta_steps`` of the
    generated ``module`` of ``model`` and ``activation``, by default the registry's)
    when the derivation recognises the model's algorithm as the compiled loop's
    (derive/simulator.py ``standard_form``; its numbers are read from the model's
    expressions); otherwise, and with ``"numpy"``, the Python loop of ``MetaStep``
    (the reference, which reads any model). With a seeded ``rng`` the two draw the
    same random numbers and agree to round-off. An interrupt (KeyboardInterrupt),
    or ``stop()`` true between two chunks, ends the run early: the records made so
    far are returned (``runtime.simulate``).

    With a finite support set and ``metric_tasks > 0``, each record also estimates the
    metrics that depend on the support set (``support_metrics``: eps_meta) at the
    simulated weights, over ``metric_tasks`` tasks and support sets drawn from
    ``metric_rng`` (``realised_metrics``; the run's own draws are untouched): the
    records hold ``metric:NAME`` and ``metric_sem:NAME`` (the Monte Carlo s.e.m.)."""
    if path not in ("compiled", "numpy"):
        raise ValueError(f"path must be compiled or numpy, got {path!r}")
    K, M = W.shape[0], B.shape[0]
    inner = model.inner_loop
    offsets, o = {}, 0
    for v in model.state_vectors + model.const_vectors:
        n = K if v.over == "student" else M
        offsets[v.name] = slice(o, o + n)
        o += n
    vectors = {name: vec[sl].copy() for name, sl in offsets.items()}
    a = vectors[inner.start.name]
    step = MetaStep(model, activation, values)
    (eta, decay), *readout_rates = rates
    fl = model.first_layer
    n_rec = n_steps // rec
    overlaps = {o.name: np.empty((n_rec + 1, *o.shape(K, M))) for o in STATE_OVERLAPS}
    records = {v.name: np.empty((n_rec + 1, K)) for v in model.state_vectors}

    estimated = support_metrics(model) if metric_tasks and not step.population else ()
    for name in estimated:
        records[f"metric:{name}"] = np.empty(n_rec + 1)
        records[f"metric_sem:{name}"] = np.empty(n_rec + 1)

    def record(i):
        for o in STATE_OVERLAPS:
            overlaps[o.name][i] = o.of(W, B)
        for name in (v.name for v in model.state_vectors):
            records[name][i] = vectors[name]
        if estimated:
            est = realised_metrics(step, W, B, vectors, metric_tasks, metric_rng)
            for name, (m, e) in est.items():
                records[f"metric:{name}"][i] = m
                records[f"metric_sem:{name}"][i] = e

    form = standard_form(model) if path == "compiled" else None
    if form is not None and module is None:
        module = load(model.name, activation).module
    if form is not None and hasattr(module, "meta_steps"):
        meta_steps = module.meta_steps
        nums = form.numbers(model, values)
        vbar = vectors[model.const_vectors[0].name]
        (eta_a, decay_a) = readout_rates[0]
        ro = model.readout_updates[0]
        # the input norm and the update rules' own coefficients (derive/model.py), as numbers
        norm = float(fl.input_norm(N))
        w_shrink, w_scale = fl.coefficients(N, eta, decay, nums["n_q"])
        weights_scale = float(fl.weights_coefficient(eta))
        a_shrink, a_scale = ro.coefficients(N, eta_a, decay_a)
        task = (nums["n_q"], nums["s"], nums["alpha_in"], nums["S"], nums["sigma"], nums["eps_B"])
        rules = (nums["second"], norm, w_shrink, w_scale, weights_scale, a_shrink, a_scale)
        Tt = np.einsum("mi,mi->m", B, B) / N  # the fixed teacher's norms

        def advance(n):
            meta_steps(W, B, Tt, a, vbar, rng, n, *task, *rules, nums["n_s"])

    else:
        rule = model.readout_updates[0] if model.readout_updates else None

        def advance(n):
            for _ in range(n):
                task = step.draw_task(rng, B, vectors)
                G, grad_W, grad_a = step.gradients(W, a, task)
                fl.step(W, G, task.Xq, eta, decay)
                if grad_W is not None:
                    fl.step_weights(W, grad_W, eta)
                if rule is not None:
                    rule.step(a, grad_a, N, *readout_rates[0])

    record(0)
    made = 0  # the last record made

    def made_so_far():
        return (
            {name: x[: made + 1] for name, x in overlaps.items()},
            {name: x[: made + 1] for name, x in records.items()},
        )

    try:
        for r in range(1, n_rec + 1):
            done = 0
            while done < rec and not (stop is not None and stop()):
                n = min(CHUNK, rec - done)
                advance(n)
                done += n
                if bar:
                    bar.update(n)
            if done < rec:
                break
            record(r)
            made = r
            if not np.all(np.isfinite(W)):
                raise SimulationDiverged(r * rec / N, model.name)
    except KeyboardInterrupt:
        raise SeedInterrupted(made_so_far()) from None
    return made_so_far()


# -- finite support sets: Monte Carlo over tasks and support sets ---------------------
# (docs/models/anil.md 5.6-5.7). Given the covariance of the fields, a task's support
# fields are Gaussian with that covariance: the draws below need no input vectors. The
# query sample is not drawn: the expectation over it, given the adapted readout and the
# task, is the engine's Gaussian integral of the model's integrand (``field_mean``).

# tasks per chunk of the Monte Carlo: a chunk holds chunk * n_s * rows support fields
SUPPORT_CHUNK = 2_000_000

# The simulator's estimate of a metric that depends on the support set (eps_meta with
# finite n_s) draws at each record METRIC_TASKS tasks, fewer (down to MIN_METRIC_TASKS)
# when their support sets would hold more than METRIC_SAMPLES samples: the control
# variate leaves a spread that shrinks like 1/n_s (``default_metric_tasks``)
METRIC_TASKS = 2000
MIN_METRIC_TASKS = 200
METRIC_SAMPLES = 100_000


def default_metric_tasks(n_s: float) -> int:
    """Tasks per record of the simulator's estimate at support size ``n_s``: 2000 up to
    n_s = 50, then 100000 / n_s, at least 200 (measured s.e.m. of eps_meta at the
    validation start: 0.002 at n_s = 3, 0.0004 at n_s = 100, 0.001 at n_s = 400)."""
    if not math.isfinite(n_s):
        return METRIC_TASKS
    return int(min(METRIC_TASKS, max(MIN_METRIC_TASKS, METRIC_SAMPLES // int(n_s))))


def _factor(C):
    """``L`` with ``L L^T = C`` for a positive semi-definite ``C`` (rows, rows) or a stack
    of them (..., rows, rows): eigenvalues clipped at 0 (the fields of an unperturbed
    task teacher repeat the teacher's rows, so ``C`` can be singular)."""
    w, V = np.linalg.eigh(C)
    return V * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


def _stack(C, n):
    """``C`` (rows, rows) or (n, rows, rows) as (n, rows, rows)."""
    C = np.asarray(C, dtype=float)
    return np.broadcast_to(C, (n, *C.shape[-2:])) if C.ndim == 2 else C


def _broadcast_list(values, shape):
    return np.array([np.broadcast_to(np.asarray(x, dtype=float), shape) for x in values])


def draw_adapted(step: MetaStep, cc: _Concrete, C, a, vectors: dict, n: int, rng, xi=None, population=None):
    """``n`` tasks and their adapted readouts: ``(v_task (M, n), adapted (K, n))``.

    Each task draws its noise ``xi`` (the task law of the model gives ``v_task``), then,
    with a finite ``n_s`` (``step.n_s``), ``n_s`` support samples: fields Gaussian with
    covariance ``C`` ((rows, rows), or (n, rows, rows): one per task), label noise
    ``zeta``; the inner loop runs on the sample means of the model's per-sample support
    gradient ``Hs c - fs`` plus its regulariser (docs/models/anil.md 5.6). With
    ``n_s = inf`` (or ``population``) it runs on their expectations at ``C`` (the
    population inner loop). ``xi`` (M, n): given task noise instead of drawn."""
    K, M = cc.K, cc.M
    vectors = {**vectors, step.model.inner_loop.start.name: a}
    xi = rng.standard_normal((M, n)) if xi is None else np.asarray(xi, dtype=float)
    v_task = _broadcast_list(cc.law(*step._args(cc, vectors=vectors, xi=xi)), (n,))
    tasks = {cc.law_vector.name: v_task}
    Cs = _stack(C, n)
    if step.population or population:
        args = (*step._args(cc, vectors=vectors, tasks=tasks), np.moveaxis(Cs, 0, -1))
        vals = _broadcast_list(cc.support_mean(*args), (n,))
    else:
        ns = int(step.n_s)
        L = _factor(Cs)
        rows = L.shape[-1]
        chunk = max(1, SUPPORT_CHUNK // (ns * rows))
        vals = np.empty((K * K + K, n))
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            u = np.einsum("tij,tsj->its", L[lo:hi], rng.standard_normal((hi - lo, ns, rows)))
            zs = rng.standard_normal((hi - lo, ns))
            fields, r = [], 0
            for s_ in cc.sources:
                size = K if s_.kind == "student" else M
                fields.append(u[r : r + size])
                r += size
            sub = {cc.law_vector.name: v_task[:, lo:hi, None]}
            args = step._args(cc, fields=fields, zeta_=zs, tasks=sub, vectors=vectors)
            vals[:, lo:hi] = _broadcast_list(cc.support_samples(*args), (hi - lo, ns)).mean(-1)
    H = vals[: K * K].reshape(K, K, n)
    f = vals[K * K :]
    r = _values(cc.regulariser, step._args(cc, vectors=vectors))
    H = H + r[: K * K].reshape(K, K, 1)
    f = f + r[K * K :, None]
    c = np.repeat(np.asarray(a, dtype=float)[:, None], n, axis=1)
    for _ in range(step.S):
        c = c - step.alpha_in * (np.einsum("kln,ln->kn", H, c) - f)
    return v_task, c


def _mean_sem(x):
    x = np.asarray(x, dtype=float)
    n = x.shape[-1]
    return x.mean(-1), (x.std(-1, ddof=1) / math.sqrt(n) if n > 1 else np.full(x.shape[:-1], np.nan))


def support_metrics(model) -> tuple[str, ...]:
    """The metrics of ``model`` that read the adapted readout: with a finite support set
    they depend on it (eps_meta); the others (eps_pre, eps_opt) do not."""
    inner = model.inner_loop
    if inner is None:
        return ()
    return tuple(k for k, e in model.metrics.items() if sp.sympify(e).has(inner.adapted.base))


def metric_estimate(step: MetaStep, C, a, vectors: dict, n_tasks: int, rng, names=None) -> dict:
    """The support-set metrics (``support_metrics``) averaged over ``n_tasks`` tasks and
    support sets at the field covariance ``C`` (as ``draw_adapted``): for each task the
    exact expectation over the query sample, given the adapted readout and the task, of
    the metric's integrand (docs/models/anil.md 5.7). ``name -> (mean, Monte Carlo s.e.m.)``."""
    names = support_metrics(step.model) if names is None else tuple(names)
    K = np.size(a)
    M = (np.asarray(C).shape[-1] - K) // (len(step.sources) - 1)
    cc = step.concrete(K, M)
    fn = cc.field_mean(("metrics", names), [step.model.metrics[k] for k in names])
    inner = step.model.inner_loop
    a = np.asarray(a, dtype=float)
    xi = rng.standard_normal((M, n_tasks))

    def values(xi_, population=None, C=C):
        n = xi_.shape[1]
        v_task, adapted = draw_adapted(step, cc, C, a, vectors, n, rng, xi=xi_, population=population)
        tasks = {cc.law_vector.name: v_task, inner.adapted.name: adapted}
        args = step._args(cc, tasks=tasks, vectors={**vectors, inner.start.name: a})
        return _broadcast_list(fn(*args, np.moveaxis(_stack(C, n), 0, -1)), (n,))

    exprs = [step.model.metrics[k] for k in names]
    out = _controlled(step, cc, values, xi, C, ("metrics", names), exprs)
    return dict(zip(names, out))


# the control variate's exact mean needs 3^M points: beyond this many, none is used
MAX_RULE_POINTS = 100_000


def _controlled(step, cc, values, xi, C, key, exprs):
    """``(mean, s.e.m.)`` of each row of ``values(xi, C=C)`` (conditional expectations
    given the tasks drawn with noise ``xi`` at the field covariance ``C``, one for all
    tasks or one per task) over the tasks.

    With a finite support set, a control variate: the same tasks adapted by the
    population inner loop (``values(xi, population=True)``). Its adapted readout is
    affine in the task noise (a linear recursion whose Hessian does not depend on the
    task, an affine task law), so for integrands of degree <= 5 in the task quantities
    its mean over the noise at a given covariance is exact by the tensor rule of three
    Gauss-Hermite points per entry (``_gauss_hermite3``). The estimate is that mean
    (averaged over the tasks' covariances when each task has its own) plus the mean
    difference, whose spread is that of the support set's effect alone (measured:
    7x smaller s.e.m. of eps_meta at n_s = 3, 40x at n_s = 100). With the population
    inner loop (``n_s = inf``) and one covariance that mean is the answer, s.e.m. 0."""
    M, n = xi.shape
    pts, w = _gauss_hermite3(M) if 3**M <= MAX_RULE_POINTS else (None, None)
    one = np.ndim(C) == 2
    usable = pts is not None and (one or n * pts.shape[1] <= MAX_RULE_POINTS)
    if not usable or cc.task_degree(key, exprs) > 5:
        return [_mean_sem(v) for v in values(xi, C=C)]
    if one:
        exact = values(pts, population=True, C=C) @ w
        if step.population:  # no support set: the rule is the exact mean (s.e.m. 0)
            return [(x, 0.0) for x in exact]
        vals, pop = values(xi, C=C), values(xi, population=True, C=C)
        return [(m + exact[i], e) for i, (m, e) in enumerate(_mean_sem(v) for v in vals - pop)]
    # one covariance per task: the rule's mean at each task's own covariance
    P = pts.shape[1]
    per_task = values(np.tile(pts, n), population=True, C=np.repeat(C, P, axis=0))
    exact = per_task.reshape(len(per_task), n, P) @ w
    vals = values(xi, C=C) - values(xi, population=True, C=C) + exact
    return [_mean_sem(v) for v in vals]


def _gauss_hermite3(M: int):
    """Points (M, 3^M) and weights of the product of the three-point Gauss-Hermite rule
    for ``N(0, 1)`` (points 0, +-sqrt(3), weights 2/3, 1/6): exact for polynomials of
    degree <= 5 in each entry."""
    x1, w1 = np.array([0.0, math.sqrt(3.0), -math.sqrt(3.0)]), np.array([2 / 3, 1 / 6, 1 / 6])
    grids = np.meshgrid(*([x1] * M), indexing="ij")
    wgrid = np.meshgrid(*([w1] * M), indexing="ij")
    return np.array([g_.ravel() for g_ in grids]), np.prod([w_.ravel() for w_ in wgrid], axis=0)


class ExpectedUpdate(NamedTuple):
    """The Monte Carlo estimate of ``expected_update``: each entry ``(mean, s.e.m.)``.

    At order 2 (finite ``n_s``) also the parts of ``dR`` and ``dQ`` along the support
    inputs (docs/models/anil.md 5.6 "Order 2"; ``gamma^mu_k = sum_j b_j da'_j/dlambda^mu_k``,
    ``b`` the query gradient in ``a'``), already included in ``dR`` and ``dQ``:
    ``sup_R`` (K, M) ``-eta w E[sum_mu gamma^mu_k nu^mu_n]``, ``sup_Q1`` (K, K)
    ``-eta w E[sum_mu (gamma^mu_k lambda^mu_l + gamma^mu_l lambda^mu_k)]`` and ``sup_Q2``
    (K, K) ``eta^2 w^2 E[sum_mu gamma^mu_k gamma^mu_l]`` (``w`` the MetaGradient weight);
    None at order 1."""

    dQ: tuple
    dR: tuple
    da: tuple
    eps_meta: tuple
    n_tasks: int
    sup_R: tuple | None = None
    sup_Q1: tuple | None = None
    sup_Q2: tuple | None = None


def _rule_entries(rules, loss, K: int, M: int):
    """The update rules' integrands at every entry of their order parameters, and their
    deterministic parts: ``(names, integrands, fixed, shapes, symbolic)``, ``names`` the
    ``(parameter, index)`` of each entry, ``symbolic`` one integrand per parameter."""
    names, integrands, fixed, shapes, symbolic = [], [], [], {}, []
    for rule in rules:
        for name, (free, integrand, deterministic) in rule.flows(loss).items():
            shape = tuple(K if index_kind(i) == STUDENT else M for i in free)
            shapes[name] = shape
            symbolic.append(integrand)
            for idx in np.ndindex(*shape):
                sub = {i: sp.Integer(v) for i, v in zip(free, idx)}
                names.append((name, idx))
                integrands.append(sp.sympify(integrand).xreplace(sub))
                fixed.append(sp.sympify(deterministic).xreplace(sub))
    return names, integrands, fixed, shapes, symbolic


def expected_update(model, params: dict, Q, R, T, vectors: dict, n_tasks: int, rng, activation="erf"):
    """The flow at given order parameters, as a Monte Carlo over tasks and
    support sets with no closure (docs/models/anil.md 5.5-5.7; no N).

    Each of ``n_tasks`` tasks draws its readout and ``n_s`` support samples, their fields
    Gaussian with the covariance the model's blocks give at ``Q``, ``R``, ``T``
    (population inner loop for ``n_s = inf``), and runs the inner loop to its adapted
    readout ``a'`` (``draw_adapted``). Given ``(a', task)``, the update rules'
    integrands (the first layer's for ``Q`` and ``R``, ``eta^2`` term included, and the
    readout's; ``FirstLayer.flows``, ``ReadoutUpdate.flows``) and the ``eps_meta``
    integrand are averaged exactly over the query sample by the engine (``field_mean``);
    these conditional expectations are averaged over the tasks. Decay terms are added
    as the rules state them. Returns ``ExpectedUpdate``: ``dQ`` (K, K), ``dR`` (K, M),
    ``da`` (K,) (the start's rate of change), ``eps_meta``, each with its s.e.m.

    Order 2 with a finite ``n_s`` (docs/models/anil.md 5.6 "Order 2"): the gradient
    also runs through the inner loop into each support sample's fields; see
    ``_expected_update_order2`` (the query terms are the first-order integrands, the
    readout's step ``-eta_a A^T b`` with the sample ``A = da'/da``, and the
    support-direction parts ``sup_R``, ``sup_Q1``, ``sup_Q2`` of ``ExpectedUpdate``).
    Order 2 with ``n_s = inf`` is refused: its second-order terms are the population
    ones (through ``Q`` and ``R``), the generated kernel's flow."""
    if isinstance(model, str):
        from derive.models import get_model

        model = get_model(model)
    values = model.resolve_params(params)
    step = MetaStep(model, activation, values)
    if step.order != 1 and step.population:
        raise ValueError(
            "expected_update: order 2 needs a finite n_s (at n_s = inf the second-order terms are "
            "the population ones, through Q and R: the generated kernel's flow)"
        )
    if "eps_meta" not in model.metrics:
        raise ValueError(f"expected_update: model {model.name!r} has no metric eps_meta")
    n_tasks = int(n_tasks)
    if n_tasks < 2:
        raise ValueError(f"expected_update: n_tasks must be >= 2 (a standard error), got {n_tasks}")
    if step.order != 1:
        return _expected_update_order2(step, Q, R, T, vectors, n_tasks, rng)
    Q, R, T = (np.asarray(x, dtype=float) for x in (Q, R, T))
    K, M = R.shape
    cc = step.concrete(K, M)
    inner = model.inner_loop
    a = np.asarray(vectors[inner.start.name], dtype=float)
    vectors = {k: np.asarray(v, dtype=float) for k, v in vectors.items()}
    C = cc.covariance()(Q, R, T)
    loss = model.sample_loss
    # the update rules' integrands at every entry, and their deterministic parts
    rules = (model.first_layer, *model.readout_updates)
    names, integrands, fixed, shapes, symbolic = _rule_entries(rules, loss, K, M)
    key = ("updates", K, M)
    fn = cc.field_mean(key, integrands + [model.metrics["eps_meta"]])
    det_args = (Q_SYMBOL, R_SYMBOL, T_SYMBOL, *[v.base for v in model.vectors])
    det = sp.lambdify(det_args, [cc._conc(e, None) for e in fixed], MODULES)
    vec_values = [vectors.get(v.name, np.zeros(K if v.over == "student" else M)) for v in model.vectors]
    det_vals = [float(x) for x in det(Q, R, T, *vec_values)]

    def values(xi, population=None, C=C):
        v_task, adapted = draw_adapted(
            step, cc, C, a, vectors, xi.shape[1], rng, xi=xi, population=population
        )
        tasks = {cc.law_vector.name: v_task, inner.adapted.name: adapted}
        args = step._args(cc, tasks=tasks, vectors=vectors)
        return _broadcast_list(fn(*args, C[..., None]), (xi.shape[1],))

    xi = rng.standard_normal((M, n_tasks))
    est = _controlled(step, cc, values, xi, C, key, symbolic + [model.metrics["eps_meta"]])
    out = {name: (np.zeros(shape), np.zeros(shape)) for name, shape in shapes.items()}
    for (name, idx), d, (m, e) in zip(names, det_vals, est[:-1]):
        out[name][0][idx] = m + d
        out[name][1][idx] = e
    start = inner.start.name
    da = out.get(start, (np.zeros(K), np.zeros(K)))
    return ExpectedUpdate(out["Q"], out["R"], da, est[-1], n_tasks)


# -- order 2 with finite support sets (docs/models/anil.md 5.6 "Order 2") --------------


class SupportDraw(NamedTuple):
    """Tasks, their support sets and what the second-order update reads of them
    (``support_sensitivities``): ``v_task`` (M, n), ``adapted`` a' (K, n), ``A`` =
    da'/da (K, K, n) with ``A[j, k] = da'_j / da_k``, ``J`` (K, K, n, n_s) with
    ``J[j, r, t, mu] = da'_j / dlambda^mu_r`` of task ``t``, ``fields`` the support
    fields of every family (``step.sources``' order) as (rows, n, n_s) arrays and
    ``zeta`` (n, n_s) the support labels' noise."""

    v_task: np.ndarray
    adapted: np.ndarray
    A: np.ndarray
    J: np.ndarray
    fields: list
    zeta: np.ndarray


def support_sensitivities(
    step: MetaStep, cc: _Concrete, C, a, vectors: dict, n: int, rng, xi=None
) -> SupportDraw:
    """``draw_adapted`` with a finite ``n_s`` (the same random draws in the same order,
    so the same adapted readouts for the same generator state), keeping the support
    fields and the derivatives of the adapted readout: ``A = da'/da`` and, for every
    support sample ``mu``, the Jacobian ``da'/dlambda^mu`` (K x K), by forward mode
    through ``c^(s+1) = c^(s) - alpha_in (Ct c^(s) - ht)``: ``Ct``, ``ht`` the sample
    means of the per-sample support Hessian and force plus the regulariser, and
    sample ``mu``'s own ``(Hs^mu, fs^mu)`` differentiated in its student fields by the
    model's expressions (``_Concrete.support_samples_d``, as ``MetaStep.gradients``):
    ``J^(s+1) = (I - alpha_in Ct) J^(s) - (alpha_in / n_s) (dHs^mu c^(s) - dfs^mu)``."""
    if step.population:
        raise ValueError("support_sensitivities: needs a finite n_s")
    K, M = cc.K, cc.M
    vectors = {**vectors, step.model.inner_loop.start.name: a}
    xi = rng.standard_normal((M, n)) if xi is None else np.asarray(xi, dtype=float)
    v_task = _broadcast_list(cc.law(*step._args(cc, vectors=vectors, xi=xi)), (n,))
    Cs = _stack(C, n)
    ns = int(step.n_s)
    L = _factor(Cs)
    rows = L.shape[-1]
    chunk = max(1, SUPPORT_CHUNK // (ns * rows))
    r = _values(cc.regulariser, step._args(cc, vectors=vectors))
    Hr, fr = r[: K * K].reshape(K, K, 1), r[K * K :, None]
    fr_da = _values(cc.regulariser_da, step._args(cc, vectors=vectors)).reshape(K, K, 1)
    alpha = step.alpha_in
    E = K * K + K
    adapted = np.empty((K, n))
    A_all = np.empty((K, K, n))
    J_all = np.empty((K, K, n, ns))
    U = np.empty((rows, n, ns))
    Z = np.empty((n, ns))
    a = np.asarray(a, dtype=float)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        t = hi - lo
        u = np.einsum("tij,tsj->its", L[lo:hi], rng.standard_normal((t, ns, rows)))
        zs = rng.standard_normal((t, ns))
        U[:, lo:hi], Z[lo:hi] = u, zs
        fields, r0 = [], 0
        for s_ in cc.sources:
            size = K if s_.kind == "student" else M
            fields.append(u[r0 : r0 + size])
            r0 += size
        sub = {cc.law_vector.name: v_task[:, lo:hi, None]}
        args = step._args(cc, fields=fields, zeta_=zs, tasks=sub, vectors=vectors)
        vals = _broadcast_list(cc.support_samples(*args), (t, ns)).mean(-1)
        d = _broadcast_list(cc.support_samples_d(*args), (t, ns)).reshape(E, K, t, ns)
        dH = d[: K * K].reshape(K, K, K, t, ns)  # [j, l, r, t, mu]
        df = d[K * K :]  # [j, r, t, mu]
        H = vals[: K * K].reshape(K, K, t) + Hr
        f = vals[K * K :] + fr
        c = np.repeat(a[:, None], t, axis=1)
        A = np.repeat(np.eye(K)[:, :, None], t, axis=2)
        J = np.zeros((K, K, t, ns))
        for _ in range(step.S):
            J = J - alpha * (
                np.einsum("jlt,lrtm->jrtm", H, J) + (np.einsum("jlrtm,lt->jrtm", dH, c) - df) / ns
            )
            A = A - alpha * (np.einsum("jlt,lkt->jkt", H, A) - fr_da)
            c = c - alpha * (np.einsum("kln,ln->kn", H, c) - f)
        adapted[:, lo:hi], A_all[:, :, lo:hi], J_all[:, :, lo:hi] = c, A, J
    fields, r0 = [], 0
    for s_ in cc.sources:
        size = K if s_.kind == "student" else M
        fields.append(U[r0 : r0 + size])
        r0 += size
    return SupportDraw(v_task, adapted, A_all, J_all, fields, Z)


def _population_A(step: MetaStep, cc: _Concrete, C, a, vectors: dict, v_task) -> np.ndarray:
    """``A = da'/da`` (K, K, n) of the population inner loop at the covariance ``C``."""
    K, n = cc.K, v_task.shape[1]
    vectors = {**vectors, step.model.inner_loop.start.name: a}
    args = (*step._args(cc, vectors=vectors, tasks={cc.law_vector.name: v_task}), np.asarray(C)[..., None])
    H = _broadcast_list(cc.support_mean(*args), (n,))[: K * K].reshape(K, K, n)
    r = _values(cc.regulariser, step._args(cc, vectors=vectors))
    H = H + r[: K * K].reshape(K, K, 1)
    fr_da = _values(cc.regulariser_da, step._args(cc, vectors=vectors)).reshape(K, K, 1)
    A = np.repeat(np.eye(K)[:, :, None], n, axis=2)
    for _ in range(step.S):
        A = A - step.alpha_in * (np.einsum("jlt,lkt->jkt", H, A) - fr_da)
    return A


def _shared_teacher(step: MetaStep) -> int:
    """The index (in ``step.sources``) of the shared teacher's field family, the one ``R``
    measures: the first teacher family with no perturbation."""
    for i, (s_, spread) in enumerate(zip(step.sources, step.spreads)):
        if i > 0 and spread == 0:
            return i
    raise ValueError(f"model {step.model.name!r}: no unperturbed teacher field family (the one R measures)")


def _expected_update_order2(step: MetaStep, Q, R, T, vectors: dict, n_tasks: int, rng) -> ExpectedUpdate:
    """``expected_update`` at order 2 with a finite support set (docs/models/anil.md 5.6
    "Order 2"), no closure.

    Each task draws its readout and support set (``support_sensitivities``: the adapted
    readout a', ``A = da'/da`` and the Jacobians ``J^mu = da'/dlambda^mu``). Given them, a'
    is fixed and the query expectations are exact (the engine's ``field_mean``):

    - the query-direction terms: the first layer's first-order integrands (``FirstLayer``
      without its ``MetaGradient``; ``eta^2 / n_q`` term included) and the readout rule's
      integrand at order 2 with the sample ``A`` (``-eta_a A^T b``), ``eps_meta``;
    - ``b_j = dL_q/da'_j`` (``delta g(lambda_j)``, averaged over the ``n_q`` queries):
      ``E_q[b]`` and ``E_q[b b^T] = E[b1 b1^T] / n_q + (1 - 1/n_q) E_q[b] E_q[b]^T``
      (``b1`` one query's; label noise included);
    - with ``gamma^mu_k = sum_j E_q[b_j] J^mu_jk``, the support-direction parts
      ``sup_R = -eta w sum_mu gamma^mu_k nu^mu_n`` (``nu^mu`` the shared teacher's
      field), ``sup_Q1 = -eta w sum_mu (gamma^mu_k lambda^mu_l + gamma^mu_l lambda^mu_k)``
      and ``sup_Q2 = eta^2 w^2 sum_mu (J^mu^T E_q[b b^T] J^mu)_kl``.

    These are averaged over the tasks with a control variate on the query terms (the same
    tasks adapted by the population inner loop, ``_controlled``; the support parts have
    none). ``dQ`` and ``dR`` are the sums of their query and support parts (their s.e.m.
    from the per-task sums) plus the decay terms."""
    model = step.model
    K, M = R.shape
    cc = step.concrete(K, M)
    inner = model.inner_loop
    a = np.asarray(vectors[inner.start.name], dtype=float)
    vectors = {k: np.asarray(v, dtype=float) for k, v in vectors.items()}
    C = cc.covariance()(Q, R, T)
    loss = model.sample_loss
    eta = float(model.numeric(model.first_layer.rate, step.values))
    w = float(step.weight)
    first = dataclasses.replace(model.first_layer, meta=None)
    names, integrands, fixed, shapes, symbolic = _rule_entries((first, *model.readout_updates), loss, K, M)
    key = ("updates2", K, M)
    fn = cc.field_mean(key, integrands + [model.metrics["eps_meta"]])
    adapted_ = inner.adapted.base
    db = [sp.diff(loss, adapted_[sp.Integer(j)]) for j in range(K)]
    fn_b = cc.field_mean_path(("query_b", K, M), db + [db[i] * db[j] for i in range(K) for j in range(K)])
    det_args = (Q_SYMBOL, R_SYMBOL, T_SYMBOL, *[v.base for v in model.vectors])
    det = sp.lambdify(det_args, [cc._conc(e, None) for e in fixed], MODULES)
    vec_values = [vectors.get(v.name, np.zeros(K if v.over == "student" else M)) for v in model.vectors]
    det_vals = [float(x) for x in det(Q, R, T, *vec_values)]
    row_Q = [i for i, (name, _) in enumerate(names) if name == "Q"]
    row_R = [i for i, (name, _) in enumerate(names) if name == "R"]
    teacher = _shared_teacher(step)
    n_q = step.n_q

    def values(xi, population=None, C=C):
        n = xi.shape[1]
        if population:
            v_task, adapted = draw_adapted(step, cc, C, a, vectors, n, rng, xi=xi, population=True)
            A = _population_A(step, cc, C, a, vectors, v_task)
        else:
            draw = support_sensitivities(step, cc, C, a, vectors, n, rng, xi=xi)
            v_task, adapted, A = draw.v_task, draw.adapted, draw.A
        tasks = {cc.law_vector.name: v_task, inner.adapted.name: adapted}
        args = step._args(cc, tasks=tasks, vectors=vectors, da=A)
        query = _broadcast_list(fn(*args, C[..., None]), (n,))
        if population:
            supR, supQ1, supQ2 = np.zeros((K, M, n)), np.zeros((K, K, n)), np.zeros((K, K, n))
        else:
            bq = _broadcast_list(fn_b(*args, C[..., None]), (n,))
            Eb = bq[:K]  # (K, n)
            Ebb = bq[K:].reshape(K, K, n) / n_q + (1 - 1 / n_q) * Eb[:, None] * Eb[None, :]
            gam = np.einsum("jt,jrtm->rtm", Eb, draw.J)  # E_q[gamma^mu_r] (K, n, n_s)
            lam_s, nu_s = draw.fields[0], draw.fields[teacher]
            supR = -eta * w * np.einsum("ktm,ntm->knt", gam, nu_s)
            x = np.einsum("ktm,ltm->klt", gam, lam_s)
            supQ1 = -eta * w * (x + x.transpose(1, 0, 2))
            supQ2 = eta**2 * w**2 * np.einsum("iktm,ijt,jltm->klt", draw.J, Ebb, draw.J)
        totQ = query[row_Q].reshape(K, K, n) + supQ1 + supQ2
        totR = query[row_R].reshape(K, M, n) + supR
        parts = [x.reshape(-1, n) for x in (supR, supQ1, supQ2, totQ, totR)]
        return np.concatenate([query, *parts])

    xi = rng.standard_normal((M, n_tasks))
    exprs = symbolic + [model.metrics["eps_meta"]]
    est = _controlled(step, cc, values, xi, C, key, exprs)
    nq_rows = len(names) + 1
    out = {name: (np.zeros(shape), np.zeros(shape)) for name, shape in shapes.items()}
    for (name, idx), d, (m, e) in zip(names, det_vals, est[: len(names)]):
        out[name][0][idx] = m + d
        out[name][1][idx] = e

    def block(lo, shape, add=None):
        n_ = int(np.prod(shape))
        mean = np.array([m for m, _ in est[lo : lo + n_]]).reshape(shape)
        sem = np.array([e for _, e in est[lo : lo + n_]]).reshape(shape)
        return (mean if add is None else mean + add, sem), lo + n_

    o = nq_rows
    sup_R, o = block(o, (K, M))
    sup_Q1, o = block(o, (K, K))
    sup_Q2, o = block(o, (K, K))
    dQ, o = block(o, (K, K), np.array([det_vals[i] for i in row_Q]).reshape(K, K))
    dR, o = block(o, (K, M), np.array([det_vals[i] for i in row_R]).reshape(K, M))
    start = inner.start.name
    da = out.get(start, (np.zeros(K), np.zeros(K)))
    return ExpectedUpdate(dQ, dR, da, est[nq_rows - 1], n_tasks, sup_R, sup_Q1, sup_Q2)


def realised_covariances(step: MetaStep, W, B, n: int, rng):
    """The covariance of the field rows that the real vectors realise, ``V V^T / N`` with
    ``V`` the student weights and each teacher family's vectors (``MetaStep.draw_task``'s
    task teachers: ``B`` plus ``spread Z``, ``Z`` a fresh standard normal (M, N), where
    the model has a perturbation): (rows, rows) when no family is perturbed, else
    (n, rows, rows), one per task.

    A task's ``Z`` enters only through ``U Z^T`` (``U`` the fixed rows ``W``, ``B``) and
    ``Z Z^T``; these are drawn exactly, at a cost free of N: with ``U^T = E L^T``
    (``E`` (N, r) orthonormal columns, a QR factorisation), ``Xi = Z E`` is a standard
    normal (M, r) matrix, ``U Z^T = L Xi^T``, and ``Z Z^T = Xi Xi^T + P`` with ``P``
    independent, Wishart with ``N - r`` degrees of freedom and scale I (Bartlett's
    construction); the ``Z`` of several perturbed families are stacked into one.
    ``tests/test_finite_support.py`` holds it against real draws of Z."""
    N = W.shape[1]
    spreads = step.spreads[1:]
    U = np.vstack([W, B])
    G = U @ U.T / N
    K, M = W.shape[0], B.shape[0]
    if all(sp_ == 0 for sp_ in spreads):
        idx = np.r_[np.arange(K), np.tile(np.arange(K, K + M), len(spreads))]
        return G[np.ix_(idx, idx)]
    r = U.shape[0]
    perturbed = [f for f, sp_ in enumerate(spreads) if sp_ > 0]
    Mp = M * len(perturbed)  # the Z of all perturbed families, stacked
    if N < r + Mp:
        raise ValueError(f"N = {N} must be at least {r + Mp} to realise the perturbed task teachers")
    L = np.linalg.qr(U.T, mode="r").T  # U = L E^T
    xi = rng.standard_normal((n, Mp, r))
    A = np.zeros((n, Mp, Mp))
    A[:, np.arange(Mp), np.arange(Mp)] = np.sqrt(rng.chisquare(N - r - np.arange(Mp), size=(n, Mp)))
    low = np.tril_indices(Mp, -1)
    A[:, low[0], low[1]] = rng.standard_normal((n, len(low[0])))
    UZ = np.einsum("ij,tmj->tim", L, xi) / N  # U Z^T / N, (n, r, Mp)
    ZZ = (np.einsum("tmj,tnj->tmn", xi, xi) + A @ A.transpose(0, 2, 1)) / N
    # the rows of every family: W, then each teacher family B + spread Z_f
    rows = K + M * len(spreads)
    out = np.empty((n, rows, rows))
    out[:, :K, :K] = G[:K, :K]
    z_of = {f: slice(M * i, M * (i + 1)) for i, f in enumerate(perturbed)}
    B_rows = slice(K, K + M)
    for f, sf_ in enumerate(spreads):
        sf = slice(K + M * f, K + M * (f + 1))
        block = np.broadcast_to(G[:K, B_rows], (n, K, M)).copy()
        if f in z_of:
            block += sf_ * UZ[:, :K, z_of[f]]
        out[:, :K, sf] = block
        out[:, sf, :K] = block.transpose(0, 2, 1)
        for g_, sg_ in enumerate(spreads[: f + 1]):
            sg = slice(K + M * g_, K + M * (g_ + 1))
            # (B + s_f Z_f)(B + s_g Z_g)^T / N
            block = np.broadcast_to(G[B_rows, B_rows], (n, M, M)).copy()
            if f in z_of:
                block += sf_ * UZ[:, B_rows, z_of[f]].transpose(0, 2, 1)
            if g_ in z_of:
                block += sg_ * UZ[:, B_rows, z_of[g_]]
            if f in z_of and g_ in z_of:
                block += sf_ * sg_ * ZZ[:, z_of[f], z_of[g_]]
            out[:, sf, sg] = block
            out[:, sg, sf] = block.transpose(0, 2, 1)
    return out


def realised_metrics(step: MetaStep, W, B, vectors: dict, n_tasks: int, rng) -> dict:
    """The support-set metrics (eps_meta with finite ``n_s``, docs/models/anil.md 5.7) of the
    network ``W``, ``B`` with readouts ``vectors``: ``metric_estimate`` over ``n_tasks``
    tasks at the covariance each task's real vectors realise (``realised_covariances``).
    ``name -> (mean, Monte Carlo s.e.m.)``."""
    C = realised_covariances(step, W, B, n_tasks, rng)
    a = vectors[step.model.inner_loop.start.name]
    return metric_estimate(step, C, a, vectors, n_tasks, rng)


def prepare_metrics(model, activation: str, values: dict, K: int, M: int) -> None:
    """Derive what ``realised_metrics`` evaluates (kept in this process: forked workers
    inherit it) for ``model`` at these parameters and sizes."""
    step = MetaStep(model, activation, values)
    names = support_metrics(model)
    step.concrete(K, M).field_mean(("metrics", names), [model.metrics[k] for k in names])
