"""The task program's regrouping for speed (derive/meta.py ``hoist_partial_sums``): the
sums a term does not need at every value of its component's indices are computed
first, into arrays over fewer indices, and the primitives it sums are tabulated over
their own indices. A program and its regrouped form are run here by a small
interpreter of the program's statements (sympy terms evaluated entry by entry, the
primitives replaced by arbitrary functions of their arguments): they must give the
same arrays, and the regrouping must have happened."""

from __future__ import annotations

import itertools
import math

import numpy as np
import sympy as sp

from derive import meta
from derive.flow import Component, FlowTerm
from derive.symbols import K, M, lam, student_index, teacher_index

SIZES = {K: 3, M: 2}
j, k, jj, l_, j0 = (student_index(x) for x in ("j", "k", "jj_", "l", "j0"))
m0, m1, r = teacher_index("m0"), teacher_index("m1"), teacher_index("r_")
nu = sp.IndexedBase("nu")  # a second family of fields, as the task's teacher fields
Lc, mu, cm, A = (sp.IndexedBase(x) for x in ("L_c", "mu_c", "mu_v", "A"))

PRIMITIVES = {
    "P4": lambda a, b, c, d: math.sin(a + 2 * b + 3 * c + 5 * d) + a * d,
    "P2": lambda a, b: math.cos(a - 3 * b) + a * b,
}


def size(i) -> int:
    return int((i.upper + 1).subs(SIZES))


def value(expr, at: dict, env: dict) -> float:
    """``expr`` at the index values ``at``, arrays read from ``env``."""
    e = sp.sympify(expr).xreplace(at)
    e = e.replace(
        lambda x: isinstance(x, sp.Indexed), lambda x: env[str(x.base)][tuple(int(i) for i in x.indices)]
    )
    return float(e)


def term_value(t: FlowTerm, at: dict, env: dict) -> float:
    total = 0.0
    for vals in itertools.product(*[range(size(s)) for s in t.sums]):
        here = {**at, **dict(zip(t.sums, vals))}
        x = value(t.coeff, here, env)
        if t.primitive is not None:
            x *= PRIMITIVES[t.primitive](*[value(a, here, env) for a in t.args])
        total += x
    return total


def run(stmts, env: dict) -> dict:
    for st in stmts:
        if isinstance(st, meta.Alloc):
            dims = [sp.sympify(d).subs({str(x): n for x, n in SIZES.items()}) for d in st.dims]
            env[st.name] = np.zeros([int(d) for d in dims])
        elif isinstance(st, meta.Assign):
            comp = st.component
            for vals in itertools.product(*[range(size(i)) for i in comp.free]):
                at = dict(zip(comp.free, vals))
                env[st.out][vals] = sum(term_value(t, at, env) for t in comp.terms)
        elif isinstance(st, meta.Guard):
            run(st.body, env)
        else:  # pragma: no cover
            raise TypeError(st)
    return env


def program():
    """One component over (j, k, jj, l, r) with the kinds of terms of the order-2
    support square (derive/meta.py ``_support_square``), inside a guard."""
    free = (j, k, jj, l_, r)
    P4 = "P4"
    terms = (
        # a Kronecker delta times a sum that needs neither k nor the delta's pairing
        FlowTerm(
            sp.KroneckerDelta(j, k) * Lc[l_, r] * Lc[j0, r], (j0,), P4, (lam[j], lam[l_], lam[j0], lam[jj])
        ),
        # a primitive of four of the five indices, no sum
        FlowTerm(Lc[k, r] * mu[l_], (), P4, (lam[k], lam[l_], lam[j], lam[jj])),
        # a sum that reads every index: kept, its primitive tabulated over (jj, j0)
        FlowTerm(Lc[j0, r] * A[k, j0] * A[l_, j0] * A[j, j0], (j0,), "P2", (lam[j0], lam[jj])),
        # one whose factors free of its sum stay outside: the sum needs (jj, r) only
        FlowTerm(Lc[j0, r] * mu[k] * mu[l_] * mu[j], (j0,), "P2", (lam[j0], lam[jj])),
        # a symmetric double sum over a second family
        FlowTerm(cm[m0] * cm[m1] * Lc[k, r], (m0, m1), P4, (lam[j], lam[jj], nu[m0], nu[m1])),
        # no sum, no primitive: kept as it is
        FlowTerm(mu[j] * mu[k] * mu[jj] * Lc[l_, r], (), None, ()),
    )
    comp = Component("X_", free, terms)
    target = ("j", "k", "jj_", "l", "r_")
    body = (meta.Alloc("X_", ("K", "K", "K", "K", "M")), meta.Assign(comp, "X_", target))
    return (meta.Guard("True", body),)


def inputs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "lambda": rng.normal(size=3),
        "nu": rng.normal(size=2),
        "L_c": rng.normal(size=(3, 2)),
        "mu_c": rng.normal(size=3),
        "mu_v": rng.normal(size=2),
        "A": rng.normal(size=(3, 3)),
    }


