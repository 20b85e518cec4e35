"""Stage 1: what a model file declares (docs/conventions.md section 1, docs/models/).

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

from .activations import ACTIVATIONS
from .names import check_name
from .symbols import (
    STUDENT,
    TEACHER,
    K,
    M,
    field_kind,
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
    """A scalar hyper-parameter of a model, with its allowed range
    ``minimum <= value <= maximum`` (either bound None: unbounded on that side)."""

    name: str
    default: float
    doc: str
    minimum: float | None = 0.0
    integer: bool = False
    choices: tuple[float, ...] | None = None
    allow_inf: bool = False
    maximum: float | None = None

    def __post_init__(self):
        check_name("parameter", self.name)
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(
                f"parameter {self.name}: minimum {self.minimum:g} is above maximum {self.maximum:g}"
            )

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
        below = self.minimum is not None and value < self.minimum
        above = self.maximum is not None and value > self.maximum
        if below or above:
            raise ValueError(f"parameter {self.name} must be {self.range} ({self.doc}), got {value:g}")
        if self.integer and math.isfinite(value) and value != int(value):
            raise ValueError(f"parameter {self.name} must be an integer, got {value}")
        return value

    @property
    def range(self) -> str:
        """The allowed range in words, e.g. ``>= 0``, ``<= 1``, ``in [0, 1]``."""
        if self.minimum is not None and self.maximum is not None:
            return f"in [{self.minimum:g}, {self.maximum:g}]"
        if self.maximum is not None:
            return f"<= {self.maximum:g}"
        if self.minimum is not None:
            return f">= {self.minimum:g}"
        return "any real number"


@dataclass(frozen=True)
class Vector:
    """A readout vector over the student units (state) or teacher units (constant)."""

    name: str
    over: str
    doc: str
    default: float = 1.0

    def __post_init__(self):
        check_name("vector", self.name)
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
    """A random quantity drawn with each task (docs/models/anil.md 5.1-5.3), jointly Gaussian
    with the other task quantities and independent of the query sample; the flow
    needs only its means and covariances (``mu_NAME``, ``S_NAME__OTHER``), which
    the kernel computes (derive/flow.py takes the expectations by Isserlis' theorem).
    ``kinds`` are the kinds of its indices (student or teacher)."""

    name: str
    kinds: tuple[str, ...]
    doc: str
    # the task law: the entry at the given indices as an expression in a TaskNoise
    # (affine in it), or None for a quantity the inner loop derives (the adapted readout)
    law: Callable[..., sp.Expr] | None = None

    def __post_init__(self):
        check_name("task vector", self.name)

    @property
    def base(self) -> sp.IndexedBase:
        return sp.IndexedBase(self.name)


UNITS = {STUDENT: "K", TEACHER: "M"}  # the size of each kind of index


@dataclass(frozen=True)
class Overlap:
    """An order parameter of the first layer (docs/conventions.md 1): the overlaps
    ``a_i . b_j / N`` of the rows of two weight matrices, ``pair = (a, b)``, each
    ``"W"`` (the student's first layer, (K, N)) or ``"B"`` (the teacher, (M, N)).
    ``kinds`` are the kinds of its two indices; an overlap the flow moves
    ``evolves`` (part of the state), the others are constants."""

    name: str
    kinds: tuple[str, str]
    pair: tuple[str, str]
    evolves: bool
    symmetric: bool
    doc: str

    @property
    def base(self) -> sp.IndexedBase:
        return sp.IndexedBase(self.name)

    @property
    def dims(self) -> tuple[str, ...]:
        """The shape in the unit counts, e.g. ``("K", "M")``."""
        return tuple(UNITS[k] for k in self.kinds)

    def shape(self, K: int, M: int) -> tuple[int, ...]:
        return tuple({"K": K, "M": M}[d] for d in self.dims)

    def of(self, W: np.ndarray, B: np.ndarray) -> np.ndarray:
        """The overlaps of real weights, ``a @ b.T / N``."""
        weights = {"W": W, "B": B}
        a, b = weights[self.pair[0]], weights[self.pair[1]]
        return a @ b.T / a.shape[1]


# The order parameters of the first layer, declared once: the kernels' state and
# constants, the initial conditions and the simulator's records follow this table.
OVERLAPS = (
    Overlap("Q", (STUDENT, STUDENT), ("W", "W"), True, True, "Q_kl = w_k.w_l/N"),
    Overlap("R", (STUDENT, TEACHER), ("W", "B"), True, False, "R_km = w_k.B_m/N"),
    Overlap("T", (TEACHER, TEACHER), ("B", "B"), False, True, "T_mn = B_m.B_n/N"),
)
STATE_OVERLAPS = tuple(o for o in OVERLAPS if o.evolves)
CONST_OVERLAPS = tuple(o for o in OVERLAPS if not o.evolves)

# Order parameters as indexed symbols, for the covariance, decay terms and `show`.
Q, R, T = (o.base for o in OVERLAPS)


@dataclass(frozen=True)
class TaskNoise:
    """The standard normal draws of a task, ``xi ~ N(0, I)`` over the units of
    ``kind`` (docs/models/anil.md 5.1): the randomness a task law is written in."""

    name: str
    kind: str
    doc: str

    def __post_init__(self):
        check_name("task noise", self.name)
        if self.kind not in (STUDENT, TEACHER):
            raise ValueError(f"TaskNoise.kind must be {STUDENT!r} or {TEACHER!r}")

    @property
    def base(self) -> sp.IndexedBase:
        return sp.IndexedBase(self.name)


def _no_regulariser(c: sp.IndexedBase) -> sp.Expr:
    return sp.S.Zero


@dataclass(frozen=True)
class InnerLoop:
    """Adaptation of a readout to each task (docs/models/anil.md 5.3, population support loss).

    ``c^(0) = start``, ``c^(s+1) = c^(s) - rate * grad_c L_sup(c^(s))`` for ``steps``
    steps, with ``L_sup(c) = E_x[loss(c)] + regulariser(c)``: ``loss(c)`` is the
    per-sample support loss of a readout ``c`` (an IndexedBase over the student
    units), its expectation over the fields the population support loss, and
    ``regulariser(c)`` a deterministic term (for example a proximal
    ``lambda |c - a|^2 / 2``). derive/meta.py derives the gradient, checks it is
    linear in ``c`` (``grad = Hs c - h``), and computes the means and loadings
    over the task draws ``noise`` of the adapted readout ``adapted`` (a'), of
    ``optimal`` (the minimiser of ``E_x[loss]``, if given) and, when
    ``second_order`` is nonzero, of the derivatives of a' with respect to
    ``Q_kl`` (symmetric variable), ``R_km`` and the start: the task quantities
    ``{adapted}_dQ[j, k, l]``, ``{adapted}_dR[j, k, m]``, ``{adapted}_da[j, k]``.
    """

    adapted: TaskVector
    start: Vector
    noise: TaskNoise
    loss: Callable[[sp.IndexedBase], sp.Expr]
    steps: sp.Expr
    rate: sp.Expr
    regulariser: Callable[[sp.IndexedBase], sp.Expr] = _no_regulariser
    optimal: TaskVector | None = None
    second_order: sp.Expr = sp.S.Zero  # nonzero when the sensitivities are needed
    # support samples per task: oo is the population support loss (the flow's); the
    # simulator draws this many support samples when it is finite
    support: sp.Expr = sp.oo

    @property
    def dQ(self) -> TaskVector:
        return TaskVector(f"{self.adapted.name}_dQ", (STUDENT,) * 3, "d adapted_j / d Q_kl")

    @property
    def dR(self) -> TaskVector:
        return TaskVector(f"{self.adapted.name}_dR", (STUDENT, STUDENT, TEACHER), "d adapted_j / d R_km")

    @property
    def da(self) -> TaskVector:
        return TaskVector(f"{self.adapted.name}_da", (STUDENT, STUDENT), "d adapted_j / d start_k")

    @property
    def sensitivities(self) -> tuple[TaskVector, ...]:
        return (self.dQ, self.dR, self.da)


@dataclass(frozen=True)
class MetaGradient:
    """The part of the outer gradient that flows through the inner loop (docs/models/anil.md 5.4,
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
    """``w_k <- (1 - decay/N) w_k - (rate/sqrt(N)) (dL/dlambda_k) x``
    (docs/conventions.md section 1, docs/models/two_layer.md).

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
    symmetric = tuple(o.name for o in STATE_OVERLAPS if o.symmetric)

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
            adapted = inner.adapted.base
            by_Q, by_R = inner.dQ.base, inner.dR.base  # d a'_j / d Q_kl, d a'_j / d R_km
            j, i = student_index("j"), student_index("i")
            m_ = teacher_index("mm")
            dL = sp.diff(loss, adapted[j])

            def through(k_, other):
                # sum_j dL/da'_j (da'_j/dw_k . other / N), ``other`` = w_l or B_n
                Qpart = student_sum(by_Q[j, k_, i] * (1 + sp.KroneckerDelta(k_, i)) * other("w", i), i)
                Rpart = teacher_sum(by_R[j, k_, m_] * other("B", m_), m_)
                return student_sum(dL * (Qpart + Rpart), j)

            def with_w(l__):
                return lambda kind, idx: Q[idx, l__] if kind == "w" else R[l__, idx]

            def with_B(n_):
                return lambda kind, idx: R[idx, n_] if kind == "w" else T[idx, n_]

            weight = self.meta.weight
            dQ += -r * weight * (through(k, with_w(l_)) + through(l_, with_w(k)))
            dR += -r * weight * through(k, with_B(n))
        fixed = -2 * d * Q[k, l_]
        if self.meta is not None and sp.sympify(self.meta.inner.support) != sp.oo:
            from .meta import support_square_name

            # finite support sets: the squared step along the support inputs (zero at
            # n_s = inf and when the second-order terms are off; docs/models/anil.md 5.6)
            GG = sp.IndexedBase(support_square_name(self.meta.inner))
            fixed += r**2 * sp.piecewise_fold(self.meta.weight**2) * GG[k, l_]
        return {
            "Q": ((k, l_), dQ, fixed),
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
        return 1.0 - decay / N, rate / (FirstLayer.input_norm(N) * batch)

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
    def input_norm(N: int) -> float:
        """``sqrt(N)``, the norm of an input ``x ~ N(0, I_N)``: the fields of a network on
        real vectors are ``lambda_k = w_k . x / input_norm(N)``, and ``dL/dw_k =
        G_k x / input_norm(N)`` (the one place this scaling is written for the
        simulators; the compiled simulator loop takes it as a number)."""
        return math.sqrt(N)

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
    """The square loss ``(f - y)^2 / 2`` of docs/models/ (the default of ``Model.loss``)."""
    return (f - y) ** 2 / 2


def _check_requires(entries, params: dict[str, float], what: str) -> None:
    """Raise at the first entry ``(name, value, why[, when])`` whose ``when`` holds
    and whose parameter is not ``value``."""
    for name, value, why, *when in entries:
        cond = when[0] if when else {}
        if all(params[k] == v for k, v in cond.items()) and params[name] != value:
            where = "".join(f" with {k} = {v:g}" for k, v in cond.items())
            raise ValueError(
                f"parameter {name} = {params[name]:g}: {what}{where} needs {name} = {value:g} ({why})"
            )


@dataclass(frozen=True)
class Model:
    """A model file's content: network, loss, updates, metrics (docs/models/).

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
    # (parameter, value the flow needs, why[, when]): e.g. finite support sets at second
    # order are simulated only (when = {"order": 2.0}). The flow's right-hand side only:
    # the metrics are functions of the state, checked by metric_requires
    flow_requires: tuple = ()
    # the same for the metrics (runtime.metatest evaluates them at test settings)
    metric_requires: tuple = ()
    # the activations generated/ holds kernels for (derive/activations.py names)
    activations: tuple[str, ...] = ("erf", "linear")
    loss: Callable[[sp.Expr, sp.Expr], sp.Expr] = square_loss

    def __post_init__(self):
        unknown = [a for a in self.activations if a not in ACTIVATIONS]
        if unknown:
            raise ValueError(
                f"model {self.name!r}: unknown activation {unknown[0]!r}; "
                f"known: {', '.join(sorted(ACTIVATIONS))}"
            )
        if not self.activations or len(set(self.activations)) != len(self.activations):
            raise ValueError(
                f"model {self.name!r}: activations {self.activations!r} must be distinct, at least one"
            )
        names = [p.name for p in self.params] + [v.name for v in self.vectors]
        names += [t.name for t in self.random_families]
        # the kernels name the derivative of a state vector ``x`` ``dx``
        derived = {f"d{v.name}": v.name for v in self.state_vectors}
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"model {self.name!r}: the name {name!r} is declared twice")
            if name in derived:
                raise ValueError(
                    f"model {self.name!r}: the name {name!r} is reserved: the generated kernels use it "
                    f"for the derivative of {derived[name]!r}; choose another name"
                )
        if not self.fields or field_kind(self.fields[0]) != STUDENT:
            raise ValueError(
                f"model {self.name!r}: the first field family must be the student fields "
                "(the rows 0..K-1 of the covariance, which the kernels tilt by)"
            )
        for i, f1 in enumerate(self.fields):
            for f2 in self.fields[i:]:
                if (f1, f2) not in self.covariance and (f2, f1) not in self.covariance:
                    raise ValueError(f"model {self.name!r}: no covariance block for ({f1}, {f2})")
        for f1, f2 in self.covariance:
            if f1 not in self.fields or f2 not in self.fields:
                raise ValueError(
                    f"model {self.name!r}: covariance block ({f1}, {f2}) of a field not in fields"
                )

        self._check_second_order()

    def _check_second_order(self):
        """The sensitivities of the inner loop are computed only when
        ``InnerLoop.second_order`` is nonzero: a gradient through the inner loop
        (the first layer's ``MetaGradient`` weight, or a readout rule reading
        ``da'/da``) without them would read buffers never written."""
        inner = self.inner_loop
        if inner is None or sp.sympify(inner.second_order) != 0:
            return
        meta = self.first_layer.meta
        if meta is not None and sp.sympify(meta.weight) != 0:
            raise ValueError(
                f"model {self.name!r}: the first layer's MetaGradient has weight {meta.weight} but "
                "InnerLoop.second_order is 0; give the inner loop the same weight (second_order=...)"
            )
        k = student_index("k")
        for rule in self.readout_updates:
            if any(sp.sympify(rule.grad(self.sample_loss, k)).has(s_.base) for s_ in inner.sensitivities):
                raise ValueError(
                    f"model {self.name!r}: the update of {rule.vector.name!r} reads the inner loop's "
                    "sensitivities but InnerLoop.second_order is 0; set second_order=..."
                )

    @property
    def layout(self) -> tuple[tuple[sp.IndexedBase, sp.Expr, sp.Symbol], ...]:
        """``(family, first row, number of rows)`` of each field family in the
        covariance of the fields, in the order of ``fields``: the one place the
        rows are laid out (read by the printer, the code generator and ``show``)."""
        out, at = [], sp.S.Zero
        for f in self.fields:
            n = K if field_kind(f) == STUDENT else M
            out.append((f, at, n))
            at = at + n
        return tuple(out)

    @property
    def random_families(self) -> tuple[TaskVector, ...]:
        """Every task quantity the flow may average over, in a fixed order."""
        fams = list(self.task_vectors)
        if self.inner_loop is not None:
            fams += list(self.inner_loop.sensitivities)
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
        """Raise if the flow of this model is not derived for these parameter values.
        An entry of ``flow_requires`` is ``(name, value, why)`` or
        ``(name, value, why, when)``, ``when`` a dict of parameter values under which
        it applies."""
        _check_requires(self.flow_requires, params, "the flow")

    def check_metrics(self, params: dict[str, float]) -> None:
        """Raise if the metrics of this model are not derived for these parameter
        values (``metric_requires``, entries as in ``check_flow``)."""
        _check_requires(self.metric_requires, params, "the metrics")

    def numeric(self, expr: sp.Expr, params: dict[str, float]) -> float:
        """Evaluate a rate or decay expression of the update rules at ``params``."""
        sub = {p.symbol: params[p.name] for p in self.params}
        return float(sp.sympify(expr).subs(sub))
