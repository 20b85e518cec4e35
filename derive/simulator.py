"""The formulas of the finite-N meta-learning simulator, derived
(docs/conventions.md sections 1-2, docs/models/anil.md).

The simulator (runtime/simulate_meta.py) runs the algorithm of docs/models/anil.md on real
vectors. Beyond the arithmetic of weights and readouts it needs the activation
``g`` and its derivative ``g'``, the primitive ``I2(C_aa, C_bb, C_ab) = E[g(u_a) g(u_b)]``
of the population support loss, and the partial derivatives of ``I2`` in its three
covariance entries (the second-order gradient through the overlaps). None of them
is typed: ``formulas`` takes the activation's sympy expression and its derivative
(derive/activations.py), the engine's ``I2`` (derive/gaussian.py) and sympy's
derivatives of it. The numpy reference path lambdifies them; ``context`` prints
them for the compiled path, rendered into each meta-learning module by
derive/templates/meta_simulator.py.jinja together with the compiled outer loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp

from .activations import get_activation, z
from .expand import KIND_OF_FUNC, KIND_RANK
from .flow import _noise_moment
from .gaussian import cov_symbol, expectation, primitive
from .model import Q, R, T, square_loss
from .printer import code
from .symbols import STUDENT, TEACHER, field_kind, g, gp, gpp, is_field, zeta
from .symbols import K as K_SYMBOL
from .symbols import M as M_SYMBOL


@dataclass(frozen=True)
class Formulas:
    """What the simulator evaluates, as sympy expressions: ``g`` and ``gp`` in ``z``;
    ``I2`` and its ``partials`` (d/dC_aa, d/dC_bb, d/dC_ab) in ``variables``
    = (C_aa, C_bb, C_ab)."""

    activation: str
    z: sp.Symbol
    g: sp.Expr
    gp: sp.Expr
    variables: tuple[sp.Symbol, sp.Symbol, sp.Symbol]
    I2: sp.Expr
    partials: tuple[sp.Expr, sp.Expr, sp.Expr]
    provenance: tuple[str, ...]


def formulas(activation: str) -> Formulas:
    """The simulator's formulas for ``activation``, from the activation's definition
    and the engine's derivation of ``I2`` (its partial derivatives by sympy)."""
    act = get_activation(activation)
    d = primitive("I2", activation)
    variables = (cov_symbol("a", "a"), cov_symbol("b", "b"), cov_symbol("a", "b"))
    extra = d.expr.free_symbols - set(variables)
    if extra:
        raise ValueError(f"I2 of {activation!r} depends on {sorted(map(str, extra))} besides its covariance")
    partials = tuple(sp.simplify(sp.diff(d.expr, v)) for v in variables)
    return Formulas(activation, z, act.expr, act.d1, variables, d.expr, partials, d.provenance)


def _number_or_code(expr: sp.Expr) -> str:
    """A constant as a float literal (a linear activation's partials are 0 and 1: the
    compiled loop's arithmetic stays in float64), anything else as printed."""
    return repr(float(expr)) if expr.is_number else code(expr)


def _function(exprs) -> dict:
    """Body of a function of (C_aa, C_bb, C_ab): cse temporaries and return values."""
    temps, rets = sp.cse(list(exprs), symbols=sp.numbered_symbols("t"), order="canonical")
    return {"temps": [f"{s} = {code(e)}" for s, e in temps], "rets": [_number_or_code(r) for r in rets]}


def context(ir) -> dict | None:
    """The template context of the compiled simulator of a model with an inner loop
    (None otherwise): the bodies of ``I2_value`` and ``I2_partials``, arguments named
    after the covariance entries; ``g`` and ``gp`` are the module's activation."""
    if ir.model.inner_loop is None or standard_form(ir.model) is None:
        return None
    f = formulas(ir.activation)
    return {
        "args": ", ".join(str(v) for v in f.variables),
        "value": _function([f.I2]),
        "partials": _function(f.partials),
        "provenance": list(f.provenance),
    }


# -- the model's expressions at concrete sizes (the numpy reference simulator) ------


def expand_sums(expr: sp.Expr) -> sp.Expr:
    """Every sum written out term by term (its limits must be numbers by now)."""
    e = sp.sympify(expr)
    while True:
        sums = [x for x in sp.preorder_traversal(e) if isinstance(x, sp.Sum)]
        if not sums:
            return e
        outer = sums[0]
        body = outer.function
        for idx, lo, hi in reversed(outer.limits):
            label = idx.label if isinstance(idx, sp.Idx) else idx
            terms = []
            for i in range(int(lo), int(hi) + 1):
                # the index by its label: substituting K, M changes the range an Idx carries
                terms.append(
                    body.replace(
                        lambda x, label=label: (
                            isinstance(x, (sp.Idx, sp.Symbol)) and getattr(x, "label", x) == label
                        ),
                        lambda x, i=i: sp.Integer(i),
                    )
                )
            body = sp.Add(*terms)
        e = e.xreplace({outer: body})


