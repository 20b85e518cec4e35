"""Printing sympy expressions as numba-compatible Python (used by derive/codegen.py).

Symbols map to names and array slots here, never by string replacement:
fields inside a primitive become rows of the covariance matrix, at the offsets
of the model's layout (``Model.layout``; for two_layer student k -> ``k``,
teacher m -> ``K + m``), the field
arrays of a sample become ``lam`` and ``nu``, Kronecker deltas become
conditional expressions. A primitive ``P_dir`` is the directional derivative
of ``P`` along a perturbation ``dC`` of the covariance: ``P_dir(C, dC, ...)``.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .gaussian import PRIMITIVES
from .symbols import g, gp, gpp, lam
TILTED = "__tilted"
TILTED1 = "__tilted1"


class KernelPrinter(PythonCodePrinter):
    """Python code for numba: ``math`` functions, array slots for indexed symbols."""

    def __init__(
        self,
        primitive_names=(),
        table_rows=None,
        field_rows=None,
        settings=None,
        tilt1_form=None,
        packed=False,
        tables=None,
        packed_names=("X", "P"),
    ):
        super().__init__(settings or {"fully_qualified_modules": True, "standard": "python3"})
        # the base of the one-unit tilt in separable form (codegen.separable_form): its
        # value in x = Ct1[a, r, q] and the per-row factors D1[a, r], D1[a, q] of tilt1_all,
        # without its numeric factor (codegen.loops multiplies the term by it)
        self.tilt1_form = tilt1_form
        # the table of the pair tilt is read packed, X[P[r] + q] (its upper triangle)
        self.packed = packed
        # the names of the packed triangle and of its row offsets: (X, P) for the table,
        # (W0, PW) for the weights of a contraction (codegen.Contraction)
        self.packed_names = packed_names
        # primitive -> (name of its table, field family -> offset of its rows in the
        # table, the family of the table's first two arguments, or None: any): calls read the table
        self.tables = tables or {}
        self.primitive_names = set(primitive_names) | set(PRIMITIVES)
        # field family -> offset of its rows in the table F of a hoisted tilt
        self.table_rows = table_rows
        # field family -> offset of its rows in the covariance C (the model's layout)
        self.field_rows = field_rows or {}

    def _print_asin(self, expr):
        # the module's vectorisable arcsine (derive/special.py)
        return f"asin_({self._print(expr.args[0])})"

    def _print_finite(self, expr):
        # derive/symbols.py finite: the guard of the terms of a finite support set
        return f"math.isfinite({self._print(expr.args[0])})"

    def _print_Idx(self, expr):
        return str(expr.label)

    def _print_Indexed(self, expr):
        base = "lam" if expr.base == lam else str(expr.base)
        return f"{base}[{', '.join(self._print(i) for i in expr.indices)}]"

    def _print_KroneckerDelta(self, expr):
        a, b = expr.args
        return f"(1.0 if {self._print(a)} == {self._print(b)} else 0.0)"

    def _print_Function(self, expr):
        name = expr.func.__name__
        if name.endswith(TILTED1):
            # a primitive at the covariance tilted by the unit of its first argument
            (a, *rest) = expr.args
            form = self.tilt1_form
            if form is not None and len(rest) == 2 and name[: -len(TILTED1)] == form["base"]:
                at, r, q = (sp.Symbol(self._field_row(x)) for x in (a, *rest))
                Ct1, D1 = sp.IndexedBase("Ct1"), sp.IndexedBase("D1")
                slots = {form["x"]: Ct1[at, r, q], form["Da"]: D1[at, r], form["Db"]: D1[at, q]}
                return self._print(form["expr"].xreplace(slots))
            rows = ", ".join(self._field_row(x) for x in rest)
            return f"{name[: -len(TILTED1)]}(Ct1[{self._field_row(a)}], {rows})"
        if name.endswith(TILTED):
            # a primitive at the tilted covariance, read from the table of the hoisted tilt
            if self.table_rows is None:
                raise ValueError(f"{name}: a primitive at a pair-tilted covariance needs its table")
            rows = [self._field_row(a, self.table_rows) for a in expr.args]
            if self.packed:
                x, p = self.packed_names
                return f"{x}[{p}[{rows[0]}] + {rows[1]}]"
            return f"F[{', '.join(rows)}]"
        if name in self.tables:
            table, rows, first = self.tables[name]
            args = expr.args
            if all(isinstance(a, sp.Indexed) and a.base in rows for a in args) and (
                first is None or {args[0].base, args[1].base} == {first}
            ):
                return f"{table}[{', '.join(self._field_row(a, rows) for a in args)}]"
        if name in self.primitive_names:
            rows = ", ".join(self._field_row(a) for a in expr.args)
            if name.endswith("_dir"):
                # zero unless dC touches its fields (codegen primitive_code: its guard)
                return f"({name}(C, dC, {rows}) if {name}_touches(dC, {rows}) else 0.0)"
            return f"{name}(C, {rows})"
        if expr.func in (g, gp, gpp):
            return f"{name}({self._print(expr.args[0])})"
        return super()._print_Function(expr)

    def _field_row(self, fld: sp.Indexed, rows=None) -> str:
        rows = self.field_rows if rows is None else rows
        if not isinstance(fld, sp.Indexed) or fld.base not in rows:
            raise ValueError(f"primitive argument {fld} is not a field (of the layout or the table)")
        (i,) = fld.indices
        return rows[fld.base] + self._print(i)

    def _print_Rational(self, expr):
        # float literals keep numba's arithmetic in float64
        return f"{float(expr.p)}/{float(expr.q)}" if expr.q != 1 else f"{float(expr.p)}"

    def _print_Integer(self, expr):
        return f"{int(expr)}"


def code(
    expr: sp.Expr,
    primitive_names=(),
    table_rows=None,
    field_rows=None,
    tilt1_form=None,
    packed=False,
    tables=None,
    packed_names=("X", "P"),
) -> str:
    """``expr`` as numba code; ``field_rows`` maps each field family to the offset of
    its rows in C (``"K + "``), ``table_rows`` to its rows in the table of a tilt
    (read ``packed`` when only its upper triangle is filled), ``tilt1_form`` the
    separable form of the base of the one-unit tilt, ``tables`` the primitives read
    from a table of the task program (see ``KernelPrinter``); ``packed_names`` the
    names of the packed triangle and its row offsets."""
    printer = KernelPrinter(
        primitive_names,
        table_rows,
        field_rows,
        tilt1_form=tilt1_form,
        packed=packed,
        tables=tables,
        packed_names=packed_names,
    )
    return printer.doprint(expr)


def field_rows(layout) -> dict:
    """Field family -> the printed offset of its rows (``""``, ``"K + "``, ...), from
    ``Model.layout``."""
    return {f: ("" if at == 0 else f"{KernelPrinter().doprint(at)} + ") for f, at, _ in layout}
