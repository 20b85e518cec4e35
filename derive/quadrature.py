"""Quadrature rules that the kernels evaluate, computed here (docs/conventions.md section 2, G4).

A primitive the engine can only reduce to a one-dimensional integral over a path
parameter ``t`` in [0, 1] (``sympy.Integral``, e.g. ``G4`` by Price's theorem along
a path that shrinks covariances, derive/gaussian.py) is printed by the code
generator as a Gauss-Legendre sum over the nodes of this module. The nodes are the
roots of the Legendre polynomial, found by Newton's method in mpmath at 40 digits,
and the weights ``2 / ((1 - x^2) P_n'(x)^2)``, both mapped to [0, 1] and then
rounded to doubles (correctly rounded: the same bits on every machine).

``NODES`` is the number of nodes the kernels use. The integrands are closed forms
(I4 at the covariance of the path) analytic on [0, 1], so the rule converges
geometrically; benchmarks/g4.py measures the error against the number of nodes
(at 20 nodes it is below 1e-13 for variances up to ~10, all equality patterns of
the four indices).
"""

from __future__ import annotations

from functools import lru_cache

import mpmath

# the nodes of the kernels' rule (benchmarks/g4.py: error and cost against nodes)
NODES = 20
DIGITS = 40


@lru_cache(maxsize=None)
def gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of the ``n``-point Gauss-Legendre rule on [0, 1], as doubles,
    nodes increasing: ``int_0^1 f(t) dt ~ sum_i w_i f(t_i)``, exact for polynomials of
    degree < 2n."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"nodes: a whole number >= 1 is allowed, got {n!r}")
    with mpmath.workdps(DIGITS):
        nodes, weights = [], []
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
            nodes.append((x + 1) / 2)
            weights.append(1 / ((1 - x**2) * dp**2))  # 2 / (...) on [-1, 1], halved on [0, 1]
        order = sorted(range(n), key=lambda k: nodes[k])
        return tuple(float(nodes[k]) for k in order), tuple(float(weights[k]) for k in order)


def _legendre(n: int, x):
    """``(P_n(x), P_n'(x))`` by the three-term recurrence (mpmath numbers)."""
    p0, p1 = mpmath.mpf(1), x
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
    if n == 0:
        return p0, mpmath.mpf(0)
    return p1, n * (x * p1 - p0) / (x**2 - 1)


def rule_names(n: int) -> tuple[str, str]:
    """Names of the module-level arrays of the ``n``-point rule in a generated module."""
    return f"GL{n}_T", f"GL{n}_W"


def rule_code(n: int) -> list[str]:
    """The module-level arrays of the ``n``-point rule as lines of code (``repr`` of the
    doubles: byte-identical on every machine)."""
    t, w = gauss_legendre(n)
    tn, wn = rule_names(n)
    lines = [f"{tn} = np.array(["]
    lines += [f"    {x!r}," for x in t]
    lines += ["])", f"{wn} = np.array(["]
    lines += [f"    {x!r}," for x in w]
    lines += ["])"]
    return lines
