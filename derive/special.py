"""Special functions that the kernels evaluate with their own code, so that numba can vectorise them.

The inner loops of the erf flows evaluate one arcsine per distinct I4 (and per
I2). libm's ``asin`` is an opaque scalar call, about 10 ns per value here, and it
keeps LLVM from vectorising those loops. The kernels therefore use ``asin_``: a
polynomial with one select and one square root, whose coefficients are computed
here and written into each generated module.

    asin(x) = x + x t P(t),            t = x^2,           |x| <= 1/2
    asin(x) = pi/2 - 2 asin(z),        z^2 = (1 - |x|)/2,  1/2 < |x| <= 1

``P`` is the Chebyshev interpolant of ``(asin(sqrt t) - sqrt t) / t^(3/2)`` on
``[0, 1/4]``. It is computed by mpmath at 40 digits. We take the smallest degree
whose error estimate is below 2^-56, then round the coefficients to doubles
(correctly rounded, so the result is the same on every machine). The result is
within 2 ulp of the correctly rounded arcsine on [-1, 1]
(tests/test_special.py). Outside [-1, 1] and for NaN the result is NaN, as with
libm.
"""

from __future__ import annotations

from functools import lru_cache

import mpmath

# the error bound on P that picks the degree
TOLERANCE = 2.0**-56


@lru_cache(maxsize=None)
def asin_coefficients() -> tuple[float, ...]:
    """Coefficients of P, lowest degree first, as doubles."""
    with mpmath.workdps(40):

        def f(t):
            s = mpmath.sqrt(t)
            return (mpmath.asin(s) - s) / (t * s)

        for n in range(4, 40):
            poly, err = mpmath.chebyfit(f, [mpmath.mpf(0), mpmath.mpf(1) / 4], n, error=True)
            if err < TOLERANCE:
                return tuple(float(c) for c in reversed(poly))
    raise RuntimeError("no polynomial degree below 40 reaches the asin tolerance")


def asin_body(x: str = "x") -> list[str]:
    """The body of the kernels' arcsine ``asin_(x)`` as lines of code: the two
    ranges above (one select each, so that numba vectorises loops that call it),
    Horner's scheme for P, and the sign of ``x``. The generated modules carry it
    as it is; the template only wraps it in a function."""
    cs = asin_coefficients()
    lines = [
        f"ax = abs({x})",
        "big = ax > 0.5",
        # t = x^2 below 1/2; above, t = z^2 = (1 - |x|)/2 and z = sqrt(t)
        "t = 0.5 * (1.0 - ax) if big else ax * ax",
        "z = math.sqrt(t) if big else ax",
        f"p = {cs[-1]!r}",
    ]
    lines += [f"p = p * t + {c!r}" for c in reversed(cs[:-1])]
    lines += [
        "r = z + z * (t * p)",
        f"r = {float(mpmath.pi / 2)!r} - 2.0 * r if big else r",
        f"return math.copysign(r, {x})",
    ]
    return lines
