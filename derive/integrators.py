"""The adaptive integrator of the kernels: the embedded Runge-Kutta pair of Dormand
and Prince, RK5(4)7M (J. R. Dormand, P. J. Prince, J. Comput. Appl. Math. 6 (1980) 19),
its continuous extension and the step-size controller, as exact numbers.

The tableau is written once here as sympy Rationals; ``context`` prints it into
``run_adaptive`` of every generated module (derive/templates/_macros.jinja holds
the control flow only). What the method is follows from the order conditions,
which are derived here too, from Butcher's rooted trees:

- ``rooted_trees(n)``: the rooted trees with n nodes; ``gamma`` (density) and
  ``sigma`` (symmetry) of a tree; ``elementary_weights(t, A)`` the vector Phi(t)
  of the stages, so that a weight vector b has order p when
  ``b . Phi(t) = 1/gamma(t)`` for every tree of at most p nodes;
- ``DP54.b`` (the solution that is propagated, order 5) and ``DP54.b_hat``
  (order 4); their difference estimates the local error;
- ``dense_weights()``: the continuous extension b_i(theta), polynomials of
  degree 4 with ``y(alpha + theta h) = y + h sum_i b_i(theta) k_i``. They are
  not typed but solved for: order 4 for every theta (the conditions of the trees
  up to 4 nodes with right-hand side ``theta^|t| / gamma(t)``), b_i(0) = 0,
  b_i(1) = b_i, the derivative at both ends equal to the slopes k_1 and k_7 (so
  the interpolant is C^1 from step to step), and no weight on k_2, whose weight
  is zero in b. That leaves one free number, taken to minimise the principal
  error of the interpolant, ``sum over the trees of 5 nodes of
  ((b(theta) . Phi(t) - theta^5/gamma(t)) / sigma(t))^2`` (the minimiser is the
  same for every theta). This is the interpolant of Dormand and Prince's
  code (Hairer, Norsett, Wanner, Solving ODEs I, II.6).

The controller (Hairer et al., II.4): the error of a step is the root mean square
over the state of ``h sum_i (b_i - b_hat_i) k_i / (atol + rtol max(|y|, |y_new|))``;
a step with error <= 1 is accepted; the next step is
``h min(GROWTH_MAX, max(GROWTH_MIN, SAFETY err^(-1/(q+1))))`` with q = 4 the
lower order, without growth right after a rejection.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

R = sp.Rational

# the step-size controller
SAFETY = R(9, 10)
GROWTH_MIN = R(1, 5)
GROWTH_MAX = R(10)
# a step shorter than this many ulp of max(|alpha|, 1) is an underflow: the flow stops
UNDERFLOW_ULPS = 16


@dataclass(frozen=True)
class Tableau:
    """An explicit embedded Runge-Kutta pair: ``A`` (s x s, strictly lower), ``b``
    of order ``order``, ``b_hat`` of order ``embedded_order``; ``fsal`` when the
    last stage is evaluated at the new solution (row s of A is b)."""

    name: str
    A: sp.Matrix
    b: sp.Matrix
    b_hat: sp.Matrix
    order: int
    embedded_order: int

    @property
    def stages(self) -> int:
        return self.A.shape[0]

    @property
    def c(self) -> sp.Matrix:
        """The nodes, the row sums of A (the flows are autonomous: they only document)."""
        return self.A * sp.ones(self.stages, 1)

    @property
    def fsal(self) -> bool:
        return self.A[self.stages - 1, :].T == self.b and self.b[self.stages - 1] == 0


def _matrix(rows, s):
    A = sp.zeros(s, s)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            A[i, j] = v
    return sp.ImmutableMatrix(A)


DP54 = Tableau(
    name="Dormand-Prince 5(4)",
    A=_matrix(
        [
            [],
            [R(1, 5)],
            [R(3, 40), R(9, 40)],
            [R(44, 45), R(-56, 15), R(32, 9)],
            [R(19372, 6561), R(-25360, 2187), R(64448, 6561), R(-212, 729)],
            [R(9017, 3168), R(-355, 33), R(46732, 5247), R(49, 176), R(-5103, 18656)],
            [R(35, 384), 0, R(500, 1113), R(125, 192), R(-2187, 6784), R(11, 84)],
        ],
        7,
    ),
    b=sp.ImmutableMatrix([R(35, 384), 0, R(500, 1113), R(125, 192), R(-2187, 6784), R(11, 84), 0]),
    b_hat=sp.ImmutableMatrix(
        [R(5179, 57600), 0, R(7571, 16695), R(393, 640), R(-92097, 339200), R(187, 2100), R(1, 40)]
    ),
    order=5,
    embedded_order=4,
)


# --------------------------------------------------------------------------- order conditions
Tree = tuple  # a rooted tree: the sorted tuple of the subtrees at its root


def _partitions(m: int, largest: int):
    if m == 0:
        yield ()
        return
    for part in range(min(m, largest), 0, -1):
        for rest in _partitions(m - part, part):
            yield (part, *rest)


@lru_cache(maxsize=None)
def rooted_trees(n: int) -> tuple[Tree, ...]:
    """The rooted trees with ``n`` nodes, each once (1, 1, 2, 4, 9, 20, ... of them)."""
    if n == 1:
        return ((),)
    out = set()
    for sizes in _partitions(n - 1, n - 1):
        for children in itertools.product(*(rooted_trees(k) for k in sizes)):
            out.add(tuple(sorted(children)))
    return tuple(sorted(out))


def nodes(t: Tree) -> int:
    return 1 + sum(nodes(u) for u in t)


def gamma(t: Tree) -> int:
    """The density: |t| times the densities of the subtrees."""
    g = nodes(t)
    for u in t:
        g *= gamma(u)
    return g


def sigma(t: Tree) -> int:
    """The symmetry: the order of the tree's automorphism group."""
    s = 1
    for u, m in Counter(t).items():
        s *= sp.factorial(m) * sigma(u) ** m
    return int(s)


