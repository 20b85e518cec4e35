"""Stage 4: render a flow IR into a self-contained numba module.

The Python here turns the IR into plain data (code lines, loop nests, layout);
the Jinja templates in derive/templates decide the module's shape. Output is a
pure function of the inputs: symbols are ordered, ``cse`` uses numbered
symbols, and the header holds a hash of every input and no timestamp.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.meta
import sympy as sp

from . import __version__
from .activations import get_activation, z
from .expand import FUNC_OF_KIND, RawTerm
from .flow import Component, FlowIR, FlowTerm, build_flow
from . import gaussian, meta
from .gaussian import PRIMITIVES, tilt_split
from .model import CONST_OVERLAPS, STATE_OVERLAPS, UNITS, Model
from .models import model_file
from .printer import TILTED, TILTED1, code, field_rows
from .simulator import context as simulator_context
from .integrators import context as integrators_context
from .special import asin_body
from .quadrature import SELECTOR, rule_code, rule_counts, rule_names, selector_code
from .tables import tilt_code
from .symbols import STUDENT, K, M, field_doc, field_kind, index_kind

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"
KERNEL_TEMPLATE = "kernel.py.jinja"


def environment(folder: Path = TEMPLATES) -> jinja2.Environment:
    """The jinja environment of the templates in ``folder`` (the kernels', or the docs')."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def check_context(env: jinja2.Environment, name: str, context: dict) -> None:
    """A template variable missing from the context, or a context key the template
    never reads, is an error rather than a blank or a silent omission."""
    source = env.loader.get_source(env, name)[0]
    wanted = jinja2.meta.find_undeclared_variables(env.parse(source))
    missing = wanted - set(context)
    extra = set(context) - wanted
    if missing or extra:
        raise ValueError(f"template {name}: missing {sorted(missing)}, unused {sorted(extra)}")


@dataclass(frozen=True)
class Sum:
    """One term of a loop nest, ``outer * sum over the nest of inner``: the factors
    that do not depend on the summation indices are multiplied once, after the sum.
    ``diagonal`` is ``inner`` on the diagonal of a triangular nest (i1 = i0)."""

    outer: str
    inner: str
    diagonal: str | None = None


@dataclass(frozen=True)
class Loop:
    """A nest of loops over summation indices and the terms summed in its body."""

    indices: tuple[tuple[str, str], ...]  # (name, bound) from outermost
    statements: tuple[Sum, ...]
    # the term is symmetric in its two summation indices: the diagonal i0 = i1 once,
    # the pairs i0 < i1 twice
    triangular: bool = False
    # a condition on the parameters outside which every term of the nest vanishes
    guard: str | None = None


@dataclass
class Contraction:
    """The terms of a pair component (dQ) that read the table of the pair tilt with
    weights free of the pair: ``outer(k, l) * sum over rows r <= q of W[r, q] F[r, q]``.
    The weights W (packed like the table, ``fills``: loop nests that add each term's
    weight at its entry) are computed once per evaluation of the right-hand side,
    and each pair costs one dot product of the table with them (``packed_dot``)
    instead of one loop nest per term."""

    name: str  # the weight array (packed like X; row offsets PW)
    fills: list = field(default_factory=list)  # Loop nests of Fill statements


@dataclass(frozen=True)
class Fill:
    """``slot += weight`` in the body of a weight loop nest of a ``Contraction``; on the
    diagonal of a triangular nest ``diagonal_slot += diagonal`` (the pairs i0 < i1 twice)."""

    slot: str
    weight: str
    diagonal_slot: str | None = None
    diagonal: str | None = None


def _contraction(component: Component, expr: sp.Expr, sums, table) -> tuple | None:
    """``expr`` (a term of ``component`` rewritten by ``_hoisted_tilt``) as
    ``(outer, weight, read)`` when it is a pair-independent weight times one read of
    the table of the pair tilt at two summation indices, times factors that depend
    on the pair (``outer``); None otherwise."""
    if table is None or table["fill"] != "upper" or len(component.free) != 2 or len(sums) != 2:
        return None
    reads = [f for f in expr.atoms(sp.Function) if f.func.__name__.endswith(TILTED)]
    if len(reads) != 1:
        return None
    (read,) = reads
    if {a.indices[0] for a in read.args} != set(sums):
        return None
    free = set(component.free) | {TILT_PREF}
    outer, weight = [], []
    for f in sp.Mul.make_args(expr):
        if f == read:
            continue
        dep = any(f.has(x) for x in free)
        if dep and any(f.has(x) for x in sums):
            return None
        (outer if dep else weight).append(f)
    return sp.Mul(*outer), sp.Mul(*weight), read


def _bound(idx: sp.Idx) -> str:
    return "K" if index_kind(idx) == STUDENT else "M"


def _term_expr(t) -> sp.Expr:
    if isinstance(t, FlowTerm):
        body = t.coeff
        if t.primitive is not None:
            body = body * sp.Function(t.primitive)(*t.args)
        return body
    assert isinstance(t, RawTerm)
    body = t.coeff * sp.Symbol("zeta") ** t.zeta_power
    for kind, fld in t.factors:
        body = body * (fld if kind == "id" else FUNC_OF_KIND[kind](fld))
    return body


TILT_PREF = sp.Symbol("tilt_pref")


def _hoisted_tilt(component: Component, t, activation: str, pair: bool = True):
    """``t`` rewritten as ``coeff * tilt_pref * base(Ct; rest)`` when its primitive
    starts by tilting on the component's two free indices (I4(k, l, ., .) in dQ):
    the tilt is then computed once per (k, l) instead of once per term (only with
    ``pair``, i.e. when the kernel tabulates the base at the tilted covariance;
    otherwise the closed-form primitive is called). None if not."""
    if activation is None or not isinstance(t, FlowTerm) or t.primitive is None:
        return None
    split = tilt_split(_kinds_of(t.primitive), activation)
    if split is None:
        return None
    if split.n == 1:
        # one g': the kernel tilts by every student unit once per call (tilt1_all)
        a = t.args[0]
        if field_kind(a.base) != STUDENT or split.base is None:
            return None
        pref = sp.IndexedBase("tilt1_pref")[a.indices[0]]
        return t.coeff * pref * sp.Function(split.base.name + TILTED1)(a, *t.args[1:]), split
    if len(component.free) != 2 or not pair:
        return None
    free = tuple(component.free)
    if tuple(a.indices[0] for a in t.args[:2]) != free or any(
        field_kind(a.base) != STUDENT for a in t.args[:2]
    ):
        return None
    expr = t.coeff * TILT_PREF
    if split.base is not None:
        expr = expr * sp.Function(split.base.name + TILTED)(*t.args[2:])
    return expr, split


