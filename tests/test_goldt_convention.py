"""The two_layer flow against an independent reimplementation of Goldt et al.'s Euler scheme.

Goldt, Advani, Saxe, Krzakala, Zdeborova (NeurIPS 2019) integrate the ODEs of
online SGD in a two-layer network with a plain Euler scheme (their C++
integrator): at every step the covariance ``C = [[Q, R], [R^T, T]]`` is built
from the old order parameters, every increment is computed from those old
values, and the second layer moves (and decays) only when it is trained. The
code below types that scheme and the Saad-Solla closed forms of
docs/conventions.md section 2 by hand, in plain numpy, reading nothing from ``derive`` or
``generated``; ``runtime.flow(method="euler")`` must follow it step by step.

Conventions checked here (docs/models/two_layer.md): weight decay ``kappa`` is not
multiplied by a learning rate, ``eta_v = 0`` freezes ``v`` without decay, the
noise enters as ``eta^2 sigma^2 v_i v_k J2(i, k)``, and
``eps_g = 1/2 E[(f - y_clean)^2]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import runtime
from runtime import Init

DT = 0.01
N_STEPS = 250
TOL = 1e-10


# --- Saad & Solla (1995) closed forms for g(z) = erf(z / sqrt(2)), docs/conventions.md section 2 ---


def erf_I2(C, a, b):
    return 2 / math.pi * math.asin(C[a, b] / math.sqrt((1 + C[a, a]) * (1 + C[b, b])))


def erf_J2(C, a, b):
    return 2 / math.pi / math.sqrt((1 + C[a, a]) * (1 + C[b, b]) - C[a, b] ** 2)


def erf_I3(C, a, b, c):
    L3 = (1 + C[a, a]) * (1 + C[c, c]) - C[a, c] ** 2
    return 2 / math.pi / math.sqrt(L3) * (C[b, c] * (1 + C[a, a]) - C[a, b] * C[a, c]) / (1 + C[a, a])


def erf_I4(C, a, b, c, d):
    L4 = (1 + C[a, a]) * (1 + C[b, b]) - C[a, b] ** 2
    L0 = (
        L4 * C[c, d]
        - C[b, c] * C[b, d] * (1 + C[a, a])
        - C[a, c] * C[a, d] * (1 + C[b, b])
        + C[a, b] * C[a, c] * C[b, d]
        + C[a, b] * C[a, d] * C[b, c]
    )
    L1 = (
        L4 * (1 + C[c, c])
        - C[b, c] ** 2 * (1 + C[a, a])
        - C[a, c] ** 2 * (1 + C[b, b])
        + 2 * C[a, b] * C[a, c] * C[b, c]
    )
    L2 = (
        L4 * (1 + C[d, d])
        - C[b, d] ** 2 * (1 + C[a, a])
        - C[a, d] ** 2 * (1 + C[b, b])
        + 2 * C[a, b] * C[a, d] * C[b, d]
    )
    return 4 / math.pi**2 / math.sqrt(L4) * math.asin(L0 / math.sqrt(L1 * L2))


# --- g(z) = z: g' = 1, every expectation by Isserlis ---


def lin_I2(C, a, b):
    return C[a, b]


def lin_J2(C, a, b):
    return 1.0


def lin_I3(C, a, b, c):
    return C[b, c]


def lin_I4(C, a, b, c, d):
    return C[c, d]


PRIMITIVES = {
    "erf": (erf_I2, erf_I3, erf_I4, erf_J2),
    "linear": (lin_I2, lin_I3, lin_I4, lin_J2),
}


def goldt_eps_g(Q, R, T, v, vs, activation):
    """Generalisation error 1/2 E[(f - y_clean)^2], Goldt et al.'s form."""
    K, M = R.shape
    if activation == "linear":
        return 0.5 * (v @ Q @ v - 2 * v @ R @ vs + vs @ T @ vs)
    e = 0.0
    for i in range(K):
        for k in range(K):
            e += v[i] * v[k] * math.asin(Q[i, k] / math.sqrt((1 + Q[i, i]) * (1 + Q[k, k]))) / math.pi
    for n in range(M):
        for m in range(M):
            e += vs[n] * vs[m] * math.asin(T[n, m] / math.sqrt((1 + T[n, n]) * (1 + T[m, m]))) / math.pi
    for i in range(K):
        for n in range(M):
            e -= 2 * v[i] * vs[n] * math.asin(R[i, n] / math.sqrt((1 + Q[i, i]) * (1 + T[n, n]))) / math.pi
    return e


