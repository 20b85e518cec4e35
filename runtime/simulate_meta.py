"""The finite-N simulator of meta-learning on streaming tasks (MODELS.md section 5).

The real algorithm on real vectors, one task per step:

1. task: ``vt = vbar + s xi``; teacher vectors ``B + eps_B Z`` (fresh ``Z``);
2. inner loop from ``c = a``, ``S`` steps ``c <- c - alpha_in (C c - h)``:
   ``population`` mode (``n_s = inf``): ``C_kl = I2(lambda_k, lambda_l)``,
   ``h = D vt`` with ``D_km = I2(lambda_k, nu^tau_m)`` at the network's current
   overlaps; ``samples`` mode: ``C = g(Lam)^T g(Lam) / n_s``,
   ``h = g(Lam)^T y / n_s`` over ``n_s`` fresh support samples;
3. query: ``n_q`` fresh samples, ``delta = f_{a'}(x) - y``, query loss
   ``L = mean(delta^2) / 2``; the outer step ``W <- W - eta grad_W L``,
   ``a <- a - (eta_a / N) grad_a L`` with ``grad_W`` at fixed ``a'`` (order 1)
   or through the inner loop (order 2, by reverse-mode differentiation of the
   inner loop, written out below), and ``grad_a = dL/da'`` (order 1) or
   ``A^T dL/da'`` (order 2).

Two paths run it. ``MetaStep`` is the numpy reference, one step at a time. The
compiled path runs whole outer steps (``meta_steps`` of the generated module of
the model and activation, rendered from derive/templates/meta_simulator.py.jinja):
the same random draws from the same numpy Generator (numba reproduces its
stream), the same arithmetic, and it is tested equal to the reference step for
step. No formula of the activation is typed here: ``g``, ``g'``, ``I2`` and the
partial derivatives of ``I2`` are derive's (derive/simulator.py: the activation's
sympy expression, the engine's ``I2`` and sympy's derivatives of it), lambdified
for the reference and printed into the generated module for the compiled path, so
a new activation needs no edit here. The simulation itself does not use the
flow's algebra (the task moments, the sensitivities): it runs the algorithm on
real vectors, and the gradient is tested against finite differences of the query
loss. The input norm ``sqrt(N)`` and the coefficients of the update rules are
those of derive/model.py.
"""

from __future__ import annotations

import math
from functools import cached_property, lru_cache

import numpy as np
import sympy as sp

from derive.activations import get_activation
from derive.model import FirstLayer
from derive.simulator import formulas

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