def separable_form(d) -> dict:
    """The primitive ``d(C; a, b)`` written as ``value(x, Da, Db)`` with ``x = C_ab`` and
    ``Dr = norm(C_rr)``, so that a table over all pairs of rows computes ``norm`` once
    per row. A square root of a polynomial in the two variances that factors as
    ``f(C_aa) f(C_bb)`` becomes ``1 / (Da Db)`` with ``norm = 1/sqrt(f)`` (one of
    ``f(C_bb)`` alone, ``1 / Db``); for erf,
    ``I2 = 2 asin(C_ab / sqrt((1 + C_aa)(1 + C_bb))) / pi = 2 asin(x Da Db) / pi`` and
    ``E[u_a g(u_b)] = sqrt(2/pi) C_ab / sqrt(1 + C_bb) = sqrt(2/pi) x Db``.
    Otherwise ``norm`` is the variance itself. The rewrite is checked numerically."""
    la, lb = d.labels
    by_name = {str(s): s for s in d.expr.free_symbols}
    caa, cbb, cab = (
        by_name.get(f"C_{u}{v}", sp.Symbol(f"C_{u}{v}")) for u, v in ((la, la), (lb, lb), (la, lb))
    )
    x, Da, Db, var = sp.symbols("x Da Db d")
    expr = d.expr
    norm = None
    for pw in sorted(expr.atoms(sp.Pow), key=sp.default_sort_key):
        if pw.exp not in (sp.S.Half, -sp.S.Half):
            continue
        const, factors = sp.factor_list(pw.base)
        fa = sp.Mul(*[f**m for f, m in factors if f.free_symbols == {caa}])
        fb = sp.Mul(*[f**m for f, m in factors if f.free_symbols == {cbb}])
        if sp.Mul(*[f**m for f, m in factors]) != fa * fb or fa == fb == 1:
            continue
        if fa != 1 and fb != 1:
            if fb != fa.xreplace({caa: cbb}):
                continue
            cand, root = 1 / sp.sqrt(fa.xreplace({caa: var})), sp.sqrt(const) / (Da * Db)
        elif fa != 1:  # a root of one variance only (E_id_g: of C_bb)
            cand, root = 1 / sp.sqrt(fa.xreplace({caa: var})), sp.sqrt(const) / Da
        else:
            cand, root = 1 / sp.sqrt(fb.xreplace({cbb: var})), sp.sqrt(const) / Db
        if norm is not None and cand != norm:
            continue
        norm = cand
        expr = expr.xreplace({pw: root if pw.exp > 0 else 1 / root})
    if norm is None or expr.has(caa) or expr.has(cbb):
        norm, expr = var, d.expr.xreplace({caa: Da, cbb: Db})
    value = expr.xreplace({cab: x})
    # the rewrite must give the primitive back
    for pa, pb, pab in ((0.7, 1.3, 0.4), (2.0, 0.5, -0.6), (0.3, 0.3, 0.1)):
        want = complex(d.expr.xreplace({caa: pa, cbb: pb, cab: pab}).evalf(30))
        at = {x: pab, Da: norm.xreplace({var: pa}), Db: norm.xreplace({var: pb})}
        got = complex(value.xreplace(at).evalf(30))
        if abs(want - got) > 1e-12 * max(1.0, abs(want)):
            raise AssertionError(f"separable form of {d.name} is wrong: {value}, norm {norm}")
    text = f"{value}, D = {norm.xreplace({var: sp.Symbol('C_rr')})}"
    # the numeric factor (2/pi for erf) is multiplied in, not divided per entry; a
    # function of one argument (asin) is applied in a pass of its own over the
    # arguments, packed (tilt2_table)
    scale, scaled = value.as_independent(x, Da, Db, as_Add=False)
    form = {"expr": scaled, "scale": scale, "x": x, "Da": Da, "Db": Db}
    xi = sp.Symbol("xi")
    if isinstance(scaled, sp.Function) and len(scaled.args) == 1:
        argument, apply, func = scaled.args[0], scaled.func(xi), code(scaled.func(xi)).split("(")[0]
    else:
        argument, apply, func = scaled, xi, "its closed form"
    return {
        "norm": code(norm),
        "value": code(value),
        "scale": code(scale),
        "scaled": code(scaled),
        "argument": code(argument),
        "apply": code(apply),
        "func": func,
        "text": text,
        "form": form,
    }


def _table_plan(ir: FlowIR, activation: str) -> dict | None:
    """The table of a hoisted pair tilt: when every term tilted on the two free indices
    (I4(k, l, ., .) in dQ) has the same two-field base primitive (I2), it is tabulated
    once per (k, l) over the rows of the field families it is read at; the kernel
    fills ``F[r, q] = base(Ct; r, q)`` in one vectorisable loop (``tilt2_table``)."""
    model = ir.model
    student = model.fields[0]  # the rows 0..K-1 of C, the units a table is tilted by
    bases, fams, splits, reads = {}, {student}, [], []
    for c in ir.derivatives:
        for t in c.terms:
            t, _ = _guarded(t)
            t = _symmetrized(t, activation)
            h = _hoisted_tilt(c, t, activation)
            if h is None or h[1].n != 2 or h[1].base is None:
                continue
            splits.append(h[1])
            base = h[1].base
            if len(base.labels) != 2 or base.kinds[0] != base.kinds[1]:
                return None
            bases[base.name] = base
            fams |= {a.base for a in t.args[2:]}
            reads.append(t)
    if len(bases) != 1:
        return None
    (base,) = bases.values()
    rows, blocks, sizes = {}, [], []
    for f, src, n in model.layout:
        if f not in fams:
            continue
        at = " + ".join(sizes) if sizes else "0"
        rows[f] = f"{at} + " if sizes else ""
        blocks.append({"to": at, "src": code(src), "n": str(n)})
        sizes.append(str(n))
    # a base symmetric in its two fields is filled on the upper triangle only (each
    # distinct integral once); mirrored when some read is not provably on it
    if not gaussian.exchange_symmetric(base, 0, 1):
        fill = "full"
    elif all(_reads_upper(t, list(rows)) for t in reads):
        fill = "upper"
    else:
        fill = "mirror"
    return {
        "rows": rows,
        "blocks": blocks,
        "size": " + ".join(sizes),
        "whole": len(rows) == len(model.fields),
        "base": base.name,
        "fill": fill,
        **separable_form(base),
        "views": _table_views(tilt_code(2, splits[0].amplitude, splits[0].width)),
        # the engine's tilt rule for the pair, as the levels of the table's loops
        "tilt": tilt_code(2, splits[0].amplitude, splits[0].width),
    }


def _table_views(tilt) -> dict:
    """The views of the rows that the packed fill of the table reads from column r on:
    the tilt's (derive/tables.py) and the per-row factors Dq = Dn[r:]."""
    names = [n for n, _ in tilt.views] + ["Dq"]
    sources = [src for _, src in tilt.views] + ["Dn[r:]"]
    return {"lhs": ", ".join(names), "rhs": ", ".join(sources), "entry": tilt.entry_view}


def _reads_upper(t, order) -> bool:
    """Whether the table entry that term ``t`` reads, ``F[row(x), row(y)]`` for its last two
    arguments ``x, y``, is on the upper triangle (row(x) <= row(y)) for every value of
    the indices: ``x`` of a field family whose rows come before ``y``'s in the table
    (``order``), the same field, or the two summation indices of a triangular nest
    (``_triangular``: ``y`` runs from ``x`` upward)."""
    x, y = t.args[-2], t.args[-1]
    if x.base != y.base:
        return order.index(x.base) < order.index(y.base)
    if x == y:
        return True
    return _triangular(t) and (x.indices[0], y.indices[0]) == tuple(t.sums)


def _tilt1_plan(ir: FlowIR, activation: str):
    """The split of the one-unit tilt (I3 = tilt by u_a, then E[u_b g(u_c)]) that the
    derivatives use, and the separable form of its two-field base, so that tilt1_all
    computes the base's per-row factor once per (unit, row) and each I3 is a product
    (None, None without such terms)."""
    for c in ir.derivatives:
        for t in c.terms:
            t, _ = _guarded(t)
            h = _hoisted_tilt(c, t, activation, pair=False)
            if h is not None and h[1].n == 1:
                base = h[1].base
                return h[1], (separable_form(base) if len(base.labels) == 2 else None)
    return None, None


