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

# A fixed node count, for the references and benchmarks that ask for one (the kernels
# choose theirs by RULES).
NODES = 20
# The kernels' rule: the node count for fields whose largest variance is at most the
# bound, the first bound that holds; above the last bound, the last count. The rule's
# error is set by the singularity of the integrand nearest to [0, 1], at t = (1 + c) / c
# for two equal fields of variance c (no covariance of variance at most c has one
# nearer), so it depends on the largest variance alone. benchmarks/g4.py --calibrate, max
# |G4(n) - G4(128)| over 12 covariances with that largest variance (4 nearly of rank 2),
# the largest variance's field among the four, x 15 equality patterns: each count's error
# is at most 1e-11 up to its bound (10x below the 1e-10 of tests/test_g4.py) and above
# it past the next grid point (e.g. 20 nodes: 1.1e-12 at 24, 3.7e-11 at 32, 1.2e-9 at 64).
RULES = (
    (2.0, 10),
    (3.0, 12),
    (6.0, 14),
    (8.0, 16),
    (24.0, 20),
    (48.0, 24),
    (128.0, 32),
    (384.0, 40),
    (768.0, 48),
    (2048.0, 64),
)
# the name of the generated function that chooses a rule (selector_code)
SELECTOR = "path_rule_for"
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


def nodes_for(c: float) -> int:
    """The node count of ``RULES`` for fields whose largest variance is ``c``."""
    for bound, n in RULES:
        if c <= bound:
            return n
    return RULES[-1][1]


def rule_counts(nodes: int | None) -> list[int]:
    """The path rules a body of ``nodes`` nodes reads: that one, or every rule of
    ``RULES`` for ``None`` (the kernels' choice by the largest variance)."""
    return sorted({n for _, n in RULES}) if nodes is None else [nodes]


def selector_code(nodes: int | None) -> list[str]:
    """The generated function ``SELECTOR(c)``: the arrays (nodes, weights) of the path
    rule for fields whose largest variance is ``c``, by ``RULES`` (``nodes`` None) or
    always the ``nodes``-point rule. A NaN variance gets the last rule."""
    lines = [
        '@njit(cache=True, error_model="numpy", inline="always")',
        f"def {SELECTOR}(c):",
        '    """(nodes, weights) of the path rule for fields whose largest variance is c',
        '    (derive/quadrature.py RULES)."""',
    ]
    if nodes is not None:
        return lines + [f"    return {', '.join(rule_names(nodes))}"]
    for bound, n in RULES[:-1]:
        lines += [f"    if c <= {bound!r}:", f"        return {', '.join(rule_names(n))}"]
    return lines + [f"    return {', '.join(rule_names(RULES[-1][1]))}"]


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
