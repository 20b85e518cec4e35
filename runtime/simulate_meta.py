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

``I2`` and its partial derivatives are typed here from their closed forms
(MODELS.md section 2), independently of the generated kernels, and the
gradient is tested against finite differences of the query loss.

Whole outer steps run compiled (``_meta_steps``; orders 1 and 2, population and
samples mode, with or without feature variability): the same random draws from
the same numpy Generator (numba reproduces its stream), the same formulas (the
reverse mode through the inner loop at order 2), and the coefficients of the
update rules taken from derive/model.py; they are tested equal to the numpy
loop, step for step.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, vectorize

from .integrate import SimulationDiverged

TWO_OVER_PI = 2.0 / math.pi


@vectorize(["float64(float64)"], cache=True)
def erf(x):
    return math.erf(x)


class Activation:
    """g, g' and the closed form of I2(a, b, c) = E[g(u) g(v)] for Var u = a,
    Var v = b, Cov = c, with its partial derivatives."""

    def __init__(self, name: str):
        if name not in ("erf", "linear"):
            raise ValueError(f"the meta-learning simulator knows erf and linear, not {name!r}")
        self.name = name

    def g(self, x):
        return erf(x / math.sqrt(2.0)) if self.name == "erf" else x

    def gp(self, x):
        return math.sqrt(2.0 / math.pi) * np.exp(-0.5 * x * x) if self.name == "erf" else np.ones_like(x)

    def I2(self, a, b, c):
        if self.name == "linear":
            return np.asarray(c, dtype=float)
        return TWO_OVER_PI * np.arcsin(c / np.sqrt((1.0 + a) * (1.0 + b)))

    def I2_partials(self, a, b, c):
        """(dI2/da, dI2/db, dI2/dc)."""
        if self.name == "linear":
            z = np.zeros(np.broadcast(a, b, c).shape)
            return z, z, np.ones_like(z)
        root = np.sqrt((1.0 + a) * (1.0 + b) - c * c)
        dc = TWO_OVER_PI / root
        da = -TWO_OVER_PI * c / (2.0 * (1.0 + a) * root)
        db = -TWO_OVER_PI * c / (2.0 * (1.0 + b) * root)
        return da, db, dc


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
        # the cases whose whole outer steps run compiled (run_seed_meta,
        # _meta_steps): orders 1 and 2, population and samples mode, any eps_B
        self.compiled = self.order in (1, 2)
        self._B = None
        self._Tt = None

    def use_teacher(self, B):
        """The seed's fixed teacher vectors (their norms are computed once)."""
        self._B = B
        self._Tt = np.einsum("mi,mi->m", B, B) / B.shape[1]

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
        sq = math.sqrt(N)
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
        sq = math.sqrt(W.shape[1])
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

    def gradients(self, W, a, task, fast: bool = True):
        """(G (n_q, K), grad_W through the inner loop or None, grad_a) for one step.

        ``G`` is the coefficient of x in the first-order gradient,
        ``dL/dw_k = mean_mu G[mu, k] x_mu / sqrt(N)``. The first-order step in
        population mode without feature variability runs the same arithmetic
        compiled (``_first_order_population``); ``fast=False`` forces numpy."""
        if fast and self.order == 1 and self.population and task[1] is self._B:
            vt, B, _, _, Xq, zq = task
            G, grad_a = _first_order_population(
                W, B, self._Tt, a, vt, Xq, zq, self.alpha_in, self.S, self.sigma, self.act.name == "linear"
            )
            return G, None, grad_a
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
            grad_W = dLam.T @ Xs / math.sqrt(N)
        return G, grad_W, grad_a


# -- the compiled path -------------------------------------------------------------
# The same formulas as MetaStep (C, D from I2 at the current overlaps or C, h from
# the support samples, S inner steps, query delta; at order 2 the reverse mode
# through the inner loop), compiled. ``_first_order_population`` is one step's
# first-order population gradients (eps_B = 0), ``_meta_steps`` whole outer
# steps. Every overlap and field (a sum over the N coordinates) is one call of
# ``_dot``, so the per-step function and the whole-loop function below give the
# same numbers to the last bit.


