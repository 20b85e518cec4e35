"""Stage 2a: expand an expression with sums over units into a list of terms.

``(sum_j v_j g(lambda_j) - sum_m vs_m g(nu_m))^2`` becomes four terms, each a
coefficient (parameters, readouts, Kronecker deltas of free indices), a tuple of
summation indices, a product of field factors ``g``, ``g'``, ``g''`` or the bare
field, and a power of the label noise ``zeta``. Kronecker deltas from
differentiating a sum (``d lambda_j / d lambda_k``) collapse a summation.
Summation indices are renamed canonically (``j0, j1, ...`` over students,
``m0, m1, ...`` over teachers, in order of first appearance) so that equal terms
merge and the code generator can share loops.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from .symbols import STUDENT, K, M, field_kind, g, gp, gpp, index_kind, is_field, zeta

KIND_OF_FUNC = {g: "g", gp: "gp", gpp: "gpp"}
FUNC_OF_KIND = {v: k for k, v in KIND_OF_FUNC.items()}
# canonical argument order of the factors of one expectation (matches I3, I4)
KIND_RANK = {"gp": 0, "gpp": 1, "id": 2, "g": 3}


@dataclass(frozen=True)
class RawTerm:
    """``coeff * prod(factors) * zeta**zeta_power``, summed over ``sums``."""

    coeff: sp.Expr
    sums: tuple[sp.Idx, ...]
    factors: tuple[tuple[str, sp.Indexed], ...]
    zeta_power: int = 0

    def __mul__(self, other: RawTerm) -> RawTerm:
        return RawTerm(
            self.coeff * other.coeff,
            self.sums + other.sums,
            self.factors + other.factors,
            self.zeta_power + other.zeta_power,
        )

    def subs_index(self, old: sp.Idx, new: sp.Idx) -> RawTerm:
        return RawTerm(
            self.coeff.subs(old, new),
            tuple(s for s in self.sums if s != old),
            tuple((k, f.subs(old, new)) for k, f in self.factors),
            self.zeta_power,
        )

    def as_expr(self) -> sp.Expr:
        """The term as one sympy expression (fields as g(lambda[j]) etc.), sums outermost."""
        body = self.coeff * zeta**self.zeta_power
        for kind, fld in self.factors:
            body *= fld if kind == "id" else FUNC_OF_KIND[kind](fld)
        for s in reversed(self.sums):
            body = sp.Sum(body, (s, 0, s.upper))
        return body


def _check_field(fld: sp.Indexed) -> None:
    (i,) = fld.indices
    if index_kind(i) != field_kind(fld.base):
        raise ValueError(f"field {fld} needs a {field_kind(fld.base)} index, got {i} ({index_kind(i)})")


class _Expander:
    def __init__(self):
        self.counter = itertools.count()

    def fresh(self, idx: sp.Idx) -> sp.Idx:
        return sp.Idx(f"_s{next(self.counter)}", (idx.lower, idx.upper))

    def run(self, e: sp.Expr) -> list[RawTerm]:
        if isinstance(e, sp.Add):
            return [t for a in e.args for t in self.run(a)]
        if isinstance(e, sp.Mul):
            terms = [RawTerm(sp.S.One, (), ())]
            for a in e.args:
                terms = [t * u for t in terms for u in self.run(a)]
            return terms
        if isinstance(e, sp.Pow) and e.exp.is_Integer and e.exp > 0 and e.base != zeta:
            terms = [RawTerm(sp.S.One, (), ())]
            for _ in range(int(e.exp)):
                terms = [t * u for t in terms for u in self.run(e.base)]
            return terms
        if isinstance(e, sp.Sum):
            # sympy keeps nested sums as one Sum with several limits
            body, new = e.function, []
            for idx, lo, hi in e.limits:
                index_kind(idx)  # raises on a range that is not 0..K-1 or 0..M-1
                if lo != 0 or hi != idx.upper:
                    raise ValueError(f"sum over {idx} must run over all units, got {lo}..{hi}")
                new.append(self.fresh(idx))
                body = body.subs(idx, new[-1])
            return [RawTerm(t.coeff, tuple(new) + t.sums, t.factors, t.zeta_power) for t in self.run(body)]
        if isinstance(e, sp.Function) and e.func in KIND_OF_FUNC:
            (arg,) = e.args
            if not is_field(arg):
                raise ValueError(f"activation applied to {arg}; only to a field such as lambda[k] or nu[m]")
            _check_field(arg)
            return [RawTerm(sp.S.One, (), ((KIND_OF_FUNC[e.func], arg),))]
        if is_field(e):
            _check_field(e)
            return [RawTerm(sp.S.One, (), (("id", e),))]
        if e == zeta:
            return [RawTerm(sp.S.One, (), (), 1)]
        if isinstance(e, sp.Pow) and e.base == zeta and e.exp.is_Integer and e.exp > 0:
            return [RawTerm(sp.S.One, (), (), int(e.exp))]
        if any(is_field(x) for x in e.atoms(sp.Indexed)) or e.has(zeta, sp.Sum, g, gp, gpp):
            raise ValueError(f"cannot expand {e}: fields may enter only polynomially through g, g', g''")
        return [RawTerm(e, (), ())]


def _collapse_deltas(t: RawTerm) -> RawTerm | None:
    while True:
        deltas = [d for d in sp.Mul.make_args(t.coeff) if isinstance(d, sp.KroneckerDelta)]
        for d in deltas:
            i, j = d.args
            if index_kind(i) != index_kind(j):
                return None
            if i in t.sums or j in t.sums:
                old, new = (i, j) if i in t.sums else (j, i)
                t = RawTerm(t.coeff / d, t.sums, t.factors, t.zeta_power).subs_index(old, new)
                break
        else:
            return t


def canonical(t: RawTerm) -> RawTerm:
    """Sort factors by kind, then rename summation indices in order of appearance."""
    factors = tuple(sorted(t.factors, key=lambda kf: (KIND_RANK[kf[0]], str(kf[1]))))
    order: list[sp.Idx] = []
    for _, f in factors:
        for s in f.indices:
            if s in t.sums and s not in order:
                order.append(s)
    for s in sorted(t.sums, key=str):
        if s not in order:
            order.append(s)
    counts = {"student": 0, "teacher": 0}
    mapping = {}
    for s in order:
        kind = index_kind(s)
        prefix = "j" if kind == STUDENT else "m"
        mapping[s] = sp.Idx(f"{prefix}{counts[kind]}", K if kind == STUDENT else M)
        counts[kind] += 1
    coeff = t.coeff.xreplace(mapping)
    factors = tuple((k, f.xreplace(mapping)) for k, f in factors)
    sums = tuple(mapping[s] for s in order)
    return RawTerm(coeff, sums, factors, t.zeta_power)


def expand(e: sp.Expr) -> list[RawTerm]:
    """Expand ``e`` into canonical terms, equal terms merged, zero terms dropped."""
    out: dict = {}
    for t in _Expander().run(sp.sympify(e)):
        t = _collapse_deltas(t)
        if t is None or t.coeff == 0:
            continue
        t = canonical(t)
        key = (t.sums, t.factors, t.zeta_power)
        out[key] = out.get(key, sp.S.Zero) + t.coeff
    terms = [RawTerm(sp.factor_terms(c), *key) for key, c in out.items() if c != 0]
    # a total order that depends on the terms only, never on traversal or hashing
    return sorted(terms, key=lambda t: (len(t.sums), str(t.sums), str(t.factors), t.zeta_power, str(t.coeff)))
