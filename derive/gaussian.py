"""Gaussian expectations of products of activations, derived (docs/conventions.md section 2).

Stage 2 of the pipeline: an expectation ``E[prod_i h_i(u_i)]`` over a zero-mean
Gaussian vector ``u`` with a symbolic covariance ``C`` is reduced to a closed
form by three rewrite rules, each a theorem about Gaussians:

- **tilt**: a factor ``A exp(q u_s^2)`` (q < 0) is absorbed into the Gaussian:
  ``E[prod_{s in S} exp(-u_s^2 / (2 p_s)) F] = det(I + C_SS P^-1)^(-1/2) E'[F]``
  with ``C' = C - C_:S (P + C_SS)^(-1) C_S:``, ``P = diag(p_s)``;
- **Stein's lemma**: ``E[u_b F(u)] = sum_j C_bj E[dF/du_j]``;
- **Price's theorem**, the base case for two odd functions:
  ``E[h1(u_a) h2(u_b)] = int_0^{C_ab} E_c[h1'(u_a) h2'(u_b)] dc``, the integrand
  obtained by the rules above and the integral done by sympy; it starts from 0
  because an odd function has zero mean.

A product with odd total parity vanishes. Each result carries its provenance:
the rules applied, in order. ``primitive(name, activation)`` gives the named
expectations of docs/conventions.md section 2 (I2, I3, I4, J2) and ``expectation(kinds, activation)``
any other pattern of factors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from .activations import Activation, get_activation

# A factor kind says which function of its field enters the product.
FACTOR_KINDS = ("gp", "id", "g", "gpp")
_ORDER = {"gp": 1, "id": None, "g": 0, "gpp": 2}

# The named primitives of docs/conventions.md section 2: factor kinds in argument order.
PRIMITIVES: dict[str, tuple[str, ...]] = {
    "I2": ("g", "g"),
    "I3": ("gp", "id", "g"),
    "I4": ("gp", "gp", "g", "g"),
    "J2": ("gp", "gp"),
}

LABELS = "abcdefgh"


def cov_symbol(a: str, b: str) -> sp.Symbol:
    """The covariance entry ``C_ab`` (symmetric: C_ba is the same symbol)."""
    a, b = sorted((a, b))
    return sp.Symbol(f"C_{a}{b}", real=True)


def field_symbol(a: str) -> sp.Symbol:
    return sp.Symbol(f"u_{a}", real=True)


@dataclass(frozen=True)
class Derived:
    """A derived expectation: the pattern, its closed form, and how it was obtained."""

    name: str
    kinds: tuple[str, ...]
    labels: tuple[str, ...]
    expr: sp.Expr
    provenance: tuple[str, ...]
    activation: str

    @property
    def cov_symbols(self) -> tuple[sp.Symbol, ...]:
        """Covariance entries the expression may use, in a fixed order."""
        return tuple(cov_symbol(a, b) for a, b in itertools.combinations_with_replacement(self.labels, 2))


class UnreducibleExpectation(NotImplementedError):
    pass


# -- the tilt rule, written once ------------------------------------------------
# The engine (``_Engine._tilt``) applies it to derive closed forms; the code
# generator (derive/codegen.py) applies the same three functions to symbols of a
# loop nest, so that a kernel's tilted covariances and prefactors are this rule.


def tilt_prefactor(amplitudes, widths, CSS: sp.Matrix) -> sp.Expr:
    """``prod_s A_s det(I + P^-1 C_SS)^(-1/2)``, ``P = diag(widths)``: the mass of the
    Gaussian factors ``A_s exp(-u_s^2 / (2 p_s))`` under the Gaussian of covariance
    ``C_SS``."""
    P = sp.diag(*widths)
    det = sp.factor((sp.eye(len(widths)) + P.inv() * CSS).det())
    return sp.Mul(*amplitudes) / sp.sqrt(det)


def tilt_inverse(widths, CSS: sp.Matrix) -> sp.Matrix:
    """``(P + C_SS)^-1``, the matrix of the Schur complement of the tilt."""
    return (sp.diag(*widths) + CSS).inv()


def tilted_entry(Cxy: sp.Expr, cx, cy, inv: sp.Matrix) -> sp.Expr:
    """Entry (x, y) of the tilted covariance, ``C_xy - C_xS (P + C_SS)^-1 C_Sy``, from
    ``cx = C_xS`` and ``cy = C_Sy`` (sequences over the tilted fields)."""
    n = len(cx)
    return Cxy - (sp.Matrix(1, n, list(cx)) * inv * sp.Matrix(n, 1, list(cy)))[0, 0]


class _Engine:
    def __init__(self, act: Activation):
        self.act = act
        self.trace: list[str] = []
        self._base_cache: dict = {}

    # -- helpers ---------------------------------------------------------
    @staticmethod
    def _vars(expr, variables):
        return [v for v in variables if expr.has(v)]

    def _parity(self, factor: sp.Expr, variables) -> int | None:
        """+1 (even), -1 (odd) or None under u -> -u."""
        flipped = factor.subs({v: -v for v in variables}, simultaneous=True)
        if sp.simplify(flipped - factor) == 0:
            return 1
        if sp.simplify(flipped + factor) == 0:
            return -1
        return None

    @staticmethod
    def _gaussian_factor(factor: sp.Expr, variables):
        """(u, p) if factor is ``A exp(-u^2 / (2 p))`` with p > 0, else None."""
        vs = [v for v in variables if factor.has(v)]
        if len(vs) != 1:
            return None
        u = vs[0]
        A = sp.Wild("A", exclude=[u])
        q = sp.Wild("q", exclude=[u])
        m = factor.match(A * sp.exp(q * u**2))
        if m is None or not (m[q].is_number and m[q] < 0):
            return None
        return u, m[A], -1 / (2 * m[q])

    # -- the rules -------------------------------------------------------
    def expect(self, integrand: sp.Expr, variables: list, C: dict) -> sp.Expr:
        """E[integrand] for zero-mean Gaussian ``variables`` with covariance ``C``.

        ``C`` maps ordered pairs (u, v) of variables to sympy expressions.
        """
        integrand = sp.sympify(integrand)
        live = self._vars(integrand, variables)
        if not live:
            return integrand
        coeff, factors = sp.S.One, []
        for f in sp.Mul.make_args(integrand):
            if f.has(*live):
                factors.append(f)
            else:
                coeff *= f
        parity = 1
        for f in factors:
            p = self._parity(f, live)
            if p is None:
                parity = None
                break
            parity *= p
        if parity == -1:
            self.trace.append("odd integrand: 0")
            return sp.S.Zero

        # tilt by every Gaussian-shaped factor at once
        tilts = []
        rest = []
        for f in factors:
            t = self._gaussian_factor(f, live)
            if t is None:
                rest.append(f)
            else:
                tilts.append(t)
        if tilts:
            return coeff * self._tilt(tilts, rest, live, C)

        # Stein on a polynomial factor
        for i, f in enumerate(factors):
            base, power = f.as_base_exp()
            if base in live and power.is_Integer and power > 0:
                return coeff * self._stein(base, power, factors[:i] + factors[i + 1 :], live, C)

        return coeff * self._base(factors, live, C)

    def _tilt(self, tilts, rest, variables, C):
        S = [u for u, _, _ in tilts]
        if len(set(S)) != len(S):
            raise UnreducibleExpectation("two Gaussian factors on one field")
        amps = [A for _, A, _ in tilts]
        widths = [p for _, _, p in tilts]
        CSS = sp.Matrix(len(S), len(S), lambda i, j: C[S[i], S[j]])
        inv = tilt_inverse(widths, CSS)
        others = list(variables)
        Cnew = {}
        for x in others:
            for y in others:
                cx = [C[x, s] for s in S]
                cy = [C[s, y] for s in S]
                Cnew[x, y] = sp.together(tilted_entry(C[x, y], cx, cy, inv))
        names = ", ".join(str(u) for u in S)
        self.trace.append(f"tilt by {names}: factor det(I + C_SS)^(-1/2), Schur-complement covariance")
        return tilt_prefactor(amps, widths, CSS) * self.expect(sp.Mul(*rest), others, Cnew)

    def _stein(self, u, power, others, variables, C):
        F = u ** (power - 1) * sp.Mul(*others)
        self.trace.append(f"Stein on {u}")
        total = sp.S.Zero
        for v in variables:
            dF = sp.diff(F, v)
            if dF != 0:
                total += C[u, v] * self.expect(dF, variables, C)
        return total

    def _base(self, factors, variables, C):
        if not factors:
            return sp.S.One
        if len(factors) == 2:
            (a,) = self._vars(factors[0], variables) or (None,)
            (b,) = self._vars(factors[1], variables) or (None,)
            if a is not None and b is not None and a != b:
                if self._parity(factors[0], [a]) == -1 and self._parity(factors[1], [b]) == -1:
                    return self._price(factors[0], a, factors[1], b, C)
        raise UnreducibleExpectation(
            f"no rule reduces E[{sp.Mul(*factors)}] for activation {self.act.name!r}"
        )

    def _price(self, h1, a, h2, b, C):
        """E[h1(u_a) h2(u_b)] for odd h1, h2 by Price's theorem along C_ab."""
        key = (h1.subs(a, sp.Symbol("_x")), h2.subs(b, sp.Symbol("_x")))
        if key not in self._base_cache:
            p, q = sp.symbols("p q", positive=True)
            c, x = sp.symbols("c x", real=True)
            ua, ub = sp.symbols("x_1 x_2", real=True)
            Cl = {(ua, ua): p, (ub, ub): q, (ua, ub): c, (ub, ua): c}
            sub = _Engine(self.act)
            integrand = sub.expect(sp.diff(h1.subs(a, ua), ua) * sp.diff(h2.subs(b, ub), ub), [ua, ub], Cl)
            integrand = sp.simplify(integrand)
            value = sp.integrate(integrand, (c, 0, x))
            value = sp.simplify(value)
            if value.has(sp.Integral) or value.has(sp.Piecewise):
                raise UnreducibleExpectation(f"sympy could not integrate {integrand} over c")
            self._base_cache[key] = (value, (p, q, x), integrand, tuple(sub.trace))
        value, (p, q, x), integrand, sub_trace = self._base_cache[key]
        inner = "; ".join(sub_trace)
        la, lb = str(a).removeprefix("u_"), str(b).removeprefix("u_")
        self.trace.append(
            f"Price's theorem on the covariance of (u_{la}, u_{lb}): E = integral over c from 0 "
            f"to C_{la}{lb} of E[h1'(x_1) h2'(x_2)] = {integrand} ({inner}; p = C_{la}{la}, "
            f"q = C_{lb}{lb}) = {value}"
        )
        return value.subs({p: C[a, a], q: C[b, b], x: C[a, b]}, simultaneous=True)