def _base_tables(ir: FlowIR, activation: str, table) -> list[dict]:
    """The two-field primitives that the derivatives call at the covariance C itself
    (I2(j, k) in the readout's flow), when the engine proves them symmetric in their two
    fields and they have a separable form: each is tabulated once per evaluation over
    every pair of rows of C, in one vectorisable loop (its norm once per row), and the
    derivatives read the table instead of calling the primitive per term."""
    prims = {d.name: d for d in ir.primitives}
    found = {}
    for c in ir.derivatives:
        for t in c.terms:
            t, _ = _guarded(t)
            t = _symmetrized(t, activation)
            if _hoisted_tilt(c, t, activation, pair=table is not None) is not None:
                continue
            if not isinstance(t, FlowTerm) or t.primitive is None or len(t.args) != 2:
                continue
            d = prims.get(t.primitive)
            if d is None or len(d.labels) != 2 or not gaussian.exchange_symmetric(d, 0, 1):
                continue
            if not d.expr.atoms(sp.Function):  # a polynomial (linear activation): as cheap read as computed
                continue
            found[d.name] = d
    return [{"prim": name, "name": f"{name}C", **separable_form(d)} for name, d in sorted(found.items())]


def _tilt_buffer_specs(table) -> list[tuple[str, str, str]]:
    """(name, shape, dtype argument) of the buffers of the table of the hoisted pair
    tilt: the table F, the per-row factors Dn of its base, the packed triangle X and
    its row offsets P."""
    if not table:
        return []
    n = "Cu.shape[0]"
    packed = ("X", f"{n} * ({n} + 1) // 2", "")
    if table["fill"] == "upper":
        # read where it is filled: F[r, q] = X[P[r] + q], q >= r
        return [("Dn", n, ""), packed, ("P", n, ", np.int64")]
    bufs = [("F", f"{n}, {n}", ""), ("Dn", n, "")]
    if table["fill"] == "mirror":
        bufs.append(packed)
    return bufs


def _tilt_buffers(table) -> list[tuple[str, str]]:
    """(name, allocation) of the buffers of the table of the hoisted pair tilt."""
    return [(name, f"np.empty(({shape},){dt})") for name, shape, dt in _tilt_buffer_specs(table)]


def _chunk_buffers(table) -> list[tuple[str, str, str]]:
    """(name, name of its stack, allocation of the stack) of the table's buffers in
    rhs_parallel_ws: one slice per chunk of pairs (N_CHUNKS), allocated once per run
    by workspace_parallel."""
    return [
        (name, f"{name}_c", f"np.empty((N_CHUNKS, {shape}){dt})")
        for name, shape, dt in _tilt_buffer_specs(table)
    ]


def _workspace(table, tilt1) -> list[str]:
    names = ["C"]
    if table:
        names += ["Cu", "rows"]
    if tilt1:
        names += ["Ct1", "tilt1_pref", "D1"]
    return names + [name for name, _ in _tilt_buffers(table)]


def _kinds_of(name: str) -> tuple[str, ...]:
    if name in PRIMITIVES:
        return PRIMITIVES[name]
    return tuple(name.removeprefix("E_").split("_"))


def loops(
    component: Component,
    primitive_names,
    activation: str | None = None,
    hoisted=None,
    table=None,
    rows=None,
    tilt1_form=None,
    tables=None,
    contractions: list | None = None,
) -> list[Loop]:
    """Group the component's terms by their summation indices, one loop nest each.

    With ``activation``, terms whose tilt can be hoisted to the free-index level
    are rewritten (see ``_hoisted_tilt``); their splits are collected in ``hoisted``.
    With ``table`` (see ``_table_plan``), the base primitive at the tilted
    covariance is read from the table filled once per pair of free indices.
    ``rows``: the model's field rows (``printer.field_rows``); ``tables``: primitives
    read from a table of the task program (``printer.KernelPrinter``).
    With ``contractions`` (a list, filled here), the terms that read the pair table
    with pair-independent weights (``_contraction``) are collected there, grouped by
    their pair factor, and the loop nests read each group's dot product."""
    groups: dict[tuple, list[Sum]] = {}
    contracted: dict[tuple, Contraction] = {}
    for t in component.terms:
        t, guard = _guarded(t)
        t = _symmetrized(t, activation)
        h = _hoisted_tilt(component, t, activation, pair=table is not None)
        if h is not None and hoisted is not None:
            expr, split = h
            hoisted.append(split)
            if split.n == 1 and tilt1_form is not None and split.base.name == tilt1_form["base"]:
                # the printer writes the base without its numeric factor: here it is
                # a factor free of the summation indices, multiplied once after the sum
                expr = expr * tilt1_form["scale"]
        else:
            expr = _term_expr(t)
        tri = _triangular(t)
        key = (tuple((str(s.label), _bound(s)) for s in t.sums), tri, guard)
        parts = _contraction(component, expr, t.sums, table) if contractions is not None else None
        if parts is not None:
            outer, weight, read = parts
            ct = contracted.get((outer, guard))
            if ct is None:
                ct = Contraction(f"W{len(contractions) + len(contracted)}")
                contracted[(outer, guard)] = ct
            fill = _weight_fill(weight, read, t.sums, tri, guard, ct.name, table, rows, primitive_names)
            ct.fills.append(fill)
            continue
        groups.setdefault(key, []).append(
            _sum(expr, t.sums, tri, primitive_names, table, rows, tilt1_form, tables)
        )
    out = [Loop(k, tuple(v), tri, guard) for (k, tri, guard), v in groups.items()]
    for (outer, guard), ct in contracted.items():
        contractions.append(ct)
        pr = code(outer, primitive_names, None, rows)
        out.append(Loop((), (Sum("1.0", f"{pr} * packed_dot(X, {ct.name})"),), False, guard))
    return out


def _weight_fill(weight, read, sums, triangular, guard, name, table, rows, primitive_names) -> Loop:
    """The loop nest that adds one term's pair-independent ``weight`` into the weights
    ``name`` of a contraction, at the packed slot of the table entry it multiplies
    (``read``); a triangular nest adds the diagonal once and the pairs i0 < i1 twice."""

    def pr(e, names=(name, "PW")):
        return code(e, primitive_names, table["rows"], rows, packed=True, packed_names=names)

    idx = tuple((str(s.label), _bound(s)) for s in sums)
    fill = Fill(pr(read), pr(weight))
    if triangular:
        s0, s1 = sums
        fill = Fill(fill.slot, fill.weight, pr(read.xreplace({s1: s0})), pr(weight.xreplace({s1: s0})))
    return Loop(idx, (fill,), triangular, guard)



def _sum(
    expr: sp.Expr,
    sums,
    triangular: bool,
    primitive_names,
    table,
    field_rows=None,
    tilt1_form=None,
    tables=None,
) -> Sum:
    """Split ``expr`` into the factors free of the summation indices and the rest."""
    table_rows = table["rows"] if table else None
    packed = bool(table) and table["fill"] == "upper"

    def pr(e):
        return code(e, primitive_names, table_rows, field_rows, tilt1_form, packed, tables)

    if not sums:
        return Sum("1.0", pr(expr))
    outer, inner = [], []
    for f in sp.Mul.make_args(expr):
        (inner if any(f.has(s) for s in sums) else outer).append(f)
    inner_e = sp.Mul(*inner)
    diagonal = None
    if triangular:
        s0, s1 = sums
        diagonal = pr(inner_e.xreplace({s1: s0}))
    return Sum(pr(sp.Mul(*outer)), pr(inner_e), diagonal)


