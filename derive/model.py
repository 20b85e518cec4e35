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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .symbols import (
    STUDENT,
    TEACHER,
    K,
    M,
    lam,
    nu,
    rename_bound,
    student_index,
    student_sum,
    teacher_index,
    teacher_sum,
    zeta,
)


@dataclass(frozen=True)
class Param:
    """A scalar hyper-parameter of a model, with its allowed range."""

    name: str
    default: float
    doc: str
    minimum: float | None = 0.0
    integer: bool = False
    choices: tuple[float, ...] | None = None
    allow_inf: bool = False

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)

    def check(self, value: float) -> float:
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not (self.allow_inf and value > 0)):
            raise ValueError(f"parameter {self.name} must be finite, got {value}")
        if self.choices is not None and value not in self.choices:
            allowed = " or ".join(f"{c:g}" for c in self.choices)
            raise ValueError(f"parameter {self.name} must be {allowed} ({self.doc}), got {value:g}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"parameter {self.name} must be >= {self.minimum:g} ({self.doc}), got {value:g}")
        if self.integer and math.isfinite(value) and value != int(value):
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


@dataclass(frozen=True)
class TaskVector:
    """A random quantity drawn with each task (MODELS.md 5.1-5.3), jointly Gaussian
    with the other task quantities and independent of the query sample; the flow
    needs only its means and covariances (``mu_NAME``, ``S_NAME__OTHER``), which
    the kernel computes (derive/flow.py takes the expectations by Isserlis' theorem).
    ``kinds`` are the kinds of its indices (student or teacher)."""

    name: str
    kinds: tuple[str, ...]
    doc: str

    @property
    def base(self) -> sp.IndexedBase:
        return sp.IndexedBase(self.name)


# Order parameters as indexed symbols, for decay terms and for `show`.
Q = sp.IndexedBase("Q")
R = sp.IndexedBase("R")
T = sp.IndexedBase("T")
# A_S = (I - alpha_in C)^S, the inner loop's linear map of the readout initialisation
A_S = sp.IndexedBase("A_S")


@dataclass(frozen=True)
class InnerLoop:
    """Adaptation of a readout to each task (MODELS.md 5.3, population support loss).

    ``c^(0) = start``, ``c^(s+1) = c^(s) - rate * grad_c L_sup(c^(s))`` for ``steps``
    steps, with ``L_sup(c) = 1/2 E_x[(student(c) - teacher)^2]``. The gradient is
    derived (derive/flow.py) and must be linear, ``C c - D task``; then
    ``adapted = A_S start + G_S task``, affine in the task readout
    ``task = task_mean + spread * xi``, so the adapted readout is Gaussian over
    tasks. ``optimal`` is the best readout ``C^+ D task``. The derivatives of
    ``adapted`` with respect to ``Q_kl`` (symmetric variable) and ``R_km`` are the
    task quantities ``{adapted}_dQ[j, k, l]`` and ``{adapted}_dR[j, k, m]``,
    evaluated as forward sensitivities of the recursion.
    """

    adapted: TaskVector
    start: Vector
    task: TaskVector
    task_mean: Vector
    spread: sp.Expr
    steps: sp.Expr
    rate: sp.Expr
    student: Callable[[sp.IndexedBase], sp.Expr]
    teacher: sp.Expr
    optimal: TaskVector | None = None
    second_order: sp.Expr = sp.S.Zero  # nonzero when the sensitivities are needed

    @property
    def dQ(self) -> TaskVector:
        return TaskVector(f"{self.adapted.name}_dQ", (STUDENT,) * 3, "d adapted_j / d Q_kl")

    @property
    def dR(self) -> TaskVector:
        return TaskVector(f"{self.adapted.name}_dR", (STUDENT, STUDENT, TEACHER), "d adapted_j / d R_km")

    def support_loss(self, c: sp.IndexedBase) -> sp.Expr:
        return rename_bound((self.student(c) - self.teacher) ** 2 / 2)


@dataclass(frozen=True)
class MetaGradient:
    """The part of the outer gradient that flows through the inner loop (MODELS.md 5.4,
    ``order = 2``): ``w_k`` also moves by ``-rate * sum_j dL/da'_j da'_j/dw_k`` with
    ``da'_j/dw_k = (1/N)[sum_l (da'_j/dQ_kl)(1 + [k=l]) w_l + sum_m (da'_j/dR_km) B_m]``,
    scaled by ``weight`` (1 for second order, 0 for first)."""

    inner: InnerLoop
    weight: sp.Expr


DEFAULT_COVARIANCE = {
    (lam, lam): lambda i, j: Q[i, j],
    (lam, nu): lambda i, j: R[i, j],
    (nu, nu): lambda i, j: T[i, j],
}


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
    batch: sp.Expr = sp.S.One  # n_q samples averaged per step: the rate^2 term is divided by it
    meta: MetaGradient | None = None
    # flows symmetric in their two free indices (Q_kl = Q_lk by construction)
    symmetric = ("Q",)

    def flows(self, loss: sp.Expr) -> dict[str, tuple[tuple[sp.Idx, ...], sp.Expr, sp.Expr]]:
        """name -> (free indices, expectation integrand, deterministic part)."""
        k, l_ = student_index("k"), student_index("l")
        n = teacher_index("n")
        Gk = sp.diff(loss, lam[k])
        Gl = sp.diff(loss, lam[l_])
        r, d = self.rate, self.decay
        dQ = -r * (Gk * lam[l_] + Gl * lam[k]) + r**2 / self.batch * Gk * Gl
        dR = -r * Gk * nu[n]
        if self.meta is not None:
            inner = self.meta.inner
            ap, Dq, Dr = inner.adapted.base, inner.dQ.base, inner.dR.base
            j, i = student_index("j"), student_index("i")
            mm = teacher_index("mm")
            dL = sp.diff(loss, ap[j])

            def through(k_, other):
                # sum_j dL/da'_j (da'_j/dw_k . other / N), ``other`` = w_l or B_n
                Qpart = student_sum(Dq[j, k_, i] * (1 + sp.KroneckerDelta(k_, i)) * other("w", i), i)
                Rpart = teacher_sum(Dr[j, k_, mm] * other("B", mm), mm)
                return student_sum(dL * (Qpart + Rpart), j)

            def with_w(l__):
                return lambda kind, idx: Q[idx, l__] if kind == "w" else R[l__, idx]

            def with_B(n_):
                return lambda kind, idx: R[idx, n_] if kind == "w" else T[idx, n_]

            wgt = self.meta.weight
            dQ += -r * wgt * (through(k, with_w(l_)) + through(l_, with_w(k)))
            dR += -r * wgt * through(k, with_B(n))
        return {
            "Q": ((k, l_), dQ, -2 * d * Q[k, l_]),
            "R": ((k, n), dR, -d * R[k, n]),
        }

    def sample_gradient(self, loss: sp.Expr) -> tuple[tuple[sp.Idx, ...], sp.Expr]:
        """The coefficient ``G_k`` of x in the per-sample update, for the simulator."""
        k = student_index("k")
        return (k,), sp.diff(loss, lam[k])

    @staticmethod
    def coefficients(N: int, rate: float, decay: float, batch: int = 1) -> tuple[float, float]:
        """``(shrink, scale)`` of one step on real vectors,
        ``w_k <- shrink w_k - scale sum_mu G_mu,k x_mu`` over a batch of ``batch``
        samples: ``shrink = 1 - decay/N``, ``scale = rate / (sqrt(N) batch)``.
        The one place these scalings are written: ``step`` applies them, and the
        compiled simulator loop (runtime/simulate_meta.py) takes them as numbers."""
        return 1.0 - decay / N, rate / (math.sqrt(N) * batch)

    def step(self, W: np.ndarray, G: np.ndarray, x: np.ndarray, rate: float, decay: float) -> None:
        """One update of the (K, N) first layer in place, from per-sample G (K,) and x (N,).

        With a batch, ``G`` is (n_q, K) and ``x`` (n_q, N): the step is their average."""
        batch = 1 if G.ndim == 1 else G.shape[0]
        shrink, scale = self.coefficients(x.shape[-1], rate, decay, batch)
        if shrink != 1.0:
            W *= shrink
        if G.ndim == 1:
            W -= np.outer(scale * G, x)
        else:
            W -= scale * (G.T @ x)

    @staticmethod
    def weights_coefficient(rate: float) -> float:
        """``scale`` of a step along a gradient already in weight space,
        ``W <- W - scale grad_W``: ``scale = rate`` (the one place it is written;
        ``step_weights`` and the compiled simulator loop read it)."""
        return rate

    @classmethod
    def step_weights(cls, W: np.ndarray, grad_W: np.ndarray, rate: float) -> None:
        """A step along a gradient already in weight space (the second-order part):
        ``W <- W - rate * grad_W``; ``rate/sqrt(N)`` times ``G x`` is the same rule
        for the part along the input, since ``dL/dw_k = G_k x / sqrt(N)``."""
        W -= cls.weights_coefficient(rate) * grad_W


@dataclass(frozen=True)
class ReadoutUpdate:
    """``c_k <- (1 - decay/N) c_k - (rate/N) dL/dc_k`` for a student readout ``c``.

    Flow: ``dc_k/dalpha = -rate E[dL/dc_k] - decay c_k``.
    """

    vector: Vector
    rate: sp.Expr
    decay: sp.Expr = sp.S.Zero
    # dL/dc_k as a function of (loss, k); default: differentiate the loss in c_k
    gradient: Callable[[sp.Expr, sp.Idx], sp.Expr] | None = None
    symmetric = ()

    def grad(self, loss: sp.Expr, k: sp.Idx) -> sp.Expr:
        if self.gradient is not None:
            return self.gradient(loss, k)
        return sp.diff(loss, self.vector.base[k])

    def flows(self, loss: sp.Expr):
        k = student_index("k")
        c = self.vector.base
        return {self.vector.name: ((k,), -self.rate * self.grad(loss, k), -self.decay * c[k])}

    def sample_gradient(self, loss: sp.Expr):
        k = student_index("k")
        return (k,), self.grad(loss, k)

    @staticmethod
    def coefficients(N: int, rate: float, decay: float) -> tuple[float, float]:
        """``(shrink, scale)`` of one step, ``c_k <- shrink c_k - scale dL/dc_k``:
        ``shrink = 1 - decay/N``, ``scale = rate/N`` (the one place these are
        written; ``step`` and the compiled simulator loop read them)."""
        return 1.0 - decay / N, rate / N

    def step(self, c: np.ndarray, H: np.ndarray, N: int, rate: float, decay: float) -> None:
        shrink, scale = self.coefficients(N, rate, decay)
        if shrink != 1.0:
            c *= shrink
        c -= scale * H


def square_loss(f: sp.Expr, y: sp.Expr) -> sp.Expr:
    """The square loss ``(f - y)^2 / 2`` of MODELS.md 3-5 (the default of ``Model.loss``)."""
    return (f - y) ** 2 / 2


@dataclass(frozen=True)
class Model:
    """A model file's content: network, loss, updates, metrics (MODELS.md 3-4).

    ``loss(f, y)`` is the per-sample loss as a function of the student output
    ``f`` and the noisy label ``y``; the flows and the simulator both read it
    through ``sample_loss``. It must keep the fields polynomial, through ``g``,
    ``g'``, ``g''`` (derive/expand.py), e.g. ``(f - y)**2/2 + gamma*f**2/2``.
    """

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
    # field families and the blocks of their covariance, (f1, f2) -> (i, j) -> entry
    fields: tuple = (lam, nu)
    covariance: dict = field(default_factory=lambda: dict(DEFAULT_COVARIANCE))
    task_vectors: tuple[TaskVector, ...] = ()
    inner_loop: InnerLoop | None = None
    # (parameter, value the flow needs, why): e.g. finite support sets are simulated only
    flow_requires: tuple = ()
    loss: Callable[[sp.Expr, sp.Expr], sp.Expr] = square_loss

    @property
    def random_families(self) -> tuple[TaskVector, ...]:
        """Every task quantity the flow may average over, in a fixed order."""
        fams = list(self.task_vectors)
        if self.inner_loop is not None:
            fams += [self.inner_loop.dQ, self.inner_loop.dR]
        return tuple(fams)

    @property
    def sample_loss(self) -> sp.Expr:
        """Per-sample loss ``L = loss(f, y)`` with ``y = y_clean + noise * zeta``
        (summation indices renamed apart from every free index)."""
        y = self.teacher_output + self.noise * zeta
        return rename_bound(sp.sympify(self.loss(self.student_output, y)))

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

    def check_flow(self, params: dict[str, float]) -> None:
        """Raise if the flow of this model is not derived for these parameter values."""
        for name, value, why in self.flow_requires:
            if params[name] != value:
                raise ValueError(
                    f"parameter {name} = {params[name]:g}: the flow needs {name} = {value:g} ({why})"
                )

    def numeric(self, expr: sp.Expr, params: dict[str, float]) -> float:
        """Evaluate a rate or decay expression of the update rules at ``params``."""
        sub = {p.symbol: params[p.name] for p in self.params}
        return float(sp.sympify(expr).subs(sub))
