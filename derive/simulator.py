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

from dataclasses import dataclass

import sympy as sp

from .activations import get_activation, z
from .gaussian import cov_symbol, primitive
from .printer import code


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
    if ir.model.inner_loop is None:
        return None
    f = formulas(ir.activation)
    return {
        "args": ", ".join(str(v) for v in f.variables),
        "value": _function([f.I2]),
        "partials": _function(f.partials),
        "provenance": list(f.provenance),
    }