def _guarded(t):
    """Split an indicator factor ``Piecewise((1, cond), (0, True))`` off the coefficient
    (e.g. the second-order terms of anil): its terms run only when ``cond`` holds."""
    if not isinstance(t, FlowTerm):
        return t, None
    conds, rest = [], []
    for f in sp.Mul.make_args(t.coeff):
        if (
            isinstance(f, sp.Piecewise)
            and len(f.args) == 2
            and f.args[0].expr == 1
            and f.args[1].expr == 0
            and f.args[1].cond == sp.true
        ):
            conds.append(f.args[0].cond)
        else:
            rest.append(f)
    if not conds:
        return t, None
    guard = " and ".join(f"({code(c)})" for c in conds)
    return FlowTerm(sp.Mul(*rest), t.sums, t.primitive, t.args), guard


@lru_cache(maxsize=None)
def _symmetric_last_two(kinds: tuple[str, ...], activation: str) -> bool:
    """Whether the engine proves the expectation of ``kinds`` symmetric in its last two
    arguments (gaussian.exchange_symmetric)."""
    n = len(kinds)
    return gaussian.exchange_symmetric(gaussian.expectation(kinds, activation), n - 2, n - 1)


def _symmetrized(t, activation: str | None):
    """A term summed over two indices of one kind that are the last two arguments of a
    primitive the engine proves symmetric in them, whose coefficient is not: the
    coefficient replaced by its mean over the exchange of the two indices. The sum
    over all pairs is unchanged and the term becomes triangular (``_triangular``):
    each distinct integral is read once (anil's I4(k, l, j0, j1) in dQ)."""
    if activation is None or not isinstance(t, FlowTerm) or t.primitive is None:
        return t
    if len(t.sums) != 2 or len(t.args) < 2:
        return t
    s0, s1 = t.sums
    a0, a1 = t.args[-2], t.args[-1]
    if index_kind(s0) != index_kind(s1) or a0.base != a1.base or (a0.indices[0], a1.indices[0]) != (s0, s1):
        return t
    if any(s0 in a.indices or s1 in a.indices for a in t.args[:-2]):
        return t
    swapped = t.coeff.xreplace({s0: s1, s1: s0})
    if sp.expand(swapped - t.coeff) == 0 or not _symmetric_last_two(_kinds_of(t.primitive), activation):
        return t
    return FlowTerm(sp.factor_terms((t.coeff + swapped) / 2), t.sums, t.primitive, t.args)


def _triangular(t) -> bool:
    """A term summed over two indices of one kind that are the last two arguments of
    its primitive, of the same factor kind (I4(k, l, j0, j1), I2(j0, j1)), with a
    coefficient unchanged by swapping them: sum over j0 <= j1, twice off the diagonal."""
    if not isinstance(t, FlowTerm) or t.primitive is None or len(t.sums) != 2 or len(t.args) < 2:
        return False
    s0, s1 = t.sums
    if index_kind(s0) != index_kind(s1):
        return False
    a0, a1 = t.args[-2], t.args[-1]
    kinds = _kinds_of(t.primitive)
    if kinds[-2] != kinds[-1] or a0.base != a1.base or (a0.indices[0], a1.indices[0]) != (s0, s1):
        return False
    if any(s0 in a.indices or s1 in a.indices for a in t.args[:-2]):
        return False
    return sp.expand(t.coeff.xreplace({s0: s1, s1: s0}) - t.coeff) == 0


def primitive_code(d, nodes: int | None = None) -> dict:
    """Body of one primitive: covariance loads, cse temporaries, return value. An
    integral over [0, 1] (Price's path, derive/gaussian.py) is a weighted sum over the
    nodes of a path rule (``quadrature.path_rule``, see ``integral_code``): the rule of
    ``quadrature.RULES`` for the largest variance of the primitive's fields (``nodes``
    None, the kernels'), or the ``nodes``-point rule."""
    syms = set(d.expr.free_symbols)
    integrals = d.expr.atoms(sp.Integral)
    if integrals and nodes is None:  # the rule is chosen by the fields' variances: load them
        syms |= {gaussian.cov_symbol(a, a) for a in d.labels}
    syms = sorted(syms, key=str)
    loads = []
    for s in syms:
        matrix, pair = str(s).split("_")
        loads.append(f"{s} = {matrix}[{pair[0]}, {pair[1]}]")
    expr, lines = merge_integrals(d.expr), []
    integrals = sorted(expr.atoms(sp.Integral), key=sp.default_sort_key)
    for i, integral in enumerate(integrals):
        q = sp.Symbol(f"q{i}")
        prefix = f"s{i}_" if len(integrals) > 1 else "s"
        variances = [str(gaussian.cov_symbol(a, a)) for a in d.labels]
        lines += integral_code(integral, str(q), nodes, prefix, variances)
        expr = expr.xreplace({integral: q})
    ds = [s for s in syms if str(s).startswith("dC_")]
    if d.name.endswith("_dir") and not integrals:
        # a derivative along dC, linear in dC's entries at its fields: entry by entry,
        # each only where dC is nonzero (a direction of one overlap touches one entry
        # of the calls it touches at all)
        lines.append("acc_ = 0.0")
        for n, x in enumerate(ds):
            part = expr.diff(x)
            if part.has(*ds):
                raise ValueError(f"{d.name} is not linear in the entries of dC")
            temps, (value,) = sp.cse([part], symbols=sp.numbered_symbols(f"t{n}_"), order="canonical")
            lines += [f"if {x} != 0.0:", *[f"    {t} = {code(e)}" for t, e in temps]]
            lines.append(f"    acc_ += {x}*({code(value)})")
        temps, ret = [], sp.Symbol("acc_")
        # its guard (printer: the kernels call it only when dC touches its fields)
        pairs = itertools.combinations_with_replacement(d.labels, 2)
        touches = [f"dC[{a}, {b}] != 0.0" for a, b in pairs]
        touch_rows = [" or ".join(touches[i : i + 4]) for i in range(0, len(touches), 4)]
        touch_rows = [("or " if i else "") + row for i, row in enumerate(touch_rows)]
    else:
        temps, (ret,) = sp.cse([expr], symbols=sp.numbered_symbols("t"), order="canonical")
    return {
        "name": d.name,
        "args": ("C, dC, " if d.name.endswith("_dir") else "C, ") + ", ".join(d.labels),
        "labels": list(d.pattern or d.labels),
        "kinds": list(d.kinds),
        "loads": loads,
        "temps": lines + [f"{s} = {code(e)}" for s, e in temps],
        "ret": code(ret),
        "provenance": list(d.provenance),
        "ops": int(sp.count_ops(d.expr)),
        # the path rules the body reads (module-level arrays, rule_code), and whether it
        # chooses one by RULES (then the module has the selector, selector_code)
        "rules": rule_counts(nodes) if integrals else [],
        "adaptive": bool(integrals) and nodes is None,
        "touches": touch_rows if d.name.endswith("_dir") and not integrals else None,
    }


