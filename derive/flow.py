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
from .gaussian import Derived, expectation, name_of
from .model import Model
from .models import get_model


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


@dataclass(frozen=True)
class FlowIR:
    model: Model
    activation: str
    derivatives: tuple[Component, ...]  # d/dalpha of Q, R, then the student readouts
    metrics: tuple[Component, ...]
    samples: tuple[Component, ...]  # per-sample gradients the simulator applies
    primitives: tuple[Derived, ...]  # those the flow uses, in a fixed order


def _noise_moment(p: int) -> int:
    """E[zeta^p] for a standard Gaussian: (p-1)!! for even p, 0 for odd."""
    if p % 2:
        return 0
    out = 1
    for i in range(p - 1, 0, -2):
        out *= i
    return out


def average(raw: list[RawTerm], activation: str, used: dict) -> tuple[FlowTerm, ...]:
    """Expectation of each expanded term over the Gaussian fields and the noise."""
    merged: dict = {}
    for t in raw:
        w = _noise_moment(t.zeta_power)
        if w == 0:
            continue
        kinds = tuple(k for k, _ in t.factors)
        args = tuple(f for _, f in t.factors)
        coeff = w * t.coeff
        name = None
        if kinds:
            d = expectation(kinds, activation, name_of(kinds))
            if d.expr == 0:
                continue
            if d.expr.is_number:
                coeff, args = coeff * d.expr, ()
            else:
                name = d.name
                used[name] = d
        key = (t.sums, name, args)
        merged[key] = merged.get(key, sp.S.Zero) + coeff
    return tuple(FlowTerm(sp.factor_terms(c), *key) for key, c in merged.items() if c != 0)


@lru_cache(maxsize=None)
def build_flow(model_name: str, activation: str) -> FlowIR:
    """Derive the flow of ``model_name`` with ``activation`` (MODELS.md sections 3-4)."""
    model = get_model(model_name)
    loss = model.loss
    used: dict = {}
    derivs = []
    rules = [model.first_layer, *model.readout_updates]
    for rule in rules:
        for name, (free, integrand, deterministic) in rule.flows(loss).items():
            terms = average(expand(integrand), activation, used)
            terms += tuple(FlowTerm(t.coeff, t.sums, None, ()) for t in expand(deterministic))
            derivs.append(Component(name, free, terms))
    # a student readout without an update rule stays constant in time
    updated = {r.vector.name for r in model.readout_updates}
    for v in model.state_vectors:
        if v.name not in updated:
            derivs.append(Component(v.name, (sp.Idx("k", v.length),), ()))
    metrics = tuple(
        Component(name, (), average(expand(integrand), activation, used))
        for name, integrand in model.metrics.items()
    )
    samples = []
    free, grad = model.first_layer.sample_gradient(loss)
    samples.append(Component("G", free, tuple(expand(grad))))
    for r in model.readout_updates:
        free, grad = r.sample_gradient(loss)
        samples.append(Component(f"H_{r.vector.name}", free, tuple(expand(grad))))
    prims = tuple(used[k] for k in sorted(used))
    return FlowIR(model, activation, tuple(derivs), metrics, tuple(samples), prims)