def concrete(expr: sp.Expr, K: int, M: int, activation: str | None = None) -> sp.Expr:
    """``expr`` at ``K`` student and ``M`` teacher units, every sum written out; with
    ``activation``, ``g``, ``g'``, ``g''`` replaced by its expressions."""
    e = expand_sums(sp.sympify(expr).subs({K_SYMBOL: K, M_SYMBOL: M}))
    if activation is None:
        return e
    act = get_activation(activation)
    return (
        e.replace(g, lambda x: act.expr.subs(z, x))
        .replace(gp, lambda x: act.d1.subs(z, x))
        .replace(gpp, lambda x: act.d2.subs(z, x))
    )


COV = sp.IndexedBase("Cov")  # the realised covariance of the fields, by rows


def field_mean(expr: sp.Expr, rows: dict, activation: str) -> sp.Expr:
    """``E[expr]`` over Gaussian fields with covariance ``Cov`` and an independent
    standard label noise ``zeta``, for a concrete ``expr`` polynomial in the factors
    ``g``, ``g'``, ``g''`` of fields and the bare fields (``rows``: field -> row of
    ``Cov``). Each product of factors is the engine's expectation
    (derive/gaussian.py) with its covariance entries read from ``Cov``."""
    total = sp.S.Zero
    for term in sp.Add.make_args(sp.expand(expr)):
        coeff, factors, zp = sp.S.One, [], 0
        for f in sp.Mul.make_args(term):
            base, power = f.as_base_exp()
            if base == zeta:
                zp += int(power)
            elif type(base) in KIND_OF_FUNC and is_field(base.args[0]):
                factors += [(KIND_OF_FUNC[type(base)], rows[base.args[0]])] * int(power)
            elif is_field(base):
                factors += [("id", rows[base])] * int(power)
            elif f.has(zeta) or any(is_field(x) for x in sp.preorder_traversal(f)):
                raise ValueError(f"cannot take the expectation of {f}: not a polynomial in g(field)")
            else:
                coeff *= f
        w = _noise_moment(zp)
        if w == 0:
            continue
        if not factors:
            total += w * coeff
            continue
        factors.sort(key=lambda kr: (KIND_RANK[kr[0]], kr[1]))
        d = expectation(tuple(k for k, _ in factors), activation)
        at = dict(zip(d.labels, (r for _, r in factors)))
        sub = {
            cov_symbol(a, b): COV[min(at[a], at[b]), max(at[a], at[b])] for a in d.labels for b in d.labels
        }
        total += w * coeff * d.expr.xreplace(sub)
    return total


@dataclass(frozen=True)
class FieldSource:
    """How the simulator realises a field family on real vectors: the student
    family from the weights ``W``; a teacher family from the teacher ``B`` plus,
    with each task, an independent isotropic perturbation of variance ``spread2``
    per component (``B + sqrt(spread2) Z``, 0 for the fixed teacher itself)."""

    family: sp.IndexedBase
    kind: str
    spread2: sp.Expr


def _block(model, f1, f2):
    if (f1, f2) in model.covariance:
        return model.covariance[(f1, f2)]
    entry = model.covariance[(f2, f1)]
    return lambda i, k: entry(k, i)


def field_sources(model) -> tuple[FieldSource, ...]:
    """Each field family of ``model`` as the simulator realises it, read from the
    model's covariance blocks: the first family the student fields (``Q``), every
    teacher family ``f`` with ``Cov(lambda, f) = R``, ``Cov(f, f) = T + s2 I`` and
    ``Cov(f, f') = T`` for another teacher family (an independent perturbation).
    A covariance of another form is refused: the simulator could not realise it."""
    i, k = sp.symbols("i_ k_", integer=True)
    out = []
    student = model.fields[0]

    def same(a, b):
        return sp.simplify(sp.sympify(a) - sp.sympify(b)) == 0

    if not same(_block(model, student, student)(i, k), Q[i, k]):
        raise ValueError(f"model {model.name!r}: the simulator realises the student fields with Cov = Q")
    out.append(FieldSource(student, STUDENT, sp.S.Zero))
    teachers = [f for f in model.fields[1:]]
    for f in teachers:
        if field_kind(f) != TEACHER:
            raise ValueError(f"model {model.name!r}: the simulator realises one student family, got {f}")
        if not same(_block(model, student, f)(i, k), R[i, k]):
            raise ValueError(f"model {model.name!r}: Cov({student}, {f}) must be R for the simulator")
        extra = sp.simplify(sp.sympify(_block(model, f, f)(i, k)) - T[i, k])
        s2 = sp.simplify(extra.subs(k, i))
        if s2.has(i, k) or s2.has(Q, R, T) or not same(extra, s2 * sp.KroneckerDelta(i, k)):
            raise ValueError(
                f"model {model.name!r}: Cov({f}, {f}) must be T + s2 I (the teacher plus an isotropic "
                f"perturbation) for the simulator, got T + {extra}"
            )
        out.append(FieldSource(f, TEACHER, s2))
    for a_, f1 in enumerate(teachers):
        for f2 in teachers[a_ + 1 :]:
            if not same(_block(model, f1, f2)(i, k), T[i, k]):
                raise ValueError(f"model {model.name!r}: Cov({f1}, {f2}) must be T for the simulator")
    return tuple(out)