def primitive_codes(d, nodes: int | None = None) -> list[dict]:
    """The functions of one primitive: its body (``primitive_code``), or, for an integral
    along Price's path with forms at equal indices (``gaussian.pattern_forms``: G4),
    each form and a function of the primitive's name that dispatches on the equality
    pattern of its runtime indices (``dispatch_code``)."""
    forms = gaussian.pattern_forms(d)
    if forms is None:
        return [primitive_code(d, nodes)]
    return [primitive_code(f, nodes) for f in forms] + [dispatch_code(d, forms)]


def set_partitions(n: int) -> list[tuple[int, ...]]:
    """The equality patterns of ``n`` indices as restricted growth strings, all distinct first."""
    out = [
        s
        for s in itertools.product(range(n), repeat=n)
        if s[0] == 0 and all(s[i] <= max(s[:i]) + 1 for i in range(1, n))
    ]
    return sorted(out, key=lambda s: (-max(s), s))


def dispatch_code(d, forms) -> dict:
    """A primitive that calls, for each equality pattern of its indices (the set
    partitions of its arguments), the form of that pattern's class with the arguments
    in the form's order (fields that occur fewer times first, as
    ``gaussian.canonical_patterns``). The last pattern (all equal) is the fallthrough."""
    by_pattern = {f.pattern: f for f in forms}
    args = list(d.labels)
    lines, last = [], None
    for rgs in set_partitions(len(args)):
        blocks = [[i for i, b in enumerate(rgs) if b == k] for k in range(max(rgs) + 1)]
        ordered = sorted(blocks, key=lambda blk: (len(blk), blk[0]))
        pattern = "".join(gaussian.LABELS[i] * len(blk) for i, blk in enumerate(ordered))
        call = f"{by_pattern[pattern].name}(C, {', '.join(args[blk[0]] for blk in ordered)})"
        conds = [f"{args[blk[i]]} == {args[blk[i + 1]]}" for blk in blocks for i in range(len(blk) - 1)]
        conds += [f"{args[x[0]]} != {args[y[0]]}" for x, y in itertools.combinations(blocks, 2)]
        if len(blocks) == 1:
            last = call
        else:
            lines += [f"if {' and '.join(conds)}:", f"    return {call}"]
    names = ", ".join(f.name for f in forms)
    return {
        "name": d.name,
        "args": "C, " + ", ".join(args),
        "labels": args,
        "kinds": list(d.kinds),
        "loads": [],
        "temps": lines,
        "ret": last,
        "provenance": [
            f"dispatch on which of the runtime indices are equal, to the form of that pattern ({names}), "
            "each derived as follows at distinct fields, then the equal fields identified:",
            *d.provenance,
        ],
        "ops": 0,
        "rules": [],
        "adaptive": False,
        "touches": None,
    }


def quadrature_lines(prims: list[dict], table: dict | None = None) -> list[str]:
    """The module-level arrays of every path rule (derive/quadrature.py) the primitives
    and the G4 ``table`` (``g4_table_plan``) read, and the function that chooses among
    them (``quadrature.selector_code``) when one of them chooses."""
    counts = {n for p in prims for n in p["rules"]}
    adaptive = any(p["adaptive"] for p in prims)
    if table is not None:
        counts |= set(rule_counts(table["nodes"]))
        adaptive = adaptive or table["nodes"] is None
    lines = [line for n in sorted(counts) for line in rule_code(n)]
    if adaptive or table is not None:
        lines += ["", "", *selector_code(None if adaptive else table["nodes"])]
    return lines


def merge_integrals(expr: sp.Expr) -> sp.Expr:
    """``sum_i c_i Integral(f_i, (t, 0, 1))`` with the ``c_i`` free of t as one
    ``Integral(sum_i c_i f_i, (t, 0, 1))`` (one loop over the nodes, e.g. for the
    derivative of G4 along dC, whose sympy form has an integral per entry of dC)."""
    if not isinstance(expr, sp.Add):
        return expr
    merged, rest = {}, []
    for term in expr.args:
        ints = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Integral)]
        if len(ints) != 1 or len(ints[0].limits) != 1:
            rest.append(term)
            continue
        (integral,) = ints
        coeff = term / integral
        var = integral.limits[0][0]
        if coeff.has(var) or coeff.has(sp.Integral):
            rest.append(term)
            continue
        merged.setdefault(integral.limits, []).append(coeff * integral.function)
    out = [sp.Integral(sp.Add(*fs), limits[0]) for limits, fs in merged.items()]
    return sp.Add(*rest, *out)


def integral_code(
    integral: sp.Integral, target: str, nodes: int | None, prefix: str = "s", variances=()
) -> list[str]:
    """Lines that set ``target`` to ``integral`` (over one variable from 0 to 1, its
    integrand free of integrals): the weighted sum over the nodes of a path rule
    (``quadrature.path_rule``, module-level arrays), the ``nodes``-point one, or for
    ``nodes`` None the one that ``quadrature.SELECTOR`` chooses for the largest of the
    ``variances`` (names of loaded variables). The integrand's cse temporaries that do
    not depend on the variable are computed once, before the loop over the nodes."""
    (limit,) = integral.limits
    if len(limit) != 3 or (limit[1], limit[2]) != (0, 1):
        raise ValueError(f"{integral}: only an integral over one variable from 0 to 1 is printed")
    var = limit[0]
    integrand = integral.function
    if integrand.has(sp.Integral):
        raise ValueError(f"{integral}: nested integrals are not printed")
    temps, (value,) = sp.cse([integrand], symbols=sp.numbered_symbols(prefix), order="canonical")
    moving = {var}
    before, inside = [], []
    for s, e in temps:
        if e.free_symbols & moving:
            moving.add(s)
            inside.append(f"    {s} = {code(e)}")
        else:
            before.append(f"{s} = {code(e)}")
    if nodes is None:
        if not variances:
            raise ValueError(f"{integral}: a rule chosen by the variances needs their names")
        tn, wn = f"{prefix}T_", f"{prefix}W_"
        largest = variances[0] if len(variances) == 1 else f"max({', '.join(variances)})"
        choose, count = [f"{tn}, {wn} = {SELECTOR}({largest})"], f"{tn}.shape[0]"
    else:
        (tn, wn), choose, count = rule_names(nodes), [], str(nodes)
    return [
        *before,
        *choose,
        f"{target} = 0.0",
        f"for node in range({count}):",
        f"    {var} = {tn}[node]",
        *inside,
        f"    {target} += {wn}[node]*({code(value)})",
    ]


def _shape(v) -> str:
    return UNITS[v.over]


def _covariance(model) -> tuple[str, list[dict], dict]:
    """Size of the field covariance, its blocks as code, and where each evolving
    overlap (Q, R) sits in it."""
    offset = {f: code(at) for f, at, _ in model.layout}
    size = code(sum((n for _, _, n in model.layout), sp.S.Zero))
    blocks, where = [], {o.name: [] for o in STATE_OVERLAPS}
    for (f1, f2), entry in model.covariance.items():
        i = sp.Idx("i", K if field_kind(f1) == STUDENT else M)
        j = sp.Idx("j", K if field_kind(f2) == STUDENT else M)
        e = entry(i, j)
        o1, o2 = offset[f1], offset[f2]
        blocks.append(
            {"o1": o1, "o2": o2, "n1": _bound(i), "n2": _bound(j), "expr": code(e), "diag": f1 == f2}
        )
        for o in STATE_OVERLAPS:
            name, base = o.name, o.base
            if e == base[i, j]:
                where[name].append((o1, o2))
            elif e.has(base):
                raise ValueError(
                    f"covariance block ({f1}, {f2}) = {e}: {name} may enter only as {name}[i, j]"
                )
    return size, blocks, where