@njit(cache=True, fastmath={"reassoc"})
def _dot(x, y):
    """sum_i x_i y_i, vectorised (reassociation only: inf and nan propagate).
    Not inlined into its callers, which would drop the fastmath flag."""
    acc = 0.0
    for i in range(x.size):
        acc += x[i] * y[i]
    return acc


@njit(cache=True)
def _overlaps(W, B, Q, R):
    """Q = W W^T / N, R = W B^T / N."""
    K, N = W.shape
    for k in range(K):
        for q in range(k, K):
            Q[k, q] = _dot(W[k], W[q]) / N
            Q[q, k] = Q[k, q]
        for m in range(B.shape[0]):
            R[k, m] = _dot(W[k], B[m]) / N


@njit(cache=True)
def _fields(Xq, W, B, lam, nu):
    """The query fields lam = X W^T / sqrt(N) (n_q, K), nu = X B^T / sqrt(N) (n_q, M)."""
    sq = math.sqrt(W.shape[1])
    for mu in range(Xq.shape[0]):
        for k in range(W.shape[0]):
            lam[mu, k] = _dot(Xq[mu], W[k]) / sq
        for m in range(B.shape[0]):
            nu[mu, m] = _dot(Xq[mu], B[m]) / sq


@njit(cache=True)
def _adapt(Q, R, Tt, a, vt, alpha_in, S, linear, C, D, h, cs):
    """The population inner loop: C, D = I2 at the overlaps, h = D vt, and the
    readouts c^(0..S) into the rows of ``cs`` (the adapted readout is cs[S])."""
    K, M = R.shape
    for k in range(K):
        h[k] = 0.0
        for q in range(K):
            if linear:
                C[k, q] = Q[k, q]
            else:
                C[k, q] = TWO_OVER_PI * math.asin(Q[k, q] / math.sqrt((1.0 + Q[k, k]) * (1.0 + Q[q, q])))
        for m in range(M):
            if linear:
                d = R[k, m]
            else:
                d = TWO_OVER_PI * math.asin(R[k, m] / math.sqrt((1.0 + Q[k, k]) * (1.0 + Tt[m])))
            D[k, m] = d
            h[k] += d * vt[m]
    _inner_steps(C, h, a, alpha_in, S, cs)


@njit(cache=True)
def _inner_steps(C, h, a, alpha_in, S, cs):
    """c^(0) = a, c^(s+1) = c^(s) - alpha_in (C c^(s) - h), into the rows of ``cs``."""
    K = a.size
    for k in range(K):
        cs[0, k] = a[k]
    for s_ in range(S):
        for k in range(K):
            acc = 0.0
            for q in range(K):
                acc += C[k, q] * cs[s_, q]
            cs[s_ + 1, k] = cs[s_, k] - alpha_in * (acc - h[k])


@njit(cache=True)
def _support_samples(Xs, zs, W, Bt, vt, sigma, linear, Lam, gL, ys, C, h):
    """Samples mode: Lam = Xs W^T / sqrt(N), gL = g(Lam), the support labels
    ys = g(Xs Bt^T / sqrt(N)) vt + sigma zs, C = gL^T gL / n_s, h = gL^T ys / n_s."""
    ns, K = Lam.shape
    M = Bt.shape[0]
    sq = math.sqrt(W.shape[1])
    for mu in range(ns):
        for k in range(K):
            x = _dot(Xs[mu], W[k]) / sq
            Lam[mu, k] = x
            gL[mu, k] = x if linear else math.erf(x / math.sqrt(2.0))
        y = 0.0
        for m in range(M):
            x = _dot(Xs[mu], Bt[m]) / sq
            y += (x if linear else math.erf(x / math.sqrt(2.0))) * vt[m]
        ys[mu] = y + sigma * zs[mu]
    for k in range(K):
        for q in range(K):
            acc = 0.0
            for mu in range(ns):
                acc += gL[mu, k] * gL[mu, q]
            C[k, q] = acc / ns
        acc = 0.0
        for mu in range(ns):
            acc += gL[mu, k] * ys[mu]
        h[k] = acc / ns


