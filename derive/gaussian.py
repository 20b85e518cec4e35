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
    # no elementary closed form for erf: an integral along Price's path (_price_path)
    "G4": ("g", "g", "g", "g"),
}

LABELS = "abcdefgh"
# the variable of Price's path (a sympy Integral over it from 0 to 1, see _price_path)
PATH_VARIABLE = "t"


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
    # the fields of the factors, in order, when some are equal (a pattern form, e.g.
    # "abcc": E[g(u_a) g(u_b) g(u_c) g(u_c)]); None when every factor has its own label
    pattern: str | None = None

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


def path_entry(Cxy: sp.Expr, t: sp.Expr) -> sp.Expr:
    """An entry of Price's path between a shrunk field and another, ``C_xy(t) = t C_xy``
    (``_Engine._price_path``; the kernels' G4 table prints it, derive/codegen.py)."""
    return t * Cxy


class _Engine:
    def __init__(self, act: Activation, path_group=()):
        self.act = act
        # the fields whose covariances Price's path shrinks (default: the first field)
        self.path_group = tuple(path_group)
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
        fields = [self._vars(f, variables) for f in factors]
        odd = (
            all(len(v) == 1 for v in fields)
            and len({v[0] for v in fields}) == len(fields)
            and all(self._parity(f, v) == -1 for f, v in zip(factors, fields))
        )
        if odd and len(factors) == 2:
            return self._price(factors[0], fields[0][0], factors[1], fields[1][0], C)
        if odd and len(factors) > 2:
            return self._price_path(factors, [v[0] for v in fields], variables, C)
        raise UnreducibleExpectation(
            f"no rule reduces E[{sp.Mul(*factors)}] for activation {self.act.name!r}"
        )

    def _price_path(self, factors, fields, variables, C):
        """E[prod_i h_i(u_i)] for more than two odd h_i on distinct fields, by Price's
        theorem along the path ``C(t)`` that shrinks the covariances between a group
        ``A`` of the fields and the rest, ``C_ij -> t C_ij`` for i in A, j not in A,
        other entries kept. ``A`` is the first field unless the caller chose a group
        (``path_group``, for a pattern of equal indices: ``expectation(..., pattern)``).
        ``C(t) = t C + (1 - t) diag(C_AA, C_rest)`` is a covariance for every t in
        [0, 1]; at t = 0 the group is independent of the rest, so
        ``E = E[prod_A h] E[prod_rest h] + int_0^1 sum_{i in A, j not in A} C_ij
        E_t[h_i'(u_i) h_j'(u_j) (the other factors)] dt`` (the first term vanishes when
        A has an odd number of odd factors), each integrand derived at ``C(t)``."""
        group = [f for f in fields if f in self.path_group] or fields[:1]
        rest = [f for f in fields if f not in group]
        if not rest:
            group, rest = fields[:1], fields[1:]
        self.path_group = ()  # the integrands' own paths, if any, start from their first field
        t = sp.Symbol(PATH_VARIABLE, real=True)
        if any(t in e.free_symbols for e in C.values()):
            raise UnreducibleExpectation("Price's path inside a Price's path: nested integrals")
        Ct = dict(C)
        for x in group:
            for v in variables:
                if v not in group:
                    Ct[x, v] = path_entry(C[x, v], t)
                    Ct[v, x] = path_entry(C[v, x], t)
        names = [str(v).removeprefix("u_") for v in group]
        others = ", ".join(str(v).removeprefix("u_") for v in rest)
        if len(names) == 1:
            (x,) = names
            which, entries, start_text = f"u_{x}", f"C_{x}j -> t C_{x}j (j = {others})", ""
        else:
            which = "(" + ", ".join(f"u_{x}" for x in names) + ") and the rest"
            entries = f"C_ij -> t C_ij (i = {', '.join(names)}; j = {others})"
            start_text = f"E[factors of {', '.join(names)}] E[the others] + "
        self.trace.append(
            f"Price's theorem along a path that shrinks the covariances of {which}: {entries}, a "
            f"covariance for every t in [0, 1], the shrunk fields independent of the rest at t = 0 "
            f"(where an odd number of odd factors has mean 0); E = {start_text}integral over t from 0 "
            f"to 1 of the sum over the shrunk i and the other j of C_ij E_t[h_i'(u_i) h_j'(u_j) (the "
            f"other factors)], each term derived at the covariance C(t):"
        )
        F = sp.Mul(*factors)
        inside = [f for f in factors if f.has(*group)]
        outside = [f for f in factors if not f.has(*group)]
        start = sp.S.Zero
        if len(inside) % 2 == 0:
            start = self.expect(sp.Mul(*inside), group, C) * self.expect(sp.Mul(*outside), rest, C)
        integrand = sp.S.Zero
        for i in group:
            for j in rest:
                integrand += C[i, j] * self.expect(sp.diff(F, i, j), variables, Ct)
        return start + sp.Integral(integrand, (t, 0, 1))

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


