"""The kernels' own arcsine (derive/special.py) and the table of the hoisted pair
tilt (``tilt2_table``), against independent computations: mpmath at 30 digits for
the arcsine, and numpy's Schur complement and closed-form I2 for the table."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from numba import njit

from derive.codegen import separable_form
from derive.gaussian import expectation
from derive.special import asin_coefficients
from generated import anil_erf, two_layer_erf

asin_ = two_layer_erf.asin_


@njit(cache=False)
def _asin_all(xs, out):
    for i in range(xs.size):
        out[i] = asin_(xs[i])


def _asin(xs):
    xs = np.ascontiguousarray(xs, dtype=float)
    out = np.empty_like(xs)
    _asin_all(xs, out)
    return out


def _ulps(got, ref):
    ref = np.asarray(ref)
    return np.abs(got - ref) / np.spacing(np.maximum(np.abs(ref), np.finfo(float).tiny))


def test_asin_within_two_ulp_of_the_correctly_rounded_value():
    rng = np.random.default_rng(0)
    xs = np.concatenate(
        [
            rng.uniform(-1, 1, 6000),
            1 - rng.uniform(0, 1e-3, 1000),  # near 1, where pi/2 - 2 asin(z) cancels most
            0.5 + rng.uniform(-1e-3, 1e-3, 1000),  # either side of the branch switch
            rng.uniform(-1e-3, 1e-3, 1000),
            [0.5, np.nextafter(0.5, 1), np.nextafter(0.5, 0), 1.0, -1.0, 1e-300, 5e-324, 1e-8],
        ]
    )
    got = _asin(xs)
    with mpmath.workdps(30):
        ref = np.array([float(mpmath.asin(mpmath.mpf(float(x)))) for x in xs])
    assert _ulps(got, ref).max() <= 2.0


def test_asin_on_a_dense_grid_against_libm():
    xs = np.linspace(-1.0, 1.0, 2_000_001)
    assert _ulps(_asin(xs), np.arcsin(xs)).max() <= 3.0


def test_asin_edge_cases():
    got = _asin(np.array([0.0, -0.0, 1.0, -1.0, 1.0000001, -2.0, np.nan, np.inf]))
    assert got[0] == 0.0 and math.copysign(1, got[0]) == 1.0
    assert got[1] == 0.0 and math.copysign(1, got[1]) == -1.0
    assert got[2] == pytest.approx(math.pi / 2, rel=1e-16) and got[3] == -got[2]
    assert np.isnan(got[4:]).all()
    xs = np.random.default_rng(1).uniform(-1, 1, 1000)
    np.testing.assert_array_equal(_asin(-xs), -_asin(xs))  # odd exactly


def test_asin_coefficients_are_the_taylor_series_at_low_order():
    # asin(x) = x + x^3/6 + 3 x^5/40 + ...: P(0) and P'(0) of the fit are these
    cs = asin_coefficients()
    assert cs[0] == pytest.approx(1 / 6, rel=1e-14)
    assert cs[1] == pytest.approx(3 / 40, rel=1e-10)


def _tilted_I2_table(C, a, b):
    """Schur complement after conditioning on two g' factors (erf: g' ~ exp(-z^2/2)),
    then I2 = (2/pi) asin(C_rq / sqrt((1 + C_rr)(1 + C_qq))) on every pair."""
    S = [a, b]
    css = C[np.ix_(S, S)] + np.eye(2)
    Ct = C - C[:, S] @ np.linalg.solve(css, C[S, :])
    d = np.diag(Ct)
    F = 2 / np.pi * np.arcsin(Ct / np.sqrt(np.outer(1 + d, 1 + d)))
    pref = 2 / np.pi / math.sqrt(np.linalg.det(css))
    return F, pref


@pytest.mark.parametrize("module", [two_layer_erf, anil_erf], ids=["two_layer", "anil"])
def test_tilt_table_equals_the_tilted_I2(module):
    """I2 is symmetric: the table is filled on one triangle (q >= r) and read packed,
    F[r, q] = X[P[r] + q] (a model whose reads are not all on the triangle would get
    the whole table F, mirrored: checked against the reference too)."""
    f = module.tilt2_table.py_func
    names = f.__code__.co_varnames[3 : f.__code__.co_argcount]
    rng = np.random.default_rng(3)
    for n in (3, 6, 11):
        A = rng.standard_normal((n, n + 2))
        C = A @ A.T / n + 0.2 * np.eye(n)
        shapes = {"F": (n, n), "Dn": (n,), "X": (n * (n + 1) // 2,)}
        for a, b in ((0, 0), (0, 1), (1, 2), (2, 0)):
            # an entry the table leaves out stays nan
            bufs = {k: np.full(shapes[k], np.nan) if k != "P" else np.full(n, -1, np.int64) for k in names}
            pref = module.tilt2_table(C, a, b, *bufs.values())
            F_ref, pref_ref = _tilted_I2_table(C, a, b)
            if "F" in bufs:
                np.testing.assert_allclose(bufs["F"], F_ref, rtol=1e-12, atol=1e-14)
            else:
                X, P = bufs["X"], bufs["P"]
                for r in range(n):
                    got = X[P[r] + np.arange(r, n)]
                    np.testing.assert_allclose(got, F_ref[r, r:], rtol=1e-12, atol=1e-14)
                assert np.isfinite(X).all()  # X is the triangle exactly, every slot filled
            assert pref == pytest.approx(pref_ref, rel=1e-13)
    assert set(names) == {"Dn", "X", "P"}  # both models read the packed triangle


def test_tilt_by_one_unit_equals_the_schur_complement():
    """tilt1_all: for each student row a, the covariance conditioned on one g'
    factor, C - C[:, a] C[a, :] / (1 + C_aa), and the prefactor E[g'(u_a)]."""
    rng = np.random.default_rng(5)
    for n, K in ((3, 2), (7, 4)):
        A = rng.standard_normal((n, n + 2))
        C = A @ A.T / n + 0.2 * np.eye(n)
        Ct1, pref, D1 = np.empty((K, n, n)), np.empty(K), np.empty((K, n))
        two_layer_erf.tilt1_all(C, K, Ct1, pref, D1)
        for a in range(K):
            ref = C - np.outer(C[:, a], C[a, :]) / (1 + C[a, a])
            np.testing.assert_allclose(Ct1[a], ref, rtol=1e-13, atol=1e-15)
            # the per-row factor of E[u_b g(u_c)] = sqrt(2/pi) C_bc / sqrt(1 + C_cc) at Ct1[a]
            np.testing.assert_allclose(D1[a], 1 / np.sqrt(1 + np.diag(ref)), rtol=1e-13)
            assert pref[a] == pytest.approx(math.sqrt(2 / math.pi) / math.sqrt(1 + C[a, a]), rel=1e-14)


def test_separable_form_of_I2_and_the_fallback():
    i2 = separable_form(expectation(("g", "g"), "erf", "I2"))
    assert i2["value"] == "2*asin_(Da*Db*x)/math.pi"
    assert i2["norm"] == "1/math.sqrt(d + 1)"
    # J2's square root holds C_ab: no per-row factor; the variances enter as they are
    j2 = separable_form(expectation(("gp", "gp"), "erf", "J2"))
    assert j2["norm"] == "d"
    assert "Da" in j2["value"] and "Db" in j2["value"] and "x" in j2["value"]