def _dims(kinds) -> list[str]:
    return [UNITS[k] for k in kinds]


def _comp(c, names, rows, out=None, target=None, tables=None) -> dict:
    """A component as the template's ``component`` macro reads it."""
    return {
        "symmetric": False,
        "hoist": [],
        "name": c.name,
        "free": [(str(i.label), _bound(i)) for i in c.free],
        "loops": loops(c, names, rows=rows, tables=tables),
        "target": list(target or [str(i.label) for i in c.free]),
        "out": out or c.name,
    }


def g4_plan(activation: str) -> dict | None:
    """The G4 table's pieces (``g4_table_plan``) when the activation's G4 is an integral
    along Price's path whose I4 splits into a pair tilt and I2 (erf); None otherwise
    (linear: G4 is Isserlis' polynomial, called directly)."""
    if not gaussian.primitive("G4", activation).expr.has(sp.Integral):
        return None
    try:
        return g4_table_plan(activation, None)
    except ValueError:
        return None


def _table_statement(st, layout, activation: str):
    """A ``meta.Table`` as the template's ``table`` statement and the printer's map
    (``KernelPrinter.tables``), or (None, None) when the kernel has no table of its
    primitive: the rows of ``C`` of the table's field families, in the layout's order,
    the family of the student units first (rows 0..K-1 of C and of the table)."""
    if st.primitive != "G4" or g4_plan(activation) is None:
        return None, None
    blocks, rows, sizes = [], {}, []
    for f, src, n in layout:
        if f not in st.families:
            continue
        at = " + ".join(sizes) if sizes else "0"
        rows[f] = f"{at} + " if sizes else ""
        blocks.append({"to": at, "src": code(src), "n": str(n)})
        sizes.append(str(n))
    first = layout[0][0]
    if first not in st.families or field_kind(first) != STUDENT or code(layout[0][1]) != "0":
        raise ValueError(f"the table {st.name} needs the student units as the first rows of C")
    stmt = {"kind": "table", "name": st.name, "blocks": blocks, "size": " + ".join(sizes)}
    return stmt, {st.primitive: (st.name, rows, first)}


def _statements(stmts, names, rows, where, model=None, activation=None, tables=None) -> list[dict]:
    """A task program (derive/meta.py) as the template's ``statements`` macro reads it;
    after a ``meta.Table``, its primitive is read from the table (``tables``)."""
    out = []
    tables = dict(tables or {})

    def sub(body):
        return _statements(body, names, rows, where, model, activation, tables)

    for st in stmts:
        if isinstance(st, meta.Alloc):
            out.append({"kind": "alloc", "name": st.name, "dims": list(st.dims), "only_if": st.only_if})
        elif isinstance(st, meta.Let):
            out.append({"kind": "let", "target": st.target, "source": st.source})
        elif isinstance(st, meta.Assign):
            comp = _comp(st.component, names, rows, st.out, st.target, tables)
            out.append({"kind": "assign", "comp": comp})
        elif isinstance(st, meta.Table):
            stmt, read = _table_statement(st, model.layout, activation)
            if stmt is not None:
                out.append(stmt)
                tables.update(read)
        elif isinstance(st, meta.Repeat):
            out.append({"kind": "repeat", "var": st.var, "count": code(st.count), "body": sub(st.body)})
        elif isinstance(st, meta.Guard):
            cond = st.cond if isinstance(st.cond, str) else f"({code(st.cond)}) != 0"
            out.append({"kind": "if", "cond": cond, "body": sub(st.body)})
        elif isinstance(st, meta.Outlined):
            out.append({"kind": "outlined", "name": st.name, "body": sub(st.body)})
        elif isinstance(st, meta.Directions):
            blocks = {**where, "start": [], "QR": []}[st.kind]
            stmt = {"kind": "directions", "dir": st.kind, "blocks": blocks, "body": sub(st.body)}
            if st.kind == "QR":
                stmt["q_blocks"], stmt["r_blocks"] = where["Q"], where["R"]
            out.append(stmt)
        else:  # pragma: no cover
            raise TypeError(f"unknown statement {st!r}")
    return out


def _reads_table(stmts) -> bool:
    for st in stmts:
        if isinstance(st, meta.Table):
            return True
        nested = (meta.Repeat, meta.Guard, meta.Directions, meta.Outlined)
        if isinstance(st, nested) and _reads_table(st.body):
            return True
    return False


def _reached(blocks, params) -> dict | None:
    """``outlined_reached(p)`` of a kernel module, whether a run with the parameters p
    reaches an outlined block (compiled at its first use): the conditions of the
    branches on the way to each, when they read only parameters (else it answers yes).
    The parameters it reads, and its return expression."""
    if not blocks:
        return None
    ways, read = [], set()
    for b in blocks:
        names = {n.id for c in b["conds"] for n in ast.walk(ast.parse(c)) if isinstance(n, ast.Name)}
        if not names <= set(params) | {"math"}:
            return {"params": [], "expr": "True"}
        read |= names & set(params)
        ways.append(" and ".join(f"({c})" for c in b["conds"]) or "True")
    return {"params": [(i, x) for i, x in enumerate(params) if x in read], "expr": " or ".join(ways)}


def _task_context(ir: FlowIR, names, where, frows) -> dict | None:
    """The task program of a model with an inner loop, and the covariances of its
    task quantities that the flow and the metrics read (``frows``: the field rows)."""
    model = ir.model
    inner = model.inner_loop
    if inner is None:
        return None
    by_name = {f.name: f for f in model.random_families}
    sens = {f.name for f in inner.sensitivities}
    second = f"({code(inner.second_order)}) != 0"

    def covariances(bases):
        """Allocations and loops of the covariances S_X__Y among ``bases``; those of
        the sensitivities only when the second-order terms read them."""
        stmts = []
        for base in bases:
            name = str(base)
            if name.startswith("mu_"):
                continue  # returned by task_moments directly
            x, y = (by_name[n] for n in name[2:].split("__"))
            cov = meta.covariance_component(x, y, inner.noise, meta.support_covariances(inner))
            dims = [_bound(i) for i in cov.free]
            assign = {"kind": "assign", "comp": _comp(cov, names, frows)}
            if {x.name, y.name} & sens:
                # empty unless the second-order terms read it
                dims = [f"{d} * s2_" for d in dims]
                assign = {"kind": "if", "cond": second, "body": [assign]}
            stmts += [{"kind": "alloc", "name": name, "dims": dims, "only_if": None}, assign]
        return stmts

    def reads_optimal(bases):
        opt = inner.optimal.name if inner.optimal is not None else None
        return opt is not None and any(opt in str(b)[2:].split("__") or str(b) == f"mu_{opt}" for b in bases)

    returns = ", ".join(f"mu_{f.name}, L_{f.name}" for f in model.random_families)
    returns += "".join(f", {n}" for n in meta.support_covariances(inner).values())
    if meta.support_covariances(inner):
        returns += f", {meta.support_square_name(inner)}"
    returns += "".join(f", {meta.excess_name(x, y)}" for x, y in meta.excess_pairs(model))
    if meta.excess_pairs(model):
        returns += f", {meta.excess_vv_name(inner)}"
    program = _statements(ir.program.statements, names, frows, where, model, ir.activation)

    def outlined(stmts, conds=()):
        for st in stmts:
            if st["kind"] == "outlined":
                yield {**st, "conds": conds}
            inner = (*conds, st["cond"]) if st["kind"] == "if" else conds
            yield from outlined(st.get("body", []), inner)

    blocks = list(outlined(program))

    return {
        "family_names": ", ".join(f.name for f in model.random_families),
        "returns": returns,
        "program": program,
        "outlined": blocks,
        "reached": _reached(blocks, [x.name for x in model.params]),
        "second_order": second,
        # the derivatives and the metrics each get only the moments they read; the
        # best readout (a pseudo-inverse) is computed only where it is read
        "rhs": {"moments": covariances(ir.moments), "optimal": reads_optimal(ir.moments)},
        "metrics": {"moments": covariances(ir.metric_moments), "optimal": reads_optimal(ir.metric_moments)},
    }