def goldt_euler(Q, R, T, v, vs, eta, eta_v, kappa, sigma, dt, n_steps, activation="erf"):
    """Goldt et al.'s Euler integration; returns Q, R, v, eps_g at every step (n_steps + 1)."""
    I2, I3, I4, J2 = PRIMITIVES[activation]
    Q, R, v = Q.astype(float).copy(), R.astype(float).copy(), v.astype(float).copy()
    K, M = R.shape
    # indices of the covariance: students 0..K-1, teachers K..K+M-1
    s = list(range(K))
    t = [K + n for n in range(M)]
    out = {
        "Q": [Q.copy()],
        "R": [R.copy()],
        "v": [v.copy()],
        "eps_g": [goldt_eps_g(Q, R, T, v, vs, activation)],
    }
    for _ in range(n_steps):
        C = np.block([[Q, R], [R.T, T]])  # old values only
        newR = R.copy()
        for i in range(K):
            for n in range(M):
                acc = -kappa * R[i, n]
                for m in range(M):
                    acc += eta * v[i] * vs[m] * I3(C, s[i], t[n], t[m])
                for j in range(K):
                    acc -= eta * v[i] * v[j] * I3(C, s[i], t[n], s[j])
                newR[i, n] += dt * acc
        newQ = Q.copy()
        for i in range(K):
            for k in range(i, K):
                acc = -2 * kappa * Q[i, k]
                for m in range(M):
                    acc += eta * (
                        v[i] * vs[m] * I3(C, s[i], s[k], t[m]) + v[k] * vs[m] * I3(C, s[k], s[i], t[m])
                    )
                for j in range(K):
                    acc -= eta * (
                        v[i] * v[j] * I3(C, s[i], s[k], s[j]) + v[k] * v[j] * I3(C, s[k], s[i], s[j])
                    )
                acc += eta**2 * sigma**2 * v[i] * v[k] * J2(C, s[i], s[k])
                sq = 0.0
                for n in range(M):
                    for m in range(M):
                        sq += vs[n] * vs[m] * I4(C, s[i], s[k], t[n], t[m])
                for j in range(K):
                    for n in range(M):
                        sq -= 2 * v[j] * vs[n] * I4(C, s[i], s[k], s[j], t[n])
                for j in range(K):
                    for l_ in range(K):
                        sq += v[j] * v[l_] * I4(C, s[i], s[k], s[j], s[l_])
                acc += eta**2 * v[i] * v[k] * sq
                newQ[i, k] += dt * acc
                newQ[k, i] = newQ[i, k]
        newv = v.copy()
        if eta_v != 0:
            for i in range(K):
                acc = -kappa * v[i]
                for k in range(K):
                    acc -= eta_v * v[k] * I2(C, s[i], s[k])
                for n in range(M):
                    acc += eta_v * vs[n] * I2(C, s[i], t[n])
                newv[i] += dt * acc
        Q, R, v = newQ, newR, newv
        out["Q"].append(Q.copy())
        out["R"].append(R.copy())
        out["v"].append(v.copy())
        out["eps_g"].append(goldt_eps_g(Q, R, T, v, vs, activation))
    return {k: np.array(a) for k, a in out.items()}


def well_conditioned_start(K, M, seed, T=None):
    """Q, R with clearly distinct units (far from the symmetric plateau), a positive-definite
    covariance, and readouts of order one."""
    rng = np.random.default_rng(seed)
    T = np.eye(M) if T is None else np.asarray(T, dtype=float)
    R = rng.uniform(-0.5, 0.5, (K, M)) + 0.3 * np.eye(K, M)
    A = 0.4 * rng.normal(size=(K, K))
    Q = R @ np.linalg.solve(T, R.T) + A @ A.T + 0.2 * np.eye(K)
    v = rng.uniform(0.4, 1.3, K)
    vs = rng.uniform(0.6, 1.2, M)
    return Q, R, T, v, vs


T_CORRELATED = np.array([[1.0, 0.3], [0.3, 0.8]])