# -- the compiled simulator's form ---------------------------------------------------


@dataclass(frozen=True)
class StandardForm:
    """A model whose algorithm is the one the compiled simulator loop runs
    (derive/templates/meta_simulator.py.jinja): the square loss of the student
    output ``sum_j c_j g(lambda_j)`` against ``y = sum_m v_task_m g(nu_task_m) + noise zeta``,
    the same per-sample loss in the inner loop with no regulariser, the task law
    ``v_task = vbar + spread xi``, the task teacher ``nu_task`` the teacher plus an isotropic
    perturbation, and the start's update ``dL/da'`` (plus, weighted like the first
    layer's second-order part, ``(da'/da)^T dL/da'``). Its expressions give the
    numbers the compiled loop takes (``numbers``)."""

    spread: sp.Expr
    spread2: sp.Expr

    def numbers(self, model, values: dict) -> dict:
        inner = model.inner_loop
        n_s = model.numeric(inner.support, values)
        return {
            "n_q": int(model.numeric(model.first_layer.batch, values)),
            "s": model.numeric(self.spread, values),
            "alpha_in": model.numeric(inner.rate, values),
            "S": int(model.numeric(inner.steps, values)),
            "sigma": model.numeric(model.noise, values),
            "eps_B": math.sqrt(model.numeric(self.spread2, values)),
            "second": model.numeric(model.first_layer.meta.weight, values) != 0,
            "n_s": 0 if math.isinf(n_s) else int(n_s),  # 0: population mode
        }


def standard_form(model, K: int = 2, M: int = 2) -> StandardForm | None:
    """The model's ``StandardForm`` if its algorithm is the compiled loop's, checked
    on its expressions written out at ``K``, ``M`` units; otherwise None (the
    simulator then runs the numpy reference, which reads any model)."""
    inner = model.inner_loop
    if inner is None or model.first_layer.meta is None or len(model.readout_updates) != 1:
        return None
    try:
        sources = field_sources(model)
    except ValueError:
        return None
    if len(sources) != 3 or len(model.const_vectors) != 1:
        return None
    lam_, nu_, nu_task_ = (s_.family for s_ in sources)
    laws = [tv for tv in model.task_vectors if tv.law is not None]
    if len(laws) != 1 or model.readout_updates[0].vector != inner.start:
        return None
    v_task, adapted, vbar = laws[0].base, inner.adapted.base, model.const_vectors[0].base
    c = sp.IndexedBase("c_standard")
    xi = inner.noise.base

    def eq(x, y):
        return sp.expand(concrete(x, K, M) - concrete(y, K, M)) == 0

    out_c = sum(c[j] * g(lam_[j]) for j in range(K))
    y = sum(v_task[m] * g(nu_task_[m]) for m in range(M)) + model.noise * zeta
    if not eq(model.student_output.xreplace({adapted: c}), out_c):
        return None
    if not eq(model.teacher_output, y - model.noise * zeta):
        return None
    if not eq(model.sample_loss.xreplace({adapted: c}), square_loss(out_c, y)):
        return None
    if not eq(inner.loss(c), square_loss(out_c, y)) or not eq(inner.regulariser(c), 0):
        return None
    spread = sp.simplify(sp.expand(concrete(inner_law(laws[0], 0), K, M) - vbar[0]).coeff(xi[0]))
    for m in range(M):
        if not eq(inner_law(laws[0], m), vbar[m] + spread * xi[m]):
            return None
    weight = model.first_layer.meta.weight
    loss = model.sample_loss
    for k in range(K):
        kk = sp.Integer(k)
        want = (1 - weight) * sp.diff(loss, adapted[kk]) + weight * sum(
            inner.da.base[j, kk] * sp.diff(loss, adapted[j]) for j in range(K)
        )
        if not eq(model.readout_updates[0].grad(loss, kk), want):
            return None
    return StandardForm(spread=spread, spread2=sources[2].spread2)


def inner_law(tv, m) -> sp.Expr:
    """The task law of ``tv`` at entry ``m``."""
    return sp.sympify(tv.law(sp.Integer(m)))