@njit(cache=True)
def _query_gradients(lam, nu, zq, c, vt, sigma, linear, G, grad_a):
    """G[mu, k] = delta_mu g'(lam_muk) c_k and grad_a = dL/da' = mean_mu g(lam_mu) delta_mu."""
    nq, K = lam.shape
    M = nu.shape[1]
    for k in range(K):
        grad_a[k] = 0.0
    for mu in range(nq):
        delta = 0.0
        for k in range(K):
            x = lam[mu, k]
            delta += (x if linear else math.erf(x / math.sqrt(2.0))) * c[k]
        for m in range(M):
            x = nu[mu, m]
            delta -= (x if linear else math.erf(x / math.sqrt(2.0))) * vt[m]
        delta -= sigma * zq[mu]
        for k in range(K):
            x = lam[mu, k]
            if linear:
                g, gp = x, 1.0
            else:
                g, gp = math.erf(x / math.sqrt(2.0)), math.sqrt(2.0 / math.pi) * math.exp(-0.5 * x * x)
            G[mu, k] = delta * gp * c[k]
            grad_a[k] += g * delta / nq


@njit(cache=True)
def _first_order_population(W, B, Tt, a, vt, Xq, zq, alpha_in, S, sigma, linear):
    """MetaStep.gradients for order 1, population mode, eps_B = 0, compiled:
    (G, dL/da'). Tested equal to the numpy path."""
    K, M, nq = W.shape[0], B.shape[0], Xq.shape[0]
    Q, R = np.empty((K, K)), np.empty((K, M))
    _overlaps(W, B, Q, R)
    cs = np.empty((S + 1, K))
    _adapt(Q, R, Tt, a, vt, alpha_in, S, linear, np.empty((K, K)), np.empty((K, M)), np.empty(K), cs)
    lam, nu = np.empty((nq, K)), np.empty((nq, M))
    _fields(Xq, W, B, lam, nu)
    G, grad_a = np.empty((nq, K)), np.empty(K)
    _query_gradients(lam, nu, zq, cs[S], vt, sigma, linear, G, grad_a)
    return G, grad_a


@njit(cache=True)
def _through_inner_loop(C, cs, alpha_in, S, grad_a, adj, adjn, dC, dh):
    """Order 2: reverse mode through c^(s+1) = c^(s) - alpha_in (C c^(s) - h), as
    ``MetaStep.gradients``. On entry ``grad_a`` holds dL/da'; on return it holds
    A^T dL/da', and dC, dh the gradients in C and h."""
    K = C.shape[0]
    for k in range(K):
        adj[k] = grad_a[k]
        dh[k] = 0.0
        for q in range(K):
            dC[k, q] = 0.0
    for s_ in range(S - 1, -1, -1):
        for k in range(K):
            for q in range(K):
                dC[k, q] -= alpha_in * (adj[k] * cs[s_, q])
            dh[k] += alpha_in * adj[k]
        for k in range(K):
            acc = 0.0
            for q in range(K):
                acc += C[q, k] * adj[q]
            adjn[k] = adj[k] - alpha_in * acc
        for k in range(K):
            adj[k] = adjn[k]
    for k in range(K):
        grad_a[k] = adj[k]