def context(ir: FlowIR, source: str | None = None) -> dict:
    """The template's variables; ``source`` names the model file (default: the
    registry's file of the model)."""
    model = ir.model
    act = get_activation(ir.activation)
    names = [d.name for d in ir.primitives]
    frows = field_rows(model.layout)
    # the order parameters (derive/model.py OVERLAPS), then the readouts
    state = [(o.name, o.dims) for o in STATE_OVERLAPS] + [(v.name, ("K",)) for v in model.state_vectors]
    consts = [(o.name, o.dims) for o in CONST_OVERLAPS]
    consts += [(v.name, (_shape(v),)) for v in model.const_vectors]
    vectors = [(v.name, (_shape(v),)) for v in model.state_vectors + model.const_vectors]
    shapes = dict(state)
    comps = []
    splits = []
    table = _table_plan(ir, act.name)
    split1, tilt1_sep = _tilt1_plan(ir, act.name)
    # the separable form is that of one base (the plan's); the one-unit tilts of other
    # bases (a model with two kinds of factor, say) are called as they are
    tilt1_form = {**tilt1_sep["form"], "base": split1.base.name} if tilt1_sep else None
    contractions: list[Contraction] = []
    base_tables = _base_tables(ir, act.name, table)
    reads_base = {b["prim"]: (b["name"], frows, None) for b in base_tables}
    for c in ir.derivatives:
        hoisted: list = []
        first = len(contractions)
        lps = loops(
            c, names, act.name, hoisted, table, frows, tilt1_form, reads_base or None, contractions
        )
        splits += hoisted
        free = [str(i.label) for i in c.free]
        hoist = []
        if any(h.n == 2 for h in hoisted):
            rows = ", ".join(name for name, _ in _tilt_buffers(table))
            hoist = [f"tilt_pref = tilt2_table(Cu, {free[0]}, {free[1]}, {rows})"]
        comps.append(
            {
                "name": c.name,
                "shape": shapes[c.name],
                "free": [(str(i.label), _bound(i)) for i in c.free],
                "loops": lps,
                "symmetric": c.symmetric,
                "hoist": hoist,
                "target": free,
                # the pair-independent weights of its table reads, once per evaluation
                "contractions": contractions[first:],
            }
        )
    # the base primitives of hoisted tilts (I2 for I4) must be in the module
    prim_list = list(ir.primitives)
    for sp_ in splits:
        if sp_.base is not None and sp_.base.name not in [d.name for d in prim_list]:
            prim_list.append(sp_.base)
    prim_list.sort(key=lambda d: d.name)
    # the tilt rule of the engine as loop nests (derive/tables.py), for one g' per
    # student unit (tilt1_all) and for the pair (k, l) of the table (tilt2_table)
    tilt1 = None
    singles = [h for h in splits if h.n == 1]
    if singles:
        tilt1 = tilt_code(1, singles[0].amplitude, singles[0].width)
    mets = [{"name": c.name, "loops": loops(c, names, rows=frows)} for c in ir.metrics]
    samples = [
        {
            "name": c.name,
            "free": [(str(i.label), _bound(i)) for i in c.free],
            "loops": loops(c, names, rows=frows),
            "symmetric": False,
            "hoist": [],
            "target": [str(i.label) for i in c.free],
        }
        for c in ir.samples
    ]
    prims = [p for d in prim_list for p in primitive_codes(d)]
    acts = [
        {"name": "g", "code": code(act.expr)},
        {"name": "gp", "code": code(act.d1)},
        {"name": "gpp", "code": code(act.d2)},
    ]
    cov_size, cov_blocks, where = _covariance(model)
    g4 = None
    if model.inner_loop is not None and _reads_table(ir.program.statements):
        g4 = g4_plan(act.name)
    ops = sum(p["ops"] for p in prims) + sum(
        int(sp.count_ops(t.coeff)) for c in ir.derivatives + ir.metrics for t in c.terms
    )
    workspace = (
        _workspace(table, tilt1)
        + (["PW"] + [ct.name for ct in contractions] if contractions else [])
        + [n for b in base_tables for n in (b["name"], b["name"] + "_D")]
    )
    own = {name for name, _ in _tilt_buffers(table)}
    return {
        "model": model.name,
        "model_doc": model.doc,
        "section": model.section,
        "model_file": source or model_file(model.name),
        "activation": act.name,
        "activation_doc": act.doc,
        "template": f"derive/templates/{KERNEL_TEMPLATE}",
        "inputs_hash": inputs_hash(model.name, act.name, source=source),
        "derive_version": __version__,
        "sympy_version": sp.__version__,
        "ops": ops,
        "params": [p.name for p in model.params],
        "state": state,
        "consts": consts,
        "vectors": vectors,
        "derivatives": comps,
        "metrics": mets,
        "samples": samples,
        "primitives": prims,
        "quadrature": quadrature_lines(prims, g4),
        "activations": acts,
        "z": str(z),
        "cov_size": cov_size,
        "layout_doc": "; ".join(
            f"{code(at)}..{code(at + n - 1)} for {f} ({field_doc(f)})" for f, at, n in model.layout
        ),
        "cov_blocks": cov_blocks,
        "task": _task_context(ir, names, where, frows),
        "tilt1": tilt1,
        # the per-row factor of the one-unit tilt's base (D1[a, r] from d = Ct1[a, r, r])
        "tilt1_norm": tilt1_sep["norm"] if tilt1_sep else "1.0",
        "table": table,
        # the G4 table of the task program (G4_tables), with its own blocks of the pair
        # tilt (g4_tilt2_block; the kernel's tilt2_table fills a packed triangle)
        "g4_table": g4,
        "g4_prefix": "g4_" if table is not None else "",
        # buffers of the hoisted pair tilt: in the workspace of rhs, once per chunk of rhs_parallel
        "tilt_buffers": _tilt_buffers(table),
        "chunk_buffers": _chunk_buffers(table),
        # the buffers of rhs_ws, in the order of its arguments (see workspace in the template)
        "workspace": workspace,
        # the buffers of rhs_parallel_ws: rhs_ws's shared by the threads, then the
        # stacks of the table's buffers (one slice per chunk of pairs)
        "workspace_parallel": [n for n in workspace if n not in own]
        + [stack for _, stack, _ in _chunk_buffers(table)],
        # two-field primitives at C read from a table filled once per evaluation
        "base_tables": base_tables,
        "contractions": contractions,
        # the vectorisable arcsine, when a primitive needs one (derive/special.py)
        "asin": asin_body() if any(d.expr.has(sp.asin) for d in prim_list) else None,
        "simulator": simulator_context(ir),  # the compiled meta-learning simulator (derive/simulator.py)
        # the adaptive integrator's tableau and controller, printed (derive/integrators.py)
        "adaptive": integrators_context(),
    }