def expectation(kinds: tuple[str, ...], activation: str, name: str | None = None) -> Derived:
    """Derive ``E[prod_i h_i(u_i)]`` with ``h_i`` given by ``kinds``, labels a, b, c, ...;
    named ``name``, by default the primitive's name (``name_of``: G4 for four g)."""
    kinds = tuple(kinds)
    return _expectation(kinds, activation, name or name_of(kinds))


# one cache for expectation(), whatever the spelling of its arguments
expectation.cache_clear = lambda: _expectation.cache_clear()


@lru_cache(maxsize=None)
def _expectation(kinds: tuple[str, ...], activation: str, name: str) -> Derived:
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
        name=name,
        kinds=tuple(kinds),
        labels=labels,
        expr=expr,
        provenance=tuple(eng.trace),
        activation=activation,
    )


def canonical_patterns(n: int) -> tuple[str, ...]:
    """One equality pattern of ``n`` indices per class of multiplicities, the fields
    that occur fewer times first: for n = 4 "abcd", "abcc", "abbb", "aabb", "aaaa"."""
    out = []

    def parts(m, top):
        if m == 0:
            yield ()
        for k in range(min(m, top), 0, -1):
            for rest in parts(m - k, k):
                yield (k, *rest)

    for sizes in parts(n, n):
        out.append("".join(LABELS[i] * k for i, k in enumerate(sorted(sizes))))
    return tuple(sorted(out, key=lambda p: (-len(set(p)), p)))


@lru_cache(maxsize=None)
def pattern_form(kinds: tuple[str, ...], activation: str, pattern: str) -> Derived:
    """``E[prod_i h_i(u_{pattern_i})]`` for a primitive of equal factor kinds that the
    engine reduces along Price's path (G4), at fields equal as ``pattern`` says (e.g.
    "abcc"): derived with a field per factor, the path shrinking the covariances of the
    first letter's fields (a field that occurs once where there is one: the integrand
    then stays far from the singular covariances of t > 1; for "aabb" the pair a, a,
    whose start is I2(a, a) I2(b, b)), then the equal fields identified. Named
    ``NAME_pattern``, its labels the distinct letters (docs/conventions.md section 2)."""
    if len(set(kinds)) != 1 or len(pattern) != len(kinds):
        raise ValueError(f"pattern {pattern!r}: one letter per factor of equal kinds {kinds} is allowed")
    labels = tuple(LABELS[: len(kinds)])
    if pattern.count(pattern[0]) in (1, len(pattern)):
        # the path of the distinct-field expectation (its first field) is the one wanted
        # (all fields equal: no group to split off, the first field is shrunk)
        whole = expectation(tuple(kinds), activation)
        expr, steps = whole.expr, whole.provenance
    else:
        act = get_activation(activation)
        us = [field_symbol(a) for a in labels]
        C = {(us[i], us[j]): cov_symbol(labels[i], labels[j]) for i in range(len(us)) for j in range(len(us))}
        eng = _Engine(act, path_group=[u for u, x in zip(us, pattern) if x == pattern[0]])
        expr = eng.expect(sp.Mul(*[_factor_expr(act, k, u) for k, u in zip(kinds, us)]), us, C)
        steps = tuple(eng.trace)
    same = {
        cov_symbol(labels[i], labels[j]): cov_symbol(pattern[i], pattern[j])
        for i, j in itertools.combinations_with_replacement(range(len(labels)), 2)
    }
    fields = tuple(dict.fromkeys(pattern))
    trace = (f"at equal fields {', '.join(pattern)} (C_xy of the factors' fields identified):", *steps)
    name = f"{name_of(kinds)}_{pattern}"
    return Derived(name, tuple(kinds), fields, expr.xreplace(same), trace, activation, pattern)