def _factor_expr(act: Activation, kind: str, u: sp.Symbol) -> sp.Expr:
    if kind == "id":
        return u
    return act.at(_ORDER[kind], u)


@lru_cache(maxsize=None)
def expectation(kinds: tuple[str, ...], activation: str, name: str | None = None) -> Derived:
    """Derive ``E[prod_i h_i(u_i)]`` with ``h_i`` given by ``kinds``, labels a, b, c, ..."""
    for k in kinds:
        if k not in FACTOR_KINDS:
            raise ValueError(f"unknown factor kind {k!r}; allowed {FACTOR_KINDS}")
    act = get_activation(activation)
    labels = tuple(LABELS[: len(kinds)])
    us = [field_symbol(a) for a in labels]
    C = {(us[i], us[j]): cov_symbol(labels[i], labels[j]) for i in range(len(us)) for j in range(len(us))}
    integrand = sp.Mul(*[_factor_expr(act, k, u) for k, u in zip(kinds, us)])
    eng = _Engine(act)
    expr = eng.expect(integrand, us, C)
    # small results read better simplified; large ones (I4) are left as derived,
    # since simplify costs minutes there and the code generator runs cse anyway
    expr = sp.simplify(expr) if sp.count_ops(expr) < 60 else expr
    return Derived(
        name=name or "E_" + "_".join(kinds),
        kinds=tuple(kinds),
        labels=labels,
        expr=expr,
        provenance=tuple(eng.trace),
        activation=activation,
    )


