"""Goldens for single passes: expansion into terms (derive/expand.py), averaging
over noise and fields (derive/flow.py ``average``) and printing (derive/printer.py).

A small expression goes in; the exact expected terms or text come out, typed
here from the documented conventions (canonical indices j0, j1, ... over
students and m0, m1, ... over teachers in order of first appearance; factors
sorted g', g'', bare field, g; a teacher field in a primitive is row ``K + m``).
"""

from __future__ import annotations

import pytest
import sympy as sp

from derive.expand import RawTerm, expand
from derive.flow import FlowTerm, average
from derive.printer import code
from derive.symbols import (
    K,
    M,
    g,
    gp,
    gpp,
    lam,
    nu,
    student_index,
    student_sum,
    teacher_index,
    teacher_sum,
    zeta,
)

j = student_index("j")
k = student_index("k")
l_ = student_index("l")
m = teacher_index("m")
n = teacher_index("n")
v = sp.IndexedBase("v")
vs = sp.IndexedBase("vs")
sigma = sp.Symbol("sigma", real=True)

# canonical names, as the expander must produce them
j0, j1 = sp.Idx("j0", K), sp.Idx("j1", K)
m0, m1 = sp.Idx("m0", M), sp.Idx("m1", M)


def as_set(terms):
    return set(terms)


# ---------------------------------------------------------------------------
# expand


def test_square_of_readout_difference_gives_three_canonical_terms():
    f = student_sum(v[j] * g(lam[j]), j)
    y = teacher_sum(vs[m] * g(nu[m]), m)
    got = expand((f - y) ** 2)
    want = [
        RawTerm(v[j0] * v[j1], (j0, j1), (("g", lam[j0]), ("g", lam[j1])), 0),
        RawTerm(-2 * v[j0] * vs[m0], (j0, m0), (("g", lam[j0]), ("g", nu[m0])), 0),
        RawTerm(vs[m0] * vs[m1], (m0, m1), (("g", nu[m0]), ("g", nu[m1])), 0),
    ]
    assert got == want


def test_square_gets_two_independent_summation_indices():
    """(sum_j g(lambda_j))^2 is a double sum, not sum_j g(lambda_j)^2."""
    got = expand(student_sum(g(lam[j]), j) ** 2)
    assert got == [RawTerm(sp.S.One, (j0, j1), (("g", lam[j0]), ("g", lam[j1])), 0)]


def test_equal_terms_merge_across_index_names():
    """sum_j g(lam_j) + sum_l g(lam_l) is one term with coefficient 2."""
    got = expand(student_sum(g(lam[j]), j) + student_sum(g(lam[l_]), l_))
    assert got == [RawTerm(sp.Integer(2), (j0,), (("g", lam[j0]),), 0)]


def test_cancelling_terms_drop():
    got = expand(student_sum(v[j] * g(lam[j]), j) - student_sum(v[l_] * g(lam[l_]), l_))
    assert got == []


def test_kronecker_delta_from_derivative_collapses_sum():
    e = sp.diff(student_sum(v[j] * g(lam[j]), j), lam[k])
    assert e.has(sp.KroneckerDelta), "precondition: sympy leaves a delta inside the sum"
    assert expand(e) == [RawTerm(v[k], (), (("gp", lam[k]),), 0)]


def test_second_derivative_two_deltas_leave_one_between_free_indices():
    """d^2/dlam_k dlam_l of (sum_j v_j g(lam_j))^2 / 2: one delta collapses the
    sum, the other is a delta between the free indices k and l and stays."""
    e = sp.diff(student_sum(v[j] * g(lam[j]), j) ** 2 / 2, lam[k], lam[l_])
    got = as_set(expand(e))
    want = {
        RawTerm(v[k] * v[l_], (), (("gp", lam[k]), ("gp", lam[l_])), 0),
        RawTerm(sp.KroneckerDelta(k, l_) * v[j0] * v[k], (j0,), (("gpp", lam[k]), ("g", lam[j0])), 0),
    }
    assert got == want


def test_factor_order_and_teacher_field():
    """Factors sort as g', id, g; the teacher sum gets m0."""
    e = teacher_sum(g(nu[m]) * nu[n] * gp(lam[k]), m)
    assert expand(e) == [RawTerm(sp.S.One, (m0,), (("gp", lam[k]), ("id", nu[n]), ("g", nu[m0])), 0)]


def test_noise_powers_are_kept():
    e = (g(lam[k]) - sigma * zeta) ** 2
    got = as_set(expand(e))
    want = {
        RawTerm(sp.S.One, (), (("g", lam[k]), ("g", lam[k])), 0),
        RawTerm(-2 * sigma, (), (("g", lam[k]),), 1),
        RawTerm(sigma**2, (), (), 2),
    }
    assert got == want