def pattern_forms(d: Derived) -> tuple[Derived, ...] | None:
    """The forms of ``d`` at every canonical pattern of equal indices (``pattern_form``)
    when ``d`` is an integral along Price's path (G4), so that a kernel can dispatch on
    the equality of its runtime indices; None for a closed form."""
    if not d.expr.has(sp.Integral) or d.pattern is not None or len(set(d.kinds)) != 1:
        return None
    if d.name != name_of(d.kinds):
        return None  # a derived primitive (P_dir) keeps the distinct-field form
    return tuple(pattern_form(d.kinds, d.activation, p) for p in canonical_patterns(len(d.kinds)))


def dcov_symbol(a: str, b: str) -> sp.Symbol:
    """Entry ``dC_ab`` of a perturbation of the covariance (a direction)."""
    a, b = sorted((a, b))
    return sp.Symbol(f"dC_{a}{b}", real=True)


# the factor kind of a derivative: h -> h'
DERIVATIVE = {"g": "gp", "gp": "gpp"}


def _relabelled(e: Derived, labels) -> sp.Expr:
    """``e``'s expression with its fields ``e.labels[n]`` renamed ``labels[n]``."""
    to = dict(zip(e.labels, labels))
    pairs = itertools.combinations_with_replacement(e.labels, 2)
    return e.expr.xreplace({cov_symbol(x, y): cov_symbol(to[x], to[y]) for x, y in pairs})


def _price_directional(d: Derived) -> tuple[sp.Expr, list[str]] | None:
    """``P_dir`` of ``P = E[prod_i h_i(u_i)]`` by Price's theorem, entry by entry of dC:
    ``dP/dC_ab = E[h_a' h_b' (the rest)]`` (a != b), ``dP/dC_aa = E[h_a'' (the rest)] / 2``,
    each an expectation the engine derives (I4 and E[g'' g g g] for G4: closed forms,
    where differentiating G4's integral along Price's path keeps the integral), and
    the names of those expectations. None when a factor has no derivative among the
    kinds or an expectation is itself an integral."""
    expr, used = sp.S.Zero, []
    for i, j in itertools.combinations_with_replacement(range(len(d.kinds)), 2):
        kinds = list(d.kinds)
        for n in {i, j} if i != j else (i, i):
            if kinds[n] not in DERIVATIVE:
                return None
            kinds[n] = DERIVATIVE[kinds[n]]
        order = [i, j] if i != j else [i]
        order += [n for n in range(len(kinds)) if n not in order]
        e = expectation(tuple(kinds[n] for n in order), d.activation)
        if e.expr.has(sp.Integral):
            return None
        used += [e.name] if e.name not in used else []
        coeff = _relabelled(e, [d.labels[n] for n in order])
        expr += (coeff if i != j else coeff / 2) * dcov_symbol(d.labels[i], d.labels[j])
    return expr, used


@lru_cache(maxsize=None)
def directional(d: Derived) -> Derived:
    """``P_dir = sum_{a<=b} (dP/dC_ab) dC_ab``: the derivative of a primitive along a
    symmetric perturbation ``dC`` of the covariance. A closed form is differentiated by
    sympy (chain rule); an integral along Price's path (G4) by Price's theorem, into
    the closed forms of one more derivative (``_price_directional``)."""
    price = _price_directional(d) if d.expr.has(sp.Integral) else None
    if price is not None:
        expr, used = price
        return Derived(
            name=d.name + "_dir",
            kinds=d.kinds,
            labels=d.labels,
            expr=expr,
            provenance=(
                f"the derivative of {d.name} along dC by Price's theorem: the sum over a < b of "
                "dC_ab E[h_a'(u_a) h_b'(u_b) (the other factors)] and over a of dC_aa E[h_a''(u_a) "
                f"(the other factors)] / 2, each expectation derived in closed form ({', '.join(used)}) "
                "at its fields",
            ),
            activation=d.activation,
        )
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