CASES = {
    # name: (K, M, params, seed, T, activation)
    "first_layer_only": (2, 2, {"eta": 1.0, "eta_v": 0.0}, 1, None, "erf"),
    "both_layers": (2, 2, {"eta": 1.0, "eta_v": 1.0}, 2, None, "erf"),
    "noise": (2, 2, {"eta": 1.0, "eta_v": 1.0, "sigma": 0.5}, 3, None, "erf"),
    "weight_decay": (2, 2, {"eta": 1.0, "eta_v": 1.0, "kappa": 0.05}, 4, None, "erf"),
    "weight_decay_frozen_readout": (2, 2, {"eta": 1.0, "eta_v": 0.0, "kappa": 0.05}, 5, None, "erf"),
    "separate_second_layer_rate": (2, 2, {"eta": 0.7, "eta_v": 1.6, "sigma": 0.2}, 6, None, "erf"),
    "K3_M2": (3, 2, {"eta": 1.0, "eta_v": 0.5, "sigma": 0.1, "kappa": 0.02}, 7, T_CORRELATED, "erf"),
    "K2_M4": (2, 4, {"eta": 0.8, "eta_v": 0.5}, 8, None, "erf"),
    "linear": (2, 3, {"eta": 0.3, "eta_v": 0.2, "sigma": 0.3, "kappa": 0.05}, 9, None, "linear"),
    "linear_first_layer_only": (3, 2, {"eta": 0.2, "eta_v": 0.0, "sigma": 0.1}, 10, None, "linear"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_layer_flow_follows_goldt_euler(name):
    K, M, params, seed, T, activation = CASES[name]
    Q, R, T, v, vs = well_conditioned_start(K, M, seed, T)
    full = {"eta": 1.0, "eta_v": 0.0, "kappa": 0.0, "sigma": 0.0, **params}
    ref = goldt_euler(Q, R, T, v, vs, dt=DT, n_steps=N_STEPS, activation=activation, **full)
    traj = runtime.flow(
        "two_layer",
        Init(Q, R, T, {"v": v, "vs": vs}),
        params,
        t_max=N_STEPS * DT,
        dt=DT,
        method="euler",
        activation=activation,
    )
    assert traj.Q.shape == ref["Q"].shape
    # the dynamics must actually have moved, or the comparison says little
    assert np.abs(ref["Q"][-1] - ref["Q"][0]).max() > 0.05
    if full["eta_v"] != 0:
        assert np.abs(ref["v"][-1] - ref["v"][0]).max() > 0.01
    for key in ("Q", "R", "v", "eps_g"):
        diff = np.abs(getattr(traj, key) - ref[key]).max()
        assert diff < TOL, f"{name}: {key} differs from Goldt et al.'s Euler scheme by {diff:.3g}"


def test_frozen_readout_does_not_decay():
    """eta_v = 0 keeps v exactly constant even with weight decay (no decay of a frozen layer)."""
    Q, R, T, v, vs = well_conditioned_start(2, 2, 11)
    traj = runtime.flow(
        "two_layer", Init(Q, R, T, {"v": v, "vs": vs}), {"eta_v": 0.0, "kappa": 0.3}, t_max=1.0, dt=DT
    )
    assert np.array_equal(traj.v, np.broadcast_to(v, traj.v.shape))


def test_scm_follows_goldt_euler_with_unit_readouts():
    """scm is Goldt's scheme with v = vs = 1 and the second layer frozen."""
    Q, R, T, _, _ = well_conditioned_start(3, 3, 12)
    ref = goldt_euler(
        Q, R, T, np.ones(3), np.ones(3), eta=1.0, eta_v=0.0, kappa=0.0, sigma=0.4, dt=DT, n_steps=N_STEPS
    )
    traj = runtime.flow("scm", Init(Q, R, T), {"eta": 1.0, "sigma": 0.4}, t_max=N_STEPS * DT, dt=DT)
    for key in ("Q", "R", "eps_g"):
        assert np.abs(getattr(traj, key) - ref[key]).max() < TOL, key


def test_reference_primitives_agree_with_monte_carlo():
    """The hand-typed closed forms above are themselves right (else the comparison proves little)."""
    rng = np.random.default_rng(0)
    C = np.array([[1.0, 0.3, 0.5, -0.2], [0.3, 0.7, 0.1, 0.4], [0.5, 0.1, 1.2, 0.2], [-0.2, 0.4, 0.2, 0.9]])
    u = rng.multivariate_normal(np.zeros(4), C, size=400_000)
    from math import erf

    g = np.vectorize(lambda z: erf(z / math.sqrt(2)))(u)
    gp = math.sqrt(2 / math.pi) * np.exp(-(u**2) / 2)
    n = u.shape[0]
    checks = {
        "I2": (erf_I2(C, 0, 2), g[:, 0] * g[:, 2]),
        "J2": (erf_J2(C, 1, 3), gp[:, 1] * gp[:, 3]),
        "I3": (erf_I3(C, 0, 1, 3), gp[:, 0] * u[:, 1] * g[:, 3]),
        "I4": (erf_I4(C, 0, 1, 2, 3), gp[:, 0] * gp[:, 1] * g[:, 2] * g[:, 3]),
        "I4_repeated": (erf_I4(C, 0, 0, 2, 2), gp[:, 0] ** 2 * g[:, 2] ** 2),
    }
    for name, (exact, samples) in checks.items():
        sem = samples.std() / math.sqrt(n)
        assert abs(samples.mean() - exact) < 5 * sem + 1e-12, name