def elementary_weights(t: Tree, A: sp.Matrix) -> sp.Matrix:
    """Phi(t), a vector over the stages: the product over the subtrees u of A Phi(u)
    (ones for the tree of one node)."""
    v = sp.ones(A.shape[0], 1)
    for u in t:
        v = v.multiply_elementwise(A * elementary_weights(u, A))
    return v


def order_defects(b, A: sp.Matrix, n: int, theta=sp.Integer(1)) -> list:
    """``b . Phi(t) - theta^n / gamma(t)`` for the trees of ``n`` nodes: all zero when
    the weights ``b`` (numbers, or polynomials in theta) satisfy the conditions of order n."""
    return [sp.expand((b.T * elementary_weights(t, A))[0] - theta**n / gamma(t)) for t in rooted_trees(n)]


THETA = sp.Symbol("theta")


@lru_cache(maxsize=None)
def dense_weights(tab: Tableau = DP54) -> tuple[sp.Expr, ...]:
    """The continuous extension b_i(theta) (module docstring), polynomials in THETA."""
    s, deg, th = tab.stages, tab.embedded_order, THETA
    beta = [[sp.Symbol(f"beta_{i}_{m}") for m in range(1, deg + 1)] for i in range(s)]
    bt = sp.Matrix([sum(beta[i][m - 1] * th**m for m in range(1, deg + 1)) for i in range(s)])
    eqs = []
    for n in range(1, deg + 1):
        for d in order_defects(bt, tab.A, n, th):
            eqs += sp.Poly(d, th).all_coeffs()
    last = s - 1
    for i in range(s):
        eqs.append(bt[i].subs(th, 1) - tab.b[i])
        eqs.append(sp.diff(bt[i], th).subs(th, 0) - (1 if i == 0 else 0))
        eqs.append(sp.diff(bt[i], th).subs(th, 1) - (1 if i == last else 0))
        if tab.b[i] == 0 and i != last:
            eqs += beta[i]
    unknowns = [x for row in beta for x in row]
    (sol,) = sp.solve(eqs, unknowns, dict=True)
    bt = bt.subs(sol)
    free = sorted(bt.free_symbols - {th}, key=str)
    if free:
        # the principal error of the interpolant, weighted by the symmetry of the trees
        err = sum(
            (d / sigma(t)) ** 2 for t, d in zip(rooted_trees(deg + 1), order_defects(bt, tab.A, deg + 1, th))
        )
        err = sp.integrate(sp.expand(err), (th, 0, 1))
        (best,) = sp.solve([sp.diff(err, x) for x in free], free, dict=True)
        bt = bt.subs(best)
    return tuple(sp.expand(x) for x in bt)


# --------------------------------------------------------------------------- printing
def _literal(x) -> str:
    """A rational as the double nearest to it."""
    return repr(float(x))


def _combination(weights, arrays="k{}[q]") -> str:
    """``w_1 * k1[q] + ...`` over the nonzero weights, as code."""
    parts = []
    for i, w in enumerate(weights):
        if w == 0:
            continue
        term = f"{_literal(abs(w))} * {arrays.format(i + 1)}"
        parts.append(("- " if w < 0 else "+ ") + term)
    text = " ".join(parts)
    return text[2:] if text.startswith("+ ") else "-" + text[2:]


def _horner(poly: sp.Expr, var: str = "theta") -> str:
    """A polynomial in THETA by Horner's scheme, coefficients as doubles."""
    coeffs = sp.Poly(poly, THETA).all_coeffs()
    text = _literal(coeffs[0])
    for cf in coeffs[1:]:
        text = f"{text} * {var}"
        if cf != 0:
            text = f"({text} {'-' if cf < 0 else '+'} {_literal(abs(cf))})"
    return text


def context(tab: Tableau = DP54) -> dict:
    """What ``run_adaptive`` prints: the increment of each stage after the first
    (``y + h * (...)``), the new solution, the error estimate, the weights of the
    continuous extension, and the controller's numbers."""
    s = tab.stages
    assert tab.fsal, "run_adaptive reuses the last stage as the next step's first"
    stages = [_combination([tab.A[i, j] for j in range(i)]) for i in range(1, s)]
    return {
        "name": tab.name,
        "stages": s,
        # stages 2..s; the last is the new solution, whose slope is the next step's k1
        "increments": stages,
        "error": _combination(list(tab.b - tab.b_hat)),
        "dense": [_horner(w) if w != 0 else None for w in dense_weights(tab)],
        "safety": _literal(SAFETY),
        "growth_min": _literal(GROWTH_MIN),
        "growth_max": _literal(GROWTH_MAX),
        # err^(-1/(q+1)), applied to the mean square err^2 (the loop takes no root)
        "exponent": _literal(-R(1, 2 * (min(tab.order, tab.embedded_order) + 1))),
        "underflow": _literal(UNDERFLOW_ULPS * sp.Integer(2) ** -52),
    }