def dcov_symbol(a: str, b: str) -> sp.Symbol:
    """Entry ``dC_ab`` of a perturbation of the covariance (a direction)."""
    a, b = sorted((a, b))
    return sp.Symbol(f"dC_{a}{b}", real=True)


@lru_cache(maxsize=None)
def directional(d: Derived) -> Derived:
    """``P_dir = sum_{a<=b} (dP/dC_ab) dC_ab``: the derivative of a primitive along a
    symmetric perturbation ``dC`` of the covariance (chain rule, by sympy)."""
    expr = sp.S.Zero
    for a, b in itertools.combinations_with_replacement(d.labels, 2):
        c = cov_symbol(a, b)
        if d.expr.has(c):
            expr += sp.diff(d.expr, c) * dcov_symbol(a, b)
    return Derived(
        name=d.name + "_dir",
        kinds=d.kinds,
        labels=d.labels,
        expr=expr,
        provenance=d.provenance + ("derivative along dC: sum over a <= b of dP/dC_ab dC_ab (sympy diff)",),
        activation=d.activation,
    )


def primitive(name: str, activation: str) -> Derived:
    """One of the named primitives of docs/conventions.md section 2, derived for ``activation``."""
    try:
        kinds = PRIMITIVES[name]
    except KeyError:
        raise ValueError(f"unknown primitive {name!r}; known: {', '.join(PRIMITIVES)}") from None
    return expectation(kinds, activation, name)


