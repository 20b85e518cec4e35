"""Stage 3: the flow IR of a model, every expectation a derived Gaussian primitive.

For each order parameter the update rules of the model (derive/model.py) give
an integrand; it is expanded into terms (derive/expand.py), the label noise is
averaged out (``E[zeta^2] = 1``), and the remaining product of field factors
becomes a primitive (derive/gaussian.py) whose arguments are the fields.
Primitives that vanish for the activation drop out; constant ones fold into the
coefficient. The result is pure data: what `show` prints and what the templates
render.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from .expand import RawTerm, expand
from .gaussian import Derived, directional, expectation, name_of
from .model import Model
from .models import get_model
from .symbols import finite


@dataclass(frozen=True)
class FlowTerm:
    """``coeff * primitive(args)`` summed over ``sums``; ``primitive`` None means 1."""

    coeff: sp.Expr
    sums: tuple[sp.Idx, ...]
    primitive: str | None
    args: tuple[sp.Indexed, ...]

    def as_expr(self) -> sp.Expr:
        body = self.coeff
        if self.primitive is not None:
            body = body * sp.Function(self.primitive)(*self.args)
        for s in reversed(self.sums):
            body = sp.Sum(body, (s, 0, s.upper))
        return body


@dataclass(frozen=True)
class Component:
    """One output array (an order parameter's derivative, a metric, a per-sample gradient)."""

    name: str
    free: tuple[sp.Idx, ...]
    terms: tuple  # FlowTerm for flows and metrics, RawTerm for per-sample gradients
    # symmetric in its two free indices: the kernel computes one triangle and mirrors it
    symmetric: bool = False


@dataclass(frozen=True)
class FlowIR:
    model: Model
    activation: str
    derivatives: tuple[Component, ...]  # d/dalpha of Q, R, then the student readouts
    metrics: tuple[Component, ...]
    samples: tuple[Component, ...]  # per-sample gradients the simulator applies
    primitives: tuple[Derived, ...]  # those the flow uses, in a fixed order
    program: object = None  # derive.meta.TaskProgram of a model with an inner loop
    moments: tuple[sp.IndexedBase, ...] = ()  # task moments (mu_*, S_*__*) the derivatives read
    metric_moments: tuple[sp.IndexedBase, ...] = ()  # and those the metrics read


def _noise_moment(p: int) -> int:
    """E[zeta^p] for a standard Gaussian: (p-1)!! for even p, 0 for odd."""
    if p % 2:
        return 0
    out = 1
    for i in range(p - 1, 0, -2):
        out *= i
    return out


def mean_symbol(x: sp.Indexed) -> sp.Indexed:
    return sp.IndexedBase(f"mu_{x.base}")[x.indices]


def cov_symbol(x: sp.Indexed, y: sp.Indexed, rank: dict) -> sp.Indexed:
    """Covariance of two task quantities, its factors in a canonical order."""
    x, y = sorted((x, y), key=lambda e: (rank[e.base], str(e.indices)))
    return sp.IndexedBase(f"S_{x.base}__{y.base}")[x.indices + y.indices]


def isserlis(factors: list[sp.Indexed], rank: dict) -> sp.Expr:
    """E[prod factors] for jointly Gaussian factors with means and covariances:
    E[X_1 F] = E[X_1] E[F] + sum_j Cov(X_1, X_j) E[F / X_j] (Isserlis / Wick)."""
    if not factors:
        return sp.S.One
    first, rest = factors[0], factors[1:]
    out = mean_symbol(first) * isserlis(rest, rank)
    for i, other in enumerate(rest):
        out += cov_symbol(first, other, rank) * isserlis(rest[:i] + rest[i + 1 :], rank)
    return out


def support_excess(factors: list[sp.Indexed], rank: dict, support: dict) -> sp.Expr:
    """The part of a fourth moment of task quantities that Isserlis' theorem misses
    when the support set's covariance ``V`` of the adapted readout depends on the task
    (docs/models/anil.md 5.6, derive/meta.py ``_support_excess``): for every split of
    the four factors into two adapted readouts read through ``V`` and two conditional
    means, ``Cov(m_x m_y, V_cd)``. ``support`` maps the adapted readout's base to the
    excess arrays' names by pair of bases."""
    if len(factors) < 3 or not support:
        return sp.S.Zero
    (base, (names, vv)), = support.items()
    if sum(f.base == base for f in factors) >= 2 and len(factors) != 4:
        raise NotImplementedError(
            f"a product of {len(factors)} task quantities with two finite-support readouts {base}: "
            "only fourth moments are derived (docs/models/anil.md 5.6)"
        )
    out = sp.S.Zero
    for pair in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        c, d = (factors[i] for i in pair)
        if c.base != base or d.base != base:
            continue
        rest = (factors[i] for i in range(4) if i not in pair)
        x, y = sorted(rest, key=lambda e: (rank[e.base], str(e.indices)))
        key = (x.base, y.base)
        if key not in names:
            raise NotImplementedError(f"finite support sets: no covariance of {x.base} {y.base} with V")
        out += sp.IndexedBase(names[key])[c.indices + d.indices + x.indices + y.indices]
    if all(f.base == base for f in factors):
        # four adapted readouts: E[V V] - E[V] E[V] over the task, for each pairing
        a, b, c, d = (f.indices for f in factors)
        for p1, p2 in ((a + b, c + d), (a + c, b + d), (a + d, b + c)):
            out += sp.IndexedBase(vv)[p1 + p2]
    return out


def task_average(coeff: sp.Expr, families, support: dict | None = None) -> tuple[sp.Expr, sp.Expr]:
    """Average a coefficient over the task quantities (``families``, in order): the
    pair (Isserlis' part, the part that the support set's task-dependent covariance
    adds to fourth moments, with ``support``; see ``support_excess``)."""
    rank = {f.base: i for i, f in enumerate(families)}
    if not rank or not coeff.has(*rank):
        return coeff, sp.S.Zero
    out = sp.S.Zero
    excess = sp.S.Zero
    for mono in sp.Add.make_args(sp.expand(coeff)):
        rand, rest = [], sp.S.One
        for f in sp.Mul.make_args(mono):
            b, e = f.as_base_exp()
            if isinstance(b, sp.Indexed) and b.base in rank:
                rand += [b] * int(e)
            else:
                rest *= f
        rand = sorted(rand, key=lambda e: (rank[e.base], str(e.indices)))
        out += rest * isserlis(rand, rank)
        excess += rest * support_excess(rand, rank, support or {})
    return out, excess


def average(
    raw: list[RawTerm], activation: str, used: dict, families=(), support=None, guard=sp.S.One
) -> tuple[FlowTerm, ...]:
    """Expectation of each expanded term over the Gaussian fields, the noise and
    the task quantities ``families`` (independent of the query sample). The part of
    a term that the support set's task-dependent covariance adds (``support``) is a
    term of its own, times ``guard`` (the indicator that the support set is finite:
    codegen runs it only then)."""
    merged: dict = {}
    for t in raw:
        w = _noise_moment(t.zeta_power)
        if w == 0:
            continue
        kinds = tuple(k for k, _ in t.factors)
        args0 = tuple(f for _, f in t.factors)
        regular, excess = task_average(w * t.coeff, families, support)
        for part, coeff in (("", regular), ("support", excess * guard)):
            if coeff == 0:
                continue
            name, args = None, args0
            if kinds:
                d = expectation(kinds, activation, name_of(kinds))
                if d.expr == 0:
                    continue
                if d.expr.is_number:
                    coeff, args = coeff * d.expr, ()
                else:
                    name = d.name
                    used[name] = d
            key = (t.sums, name, args, part)
            merged[key] = merged.get(key, sp.S.Zero) + coeff
    return tuple(FlowTerm(sp.factor_terms(c), *key[:3]) for key, c in merged.items() if c != 0)


def _directional(terms: tuple[FlowTerm, ...], activation: str, used: dict) -> tuple[FlowTerm, ...]:
    out = []
    for t in terms:
        if t.primitive is None:
            continue  # constant in the covariance
        d = directional(used[t.primitive])
        used[d.name] = d
        out.append(FlowTerm(t.coeff, t.sums, d.name, t.args))
    return tuple(out)


def _moment_bases(components) -> tuple[sp.IndexedBase, ...]:
    names = set()
    for comp in components:
        for t in comp.terms:
            for x in t.coeff.atoms(sp.Indexed):
                n = str(x.base)
                if n.startswith("mu_") or n.startswith("S_"):
                    names.add(n)
    return tuple(sp.IndexedBase(n) for n in sorted(names))


# flows of Model objects outside the registry, by identity: (id, activation) -> (model, flow)
_BY_OBJECT: dict = {}


def build_flow(model: str | Model, activation: str) -> FlowIR:
    """Derive the flow of ``model`` (a registered name or a ``Model``, e.g. from a
    file outside derive/models) with ``activation`` (docs/models/).
    Cached by name, and for a ``Model`` by identity."""
    if isinstance(model, str):
        return _build_named(model, activation)
    hit = _BY_OBJECT.get((id(model), activation))
    if hit is None or hit[0] is not model:
        hit = (model, derive_flow(model, activation))
        _BY_OBJECT[id(model), activation] = hit
    return hit[1]


@lru_cache(maxsize=None)
def _build_named(model_name: str, activation: str) -> FlowIR:
    return derive_flow(get_model(model_name), activation)


def derive_flow(model: Model, activation: str) -> FlowIR:
    """The flow IR of ``model`` with ``activation``, derived afresh (no cache)."""
    loss = model.sample_loss
    fams = model.random_families
    used: dict = {}
    support = None
    guard = sp.S.One
    if model.inner_loop is not None:
        from .meta import excess_name, excess_pairs, excess_vv_name

        pairs = excess_pairs(model)
        if pairs:
            support = {
                model.inner_loop.adapted.base: (
                    {(x.base, y.base): excess_name(x, y) for x, y in pairs},
                    excess_vv_name(model.inner_loop),
                )
            }
            # the support set's terms run only when it is finite (zero arrays otherwise)
            guard = sp.Piecewise((1, finite(sp.sympify(model.inner_loop.support))), (0, True))
    derivs = []
    rules = [model.first_layer, *model.readout_updates]
    for rule in rules:
        for name, (free, integrand, deterministic) in rule.flows(loss).items():
            terms = average(expand(integrand), activation, used, fams, support, guard)
            terms += tuple(FlowTerm(t.coeff, t.sums, None, ()) for t in expand(deterministic))
            derivs.append(Component(name, free, terms, symmetric=name in rule.symmetric))
    # a student readout without an update rule stays constant in time
    updated = {r.vector.name for r in model.readout_updates}
    for v in model.state_vectors:
        if v.name not in updated:
            derivs.append(Component(v.name, (sp.Idx("k", v.length),), ()))
    metrics = tuple(
        Component(name, (), average(expand(integrand), activation, used, fams, support, guard))
        for name, integrand in model.metrics.items()
    )
    samples = []
    if model.inner_loop is None:
        # per-sample gradients for the generic simulator; a model with an inner
        # loop has its own simulator (runtime/simulate_meta.py)
        free, grad = model.first_layer.sample_gradient(loss)
        samples.append(Component("G", free, tuple(expand(grad))))
        for r in model.readout_updates:
            free, grad = r.sample_gradient(loss)
            samples.append(Component(f"H_{r.vector.name}", free, tuple(expand(grad))))
    program = None
    if model.inner_loop is not None:
        from .meta import task_program

        program = task_program(model, activation, used)
    prims = tuple(used[k] for k in sorted(used))
    return FlowIR(
        model,
        activation,
        tuple(derivs),
        metrics,
        tuple(samples),
        prims,
        program,
        _moment_bases(derivs),
        _moment_bases(metrics),
    )