@njit(cache=True)
def _population_overlap_gradients(Q, R, Tt, vt, linear, dC, dh, GQ, GR):
    """Order 2, population mode: from dC, dh the gradients in the overlaps, ``GQ``
    (already symmetrised, GQ + GQ^T) and ``GR``; ``grad_W = (GQ @ W + GR @ Bt) / N``."""
    K, M = R.shape
    # dI2(a, b, c): erf dc = 2/pi / root, da = -2/pi c / (2 (1 + a) root), db likewise
    for k in range(K):
        diag = 0.0
        for q in range(K):
            if linear:
                cc, ca, cb_qk = 1.0, 0.0, 0.0
            else:
                root = math.sqrt((1.0 + Q[k, k]) * (1.0 + Q[q, q]) - Q[k, q] * Q[k, q])
                cc = TWO_OVER_PI / root
                ca = -TWO_OVER_PI * Q[k, q] / (2.0 * (1.0 + Q[k, k]) * root)
                # the b-partial at (q, k): Q_qk / (2 (1 + Q_kk) root_qk)
                root_qk = math.sqrt((1.0 + Q[q, q]) * (1.0 + Q[k, k]) - Q[q, k] * Q[q, k])
                cb_qk = -TWO_OVER_PI * Q[q, k] / (2.0 * (1.0 + Q[k, k]) * root_qk)
            GQ[k, q] = dC[k, q] * cc
            diag += dC[k, q] * ca + dC[q, k] * cb_qk
        for m in range(M):
            dD = dh[k] * vt[m]
            if linear:
                GR[k, m] = dD
            else:
                root = math.sqrt((1.0 + Q[k, k]) * (1.0 + Tt[m]) - R[k, m] * R[k, m])
                GR[k, m] = dD * (TWO_OVER_PI / root)
                diag += dD * (-TWO_OVER_PI * R[k, m] / (2.0 * (1.0 + Q[k, k]) * root))
        GQ[k, k] += diag
    for k in range(K):
        for q in range(k, K):
            x = GQ[k, q] + GQ[q, k]
            GQ[k, q] = x
            GQ[q, k] = x


@njit(cache=True)
def _combine(x, W, y, Bt, N, scratch, out):
    """out = (sum_q x_q W_q) / N + (sum_m y_m Bt_m) / N, each sum in increasing index."""
    for i in range(out.size):
        out[i] = x[0] * W[0, i]
    for q in range(1, x.size):
        for i in range(out.size):
            out[i] += x[q] * W[q, i]
    for i in range(out.size):
        scratch[i] = y[0] * Bt[0, i]
    for m in range(1, y.size):
        for i in range(out.size):
            scratch[i] += y[m] * Bt[m, i]
    for i in range(out.size):
        out[i] = out[i] / N + scratch[i] / N


@njit(cache=True)
def _samples_weight_gradient(Xs, Lam, gL, ys, dC, dh, linear, dLam, grad_W):
    """Order 2, samples mode: dLam = (gL (dC + dC^T) + ys dh^T) / n_s * g'(Lam),
    grad_W = dLam^T Xs / sqrt(N), at the weights before the step."""
    ns, K = Lam.shape
    N = Xs.shape[1]
    sq = math.sqrt(N)
    for mu in range(ns):
        for k in range(K):
            acc = 0.0
            for q in range(K):
                acc += gL[mu, q] * (dC[q, k] + dC[k, q])
            x = Lam[mu, k]
            gp = 1.0 if linear else math.sqrt(2.0 / math.pi) * math.exp(-0.5 * x * x)
            dLam[mu, k] = (acc + ys[mu] * dh[k]) / ns * gp
    for k in range(K):
        g = dLam[0, k]
        for i in range(N):
            grad_W[k, i] = g * Xs[0, i]
        for mu in range(1, ns):
            g = dLam[mu, k]
            for i in range(N):
                grad_W[k, i] += g * Xs[mu, i]
        for i in range(N):
            grad_W[k, i] /= sq