def exchange_symmetric(d: Derived, i: int, j: int) -> bool:
    """Whether ``d`` is unchanged by exchanging its arguments ``i`` and ``j``: the two
    factors are of one kind and the derived expression, with the labels exchanged
    in its covariance entries, is itself (structurally, or once expanded). A kernel that tabulates ``d``
    over pairs of rows then computes one triangle (derive/codegen.py: _table_plan)."""
    if d.kinds[i] != d.kinds[j]:
        return False
    a, b = d.labels[i], d.labels[j]
    swap = {a: b, b: a}
    relabel = {
        cov_symbol(x, y): cov_symbol(swap.get(x, x), swap.get(y, y))
        for x, y in itertools.combinations_with_replacement(d.labels, 2)
    }
    swapped = d.expr.xreplace(relabel)
    # structural equality, or of the expanded forms (a proof, and fast); sympy's simplify
    # on I4 takes minutes, and a difference that only it could cancel is not trusted
    return swapped == d.expr or sp.expand(swapped - d.expr) == 0


@dataclass(frozen=True)
class TiltSplit:
    """``E[g'(u_a) g'(u_b) F(u_rest)] = pref(C_SS) E'[F]`` (the tilt rule, applied first):
    the first ``n`` factors are g' = ``amplitude exp(-z^2 / (2 width))``; ``base`` is the
    expectation of the remaining factors at the tilted covariance (None: it is 1)."""

    n: int
    amplitude: sp.Expr
    width: sp.Expr
    base: Derived | None


@lru_cache(maxsize=None)
def tilt_split(kinds: tuple[str, ...], activation: str) -> TiltSplit | None:
    """The tilt structure of a pattern whose leading factors are one or two g' of
    a Gaussian-shaped g' (erf), so that a kernel can tilt once per unit or pair."""
    n = 0
    while n < len(kinds) and kinds[n] == "gp":
        n += 1
    if n not in (1, 2) or "gp" in kinds[n:]:
        return None
    act = get_activation(activation)
    u = sp.Symbol("u", real=True)
    shape = _Engine._gaussian_factor(act.at(1, u), [u])
    if shape is None:
        return None
    _, amplitude, width = shape
    rest = tuple(kinds[n:])
    base = expectation(rest, activation, name_of(rest)) if rest else None
    if base is not None and base.expr.is_number:
        return None
    return TiltSplit(n, amplitude, width, base)


def name_of(kinds: tuple[str, ...]) -> str:
    for name, k in PRIMITIVES.items():
        if k == kinds:
            return name
    return "E_" + "_".join(kinds)
