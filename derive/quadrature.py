"""Quadrature rules that the kernels evaluate, computed here (docs/conventions.md section 2, G4).

A primitive the engine can only reduce to a one-dimensional integral over a path
parameter ``t`` in [0, 1] (``sympy.Integral``, e.g. ``G4`` by Price's theorem along
a path that shrinks covariances, derive/gaussian.py) is printed by the code
generator as a weighted sum over the nodes of ``path_rule``: Gauss-Legendre in ``s``
with ``t = 1 - (1 - s)^2``. The integrands are closed forms (I4 at the covariance
C(t)) analytic on [0, 1], whose nearest singularity lies just beyond t = 1 when a
variance c is large (``(1 + C_aa)(1 + C_bb) - t^2 C_ab^2 = 0`` at ``t = (1 + c) / c``
for two equal fields); the substitution moves it from distance ``1/c`` to about
``1/sqrt(c)`` of the interval, and the rule converges geometrically the faster
(benchmarks/g4.py: error and cost against the number of nodes).

The Gauss-Legendre nodes are the roots of the Legendre polynomial, found by Newton's
method in mpmath at 40 digits, the weights ``2 / ((1 - x^2) P_n'(x)^2)``; nodes and
weights are mapped (to [0, 1], and through the substitution) at that precision and
then rounded to doubles (correctly rounded: the same bits on every machine).
"""

from __future__ import annotations

from functools import lru_cache

import mpmath

# the nodes of the kernels' rule. benchmarks/g4.py, max |G4(n) - G4(64)| over the 15
# equality patterns of random covariances with variances up to 64: 12 nodes 1.1e-9,
# 16 nodes 1.2e-12, 20 nodes 4.2e-15 (machine precision), at ~1.1 us per G4 call
NODES = 20
DIGITS = 40


def _gauss_legendre_mp(n: int) -> list[tuple]:
    """(node, weight) of the ``n``-point Gauss-Legendre rule on [0, 1] as mpmath numbers
    at ``DIGITS`` digits, nodes increasing."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"nodes: a whole number >= 1 is allowed, got {n!r}")
    rule = []
    for i in range(1, n + 1):
        # the i-th largest root, from the asymptotic guess, then Newton
        x = mpmath.cos(mpmath.pi * (i - mpmath.mpf(1) / 4) / (n + mpmath.mpf(1) / 2))
        for _ in range(100):
            p, dp = _legendre(n, x)
            step = p / dp
            x -= step
            if abs(step) < mpmath.mpf(10) ** (5 - DIGITS):
                break
        _, dp = _legendre(n, x)
        # 2 / ((1 - x^2) P'^2) on [-1, 1], halved on [0, 1]
        rule.append(((x + 1) / 2, 1 / ((1 - x**2) * dp**2)))
    return sorted(rule, key=lambda nw: nw[0])


@lru_cache(maxsize=None)
def gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of the ``n``-point Gauss-Legendre rule on [0, 1], as doubles,
    nodes increasing: ``int_0^1 f(t) dt ~ sum_i w_i f(t_i)``, exact for polynomials of
    degree < 2n."""
    with mpmath.workdps(DIGITS):
        rule = _gauss_legendre_mp(n)
        return tuple(float(x) for x, _ in rule), tuple(float(w) for _, w in rule)


@lru_cache(maxsize=None)
def path_rule(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The kernels' rule for an integral over Price's path, ``int_0^1 f(t) dt``: the
    ``n``-point Gauss-Legendre rule in ``s`` with ``t = 1 - (1 - s)^2``, ``dt = 2 (1 - s)
    ds`` (nodes graded towards t = 1; exact for polynomials in t of degree < n)."""
    with mpmath.workdps(DIGITS):
        rule = _gauss_legendre_mp(n)
        return (
            tuple(float(1 - (1 - s) ** 2) for s, _ in rule),
            tuple(float(2 * (1 - s) * w) for s, w in rule),
        )


def _legendre(n: int, x):
    """``(P_n(x), P_n'(x))`` by the three-term recurrence (mpmath numbers)."""
    p0, p1 = mpmath.mpf(1), x
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
    if n == 0:
        return p0, mpmath.mpf(0)
    return p1, n * (x * p1 - p0) / (x**2 - 1)


def rule_names(n: int) -> tuple[str, str]:
    """Names of the module-level arrays of the ``n``-point path rule in a generated module."""
    return f"PATH{n}_T", f"PATH{n}_W"


def rule_code(n: int) -> list[str]:
    """The module-level arrays of the ``n``-point path rule as lines of code (``repr`` of
    the doubles: byte-identical on every machine)."""
    t, w = path_rule(n)
    tn, wn = rule_names(n)
    lines = [f"{tn} = np.array(["]
    lines += [f"    {x!r}," for x in t]
    lines += ["])", f"{wn} = np.array(["]
    lines += [f"    {x!r}," for x in w]
    lines += ["])"]
    return lines