class MetaStep:
    """One outer step of the meta-learner; ``query_loss`` and ``gradients`` are
    exposed separately so that the gradient can be checked by finite differences."""

    def __init__(self, act: Activation, params: dict):
        self.act = act
        self.alpha_in = params["alpha_in"]
        self.S = int(params["S"])
        self.order = int(params["order"])
        self.n_q = int(params["n_q"])
        self.n_s = params["n_s"]
        self.s = params["s"]
        self.eps_B = params["eps_B"]
        self.sigma = params["sigma"]
        self.population = not math.isfinite(self.n_s)
        # the cases whose whole outer steps run compiled (run_seed_meta, meta_steps
        # of the generated module): orders 1 and 2, population and samples mode, any eps_B
        self.compiled = self.order in (1, 2)

    def draw_task(self, rng, B, vbar):
        """(vt, task teacher vectors, support inputs or None, support noise, query inputs, query noise)."""
        M, N = B.shape
        vt = vbar + self.s * rng.standard_normal(M)
        Bt = B + self.eps_B * rng.standard_normal((M, N)) if self.eps_B > 0 else B
        Xs = zs = None
        if not self.population:
            ns = int(self.n_s)
            Xs = rng.standard_normal((ns, N))
            zs = rng.standard_normal(ns)
        Xq = rng.standard_normal((self.n_q, N))
        zq = rng.standard_normal(self.n_q)
        return vt, Bt, Xs, zs, Xq, zq

    # -- inner loop -----------------------------------------------------------
    def support(self, W, task):
        """(C, h, cache) of the support gradient C c - h."""
        vt, Bt, Xs, zs, _, _ = task
        N = W.shape[1]
        act = self.act
        if self.population:
            Q = W @ W.T / N
            Rt = W @ Bt.T / N
            Tt = np.einsum("mi,mi->m", Bt, Bt) / N
            q = np.diag(Q)
            C = act.I2(q[:, None], q[None, :], Q)
            D = act.I2(q[:, None], Tt[None, :], Rt)
            return C, D @ vt, (Q, Rt, Tt, D)
        sq = FirstLayer.input_norm(N)
        Lam = Xs @ W.T / sq
        ys = act.g(Xs @ Bt.T / sq) @ vt + self.sigma * zs
        gL = act.g(Lam)
        ns = Xs.shape[0]
        return gL.T @ gL / ns, gL.T @ ys / ns, (Lam, gL, ys)

    def adapt(self, C, h, a):
        """c^(0..S) of the inner loop."""
        cs = [a.copy()]
        for _ in range(self.S):
            cs.append(cs[-1] - self.alpha_in * (C @ cs[-1] - h))
        return cs

    # -- query ----------------------------------------------------------------
    def query(self, W, ap, task):
        vt, Bt, _, _, Xq, zq = task
        sq = FirstLayer.input_norm(W.shape[1])
        lam = Xq @ W.T / sq
        y = self.act.g(Xq @ Bt.T / sq) @ vt + self.sigma * zq
        delta = self.act.g(lam) @ ap - y
        return lam, delta

    def query_loss(self, W, a, task) -> float:
        """L = mean over the query samples of delta^2 / 2, through the inner loop."""
        C, h, _ = self.support(W, task)
        ap = self.adapt(C, h, a)[-1]
        _, delta = self.query(W, ap, task)
        return 0.5 * float(np.mean(delta**2))

    def gradients(self, W, a, task):
        """(G (n_q, K), grad_W through the inner loop or None, grad_a) for one step.

        ``G`` is the coefficient of x in the first-order gradient,
        ``dL/dw_k = mean_mu G[mu, k] x_mu / sqrt(N)``."""
        act = self.act
        C, h, cache = self.support(W, task)
        cs = self.adapt(C, h, a)
        ap = cs[-1]
        lam, delta = self.query(W, ap, task)
        nq = lam.shape[0]
        G = (delta[:, None] * act.gp(lam)) * ap[None, :]
        b = act.g(lam).T @ delta / nq  # dL/da'
        if self.order == 1:
            return G, None, b
        # reverse mode through c^(s+1) = c^(s) - alpha_in (C c^(s) - h)
        adj = b.copy()
        dC = np.zeros_like(C)
        dh = np.zeros_like(h)
        for s_ in range(self.S - 1, -1, -1):
            dC -= self.alpha_in * np.outer(adj, cs[s_])
            dh += self.alpha_in * adj
            adj = adj - self.alpha_in * (C.T @ adj)
        grad_a = adj  # A^T dL/da'
        N = W.shape[1]
        if self.population:
            Q, Rt, Tt, D = cache
            vt, Bt = task[0], task[1]
            dD = np.outer(dh, vt)
            q = np.diag(Q)
            ca, cb, cc = act.I2_partials(q[:, None], q[None, :], Q)
            da, _, dc = act.I2_partials(q[:, None], Tt[None, :], Rt)
            GQ = dC * cc  # off-diagonal slots, Q_kl and Q_lk distinct variables
            GQ[np.diag_indices_from(GQ)] += (dC * ca).sum(1) + (dC * cb).sum(0) + (dD * da).sum(1)
            GR = dD * dc
            grad_W = (GQ + GQ.T) @ W / N + GR @ Bt / N
        else:
            Lam, gL, ys = cache
            Xs = task[2]
            ns = Lam.shape[0]
            dLam = ((gL @ (dC + dC.T)) + np.outer(ys, dh)) / ns * act.gp(Lam)
            grad_W = dLam.T @ Xs / FirstLayer.input_norm(N)
        return G, grad_W, grad_a