def test_regrouped_program_computes_the_same_arrays():
    plain = program()
    hoisted = meta.hoist_partial_sums(plain)
    want = run(plain, inputs(0))["X_"]
    got = run(hoisted, inputs(0))["X_"]
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # it regrouped: arrays over fewer indices, and the main component's sums gone
    # except that of the term that reads every index
    (guard,) = hoisted
    names = [st.name for st in guard.body if isinstance(st, meta.Alloc)]
    assert sum(n.startswith("part") for n in names) >= 4, names
    assert sum(n.startswith("tab") for n in names) >= 3, names
    main = [st for st in guard.body if isinstance(st, meta.Assign) and st.out == "X_"][0]
    summed = [t for t in main.component.terms if t.sums]
    assert len(summed) == 1 and summed[0].primitive is None


def test_regrouping_leaves_a_program_without_partial_sums_alone():
    free = (j, k)
    comp = Component("Y_", free, (FlowTerm(mu[j] * mu[k] * mu[j0], (j0,), "P2", (lam[j], lam[k])),))
    stmts = (meta.Alloc("Y_", ("K", "K")), meta.Assign(comp, "Y_", ("j", "k")))
    assert meta.hoist_partial_sums(stmts) == stmts


def test_a_partial_sum_is_shared_until_what_it_reads_is_written():
    """Two components with the same partial sum share one array, unless a statement
    between them writes an array that the sum reads (then it is computed again)."""
    free = (j, k, r)
    term = FlowTerm(sp.KroneckerDelta(j, k) * Lc[j0, r], (j0,), "P2", (lam[j], lam[j0]))

    def assign(name):
        return meta.Assign(Component(name, free, (term,)), name, ("j", "k", "r_"))

    twice = Component("L_c", (j, r), (FlowTerm(2 * Lc[j, r], (), None, ()),))
    double = meta.Assign(twice, "L_c", ("j", "r_"))
    allocs = (meta.Alloc("X_", ("K", "K", "M")), meta.Alloc("Y_", ("K", "K", "M")))
    for between, arrays in (((), 1), ((double,), 2)):
        plain = (*allocs, assign("X_"), *between, assign("Y_"))
        hoisted = meta.hoist_partial_sums(plain)
        parts = [st for st in hoisted if isinstance(st, meta.Alloc) and st.name.startswith("part")]
        assert len(parts) == arrays
        want, got = run(plain, inputs(1)), run(hoisted, inputs(1))
        for name in ("X_", "Y_"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)
        assert np.abs(want["Y_"]).max() > 0.1


def _reads(stmts) -> set:
    """The arrays that the components of ``stmts`` read (their terms' coefficients and
    primitive arguments), in guards too."""
    out = set()
    for st in stmts:
        if isinstance(st, meta.Guard):
            out |= _reads(st.body)
        elif isinstance(st, meta.Assign):
            for t in st.component.terms:
                for e in (t.coeff, *t.args):
                    out |= {str(x.base) for x in sp.sympify(e).atoms(sp.Indexed)}
    return out


def test_every_array_the_regrouping_adds_is_read():
    """A table or partial sum is computed only to be read: a component whose terms get
    a table but no partial sum reads the table too (the two I2 tables and three G4
    tables of the query's E[b] and E[b b^T] were once computed and left unread)."""
    free = (j, r)
    comp = Component("Z_", free, (FlowTerm(Lc[j0, r] * mu[j0], (j0,), "P2", (lam[j0], lam[j])),))
    stmts = (meta.Alloc("Z_", ("K", "M")), meta.Assign(comp, "Z_", ("j", "r_")))
    for plain in (program(), stmts):
        hoisted = meta.hoist_partial_sums(plain)
        body = hoisted[0].body if isinstance(hoisted[0], meta.Guard) else hoisted
        added = {st.name for st in body if isinstance(st, meta.Alloc)} - {"X_", "Z_"}
        assert added and added <= _reads(hoisted), added - _reads(hoisted)
        want, got = run(plain, inputs(2)), run(hoisted, inputs(2))
        name = "X_" if plain is not stmts else "Z_"
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_a_primitive_that_a_table_serves_is_not_tabulated_again():
    """After a ``Table`` of a primitive, the kernel reads that table in place of the
    primitive's calls: the regrouping adds no table of its own for it."""
    free = (j, r)
    comp = Component("Z_", free, (FlowTerm(Lc[j0, r] * mu[j0], (j0,), "P2", (lam[j0], lam[j])),))
    stmts = (
        meta.Alloc("Z_", ("K", "M")),
        meta.Table("P2t_", "P2", (lam,)),
        meta.Assign(comp, "Z_", ("j", "r_")),
    )
    assert meta.hoist_partial_sums(stmts) == stmts