def test_expand_rejects_non_polynomial_field():
    with pytest.raises(ValueError, match="cannot expand"):
        expand(sp.exp(lam[k]))


def test_expand_rejects_activation_of_non_field():
    with pytest.raises(ValueError, match="only to a field"):
        expand(g(2 * lam[k]))


# ---------------------------------------------------------------------------
# average (noise moments and primitives)


def test_average_noise_square_and_first_power():
    """E over zeta: the zeta^1 term vanishes, zeta^2 -> 1; E over the field: I2."""
    used: dict = {}
    got = as_set(average(expand((g(lam[k]) - sigma * zeta) ** 2), "erf", used))
    want = {
        FlowTerm(sp.S.One, (), "I2", (lam[k], lam[k])),
        FlowTerm(sigma**2, (), None, ()),
    }
    assert got == want
    assert set(used) == {"I2"}


def test_average_noise_with_gprime_factors_is_J2():
    used: dict = {}
    got = average(expand(sigma**2 * zeta**2 * gp(lam[k]) * gp(lam[l_])), "erf", used)
    assert as_set(got) == {FlowTerm(sigma**2, (), "J2", (lam[k], lam[l_]))}
    assert set(used) == {"J2"}


def test_average_constant_primitive_folds_into_coefficient():
    """For the linear activation J2 = 1: no primitive call is left."""
    used: dict = {}
    got = average(expand(sigma**2 * zeta**2 * gp(lam[k]) * gp(lam[l_])), "linear", used)
    assert as_set(got) == {FlowTerm(sigma**2, (), None, ())}
    assert used == {}


def test_average_fourth_noise_moment():
    got = average(expand(zeta**4 + zeta**3 + zeta), "erf", {})
    assert as_set(got) == {FlowTerm(sp.Integer(3), (), None, ())}


def test_average_drops_odd_expectations():
    e = student_sum(v[j] * g(lam[j]), j) * gp(lam[k])  # E[g'(u_a) g(u_b)] = 0
    assert average(expand(e), "erf", {}) == ()


def test_average_I3_with_teacher_field():
    e = gp(lam[k]) * nu[n] * teacher_sum(vs[m] * g(nu[m]), m)
    got = average(expand(e), "erf", {})
    assert as_set(got) == {FlowTerm(vs[m0], (m0,), "I3", (lam[k], nu[n], nu[m0]))}


# ---------------------------------------------------------------------------
# printer


@pytest.mark.parametrize(
    "expr, text",
    [
        (lam[k], "lam[k]"),
        (nu[m], "nu[m]"),
        (v[k] * vs[m], "v[k]*vs[m]"),
        (sp.Function("I2")(lam[k], nu[m]), "I2(C, k, K + m)"),
        (sp.Function("I3")(lam[k], nu[n], lam[j0]), "I3(C, k, K + n, j0)"),
        (sp.Function("I4")(lam[k], lam[l_], nu[m0], nu[m1]), "I4(C, k, l, K + m0, K + m1)"),
        (sp.Function("J2")(lam[k], lam[l_]), "J2(C, k, l)"),
        (sp.KroneckerDelta(k, l_), "(1.0 if k == l else 0.0)"),
        (gp(lam[k]), "gp(lam[k])"),
        (g(nu[m0]), "g(nu[m0])"),
        (gpp(lam[j0]), "gpp(lam[j0])"),
        (sp.Rational(1, 2) * v[k], "(1.0/2.0)*v[k]"),
        (sp.Symbol("x") ** sp.Rational(3, 2), "x**(3.0/2.0)"),
        # the module's vectorisable arcsine (derive/special.py), not libm's
        (sp.asin(sp.Symbol("x")), "asin_(x)"),
    ],
)
def test_printer_golden(expr, text):
    # the rows of two_layer's layout: students first, then teachers
    assert code(expr, field_rows={lam: "", nu: "K + "}) == text


def test_printer_reads_tilted_primitives_from_the_table():
    from derive.printer import TILTED
    from derive.symbols import nu_task

    rows = {lam: "", nu_task: "K + "}
    e = sp.Function("I2" + TILTED)(lam[k], nu_task[m])
    assert code(e, (), rows) == "F[k, K + m]"
    # without a table the kernel calls the closed form; a tilted primitive has no meaning
    with pytest.raises(ValueError, match="needs its table"):
        code(e)
    with pytest.raises(ValueError, match="not a field"):
        code(sp.Function("I2" + TILTED)(lam[k], nu[m]), (), rows)


def test_printer_primitive_argument_must_be_field():
    with pytest.raises(ValueError, match="not a field"):
        code(sp.Function("I2")(lam[k], v[k]))


def test_printer_extra_primitive_name():
    rows = {lam: "", nu: "K + "}
    assert code(sp.Function("E_gp")(nu[m]), primitive_names=("E_gp",), field_rows=rows) == "E_gp(C, K + m)"
