"""Activations as sympy definitions (docs/conventions.md section 1).

An activation is one expression ``g(z)``; its derivatives come from sympy.
Adding an activation is adding one entry to ``ACTIVATIONS``; if its Gaussian
expectations need rules the engine does not have yet (derive/gaussian.py), the
engine says which pattern it could not reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sympy as sp

z = sp.Symbol("z", real=True)


@dataclass(frozen=True)
class Activation:
    """An activation function ``g(z)`` given as a sympy expression in ``z``."""

    name: str
    expr: sp.Expr
    doc: str

    @cached_property
    def d1(self) -> sp.Expr:
        return sp.diff(self.expr, z)

    @cached_property
    def d2(self) -> sp.Expr:
        return sp.diff(self.expr, z, 2)

    def at(self, order: int, arg: sp.Expr) -> sp.Expr:
        """g, g' or g'' (order 0, 1, 2) evaluated at ``arg``."""
        e = (self.expr, self.d1, self.d2)[order]
        return e.subs(z, arg)

    @cached_property
    def is_odd(self) -> bool:
        return sp.simplify(self.expr.subs(z, -z) + self.expr) == 0


ACTIVATIONS: dict[str, Activation] = {
    "erf": Activation("erf", sp.erf(z / sp.sqrt(2)), "g(z) = erf(z/sqrt(2))"),
    "linear": Activation("linear", z, "g(z) = z"),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None
