"""Stage 1: what a model file declares (MODELS.md sections 1, 3, 4).

A model is its network written in sympy (student output, clean teacher output,
label noise, loss) plus its update rules. Each update rule below holds one
learning-rate convention in one place: the flow builder (derive/flow.py) asks it
for its order-parameter flow, the finite-N simulator (runtime/simulate.py) asks
it for its step on real vectors, so the two cannot disagree on a scaling or a
sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .symbols import STUDENT, TEACHER, K, M, lam, nu, student_index, teacher_index, zeta


@dataclass(frozen=True)
class Param:
    """A scalar hyper-parameter of a model, with its allowed range."""

    name: str
    default: float
    doc: str
    minimum: float | None = 0.0
    integer: bool = False

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)

    def check(self, value: float) -> float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"parameter {self.name} must be finite, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"parameter {self.name} must be >= {self.minimum} ({self.doc}), got {value}")
        if self.integer and value != int(value):
            raise ValueError(f"parameter {self.name} must be an integer, got {value}")
        return value


@dataclass(frozen=True)
class Vector:
    """A readout vector over the student units (state) or teacher units (constant)."""

    name: str
    over: str
    doc: str
    default: float = 1.0

    def __post_init__(self):
        if self.over not in (STUDENT, TEACHER):
            raise ValueError(f"Vector.over must be {STUDENT!r} or {TEACHER!r}")

    @property
    def base(self) -> sp.IndexedBase:
        return sp.IndexedBase(self.name)

    @property
    def length(self) -> sp.Symbol:
        return K if self.over == STUDENT else M


# Order parameters as indexed symbols, for decay terms and for `show`.
Q = sp.IndexedBase("Q")
R = sp.IndexedBase("R")
T = sp.IndexedBase("T")


@dataclass(frozen=True)
class FirstLayer:
    """``w_k <- (1 - decay/N) w_k - (rate/sqrt(N)) (dL/dlambda_k) x`` (MODELS.md 1, 4).

    With ``G_k = dL/dlambda_k`` and one fresh sample per step, alpha = steps/N:
    ``dR_kn/dalpha = -rate E[G_k nu_n] - decay R_kn`` and
    ``dQ_kl/dalpha = -rate E[G_k lambda_l + G_l lambda_k] + rate^2 E[G_k G_l] - 2 decay Q_kl``
    (x.x/N -> 1; products of decay and gradient are O(1/N) and drop).
    """

    rate: sp.Expr
    decay: sp.Expr = sp.S.Zero

    def flows(self, loss: sp.Expr) -> dict[str, tuple[tuple[sp.Idx, ...], sp.Expr, sp.Expr]]:
        """name -> (free indices, expectation integrand, deterministic part)."""
        k, l_ = student_index("k"), student_index("l")
        n = teacher_index("n")
        Gk = sp.diff(loss, lam[k])
        Gl = sp.diff(loss, lam[l_])
        r, d = self.rate, self.decay
        return {
            "Q": ((k, l_), -r * (Gk * lam[l_] + Gl * lam[k]) + r**2 * Gk * Gl, -2 * d * Q[k, l_]),
            "R": ((k, n), -r * Gk * nu[n], -d * R[k, n]),
        }

    def sample_gradient(self, loss: sp.Expr) -> tuple[tuple[sp.Idx, ...], sp.Expr]:
        """The coefficient ``G_k`` of x in the per-sample update, for the simulator."""
        k = student_index("k")
        return (k,), sp.diff(loss, lam[k])

    @staticmethod
    def step(W: np.ndarray, G: np.ndarray, x: np.ndarray, rate: float, decay: float) -> None:
        """One update of the (K, N) first layer in place, from per-sample G (K,) and x (N,)."""
        N = x.shape[0]
        if decay:
            W *= 1.0 - decay / N
        W -= np.outer((rate / math.sqrt(N)) * G, x)


@dataclass(frozen=True)
class ReadoutUpdate:
    """``c_k <- (1 - decay/N) c_k - (rate/N) dL/dc_k`` for a student readout ``c``.

    Flow: ``dc_k/dalpha = -rate E[dL/dc_k] - decay c_k``.
    """

    vector: Vector
    rate: sp.Expr
    decay: sp.Expr = sp.S.Zero

    def flows(self, loss: sp.Expr):
        k = student_index("k")
        c = self.vector.base
        return {self.vector.name: ((k,), -self.rate * sp.diff(loss, c[k]), -self.decay * c[k])}

    def sample_gradient(self, loss: sp.Expr):
        k = student_index("k")
        return (k,), sp.diff(loss, self.vector.base[k])

    @staticmethod
    def step(c: np.ndarray, H: np.ndarray, N: int, rate: float, decay: float) -> None:
        if decay:
            c *= 1.0 - decay / N
        c -= (rate / N) * H


@dataclass(frozen=True)
class Model:
    """A model file's content: network, loss, updates, metrics (MODELS.md 3-4)."""

    name: str
    doc: str
    section: str
    params: tuple[Param, ...]
    vectors: tuple[Vector, ...]
    student_output: sp.Expr
    teacher_output: sp.Expr  # clean, without label noise
    noise: sp.Expr  # standard deviation multiplying zeta
    first_layer: FirstLayer
    readout_updates: tuple[ReadoutUpdate, ...] = ()
    metrics: dict = field(default_factory=dict)  # name -> integrand (expectation taken)

    @property
    def loss(self) -> sp.Expr:
        """Per-sample loss ``L = (f - y)^2 / 2`` with ``y = y_clean + noise * zeta``."""
        return (self.student_output - self.teacher_output - self.noise * zeta) ** 2 / 2

    @property
    def state_vectors(self) -> tuple[Vector, ...]:
        return tuple(v for v in self.vectors if v.over == STUDENT)

    @property
    def const_vectors(self) -> tuple[Vector, ...]:
        return tuple(v for v in self.vectors if v.over == TEACHER)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(
            f"model {self.name!r} has no parameter {name!r}; its parameters: "
            + ", ".join(p.name for p in self.params)
        )

    def resolve_params(self, values: dict | None = None) -> dict[str, float]:
        """Defaults updated by ``values``, each checked against its range."""
        out = {p.name: p.default for p in self.params}
        for key, val in (values or {}).items():
            out[key] = self.param(key).check(val)
        return out

    def numeric(self, expr: sp.Expr, params: dict[str, float]) -> float:
        """Evaluate a rate or decay expression of the update rules at ``params``."""
        sub = {p.symbol: params[p.name] for p in self.params}
        return float(sp.sympify(expr).subs(sub))