PRIMITIVES_TEMPLATE = "primitives.py.jinja"


def g4_table_plan(activation: str, nodes: int | None) -> dict:
    """The pieces of the G4 table (templates/primitives.py.jinja ``G4_table``): the pair
    tilt of I4 (``tilt_split``, printed by derive/tables.py), I2 in its separable form,
    the entry of Price's path (``gaussian.path_entry``) and the function that gives the
    path rule for the largest variance of the table's rows (``quadrature.SELECTOR``: by
    ``quadrature.RULES`` for ``nodes`` None, else always the ``nodes``-point rule)."""
    split = tilt_split(PRIMITIVES["I4"], activation)
    if split is None or split.n != 2 or split.base is None:
        raise ValueError(f"activation {activation!r}: I4 does not split into a pair tilt and I2")
    c, t = sp.Symbol("c"), sp.Symbol("t")
    return {
        "base": split.base.name,
        **separable_form(split.base),
        "tilt": tilt_code(2, split.amplitude, split.width),
        "path_entry": code(gaussian.path_entry(c, t)),
        "selector": SELECTOR,
        "nodes": nodes,
    }


def render_primitives(names, activation: str, nodes: int | None = None, table: bool = False) -> str:
    """A module of the named primitives (``gaussian.PRIMITIVES``, or ``NAME_dir``, the
    derivative along dC, ``gaussian.directional``) for ``activation``, with ``table``
    the G4 table (``g4_table_plan``),
    each rendered as in a kernel module (``primitive_code``: integrals over the path rule
    that ``quadrature.RULES`` gives for the largest variance of the fields, as the kernels
    do, or with ``nodes`` over the ``nodes``-point rule), with the arcsine and the rules
    they read: the tests and benchmarks of a primitive that no committed kernel calls
    yet (G4) import it."""
    act = get_activation(activation)
    derived = [
        gaussian.directional(gaussian.primitive(n.removesuffix("_dir"), act.name))
        if n.endswith("_dir")
        else gaussian.primitive(n, act.name)
        for n in names
    ]
    prims = [p for d in derived for p in primitive_codes(d, nodes)]
    ctx = {
        "names": list(names),
        "activation": act.name,
        "activation_doc": act.doc,
        "template": f"derive/templates/{PRIMITIVES_TEMPLATE}",
        "derive_version": __version__,
        "sympy_version": sp.__version__,
        "nodes": nodes,
        "asin": asin_body() if any(d.expr.has(sp.asin) for d in derived) else None,
        "primitives": prims,
        # G4(k, l, p, q) for every (p, q) at once (needs G4 among the names: its rule)
        "table": g4_table_plan(act.name, nodes) if table else None,
    }
    ctx["quadrature"] = quadrature_lines(prims, ctx["table"])
    env = environment()
    check_context(env, PRIMITIVES_TEMPLATE, ctx)
    return env.get_template(PRIMITIVES_TEMPLATE).render(**ctx)


def inputs_hash(model_name: str, activation: str, root: Path = ROOT, source: str | None = None) -> str:
    """sha256 over everything one generated module depends on: the engine
    (derive/*.py but its command line, ``show`` and ``docs``, and the kernel
    templates; the docs templates live in a folder of their own), the
    model's own file, the model and activation names and the sympy version.
    Other model files and the registry (derive/models/__init__.py) are left
    out, so adding or editing one model changes no other model's files.
    ``root`` is the repository root (tests hash a modified copy); ``source`` the
    model's file for a model outside the registry (relative to ``root``)."""
    h = hashlib.sha256()
    skip = {"__main__.py", "show.py", "docs.py"}  # they do not shape the generated text
    engine = [p for p in (root / "derive").glob("*.py") if p.name not in skip]
    engine += list((root / "derive" / "templates").glob("*.jinja"))
    files = sorted(engine) + [root / (source or model_file(model_name))]
    for p in files:
        if not p.is_file():
            continue  # a model object given without its file
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    h.update(f"{model_name}\0{activation}\0sympy {sp.__version__}".encode())
    return h.hexdigest()


def reachable(tree: ast.Module, entry_points) -> set[str]:
    """Names of the module's top-level functions that its entry points call,
    directly or through one another."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    calls = {
        name: {x.id for x in ast.walk(node) if isinstance(x, ast.Name) and x.id in defs}
        for name, node in defs.items()
    }
    seen, todo = set(), [e for e in entry_points if e in defs]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(calls[name] - seen)
    return seen


OUTLINED_ARGS = "__args_{}__"


def outlined_arguments(text: str) -> str:
    """Fill in the arguments of each outlined function of the task program
    (``meta.Outlined``; the template writes ``OUTLINED_ARGS`` in its signature and at
    its call): the names its body reads and does not bind, in sorted order, which
    are the caller's locals (the module's functions, imports and Python's builtins
    excepted)."""
    import builtins

    tree = ast.parse(text)
    module = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for n in tree.body:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            module |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.Assign):
            module |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.args.args[:1] == []:
            continue
        marker = OUTLINED_ARGS.format(node.name)
        if [a.arg for a in node.args.args] != [marker]:
            continue
        bound = {x.id for x in ast.walk(node) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Store)}
        read = {x.id for x in ast.walk(node) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)}
        free = sorted(read - bound - module - set(dir(builtins)))
        text = text.replace(marker, ", ".join(free))
    return text


def prune(text: str) -> str:
    """Drop the top-level functions that no entry point (``ENTRY_POINTS`` of the
    module) reaches: a primitive whose every use was hoisted into a table, the
    activation where no per-sample gradient calls it."""
    tree = ast.parse(text)
    entry = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["ENTRY_POINTS"]
    )
    keep = reachable(tree, entry)
    lines = text.splitlines(keepends=True)
    drop = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name not in keep:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            end = node.end_lineno
            while end < len(lines) and not lines[end].strip():
                end += 1  # the blank lines that follow the function go with it
            drop.update(range(start, end))
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def render_model(model: Model, activation: str, model_file: str | Path) -> str:
    """The kernel module of a ``Model`` object that need not be in the registry,
    e.g. one defined in a file under tests/ (``model_file``, recorded in the
    header and hashed with the other inputs)."""
    ir = build_flow(model, activation)
    env = environment()
    path = Path(model_file)
    inside = path.is_absolute() and path.is_relative_to(ROOT)
    shown = path.relative_to(ROOT).as_posix() if inside else str(path)
    ctx = context(ir, shown)
    check_context(env, KERNEL_TEMPLATE, ctx)
    return prune(outlined_arguments(env.get_template(KERNEL_TEMPLATE).render(**ctx)))


def render(model_name: str, activation: str) -> str:
    """The text of ``generated/{model}_{activation}.py``."""
    ir = build_flow(model_name, activation)
    env = environment()
    ctx = context(ir)
    check_context(env, KERNEL_TEMPLATE, ctx)
    return prune(outlined_arguments(env.get_template(KERNEL_TEMPLATE).render(**ctx)))