@njit(cache=True)
def _meta_steps(
    W, B, Tt0, a, vbar, rng, n_steps, n_q, s, alpha_in, S, sigma, eps_B, second, linear,
    w_shrink, w_scale, weights_scale, a_shrink, a_scale, n_s,
):  # fmt: skip
    """``n_steps`` whole outer steps, in place on W and a, without allocating.
    The task is drawn from ``rng`` in the order of ``MetaStep.draw_task``: vt,
    then (eps_B > 0) the task teacher ``Bt = B + eps_B Z`` with its own norms Tt,
    then (samples mode, ``n_s > 0``; ``n_s = 0`` is population mode) the support
    inputs and noise, then the query inputs and noise. The inner loop runs on C, h
    of the population support loss (``_adapt``) or of the support samples
    (``_support_samples``); the query gives G and dL/da' (``_query_gradients``);
    with ``second`` (order 2) the reverse mode through the inner loop
    (``_through_inner_loop``) gives A^T dL/da' and grad_W (through the overlaps,
    ``_population_overlap_gradients``, or the support fields,
    ``_samples_weight_gradient``). Then
    ``w_k <- w_shrink w_k - w_scale sum_mu G_mu,k x_mu``,
    ``W <- W - weights_scale grad_W`` (order 2) and ``a <- a_shrink a - a_scale grad_a``,
    with the coefficients of ``FirstLayer.step``, ``FirstLayer.step_weights`` and
    ``ReadoutUpdate.step`` (derive/model.py) passed in."""
    K, N = W.shape
    M = B.shape[0]
    Q, R = np.empty((K, K)), np.empty((K, M))
    C, D, h, cs = np.empty((K, K)), np.empty((K, M)), np.empty(K), np.empty((S + 1, K))
    vt = np.empty(M)
    Bt = B.copy()
    Tt = Tt0.copy()
    Xq, zq = np.empty((n_q, N)), np.empty(n_q)
    lam, nu = np.empty((n_q, K)), np.empty((n_q, M))
    G, grad_a = np.empty((n_q, K)), np.empty(K)
    gx = np.empty(N)
    adj, adjn, dC, dh = np.empty(K), np.empty(K), np.empty((K, K)), np.empty(K)
    GQ, GR, grad_W = np.empty((K, K)), np.empty((K, M)), np.empty((K, N))
    # samples mode (n_s > 0): the support set
    ns = max(n_s, 1)
    Xs, zs, ys = np.empty((ns, N)), np.empty(ns), np.empty(ns)
    Lam, gL, dLam = np.empty((ns, K)), np.empty((ns, K)), np.empty((ns, K))
    for _ in range(n_steps):
        for m in range(M):
            vt[m] = vbar[m] + s * rng.standard_normal()
        if eps_B > 0.0:
            for m in range(M):
                for i in range(N):
                    Bt[m, i] = B[m, i] + eps_B * rng.standard_normal()
            for m in range(M):
                Tt[m] = _dot(Bt[m], Bt[m]) / N
        if n_s > 0:
            for mu in range(n_s):
                for i in range(N):
                    Xs[mu, i] = rng.standard_normal()
            for mu in range(n_s):
                zs[mu] = rng.standard_normal()
        for mu in range(n_q):
            for i in range(N):
                Xq[mu, i] = rng.standard_normal()
        for mu in range(n_q):
            zq[mu] = rng.standard_normal()
        if n_s > 0:
            _support_samples(Xs, zs, W, Bt, vt, sigma, linear, Lam, gL, ys, C, h)
            _inner_steps(C, h, a, alpha_in, S, cs)
        else:
            _overlaps(W, Bt, Q, R)
            _adapt(Q, R, Tt, a, vt, alpha_in, S, linear, C, D, h, cs)
        _fields(Xq, W, Bt, lam, nu)
        _query_gradients(lam, nu, zq, cs[S], vt, sigma, linear, G, grad_a)
        if second:
            _through_inner_loop(C, cs, alpha_in, S, grad_a, adj, adjn, dC, dh)
            if n_s > 0:
                _samples_weight_gradient(Xs, Lam, gL, ys, dC, dh, linear, dLam, grad_W)
            else:
                _population_overlap_gradients(Q, R, Tt, vt, linear, dC, dh, GQ, GR)
                # grad_W = (GQ W + GR Bt) / N at the weights before the step, row by row
                for k in range(K):
                    _combine(GQ[k], W, GR[k], Bt, N, gx, grad_W[k])
        for k in range(K):
            if w_shrink != 1.0:
                for i in range(N):
                    W[k, i] *= w_shrink
            g = G[0, k]
            if n_q == 1:
                for i in range(N):
                    W[k, i] -= w_scale * (g * Xq[0, i])
            else:
                # sum_mu G_mu,k x_mu, summed in increasing mu
                for i in range(N):
                    gx[i] = g * Xq[0, i]
                for mu in range(1, n_q):
                    g = G[mu, k]
                    for i in range(N):
                        gx[i] += g * Xq[mu, i]
                for i in range(N):
                    W[k, i] -= w_scale * gx[i]
            if second:
                for i in range(N):
                    W[k, i] -= weights_scale * grad_W[k, i]
        if a_shrink != 1.0:
            for k in range(K):
                a[k] *= a_shrink
        for k in range(K):
            a[k] -= a_scale * grad_a[k]