class SeedInterrupted(KeyboardInterrupt):
    """An interrupt during one seed's run: ``records`` are (Q, R, readouts) so far."""

    def __init__(self, records):
        self.records = records
        super().__init__("interrupted")


# at most this many steps per call of the compiled loop (the progress bar moves
# at least this often); its results do not depend on it
CHUNK = 4096


def run_seed_meta(
    model, W, B, vec, values, rates, N, n_steps, rec, rng, bar, activation, path="compiled", stop=None
):
    """One seed: ``n_steps`` outer steps, the order parameters every ``rec`` steps.

    ``path``: ``"compiled"`` runs whole outer steps compiled (``meta_steps`` of the
    generated module of ``model`` and ``activation``) where ``MetaStep.compiled``
    holds (orders 1 and 2, both support modes, any eps_B: every case the model
    allows); ``"numpy"`` the Python loop of ``MetaStep`` (the reference). With a
    seeded ``rng`` the two draw the same random numbers and agree to round-off.
    An interrupt (KeyboardInterrupt), or ``stop()`` true between two chunks, ends
    the run early: the records made so far are returned (``runtime.simulate``)."""
    if path not in ("compiled", "numpy"):
        raise ValueError(f"path must be compiled or numpy, got {path!r}")
    K, M = W.shape[0], B.shape[0]
    names = [v.name for v in model.state_vectors + model.const_vectors]
    if names != ["a", "vbar"]:
        raise ValueError(f"the meta-learning simulator expects readouts a, vbar, got {names}")
    a = vec[:K].copy()
    vbar = vec[K : K + M].copy()
    step = MetaStep(Activation(activation), values)
    (eta, decay), (eta_a, decay_a) = rates
    fl, ro = model.first_layer, model.readout_updates[0]
    n_rec = n_steps // rec
    Qs = np.empty((n_rec + 1, K, K))
    Rs = np.empty((n_rec + 1, K, M))
    As = np.empty((n_rec + 1, K))

    def record(i):
        Qs[i] = W @ W.T / N
        Rs[i] = W @ B.T / N
        As[i] = a

    if path == "compiled" and step.compiled:
        meta_steps = load(model.name, activation).module.meta_steps
        # the input norm and the update rules' own coefficients (derive/model.py), as numbers
        norm = float(fl.input_norm(N))
        w_shrink, w_scale = fl.coefficients(N, eta, decay, step.n_q)
        weights_scale = float(fl.weights_coefficient(eta))
        a_shrink, a_scale = ro.coefficients(N, eta_a, decay_a)
        task = (step.n_q, float(step.s), float(step.alpha_in), step.S, float(step.sigma), float(step.eps_B))
        rules = (step.order == 2, norm, w_shrink, w_scale, weights_scale, a_shrink, a_scale)
        n_s = 0 if step.population else int(step.n_s)  # 0: population mode
        Tt = np.einsum("mi,mi->m", B, B) / N  # the fixed teacher's norms

        def advance(n):
            meta_steps(W, B, Tt, a, vbar, rng, n, *task, *rules, n_s)

    else:

        def advance(n):
            for _ in range(n):
                task = step.draw_task(rng, B, vbar)
                G, grad_W, grad_a = step.gradients(W, a, task)
                fl.step(W, G, task[4], eta, decay)
                if grad_W is not None:
                    fl.step_weights(W, grad_W, eta)
                ro.step(a, grad_a, N, eta_a, decay_a)

    record(0)
    made = 0  # the last record made
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
        raise SeedInterrupted((Qs[: made + 1], Rs[: made + 1], {"a": As[: made + 1]})) from None
    return Qs[: made + 1], Rs[: made + 1], {"a": As[: made + 1]}
