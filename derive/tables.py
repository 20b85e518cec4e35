"""Stage 4a: the engine's tilt rule as loop nests (hoisting stated by the derivation).

The engine (derive/gaussian.py) states that a primitive starting with ``n``
Gaussian-shaped ``g'`` factors is a prefactor times an expectation at a tilted
covariance (``tilt_split``), and writes the tilt rule once (``tilt_prefactor``,
``tilt_inverse``, ``tilted_entry``). A kernel that tilts on the same fields for
many terms (one student unit for I3, a pair (k, l) for I4 and J2 in dQ_kl)
computes the tilted covariance once per tilt. This module applies the rule to
the symbols of that loop nest,

    tilt level   the tilted rows a (and b):     C[a, a], C[a, b], C[b, b]
    row level    one row r of the covariance:   C[r, a], C[r, b]
    entry level  one entry (r, q):              C[r, q], C[a, q], C[b, q]

and splits each derived expression by the level of its symbols: the tilted
entry is affine in the entry-level symbols, with row-level coefficients
``U_s[r]``; those are linear in the row-level symbols, with tilt-level
coefficients; the prefactor is tilt-level. Each part is printed from the
engine's expression, so a change of the rule shows in the generated code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from . import gaussian
from .printer import code

C = sp.IndexedBase("C")
ROW, COL = sp.Symbol("r", integer=True), sp.Symbol("q", integer=True)
TILTED_ROWS = (sp.Symbol("a", integer=True), sp.Symbol("b", integer=True))


@dataclass(frozen=True)
class TiltCode:
    """The tilt rule for ``n`` tilted rows, as code for a loop nest (see the module doc).

    ``tilt``: lines at the tilt level (cse temporaries and the row coefficients'
    factors); ``prefactor``: its value there; ``row``: ``(u_s, U_s[r])`` at the
    row level; ``entry``: the tilted entry (r, q) in terms of the ``u_s``, with
    ``diagonal`` the same at q = r."""

    n: int
    tilt: tuple[str, ...]
    prefactor: str
    row: tuple[tuple[str, str], ...]  # (name of U_s[r] in the entry, its code)
    entry: str
    diagonal: str
    text: str  # the rule in words, for the generated docstring
    # the entry (r, q), q = r + j, read through views of the rows from column r on
    # (``C[a, r:]``, ...): (name, source) of each view, and the entry in terms of them
    views: tuple[tuple[str, str], ...] = ()
    entry_view: str = ""


def _affine(expr: sp.Expr, symbols) -> tuple[list[sp.Expr], sp.Expr]:
    """Coefficients of ``expr`` in ``symbols`` and the rest; raises if ``expr`` is
    not affine in them with coefficients free of them."""
    expr = sp.expand(expr)
    coeffs = [sp.expand(expr.diff(s)) for s in symbols]
    rest = sp.expand(expr - sum(c * s for c, s in zip(coeffs, symbols)))
    if any(c.has(*symbols) for c in coeffs) or rest.has(*symbols):
        raise ValueError(f"{expr} is not affine in {symbols}: the tilt cannot be hoisted")
    return coeffs, rest


def _sym(i, j) -> sp.Symbol:
    """A plain symbol for the covariance entry ``C[i, j]`` (sympy differentiates
    Indexed objects with Kronecker deltas; the levels need plain symbols)."""
    return sp.Symbol(f"C_{i}{j}", real=True)


@lru_cache(maxsize=None)
def tilt_code(n: int, amplitude: sp.Expr, width: sp.Expr) -> TiltCode:
    """The tilt by ``n`` (1 or 2) factors ``amplitude exp(-z^2 / (2 width))`` on rows
    ``a`` (, ``b``) of ``C``, split into its tilt, row and entry levels."""
    S = TILTED_ROWS[:n]
    r, q = ROW, COL
    CSS = sp.Matrix(n, n, lambda i, j: _sym(S[min(i, j)], S[max(i, j)]))
    pref = gaussian.tilt_prefactor([amplitude] * n, [width] * n, CSS)
    inv = gaussian.tilt_inverse([width] * n, CSS)
    entry = gaussian.tilted_entry(_sym(r, q), [_sym(r, s) for s in S], [_sym(s, q) for s in S], inv)
    # entry level: Ct[r, q] = c_rq C[r, q] + sum_s U_s[r] C[s, q]
    (c_rq, *U), rest = _affine(entry, [_sym(r, q)] + [_sym(s, q) for s in S])
    if rest != 0:
        raise ValueError(f"the tilted entry {entry} has a part free of the entry-level symbols")
    # row level: U_s[r] = sum_t K_st C[r, t], K at the tilt level
    K = []
    for u in U:
        coeffs, rest = _affine(u, [_sym(r, t) for t in S])
        if rest != 0:
            raise ValueError(f"the row coefficient {u} of the tilt is not linear in the row")
        K.append(coeffs)
    row_syms = {_sym(r, t) for t in S}
    for e in [c_rq, pref, *[k for ks_ in K for k in ks_]]:
        if e.free_symbols & (row_syms | {_sym(r, q)} | {_sym(s, q) for s in S}):
            raise ValueError(f"{e} should depend on the tilted rows only")
    # print at the loop's array slots
    slots = {_sym(i, j): C[i, j] for i in (*S, r) for j in (*S, q)}
    ks = [sp.Symbol(f"k{s}{t}") for s in range(n) for t in range(n)]
    flat = [c_rq, pref] + [K[s][t] for s in range(n) for t in range(n)]
    temps, reduced = sp.cse(
        [e.xreplace(slots) for e in flat], symbols=sp.numbered_symbols("e"), order="canonical"
    )
    c_rq_r, pref_r, *k_r = reduced
    tilt = [f"{s} = {code(e)}" for s, e in temps]
    tilt += [f"{k} = {code(e)}" for k, e in zip(ks, k_r)]
    us = [sp.Symbol(f"u{s}") for s in range(n)]
    row = tuple(
        (str(us[s]), code(sp.Add(*[ks[s * n + t] * C[r, S[t]] for t in range(n)]))) for s in range(n)
    )
    c_sym = c_rq_r
    if c_rq_r.free_symbols:
        c_sym = sp.Symbol("crq")
        tilt.append(f"crq = {code(c_rq_r)}")

    def at(col):
        return c_sym * C[r, col] + sp.Add(*[us[s] * C[S[s], col] for s in range(n)])

    rows = ", ".join(str(s) for s in S)
    text = (
        f"Ct = C - C[:, S] (w I + C_SS)^-1 C[S, :] with S = ({rows}), prefactor "
        f"A^{n} det(I + C_SS / w)^(-1/2), for g' = A exp(-z^2 / (2 w)), A = {amplitude}, w = {width}"
    )
    # the entry through row views starting at column r: an index j = q - r from 0
    j = sp.Symbol("j", integer=True)
    view_of = {C[x, q]: sp.IndexedBase(f"C{x}")[j] for x in (*S, r)}
    views = tuple((f"C{x}", f"C[{x}, {r}:]") for x in (*S, r))
    entry_view = code(at(q).xreplace(view_of))
    return TiltCode(n, tuple(tilt), code(pref_r), row, code(at(q)), code(at(r)), text, views, entry_view)