# at most this many steps per call of the compiled loop (the progress bar moves
# at least this often); its results do not depend on it
CHUNK = 4096


def run_seed_meta(model, W, B, vec, values, rates, N, n_steps, rec, rng, bar, activation, path="compiled"):
    """One seed: ``n_steps`` outer steps, the order parameters every ``rec`` steps.

    ``path``: ``"compiled"`` runs whole outer steps compiled where
    ``MetaStep.compiled`` holds (orders 1 and 2, both support modes, any eps_B:
    every case the model allows); ``"step"`` the Python loop with the compiled gradients;
    ``"numpy"`` the Python loop with the numpy gradients (the reference). With
    a seeded ``rng`` the three draw the same random numbers and agree to round-off."""
    if path not in ("compiled", "step", "numpy"):
        raise ValueError(f"path must be compiled, step or numpy, got {path!r}")
    K, M = W.shape[0], B.shape[0]
    names = [v.name for v in model.state_vectors + model.const_vectors]
    if names != ["a", "vbar"]:
        raise ValueError(f"the meta-learning simulator expects readouts a, vbar, got {names}")
    a = vec[:K].copy()
    vbar = vec[K : K + M].copy()
    step = MetaStep(Activation(activation), values)
    step.use_teacher(B)
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
        # the update rules' own coefficients (derive/model.py), as numbers
        w_shrink, w_scale = fl.coefficients(N, eta, decay, step.n_q)
        weights_scale = float(fl.weights_coefficient(eta))
        a_shrink, a_scale = ro.coefficients(N, eta_a, decay_a)
        task = (step.n_q, float(step.s), float(step.alpha_in), step.S, float(step.sigma), float(step.eps_B))
        second, linear = step.order == 2, step.act.name == "linear"
        rules = (second, linear, w_shrink, w_scale, weights_scale, a_shrink, a_scale)
        n_s = 0 if step.population else int(step.n_s)  # 0: population mode

        def advance(n):
            _meta_steps(W, B, step._Tt, a, vbar, rng, n, *task, *rules, n_s)

    else:
        fast = path != "numpy"

        def advance(n):
            for _ in range(n):
                task = step.draw_task(rng, B, vbar)
                G, grad_W, grad_a = step.gradients(W, a, task, fast=fast)
                fl.step(W, G, task[4], eta, decay)
                if grad_W is not None:
                    fl.step_weights(W, grad_W, eta)
                ro.step(a, grad_a, N, eta_a, decay_a)

    record(0)
    for r in range(1, n_rec + 1):
        done = 0
        while done < rec:
            n = min(CHUNK, rec - done)
            advance(n)
            done += n
            if bar:
                bar.update(n)
        record(r)
        if not np.all(np.isfinite(W)):
            raise SimulationDiverged(r * rec / N, model.name)
    return Qs, Rs, {"a": As}
