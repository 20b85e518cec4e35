"""Stage 3b: the meta-learner's task program, derived from the model file (docs/models/anil.md 5.1-5.4).

A model with an inner loop declares (derive/model.py):

- its task draws (``TaskNoise``: a standard normal vector ``xi`` per task) and
  the law of each task vector as an expression in them, affine (the task
  readout ``v_task = vbar + s xi`` of anil);
- the inner loop (``InnerLoop``): a per-sample support loss of the adapted
  readout ``c`` (its expectation over the fields is the population support
  loss), a deterministic regulariser, the start ``c^(0)``, the steps and the
  rate of gradient descent, the readout that minimises the support loss, and the
  weight of the second-order terms (which need the sensitivities of ``c^(S)``).

Every task quantity ``X`` is then affine in the draws, ``X = mu_X + L_X xi``; the
flow needs only the means ``mu_X`` and loadings ``L_X`` (and the covariances
``S_X__Y = L_X L_Y^T``, by Isserlis' theorem in derive/flow.py). This module
derives the program that computes them, as components (sympy terms that the code
generator turns into loop nests) and control flow:

1. the task law: ``mu_X = law(xi = 0)``, ``L_X[., r] = d law / d xi_r``;
2. the support gradient, derived from the support loss and checked linear,
   ``grad_c = Hs c - h``: the Hessian ``Hs`` (fields' expectations) and the force
   ``h``, whose mean and loading follow from the task law (``h`` is affine in the
   task vectors);
3. the recursion ``c^(s+1) = c^(s) - rate grad_c(c^(s))``, on the means and on
   the loadings;
4. the best readout, the minimiser ``Hs^+ h`` of the support loss;
5. the forward sensitivities of ``c^(S)`` along each overlap ``Q_ab`` (a <= b,
   one symmetric variable), ``R_am`` and each entry of the start ``a``: the
   recursion differentiated (``dHs``, ``dh`` are the directional derivatives of
   the primitives along the covariance perturbation ``dC``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

import sympy as sp

from .expand import expand
from .symbols import STUDENT, K, M, finite, lam, rename_bound, student_index

EPS = sp.Symbol("epsilon")


@dataclass(frozen=True)
class Alloc:
    """``name = np.zeros(dims)``; with ``only_if``, zero-length when the condition
    does not hold (every read of the array is under the same condition)."""

    name: str
    dims: tuple[str, ...]
    only_if: str | None = None


@dataclass(frozen=True)
class Let:
    """``target = source``: a view or a call that derive writes (never a formula of
    the template's own)."""

    target: str
    source: str


@dataclass(frozen=True)
class Assign:
    """``out[target] = sum of the component's terms`` for every value of its free indices."""

    component: object  # derive.flow.Component
    out: str
    target: tuple[str, ...]


@dataclass(frozen=True)
class Repeat:
    """``for var in range(count): body``."""

    var: str
    count: sp.Expr
    body: tuple


@dataclass(frozen=True)
class Guard:
    """``if cond: body``."""

    cond: sp.Expr | str
    body: tuple


@dataclass(frozen=True)
class Directions:
    """The body once per direction of ``kind``: ``Q`` (pairs a_ <= b_ of student
    units), ``R`` (a student unit a_ and a teacher unit b_) with the covariance
    perturbation ``dC`` set to the entries where that overlap sits, ``QR`` (those
    of Q, then those of R, in one loop: ``kind_`` is 0 for Q, 1 for R), or
    ``start`` (a student unit a_, the entry of the inner loop's start)."""

    kind: str
    body: tuple


@dataclass(frozen=True)
class Outlined:
    """``body`` as a function of its own (``name``), called where it stands through
    numba's object mode: it is compiled when it first runs, so that a kernel whose
    runs never reach it (population support sets, first order) never compiles it.
    Its arguments are the names the body reads from the program around it (found
    by codegen in the rendered body)."""

    name: str
    body: tuple


@dataclass(frozen=True)
class Table:
    """``name[k, l, p, q] = primitive(k, l, p, q)`` for every pair of student units k, l
    and every pair of rows p, q of the fields ``families`` (the primitive is symmetric
    in its arguments): filled once, where the kernel can, by its table of the
    primitive (G4: ``G4_table``, one Price path per pair k <= l, mirrored), and read
    in place of calls by the components after it; otherwise the calls stay."""

    name: str
    primitive: str
    families: tuple


@dataclass(frozen=True)
class TaskProgram:
    families: tuple  # TaskVector, in the order of the returned (mu, L) pairs
    statements: tuple


def hoist_partial_sums(stmts, counter=None, tabled=()) -> tuple:
    """``stmts`` with the costly part of each term of an ``Assign`` computed first when
    it reads only some of the component's free indices. A term is ``outer * inner``:
    ``inner`` its primitive and the factors that depend on its summation indices,
    summed; ``outer`` the rest (Kronecker deltas, task quantities at a free index).
    When ``inner`` reads fewer free indices than the component has, it goes into an
    array over those (``part<n>_``, the inners of one ``outer`` and index set summed),
    and the term reads it: ``delta(j, k) sum_j0 I4(j, l, j0, jj) c[j0]`` costs K^4
    primitive calls, not K^5, and an ``I4(k, l, j, jj)`` in a component over six
    indices is computed once per value of its own four. Before that, a primitive
    summed in a term that reads more indices than the primitive does is tabulated over
    its own (``tab<n>_``): ``sum_{j0, m0} I4(j, jj, j0, m0) L[j0, r] L[m0, r2]`` over
    ``(j, jj, r, r2)`` calls I4 K^3 M times, not K^3 M^3. A primitive that a ``Table``
    before the statement (in its body or an enclosing one) serves is not tabulated
    again: the kernel reads that table (``tabled``, the primitives of those tables).
    The terms are the derivation's, regrouped; each value is unchanged up to the order
    of additions."""
    from .flow import Component, FlowTerm

    counter = counter if counter is not None else itertools.count()
    tabled = set(tabled)
    out, cache = [], {}  # cache: (free, terms) -> (the array's read, the arrays it reads)

    def array(prefix, free, terms):
        """The read of an array over ``free`` holding the sum of ``terms``: one computed
        before in this body when no statement since wrote what it reads, else a new one."""
        key = (free, tuple(terms))
        if key not in cache:
            name = f"{prefix}{next(counter)}_"
            out.extend([
                Alloc(name, tuple(str(i.upper + 1) for i in free)),
                Assign(Component(name, free, tuple(terms)), name, tuple(str(i.label) for i in free)),
            ])
            reads = {str(x.base) for t in terms for x in sp.sympify(t.coeff).atoms(sp.Indexed)}
            cache[key] = (sp.IndexedBase(name)[free], reads)
        return cache[key][0]

    for st in stmts:
        if isinstance(st, (Repeat, Guard, Directions, Outlined)):
            out.append(replace(st, body=hoist_partial_sums(st.body, counter, tabled)))
            cache.clear()  # it may write anything
            continue
        if isinstance(st, Table):
            tabled.add(st.primitive)
        if not isinstance(st, Assign):
            out.append(st)
            cache = {k: v for k, v in cache.items() if st.name not in v[1]} if isinstance(st, Alloc) else {}
            continue
        comp, groups, kept, tabulated = st.component, {}, [], False
        for t in comp.terms:
            if isinstance(t, FlowTerm) and t.primitive and t.sums and t.primitive not in tabled:
                # a primitive in a sum (one free of it is multiplied after the sum) that
                # reads fewer of the nest's indices than its term: tabulated over its own
                nest = (*comp.free, *t.sums)
                own = tuple(i for i in nest if any(a.has(i) for a in t.args))
                reads = sum(1 for i in nest if t.coeff.has(i) or any(a.has(i) for a in t.args))
                if set(own) & set(t.sums) and len(own) < reads:
                    table = array("tab", own, [FlowTerm(sp.S.One, (), t.primitive, t.args)])
                    t, tabulated = FlowTerm(t.coeff * table, t.sums, None, ()), True
            if not isinstance(t, FlowTerm) or not (t.sums or t.primitive):
                kept.append(t)
                continue
            factors = sp.Mul.make_args(sp.sympify(t.coeff))
            inner = [f for f in factors if any(f.has(i) for i in t.sums)]
            outer = sp.Mul(*[f for f in factors if not any(f.has(i) for i in t.sums)])
            reads = [*inner, *t.args]
            used = tuple(i for i in comp.free if any(f.has(i) for f in reads))
            own_output = any(str(x.base) == st.out for f in inner for x in f.atoms(sp.Indexed))
            if not used or len(used) == len(comp.free) or own_output:
                kept.append(t)
                continue
            groups.setdefault((used, outer), []).append(FlowTerm(sp.Mul(*inner), t.sums, t.primitive, t.args))
        for (used, outer), terms in groups.items():
            kept.append(FlowTerm(outer * array("part", used, terms), (), None, ()))
        if groups or tabulated:
            st = Assign(Component(comp.name, comp.free, tuple(kept), comp.symmetric), st.out, st.target)
        out.append(st)
        cache = {k: v for k, v in cache.items() if st.out not in v[1]}
    return tuple(out)


def _replace_base(expr: sp.Expr, base, make) -> sp.Expr:
    """Every ``base[idx]`` in ``expr`` replaced by ``make(idx)`` (inside sums too)."""
    return expr.replace(
        lambda e: isinstance(e, sp.Indexed) and e.base == base,
        lambda e: make(e.indices),
    )


def _count(expr: sp.Expr, bases) -> int:
    """How many factors of ``expr`` (a product) are entries of ``bases``."""
    n = 0
    for f in sp.Mul.make_args(expr):
        b, e = f.as_base_exp()
        if isinstance(b, sp.Indexed) and b.base in bases:
            n += int(e)
    return n


def _affine_terms(expr: sp.Expr, bases, what: str):
    """The expanded terms of ``expr``, checked to hold at most one entry of ``bases``."""
    raw = expand(expr)
    for t in raw:
        if _count(t.coeff, bases) > 1:
            raise ValueError(f"{what} is not affine in {', '.join(str(b) for b in bases)}: {t.as_expr()}")
    return raw


def mean_base(name: str) -> sp.IndexedBase:
    return sp.IndexedBase(f"mu_{name}")


def loading_base(name: str) -> sp.IndexedBase:
    return sp.IndexedBase(f"L_{name}")


def _dims(kinds) -> tuple[str, ...]:
    return tuple("K" if k == STUDENT else "M" for k in kinds)


def _idx(kinds, first: int = 0) -> tuple[sp.Idx, ...]:
    return tuple(sp.Idx(f"i{first + n}", K if kd == STUDENT else M) for n, kd in enumerate(kinds))


# The best readout is the minimiser of a quadratic support loss, Hs^+ h: numpy's
# Moore-Penrose pseudo-inverse (the minimum-norm minimiser where Hs is singular).
BEST_READOUT = "np.linalg.pinv({})"


def task_program(model, activation: str, used: dict) -> TaskProgram:
    """The program that computes the mean and loading of every task quantity of
    ``model`` (see the module doc); ``used`` collects the primitives it calls."""
    from .flow import Component, _directional, average
    from .printer import code

    inner = model.inner_loop
    noise = inner.noise
    r = sp.Idx("r_", K if noise.kind == STUDENT else M)
    nr = _dims((noise.kind,))[0]
    k, l_, j = student_index("k"), student_index("l"), student_index("j")
    laws = [tv for tv in model.task_vectors if tv.law is not None]
    random = [tv.base for tv in laws]
    stmts: list = []

    def comp(name, free, expr):
        """A component from a sympy expression: expanded, averaged over the fields
        (population expectations become primitives), deterministic otherwise."""
        return Component(name, tuple(free), average(expand(sp.sympify(expr)), activation, used))

    def assign(c, out=None, target=None):
        return Assign(c, out or c.name, tuple(target or [str(i.label) for i in c.free]))

    # 1. the task law: mu_X = law at xi = 0, L_X[., r] = d law / d xi_r
    for tv in laws:
        idx = _idx(tv.kinds)
        law = sp.sympify(tv.law(*idx))
        if not law.has(noise.base):
            raise ValueError(f"the law of task vector {tv.name} draws nothing from {noise.name}")
        _affine_terms(law, [noise.base], f"the law of {tv.name}")
        mu = _replace_base(law, noise.base, lambda ix: sp.S.Zero)
        load = _replace_base(sp.expand(law - mu), noise.base, lambda ix: sp.KroneckerDelta(ix[0], r))
        stmts += [
            Alloc(f"mu_{tv.name}", _dims(tv.kinds)),
            Alloc(f"L_{tv.name}", _dims(tv.kinds) + (nr,)),
            assign(comp(f"mu_{tv.name}", idx, mu)),
            assign(comp(f"L_{tv.name}", idx + (r,), load)),
        ]

    # 2. the support gradient grad_c = Hs c - h, derived and checked linear in c
    c = sp.IndexedBase("c")
    loss = rename_bound(inner.loss(c) + inner.regulariser(c))
    grad = sp.diff(loss, c[k])
    _affine_terms(grad, [c], "the support gradient")
    Hexpr = sp.diff(grad, c[l_])
    if any(_count(t.coeff, [c, *random]) for t in expand(Hexpr)):
        raise ValueError(f"the support Hessian of {model.name} depends on the readout or the task")
    hexpr = -_replace_base(grad, c, lambda ix: sp.S.Zero)
    _affine_terms(hexpr, random, "the support force h")

    def mean_of(e):
        for tv in laws:
            e = _replace_base(e, tv.base, lambda ix, n=tv.name: mean_base(n)[ix])
        return e

    def loading_of(e):
        """The part of ``e`` linear in the task vectors, each replaced by its loading."""
        zero = e
        for tv in laws:
            zero = _replace_base(zero, tv.base, lambda ix: sp.S.Zero)
        lin = e - zero
        for tv in laws:
            lin = _replace_base(lin, tv.base, lambda ix, n=tv.name: loading_base(n)[ix + (r,)])
        return lin

    # h = h0 + sum_X J_X X: the part free of the task vectors and the Jacobian in
    # each (its primitives evaluated once per entry, not once per draw); then
    # mu_h = h0 + J mu_X and L_h = J L_X are contractions
    h0 = hexpr
    for tv in laws:
        h0 = _replace_base(h0, tv.base, lambda ix: sp.S.Zero)
    jacobians = [(tv, _idx(tv.kinds), f"H_{tv.name}") for tv in laws]

    def contract(first, jac_prefix, loading):
        """``first[k] + sum_X J_X[k, ix] mu_X[ix]`` (means) or ``sum_X J_X[k, ix] L_X[ix, r]``."""
        e = sp.S.Zero if loading else sp.IndexedBase(first)[k]
        for tv, ix, name in jacobians:
            J = sp.IndexedBase(jac_prefix + name[2:])[(k, *ix)]
            X = loading_base(tv.name)[ix + (r,)] if loading else mean_base(tv.name)[ix]
            e += sp.Sum(J * X, *[(i, 0, i.upper) for i in ix])
        return e

    Hs = comp("H_s", (k, l_), Hexpr)
    H0 = comp("mu_h0", (k,), h0)
    jac = [comp(name, (k, *ix), sp.diff(hexpr, tv.base[ix])) for tv, ix, name in jacobians]
    stmts += [
        Alloc("H_s", ("K", "K")),
        Alloc("mu_h0", ("K",)),
        Alloc("mu_h", ("K",)),
        Alloc("L_h", ("K", nr)),
    ]
    stmts += [Alloc(name, ("K", *_dims(tv.kinds))) for tv, _, name in jacobians]
    stmts += [assign(Hs), assign(H0), *[assign(J) for J in jac]]
    stmts += [
        assign(comp("mu_h", (k,), contract("mu_h0", "H_", False))),
        assign(comp("L_h", (k, r), contract(None, "H_", True))),
    ]

    # 3. the recursion c^(s+1) = c^(s) - rate (Hs c^(s) - h), on means and loadings
    s = sp.Symbol("s_", integer=True)
    steps = sp.Symbol("steps_", integer=True)
    cb, Hb, hb = sp.IndexedBase("c"), sp.IndexedBase("H_s"), sp.IndexedBase("h")
    step = cb[k] - inner.rate * (sp.Sum(Hb[k, l_] * cb[l_], (l_, 0, K - 1)) - hb[k])
    mu_c, L_c = sp.IndexedBase("mu_c"), sp.IndexedBase("L_c")

    def on_means(e):
        e = _replace_base(e, cb, lambda ix: mu_c[(s,) + ix])
        return _replace_base(e, hb, lambda ix: sp.IndexedBase("mu_h")[ix])

    def on_loadings(e):
        e = _replace_base(e, cb, lambda ix: L_c[(s,) + ix + (r,)])
        return _replace_base(e, hb, lambda ix: sp.IndexedBase("L_h")[ix + (r,)])

    start = inner.start.base[k]
    adapted = inner.adapted.name
    stmts += [
        Let("steps_", f"int(round({code(inner.steps)}))"),
        Alloc("mu_c", ("steps_ + 1", "K")),
        Alloc("L_c", ("steps_ + 1", "K", nr)),
        assign(comp("mu_c", (k,), start), "mu_c", ("0", "k")),
        Repeat(
            "s_",
            steps,
            (
                assign(comp("mu_c", (k,), on_means(step)), "mu_c", ("s_ + 1", "k")),
                assign(comp("L_c", (k, r), on_loadings(step)), "L_c", ("s_ + 1", "k", "r_")),
            ),
        ),
        Let(f"mu_{adapted}", "mu_c[steps_]"),
        Let(f"L_{adapted}", "L_c[steps_]"),
    ]
    fams = [*laws, inner.adapted]

    # 4. the best readout for the task, the minimiser of the support loss without
    # its regulariser: a* = Hs^+ h
    if inner.optimal is not None:
        opt = inner.optimal.name
        Ho, mu_ho, L_ho = "H_s", "mu_h", "L_h"
        body: list = []
        if sp.sympify(inner.regulariser(c)) != 0:
            g0 = sp.diff(rename_bound(inner.loss(c)), c[k])
            h0 = -_replace_base(g0, c, lambda ix: sp.S.Zero)
            Ho, mu_ho, L_ho = "H_o", "mu_ho", "L_ho"
            body += [
                Alloc("H_o", ("K", "K")),
                Alloc("mu_ho", ("K",)),
                Alloc("L_ho", ("K", nr)),
                assign(comp("H_o", (k, l_), sp.diff(g0, c[l_]))),
                assign(comp("mu_ho", (k,), mean_of(h0))),
                assign(comp("L_ho", (k, r), loading_of(h0))),
            ]
        Hp = sp.IndexedBase("H_p")
        body += [
            Let("H_p", BEST_READOUT.format(Ho)),
            assign(comp(f"mu_{opt}", (k,), sp.Sum(Hp[k, l_] * sp.IndexedBase(mu_ho)[l_], (l_, 0, K - 1)))),
            assign(comp(f"L_{opt}", (k, r), sp.Sum(Hp[k, l_] * sp.IndexedBase(L_ho)[l_, r], (l_, 0, K - 1)))),
        ]
        stmts += [
            Alloc(f"mu_{opt}", ("K",)),
            Alloc(f"L_{opt}", ("K", nr)),
            Guard("with_optimal", tuple(body)),
        ]
        fams.append(inner.optimal)

    # 4b. finite support sets (docs/models/anil.md 5.6): the moments of the adapted
    # readout over the support set, added to the population ones when the support
    # size is finite
    support_body = ()
    if sp.sympify(inner.support) != sp.oo:
        sup, nonzero = _support_moments(inner, laws, comp, assign, step, steps, s, r, nr)
        stmts += sup + _support_excess(model, laws, comp, assign, steps, r, nonzero)
        name = inner.adapted.name
        outputs = {f"mu_{name}", f"L_{name}", SUPPORT_COV.format(name)}
        support_body = tuple(st for st in sup[-1].body if not (isinstance(st, Assign) and st.out in outputs))

    # 5. the forward sensitivities of c^(S), read by the second-order terms only:
    # the recursion differentiated along a direction (dc, dHs, dh)
    dcb, dHb, dhb = sp.IndexedBase("dc"), sp.IndexedBase("dH"), sp.IndexedBase("dh")
    pert = step
    for b, db in ((cb, dcb), (Hb, dHb), (hb, dhb)):
        pert = _replace_base(pert, b, lambda ix, b=b, db=db: b[ix] + EPS * db[ix])
    dstep = sp.diff(pert, EPS).subs(EPS, 0)
    mu_dc, L_dc = sp.IndexedBase("mu_dc"), sp.IndexedBase("L_dc")
    H_ds = sp.IndexedBase("H_ds")

    def d_on_means(e):
        e = _replace_base(on_means(e), dcb, lambda ix: mu_dc[(s,) + ix])
        e = _replace_base(e, dHb, lambda ix: H_ds[ix])
        return _replace_base(e, dhb, lambda ix: sp.IndexedBase("mu_dh")[ix])

    def d_on_loadings(e):
        # the loading of dH c is dH L_c (dH does not depend on the task)
        e = _replace_base(e, dcb, lambda ix: L_dc[(s,) + ix + (r,)])
        e = _replace_base(e, dHb, lambda ix: H_ds[ix])
        e = _replace_base(e, dhb, lambda ix: sp.IndexedBase("L_dh")[ix + (r,)])
        return on_loadings(e)

    def recursion(dstart):
        """The differentiated recursion along one direction, from dc^(0) = dstart."""
        return [
            assign(comp("mu_dc", (k,), dstart), "mu_dc", ("0", "k")),
            Repeat(
                "s_",
                steps,
                (
                    assign(comp("mu_dc", (k,), d_on_means(dstep)), "mu_dc", ("s_ + 1", "k")),
                    assign(comp("L_dc", (k, r), d_on_loadings(dstep)), "L_dc", ("s_ + 1", "k", "r_")),
                ),
            ),
        ]

    def last(name, target, loading=False):
        src = L_dc[steps, j, r] if loading else mu_dc[steps, j]
        return assign(comp(name, (j, r) if loading else (j,), src), name, target)

    dQ, dR, dS = inner.dQ.name, inner.dR.name, inner.da.name
    a_ = sp.Idx("a_", K)  # the entry of the start that a direction moves
    b_ = sp.Idx("b_", K)
    bm_ = sp.Idx("b_", M)
    i2 = student_index("i2_")
    # finite support sets (docs/models/anil.md 5.6, order 2): the gradient through the
    # support inputs. Moving w_k along a direction u moves every support field
    # lambda^mu_k by u . x^mu / sqrt(N), i.e. the support set's covariance as Q_kl, R_km
    # move; so E[sum_mu gamma^mu_k (u . x^mu)/sqrt(N)] is the derivative of the expected
    # query loss along that change of the support covariance alone. The query loss is
    # quadratic in a': its expectation reads the mean of a' over the support set (the
    # population iterate plus the mean shift mm) and its covariance V. The tangent of
    # the support block along each direction gives both: the mean shift's into the
    # sensitivity's mean and loading, half of V's into the sensitivity's support-set
    # covariance with a' (V_<adapted>_dQ ...; the query loss reads V through
    # tr(C V) / 2 = sum_jl C_jl Cov(a'_j, dV_jl / 2), covariance_component)
    fin_cov: list = [[], []]
    fin_tan: list = []
    fin_start: list = []
    fin_allocs: list = []
    if support_body:
        given = {"H_s": "H_ds", "mu_c": "mu_dc", "L_c": "L_dc"}
        al_c, st_c, vary_c = tangent(support_body, given, True, activation, used)
        al_s, st_s, vary_s = tangent(support_body, {"mu_c": "mu_dc", "L_c": "L_dc"}, False, activation, used)
        seen = set()
        for al in al_c + al_s:
            if al.name not in seen:
                seen.add(al.name)
                fin_allocs.append(al)
        mm_, mL_, Vs_ = (sp.IndexedBase(TANGENT.format(n)) for n in ("mmu_s", "mL_s", "V_s"))

        def outputs(kind, pairs):
            body = []
            for n, tgt in enumerate(pairs):
                if n:  # the mirror entry of a symmetric direction: a copy, not a second shift
                    first = pairs[0]
                    body += [
                        assign(comp(f"mu_{kind}", (j,), sp.IndexedBase(f"mu_{kind}")[(j, *first)]),
                               f"mu_{kind}", ("j", *[str(x) for x in tgt])),
                        assign(comp(f"L_{kind}", (j, r), sp.IndexedBase(f"L_{kind}")[(j, *first, r)]),
                               f"L_{kind}", ("j", *[str(x) for x in tgt], "r_")),
                        assign(comp(SUPPORT_COV.format(kind), (i2, j), Vs_[steps, i2, j] / 2),
                               SUPPORT_COV.format(kind), ("i2_", "j", *[str(x) for x in tgt])),
                    ]
                    continue
                body += [
                    assign(comp(f"mu_{kind}", (j,), sp.IndexedBase(f"mu_{kind}")[(j, *tgt)] + mm_[steps, j]),
                           f"mu_{kind}", ("j", *[str(x) for x in tgt])),
                    assign(comp(f"L_{kind}", (j, r),
                                sp.IndexedBase(f"L_{kind}")[(j, *tgt, r)] + mL_[steps, j, r]),
                           f"L_{kind}", ("j", *[str(x) for x in tgt], "r_")),
                    assign(comp(SUPPORT_COV.format(kind), (i2, j), Vs_[steps, i2, j] / 2),
                           SUPPORT_COV.format(kind), ("i2_", "j", *[str(x) for x in tgt])),
                ]
            return body

        fin_tan = [Guard(_finite_support(inner), tuple(st_c))]
        fin_cov = [outputs(dQ, [(a_, b_), (b_, a_)]), outputs(dR, [(a_, bm_)])]
        fin_start = [Guard(_finite_support(inner), tuple(st_s + outputs(dS, [(a_,)])))]
        gg_allocs, gg_body = _support_square(model, activation, used, steps, r, nr)
        fin_allocs += gg_allocs
        fin_cov = [[Guard(_finite_support(inner), tuple(out))] for out in fin_cov]
    along_cov = [
        assign(Component("H_ds", (k, l_), _directional(Hs.terms, activation, used))),
        assign(Component("mu_dh0", (k,), _directional(H0.terms, activation, used))),
        *[
            assign(Component("H_d" + J.name[2:], J.free, _directional(J.terms, activation, used)))
            for J in jac
        ],
        assign(comp("mu_dh", (k,), contract("mu_dh0", "H_d", False))),
        assign(comp("L_dh", (k, r), contract(None, "H_d", True))),
    ]
    along_start = [
        assign(comp("H_ds", (k, l_), sp.S.Zero)),
        assign(comp("mu_dh", (k,), sp.diff(mean_of(hexpr), inner.start.base[a_]))),
        assign(comp("L_dh", (k, r), sp.diff(loading_of(hexpr), inner.start.base[a_]))),
    ]
    def sensitivities(fin_allocs, fin_tan, fin_cov, fin_start):
        return _sensitivity_program(
            fin_allocs, fin_tan, fin_cov, fin_start, along_cov, along_start, recursion, last, jacobians,
            nr, dQ, dR, dS, start, inner, a_,
        )

    if support_body:
        # finite support sets: the same program with the support block's tangent and the
        # eta^2 term, outlined (compiled only when a run reaches it)
        full = sensitivities(fin_allocs, fin_tan, fin_cov, fin_start) + (
            Guard(_finite_support(inner), tuple(gg_body)),
        )
        second_body = (
            Guard(f"not ({_finite_support(inner)})", sensitivities([], [], [[], []], [])),
            Guard(_finite_support(inner), (Outlined("support_second_order_", hoist_partial_sums(full)),)),
        )
    else:
        second_body = sensitivities([], [], [[], []], [])
    stmts += [
        Let("n2_", f"K if ({code(inner.second_order)}) != 0 else 0"),
        Alloc(f"mu_{dQ}", ("K", "n2_", "n2_")),
        Alloc(f"L_{dQ}", ("K", "n2_", "n2_", nr)),
        Alloc(f"mu_{dR}", ("K", "n2_", "M")),
        Alloc(f"L_{dR}", ("K", "n2_", "M", nr)),
        Alloc(f"mu_{dS}", ("K", "n2_")),
        Alloc(f"L_{dS}", ("K", "n2_", nr)),
        *[
            Alloc(SUPPORT_COV.format(f.name), ("K", "K", *dims))
            for f, dims in _sensitivity_dims(inner)
            if support_body
        ],
        *([Alloc(support_square_name(inner), ("K", "K"))] if support_body else []),
        Guard(inner.second_order, second_body),
    ]
    fams += [inner.dQ, inner.dR, inner.da]
    return TaskProgram(tuple(fams), tuple(stmts))


def _sensitivity_program(
    fin_allocs, fin_tan, fin_cov, fin_start, along_cov, along_start, recursion, last, jacobians,
    nr, dQ, dR, dS, start, inner, a_,
) -> tuple:
    """The forward sensitivities of c^(S) along every direction of Q and R (one loop)
    and of the start, with the finite-support-set parts given (or empty)."""
    sens = (
        *fin_allocs,
        Alloc("H_ds", ("K", "K")),
        Alloc("mu_dh0", ("K",)),
        *[Alloc("H_d" + name[2:], ("K", *_dims(tv.kinds))) for tv, _, name in jacobians],
        Alloc("mu_dh", ("K",)),
        Alloc("L_dh", ("K", nr)),
        Alloc("mu_dc", ("steps_ + 1", "K")),
        Alloc("L_dc", ("steps_ + 1", "K", nr)),
        # one loop over the directions of Q (kind_ 0) and of R (kind_ 1): the
        # differentiated recursion and the support block's tangent rendered once
        Directions(
            "QR",
            tuple(
                along_cov
                + recursion(sp.S.Zero)
                + fin_tan
                + [
                    Guard(
                        "kind_ == 0",
                        (
                            last(f"mu_{dQ}", ("j", "a_", "b_")),
                            last(f"mu_{dQ}", ("j", "b_", "a_")),
                            last(f"L_{dQ}", ("j", "a_", "b_", "r_"), True),
                            last(f"L_{dQ}", ("j", "b_", "a_", "r_"), True),
                            *fin_cov[0],
                        ),
                    ),
                    Guard(
                        "kind_ == 1",
                        (
                            last(f"mu_{dR}", ("j", "a_", "b_")),
                            last(f"L_{dR}", ("j", "a_", "b_", "r_"), True),
                            *fin_cov[1],
                        ),
                    ),
                ]
            ),
        ),
        Directions(
            "start",
            tuple(
                along_start
                + recursion(sp.diff(start, inner.start.base[a_]))
                + [last(f"mu_{dS}", ("j", "a_")), last(f"L_{dS}", ("j", "a_", "r_"), True)]
                + fin_start
            ),
        ),
    )
    return sens


TANGENT = "D_{}"


def _assigned(stmts) -> list:
    """Every ``Assign`` of ``stmts``, in order, with the repeat variables around it."""
    out = []

    def walk(body, loops):
        for st in body:
            if isinstance(st, Assign):
                out.append((st, loops))
            elif isinstance(st, Repeat):
                walk(st.body, loops + (st.var,))
            elif isinstance(st, (Guard, Directions)):
                walk(st.body, loops)

    walk(stmts, ())
    return out


def _reads(component, names) -> bool:
    return any(
        str(x.base) in names for t in component.terms for x in sp.sympify(t.coeff).atoms(sp.Indexed)
    )


def tangent(stmts, varying: dict, along_cov: bool, activation: str, used: dict):
    """The forward-mode tangent of a task program's statements (derive/meta.py) along
    one direction: for every array ``X`` that the statements compute from the arrays
    of ``varying`` (``name -> its tangent's name``, given) or, ``along_cov``, from
    primitives of the covariance, an array ``D_X`` of the same shape with the
    directional derivative. A term ``coeff * P(args)`` gives ``dcoeff * P(args)`` (every
    varying entry ``X[i]`` of ``coeff`` moved to ``X[i] + eps D_X[i]``, sympy's
    derivative at eps = 0) plus ``coeff * P_dir(args)`` (``gaussian.directional``: the
    derivative along the perturbation ``dC`` of the covariance). A statement inside a
    repeat whose target does not move with the repeat (a scratch array, overwritten)
    is replayed before its tangent. Returns ``(allocations, statements, varying)``,
    ``varying`` extended by the computed arrays."""
    from .flow import Component, FlowTerm

    varying = dict(varying)
    # which arrays move: a fixed point over the program (a repeat feeds its own body)
    changed = True
    while changed:
        changed = False
        for st, _ in _assigned(stmts):
            if st.out in varying:
                continue
            comp = st.component
            if _reads(comp, varying) or (along_cov and any(t.primitive for t in comp.terms)):
                varying[st.out] = TANGENT.format(st.out)
                changed = True

    def d_component(comp, name):
        terms = []
        for t in comp.terms:
            coeff = sp.sympify(t.coeff)
            moved = coeff.replace(
                lambda e: isinstance(e, sp.Indexed) and str(e.base) in varying,
                lambda e: e + EPS * sp.IndexedBase(varying[str(e.base)])[e.indices],
            )
            dcoeff = sp.expand(sp.diff(moved, EPS).subs(EPS, 0))
            for part in sp.Add.make_args(dcoeff):
                if part != 0:
                    terms.append(FlowTerm(part, t.sums, t.primitive, t.args))
            if along_cov and t.primitive is not None:
                d = gaussian_directional(used[t.primitive])
                used[d.name] = d
                terms.append(FlowTerm(coeff, t.sums, d.name, t.args))
        return Component(name, comp.free, tuple(terms))

    allocs: list = []

    def walk(body, loops):
        out = []
        for st in body:
            if isinstance(st, Alloc):
                if st.name in varying and varying[st.name] == TANGENT.format(st.name):
                    allocs.append(Alloc(varying[st.name], st.dims, st.only_if))
            elif isinstance(st, Assign):
                if st.out not in varying or varying[st.out] != TANGENT.format(st.out):
                    continue
                names = {w for tgt in st.target for w in re.findall(r"[A-Za-z_]\w*", tgt)}
                if loops and not names & set(loops):
                    out.append(st)  # a scratch array: its primal value, then its tangent
                dname = varying[st.out]
                out.append(Assign(d_component(st.component, dname), dname, st.target))
            elif isinstance(st, Repeat):
                body_ = walk(st.body, loops + (st.var,))
                if body_:
                    out.append(Repeat(st.var, st.count, tuple(body_)))
            elif isinstance(st, Guard):
                body_ = walk(st.body, loops)
                if body_:
                    out.append(Guard(st.cond, tuple(body_)))
            elif isinstance(st, (Table, Let)):
                continue  # a table's primitive is differentiated where it is read
            else:  # pragma: no cover
                raise TypeError(f"tangent: unsupported statement {st!r}")
        return out

    return allocs, walk(stmts, ()), varying


def gaussian_directional(d):
    from .gaussian import directional

    return directional(d)


def support_square_name(inner) -> str:
    """``GG_<adapted>[k, l] = E[sum_mu gamma^mu_k gamma^mu_l]``, the second moment of the
    gradient along the support inputs (docs/models/anil.md 5.6, the ``eta^2`` term of
    ``dQ`` at second order), computed by the task program when the support set is finite."""
    return f"GG_{inner.adapted.name}"


def _quadratic_parts(terms, subs, r, r2):
    """The terms of a component whose coefficients are polynomials of degree <= 2 in
    task quantities, each ``X[i] = mu_X[i] + sum_r L_X[i, r] xi_r`` (``subs``: base ->
    ``(mean(i), loading(i, r))``), split by their degree in the task draws ``xi``:
    ``(E0, E1[r], E2[r, r2])`` with ``E = E0 + E1 . xi + xi^T E2 xi`` (``E2`` symmetric):
    the value at the means, the first and the halved mixed second derivatives along
    the loadings (sympy)."""
    from .flow import FlowTerm

    e1, e2 = sp.Symbol("epsilon_1"), sp.Symbol("epsilon_2")
    parts = ([], [], [])
    for t in terms:
        coeff = sp.sympify(t.coeff)
        moved = coeff.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base in subs,
            lambda e: subs[e.base][0](e.indices) + e1 * subs[e.base][1](e.indices, r)
            + e2 * subs[e.base][1](e.indices, r2),
        )
        for n, part in enumerate((
            moved.subs({e1: 0, e2: 0}),
            sp.diff(moved, e1).subs({e1: 0, e2: 0}),
            sp.diff(moved, e1, e2).subs({e1: 0, e2: 0}) / 2,
        )):
            for x in sp.Add.make_args(sp.expand(part)):
                if x != 0:
                    parts[n].append(FlowTerm(x, t.sums, t.primitive, t.args))
    return parts


def _support_square(model, activation, used, steps, r, nr):
    """``GG = E[sum_mu gamma^mu gamma^mu^T]`` to leading order in ``1/n_s`` (docs/models/anil.md
    5.6): ``gamma^mu_k = b . d a' / d lambda^mu_k``, ``b = dL_q / d a'`` averaged over the
    ``n_q`` query samples. With ``psi_jk(c; x) = d^2 l / dc_j dlambda_k`` (``l`` the
    per-sample support loss), ``d a' / d lambda^mu_k = -(1/n_s) sum_s Pi^s psi_k(c^s; x^mu)``
    (``Pi^s = P^(S-1-s) B``, the recursion's response, ``c^s`` the population iterates);
    the query and the support sample are independent given the task, so
    ``GG_kl = (1/n_s) sum_{s,t} E_task[sum_jj' BB^st_jj' PS^st_jk,j'l]`` with
    ``BB^st = Pi^s^T E_q[b b^T] Pi^t`` and ``PS^st_jk,j'l = E_x[psi_jk(c^s) psi_j'l(c^t)]``,
    ``E_q[b b^T] = E[b_1 b_1^T] / n_q + (1 - 1/n_q) E[b] E[b]^T``. Both factors are
    quadratic in the task draws (``_quadratic_parts``): their product's mean is
    ``(A0 + tr A2)(B0 + tr B2) + A1 . B1 + 2 tr(A2 B2)``, exact over the task."""
    from .flow import Component, average

    inner = model.inner_loop
    adapted = inner.adapted
    laws = [tv for tv in model.task_vectors if tv.law is not None]
    k, l_, j, j2 = (student_index(x) for x in ("k", "l", "j", "jj_"))
    i_, i2 = student_index("i_"), student_index("i2_")
    r2 = sp.Idx("r2_", r.upper + 1)
    s, t = sp.Symbol("s_", integer=True), sp.Symbol("t_", integer=True)
    c, c2 = sp.IndexedBase("c"), sp.IndexedBase("c2")
    nq = sp.sympify(model.first_layer.batch)
    inv_n = 1 / sp.sympify(inner.support)

    def law_subs():
        return {
            tv.base: (
                lambda ix, n=tv.name: mean_base(n)[ix],
                lambda ix, rr, n=tv.name: loading_base(n)[ix + (rr,)],
            )
            for tv in laws
        }

    def readout(at):
        return (
            lambda ix: sp.IndexedBase("mu_c")[(at,) + ix],
            lambda ix, rr: sp.IndexedBase("L_c")[(at,) + ix + (rr,)],
        )

    q_subs = {**law_subs(), adapted.base: (lambda ix: mean_base(adapted.name)[ix],
                                            lambda ix, rr: loading_base(adapted.name)[ix + (rr,)])}
    x_subs = {**law_subs(), c: readout(s), c2: readout(t)}

    def avg(expr):
        return average(expand(rename_bound(sp.sympify(expr))), activation, used)

    loss = model.sample_loss
    b_i, b_i2 = sp.diff(loss, adapted.base[i_]), sp.diff(loss, adapted.base[i2])
    per = rename_bound(inner.loss(c))
    psi = sp.diff(sp.diff(per, c[j]), lam[k])
    psi2 = sp.diff(sp.diff(rename_bound(inner.loss(c2)), c2[j2]), lam[l_])

    def parts(name, free, terms, subs):
        out = []
        frees = (tuple(free), tuple(free) + (r,), tuple(free) + (r, r2))
        dims = (*_dims([STUDENT] * len(free)),)
        for n, ts in enumerate(_quadratic_parts(terms, subs, r, r2)):
            comp_ = Component(f"{name}{n}", frees[n], tuple(ts))
            target = tuple(str(x.label) for x in frees[n])
            out.append((Alloc(comp_.name, dims + (nr,) * n), Assign(comp_, comp_.name, target)))
        return out

    Eq = parts("Eqbb_", (i_, i2), avg(b_i * b_i2), q_subs)
    Eb = parts("Eqb_", (i_,), avg(b_i), q_subs)[:2]
    PS = parts("PS_", (j, k, j2, l_), avg(psi * psi2), x_subs)
    E0, E1 = sp.IndexedBase("Eqb_0"), sp.IndexedBase("Eqb_1")
    Q0, Q1, Q2 = (sp.IndexedBase(f"Eqbb_{n}") for n in range(3))
    # E_q[b b^T] over n_q queries, its three parts
    bq = [
        Q0[i_, i2] / nq + (1 - 1 / nq) * E0[i_] * E0[i2],
        Q1[i_, i2, r] / nq + (1 - 1 / nq) * (E0[i_] * E1[i2, r] + E1[i_, r] * E0[i2]),
        Q2[i_, i2, r, r2] / nq + (1 - 1 / nq) * (E1[i_, r] * E1[i2, r2] + E1[i_, r2] * E1[i2, r]) / 2,
    ]
    Pi = sp.IndexedBase("Pi_s")
    pis = Pi[steps - 1 - s, i_, j] * Pi[steps - 1 - t, i2, j2]
    BB = []
    for n, e in enumerate(bq):
        free = (j, j2) + (r, r2)[:n]
        summed = sp.Sum(pis * e, (i_, 0, i_.upper), (i2, 0, i2.upper))
        comp_ = Component(f"BB_{n}", free, average(expand(summed), "linear", {}))
        target = tuple(str(x.label) for x in free)
        BB.append((Alloc(comp_.name, ("K", "K") + (nr,) * n), Assign(comp_, comp_.name, target)))
    B0, B1, B2 = (sp.IndexedBase(f"BB_{n}") for n in range(3))
    P0, P1, P2 = (sp.IndexedBase(f"PS_{n}") for n in range(3))
    tr = lambda X, *ix: sp.Sum(X[ix + (r, r)], (r, 0, r.upper))  # noqa: E731
    prod = (B0[j, j2] + tr(B2, j, j2)) * (P0[j, k, j2, l_] + tr(P2, j, k, j2, l_))
    prod += sp.Sum(B1[j, j2, r] * P1[j, k, j2, l_, r], (r, 0, r.upper))
    prod += 2 * sp.Sum(B2[j, j2, r, r2] * P2[j, k, j2, l_, r2, r], (r, 0, r.upper), (r2, 0, r2.upper))
    name = support_square_name(inner)
    GG = sp.IndexedBase(name)
    acc = GG[k, l_] + inv_n * sp.Sum(prod, (j, 0, j.upper), (j2, 0, j2.upper))
    acc_c = Component(name, (k, l_), average(expand(acc), "linear", {}))
    allocs = [a for a, _ in Eq + Eb + PS + BB]
    zero = Component(name, (k, l_), ())
    # the query's E[b b^T] reads G4 at the student units and the task's fields: from a
    # table (that of the covariances of the support moments, filled again in this block)
    body = [Assign(zero, name, ("k", "l")), *_g4_table([x for _, x in Eq]), *[x for _, x in Eq + Eb]]
    pair = (*[x for _, x in PS + BB], Assign(acc_c, name, ("k", "l")))
    body.append(Repeat("s_", steps, (Repeat("t_", steps, pair),)))
    return allocs, body


def _sensitivity_dims(inner):
    """The sensitivity families of ``inner`` and their direction dimensions (empty
    unless the second-order terms read them: ``n2_``)."""
    return [(inner.dQ, ("n2_", "n2_")), (inner.dR, ("n2_", "M")), (inner.da, ("n2_",))]


def _named(kinds, prefix: str) -> tuple[sp.Idx, ...]:
    return tuple(sp.Idx(f"{prefix}{n}", K if kd == STUDENT else M) for n, kd in enumerate(kinds))


def _summed(expr: sp.Expr, idx) -> sp.Expr:
    for i in reversed(idx):
        expr = sp.Sum(expr, (i, 0, i.upper))
    return expr


# the support-set covariance of the adapted readout, added to L L^T by covariance_component
SUPPORT_COV = "V_{}"
# the table of the four-factor expectations that the support-set covariances read
G4_TABLE = ("G4t_", "G4")


def _family_mean(name, at, ix):
    """Mean over the task draws of a coefficient family of the support gradient: the
    readout ``c`` (its iterate at step ``at``), a task vector, or ``1``."""
    if name == "c":
        return sp.IndexedBase("mu_c")[(at,) + ix]
    return sp.S.One if name == "1" else mean_base(name)[ix]


def _family_loading(name, at, ix, r):
    """Loading over the task draws ``r`` of a coefficient family (0 for ``1``)."""
    if name == "c":
        return sp.IndexedBase("L_c")[(at,) + ix + (r,)]
    return sp.S.Zero if name == "1" else loading_base(name)[ix + (r,)]


def _coefficient_cov(rank, nonzero, P, kk, ip, Q, ll, iq):
    """``N_P__Q[kk, ip, ll, iq]``, the covariance of two coefficients, stored once per
    unordered pair of families (zero where its derived terms cancel)."""
    if rank[P] > rank[Q]:
        P, kk, ip, Q, ll, iq = Q, ll, iq, P, kk, ip
    if (P, Q) not in nonzero:
        return sp.S.Zero
    return sp.IndexedBase(f"N_{P}__{Q}")[(kk, *ip, ll, *iq)]


def _g4_table(assigns) -> list:
    """A ``Table`` of G4 over the fields at which ``assigns`` call it (none if they do not)."""
    fields = []
    for st in assigns:
        for t in st.component.terms if isinstance(st, Assign) else ():
            if getattr(t, "primitive", None) == G4_TABLE[1]:
                fields += [a.base for a in t.args if a.base not in fields]
    return [Table(G4_TABLE[0], G4_TABLE[1], tuple(fields))] if fields else []


def _support_moments(inner, laws, comp, assign, step, steps, s, r, nr) -> list:
    """The moments of the adapted readout over a finite support set of ``n_s``
    samples (docs/models/anil.md 5.6), to O(1/n_s), exact for one step.

    The sample support gradient at ``c`` is ``(1/n_s) sum_mu A(x^mu) w``, with
    ``w = (c, the task vectors, 1)`` and ``A`` the per-sample gradient's
    coefficients (derived from the per-sample loss, checked affine); its
    fluctuation ``eps(c)`` has covariance ``(1/n_s) N[w, w']``, ``N`` the
    covariance of the coefficients over the fields (four-factor expectations:
    G4). The recursion, perturbed to first order in the fluctuation,
    ``J^(s+1) = P J^s - B eps(c^s)`` (``P = d step / d c``, ``B = d step / d h``),
    gives the covariance ``V = E[J^S J^S^T]`` (with ``X^s_t = Cov(J^s, eps(c^t))``);
    to second order, the mean shift ``m^(s+1) = P m^s + D2 : Cov(dH, J^s)``
    (``D2`` the mixed second derivative of the step in ``H`` and ``c``). Every
    moment of ``w`` over the task draws is its mean times mean plus its loadings'
    product: the task average of the support-set moments is exact."""
    k, l_ = student_index("k"), student_index("l")
    i_, n_ = student_index("i_"), student_index("n_")
    c = sp.IndexedBase("c")
    per = rename_bound(inner.loss(c))  # the regulariser is deterministic: no fluctuation
    bases = [c, *[tv.base for tv in laws]]

    def zero(e, keep=()):
        for b in bases:
            if b not in keep:
                e = _replace_base(e, b, lambda ix: sp.S.Zero)
        return e

    # the coefficients of the per-sample gradient: families c, the task vectors, 1
    fams = [("c", (STUDENT,))] + [(tv.name, tv.kinds) for tv in laws] + [("1", ())]
    rank = {name: n for n, (name, _) in enumerate(fams)}

    def coefficient(name, kk, ix):
        grad = sp.diff(per, c[kk])
        if name == "c":
            a = sp.diff(grad, c[ix[0]])
        elif name == "1":
            a = zero(grad)
        else:
            a = zero(sp.diff(grad, laws[rank[name] - 1].base[ix]))
        if any(_count(t.coeff, bases) for t in expand(a)):
            what = f"the per-sample support gradient of {inner.adapted.name}"
            raise ValueError(f"{what} is not affine in {name}")
        return a

    mean = _family_mean

    def loading(name, at, ix):
        return _family_loading(name, at, ix, r)

    stmts: list = [Alloc(SUPPORT_COV.format(inner.adapted.name), ("K", "K"))]
    body: list = []
    # mean of each coefficient over the fields, then the covariance N of two; a
    # component whose derived terms cancel is zero (anil: the label noise's
    # coefficient has mean 0 and no covariance with the others) and is skipped
    zero_mean, nonzero = set(), set()
    for name, kinds in fams:
        ix = _named(kinds, "p")
        ea = comp(f"EA_{name}", (k, *ix), coefficient(name, k, ix))
        if not ea.terms:
            zero_mean.add(name)
            continue
        body += [Alloc(ea.name, ("K", *_dims(kinds))), assign(ea)]
    ncovs: list = []
    for P, kp in fams:
        for Qn, kq in fams[rank[P]:]:
            ip, iq = _named(kp, "p"), _named(kq, "q")
            e = coefficient(P, k, ip) * coefficient(Qn, l_, iq)
            if not {P, Qn} & zero_mean:
                e -= sp.IndexedBase(f"EA_{P}")[(k, *ip)] * sp.IndexedBase(f"EA_{Qn}")[(l_, *iq)]
            nc = comp(f"N_{P}__{Qn}", (k, *ip, l_, *iq), e)
            if nc.terms:
                nonzero.add((P, Qn))
                ncovs += [Alloc(nc.name, ("K", *_dims(kp), "K", *_dims(kq))), assign(nc)]
    # the covariances' four-factor expectations G4(k, l, p, q), over the fields that
    # they read: one table for all blocks (G4 is symmetric in its four arguments)
    body += _g4_table(ncovs) + ncovs

    def ncov(P, kk, ip, Qn, ll, iq):
        return _coefficient_cov(rank, nonzero, P, kk, ip, Qn, ll, iq)

    inv_n = 1 / sp.sympify(inner.support)
    t = sp.Symbol("t_", integer=True)
    # Sig[s, t] = Cov(eps(c^s), eps(c^t)), averaged over the task draws
    # = sum N[k, p, l, q] W[p, q], the second moments W of the families over the task
    # draws contracted first (W_P__Q at steps s, t: K^2 rank work, then K^2 per entry
    # of Sig, instead of K^2 rank per entry)
    sig = sp.S.Zero
    moments, moment_allocs = [], []
    for P, kp in fams:
        for Qn, kq in fams:
            ip, iq = _named(kp, "p"), _named(kq, "q")
            nc = ncov(P, k, ip, Qn, l_, iq)
            if nc == 0:
                continue
            mom = mean(P, s, ip) * mean(Qn, t, iq)
            mom += sp.Sum(loading(P, s, ip) * loading(Qn, t, iq), (r, 0, r.upper))
            if ip or iq:
                w = comp(f"W_{P}__{Qn}", ip + iq, mom)
                moment_allocs.append(Alloc(w.name, _dims(kp) + _dims(kq)))
                moments.append(assign(w))
                mom = sp.IndexedBase(w.name)[ip + iq]
            sig += _summed(nc * mom, ip + iq)
    # the step's derivatives: P = d step/d c, B = d step/d h, D2 = d2 step/dH dc
    cb, Hb, hb = sp.IndexedBase("c"), sp.IndexedBase("H_s"), sp.IndexedBase("h")
    st = rename_bound(step)
    # not a_, b_: the directions of the sensitivities loop over those, around its tangent
    a_, b_ = student_index("e_"), student_index("f_")
    dP = sp.diff(st, cb[i_])
    dB = sp.diff(st, hb[i_])
    dH = sp.diff(st, Hb[a_, b_])
    if any(_count(t_.coeff, [cb, Hb, hb]) for t_ in expand(dB)) or any(
        _count(t_.coeff, [Hb, hb]) for t_ in expand(sp.diff(dH, cb[i_]))
    ):
        raise ValueError(f"the inner step of {inner.adapted.name} is not a gradient step on H c - h")
    # the step must read (H, h) only through the gradient H c - h: dstep/dH_ab = -dstep/dh_a c_b
    chk = expand(dH + sp.diff(st, hb[a_]) * cb[b_])
    if any(t_.coeff != 0 for t_ in chk):
        raise ValueError(f"the inner step of {inner.adapted.name} reads H and h other than through H c - h")
    D2 = sp.diff(dH, cb[i_])
    Pm, Bm = sp.IndexedBase("P_"), sp.IndexedBase("B_")
    V, X, Sg = sp.IndexedBase("V_s"), sp.IndexedBase("X_s"), sp.IndexedBase("Sig_s")
    Zm, ZL = sp.IndexedBase("Zmu_s"), sp.IndexedBase("ZL_s")
    mm, mL = sp.IndexedBase("mmu_s"), sp.IndexedBase("mL_s")
    j1, j2 = student_index("j1_"), student_index("j2_")

    def S2(e, *idx):
        return _summed(e, idx)

    # V^(s+1) = P V^s P^T + B Sig^ss B^T - P X^s_s B^T - B X^s_s^T P^T
    Pk = lambda a, b: Pm[a, b]  # noqa: E731
    Bk = lambda a, b: Bm[a, b]  # noqa: E731
    v_next = S2(Pk(k, j1) * V[s, j1, j2] * Pk(l_, j2), j1, j2)
    v_next += S2(Bk(k, j1) * Sg[s, s, j1, j2] * Bk(l_, j2), j1, j2)
    v_next -= S2(Pk(k, j1) * X[s, s, j1, j2] * Bk(l_, j2), j1, j2)
    v_next -= S2(Bk(k, j1) * X[s, s, j2, j1] * Pk(l_, j2), j1, j2)
    # X^(s+1)_t = P X^s_t - B Sig^st, for t > s
    x_next = S2(Pk(k, j1) * X[s, t, j1, l_], j1) - S2(Bk(k, j1) * Sg[s, t, j1, l_], j1)
    # Z^(s+1)[a, b, n] = Cov(dH_ab, J^(s+1)_n)
    #                 = sum_m P[n, m] Z^s[a, b, m] - sum_m B[n, m] Cov(dH_ab, eps_m(c^s))
    # contracted before the steps: BN_Q[a, b, n, q] = sum_m B[n, m] N_c__Q[a, b, m, q] (B and
    # N do not change along the inner loop), so that a step costs K^4 (1 + rank) per family
    # instead of K^5 (1 + rank)
    zmu_next = S2(Pk(n_, j1) * Zm[s, a_, b_, j1], j1)
    zL_next = S2(Pk(n_, j1) * ZL[s, a_, b_, j1, r], j1)
    contracted = []
    for Qn, kq in fams:
        iq = _named(kq, "q")
        cov = ncov("c", a_, (b_,), Qn, j1, iq)
        if cov == 0:
            continue
        bn = comp(f"BN_{Qn}", (a_, b_, n_, *iq), S2(Bk(n_, j1) * cov, j1))
        contracted += [Alloc(bn.name, ("K", "K", "K", *_dims(kq))), assign(bn)]
        BN = sp.IndexedBase(bn.name)[(a_, b_, n_, *iq)]
        zmu_next -= inv_n * _summed(BN * mean(Qn, s, iq), iq)
        zL_next -= inv_n * _summed(BN * loading(Qn, s, iq), iq)
    # m^(s+1) = P m^s + D2 : Z^s (mean and loading)
    mmu_next = S2(Pk(k, i_) * mm[s, i_], i_) + S2(D2 * Zm[s, a_, b_, i_], a_, b_, i_)
    mL_next = S2(Pk(k, i_) * mL[s, i_, r], i_) + S2(D2 * ZL[s, a_, b_, i_, r], a_, b_, i_)
    adapted = inner.adapted.name
    sig_c, x_c = comp("Sig_s", (k, l_), inv_n * sig), comp("X_s", (k, l_), x_next)
    body += [
        Alloc("P_", ("K", "K")),
        Alloc("B_", ("K", "K")),
        assign(comp("P_", (k, i_), dP)),
        assign(comp("B_", (k, i_), dB)),
        *contracted,
        *moment_allocs,
        Alloc("Sig_s", ("steps_", "steps_", "K", "K")),
        Alloc("V_s", ("steps_ + 1", "K", "K")),
        Alloc("X_s", ("steps_ + 1", "steps_", "K", "K")),
        Alloc("Zmu_s", ("steps_ + 1", "K", "K", "K")),
        Alloc("ZL_s", ("steps_ + 1", "K", "K", "K", nr)),
        Alloc("mmu_s", ("steps_ + 1", "K")),
        Alloc("mL_s", ("steps_ + 1", "K", nr)),
        Repeat(
            "s_",
            steps,
            (
                Repeat(
                    "t_",
                    steps,
                    (Guard("t_ >= s_", (*moments, assign(sig_c, "Sig_s", ("s_", "t_", "k", "l")))),),
                ),
                assign(comp("V_s", (k, l_), v_next), "V_s", ("s_ + 1", "k", "l")),
                Repeat("t_", steps, (Guard("t_ > s_", (assign(x_c, "X_s", ("s_ + 1", "t_", "k", "l")),)),)),
                assign(comp("Zmu_s", (a_, b_, n_), zmu_next), "Zmu_s", ("s_ + 1", "e_", "f_", "n_")),
                assign(comp("ZL_s", (a_, b_, n_, r), zL_next), "ZL_s", ("s_ + 1", "e_", "f_", "n_", "r_")),
                assign(comp("mmu_s", (k,), mmu_next), "mmu_s", ("s_ + 1", "k")),
                assign(comp("mL_s", (k, r), mL_next), "mL_s", ("s_ + 1", "k", "r_")),
            ),
        ),
        assign(comp(f"mu_{adapted}", (k,), mean_base(adapted)[k] + mm[steps, k])),
        assign(comp(f"L_{adapted}", (k, r), loading_base(adapted)[k, r] + mL[steps, k, r])),
        assign(comp(SUPPORT_COV.format(adapted), (k, l_), V[steps, k, l_])),
    ]
    return stmts + [Guard(_finite_support(inner), tuple(body))], nonzero


def _code(e) -> str:
    from .printer import code

    return code(sp.sympify(e))


def _finite_support(inner) -> str:
    """The condition that the support set is finite, as the flow's guard prints it
    (derive/symbols.py ``finite``): the task program computes the support set's
    arrays under it."""
    return _code(finite(sp.sympify(inner.support)))


def excess_pairs(model) -> list:
    """The pairs (X, Y) of task quantities, in the order of ``model.random_families``,
    whose conditional means' product covaries with the support-set covariance
    ``V(xi)`` of the adapted readout: ``CMV_X__Y[c, d, ix, iy] = Cov(m_X m_Y, V_cd)``
    (the task law's vectors and the adapted readout; empty for a population
    support loss)."""
    inner = model.inner_loop
    if inner is None or not support_families(inner):
        return []
    names = [tv.name for tv in model.task_vectors if tv.law is not None] + [inner.adapted.name]
    fams = [f for f in model.random_families if f.name in names]
    return [(x, y) for n, x in enumerate(fams) for y in fams[n:]]


def excess_name(x, y) -> str:
    return f"CMV_{x.name}__{y.name}"


def _support_excess(model, laws, comp, assign, steps, r, nonzero) -> list:
    """``CMV_X__Y[c, d, ix, iy] = Cov(m_X[ix] m_Y[iy], V_cd(xi))`` and ``CVV[a, b, c, d] =
    Cov(V_ab(xi), V_cd(xi))`` over the task draws (docs/models/anil.md 5.6). The support
    set's covariance of the adapted readout depends on the task draws ``xi``:
    ``V(xi) = sum_{s,t} Pi^s Sig^st(xi) Pi^t^T``, ``Pi^s = P^(S-1-s) B``, ``Sig^st(xi) =
    (1/n_s) N[w^s(xi), w^t(xi)]`` with ``w^s = mu^s + Lambda^s xi`` the stacked coefficient
    families (the readout's iterate, the task vectors, 1); so V is a quadratic form in
    ``xi``, ``V_cd = const + lV_cd . xi + xi^T AV_cd xi`` with

        lV[c, d, r] = sum_{s,t} Pi^s Pi^t (1/n_s) N[mu^s, Lambda^t_r] + N[Lambda^s_r, mu^t]
        AV[c, d, r, r2] = sum_{s,t} Pi^s Pi^t (1/n_s) N[Lambda^s_r, Lambda^t_r2].

    The conditional means ``m_X = mu_X + L_X xi`` are affine in ``xi``, so (Isserlis)
    ``Cov(m_X m_Y, V_cd) = (mu_X L_Y + mu_Y L_X) . lV_cd + L_X^T (AV_cd + AV_cd^T) L_Y`` and
    ``Cov(V_ab, V_cd) = lV_ab . lV_cd + 2 tr(sym(AV_ab) sym(AV_cd))``. (With the support
    set Gaussian given the task, a fourth moment of ``z = (a', v_task)`` is Isserlis'
    value from the means and covariances plus, for every split of its four factors
    into a pair read through ``V`` and a pair of means, the covariance CMV.)

    Order of summation: ``N`` is contracted with the loadings and the means of the
    families at step ``s`` first (``NL_Q``, ``Nm_Q``: K^2 (K + M)^2 M work), then with those
    at step ``t`` (``F1_s``, ``F2_s``), then with ``Pi^s`` and ``Pi^t`` one at a time; CMV and
    CVV read only lV and AV, after the steps: no K^4 array is built inside the steps."""
    inner = model.inner_loop
    pairs = excess_pairs(model)
    # K^4 entries and more, read only by the flow's terms guarded by a finite support
    # set (derive/flow.py average): none with a population support loss
    when_finite = _finite_support(inner)
    stmts = [
        Alloc(excess_name(x, y), ("K", "K", *_dims(x.kinds), *_dims(y.kinds)), when_finite) for x, y in pairs
    ]
    i_, j_ = student_index("i_"), student_index("j_")
    c_, d_ = student_index("c_"), student_index("d_")
    a_, b_ = student_index("a_"), student_index("b_")
    wfams = [("c", (STUDENT,))] + [(tv.name, tv.kinds) for tv in laws]
    allw = wfams + [("1", ())]
    rank = {name: n for n, (name, _) in enumerate(allw)}
    s, t = sp.Symbol("s_", integer=True), sp.Symbol("t_", integer=True)
    inv_n = 1 / sp.sympify(inner.support)
    Pm, Bm, Pi = sp.IndexedBase("P_"), sp.IndexedBase("B_"), sp.IndexedBase("Pi_s")
    k = student_index("k")
    body: list = [
        Alloc("Pi_s", ("steps_", "K", "K")),
        # Pi^s = P^(S-1-s) B, stored at S - 1 - s
        Repeat("s_", steps, (
            Guard("s_ == 0", (assign(comp("Pi_s", (k, i_), Bm[k, i_]), "Pi_s", ("0", "k", "i_")),)),
            Guard("s_ > 0", (assign(
                comp("Pi_s", (k, i_), sp.Sum(Pm[k, j_] * Pi[s - 1, j_, i_], (j_, 0, j_.upper))),
                "Pi_s", ("s_", "k", "i_")),)),
        )),
    ]
    mean = _family_mean
    r2 = sp.Idx("r2_", r.upper + 1)
    nr = _dims((inner.noise.kind,))[0]

    def ncov(P, kk, ip, Q, ll, iq):
        return _coefficient_cov(rank, nonzero, P, kk, ip, Q, ll, iq)

    def loading(P, at, ip, rr):
        return _family_loading(P, at, ip, rr)

    # N contracted with the families at step s: NL_Q[i, j, iq, r] = sum_P N_PQ[i, ., j, iq] .
    # Lambda^s_P[., r], Nm_Q[i, j, iq] = sum_P N_PQ[i, ., j, iq] . mu^s_P; then F1, F2 at step t
    first: list = []
    f1, f2 = sp.S.Zero, sp.S.Zero
    for Q, kq in allw:
        iq = _named(kq, "q")
        nl, nm = sp.S.Zero, sp.S.Zero
        for P, kp in allw:
            ip = _named(kp, "p")
            nc = ncov(P, i_, ip, Q, j_, iq)
            if nc == 0:
                continue
            nl += _summed(nc * loading(P, s, ip, r), ip)
            nm += _summed(nc * mean(P, s, ip), ip)
        lt = loading(Q, t, iq, r)
        nlc = comp(f"NL_{Q}_", (i_, j_, *iq, r), nl)
        nmc = comp(f"Nm_{Q}_", (i_, j_, *iq), nm)
        if nlc.terms:
            first += [Alloc(nlc.name, ("K", "K", *_dims(kq), nr)), assign(nlc)]
            NL = sp.IndexedBase(nlc.name)
            f2 += _summed(NL[(i_, j_, *iq, r)] * loading(Q, t, iq, r2), iq)
            f1 += _summed(NL[(i_, j_, *iq, r)] * mean(Q, t, iq), iq)
        if nmc.terms and lt != 0:
            first += [Alloc(nmc.name, ("K", "K", *_dims(kq))), assign(nmc)]
            f1 += _summed(sp.IndexedBase(nmc.name)[(i_, j_, *iq)] * lt, iq)
    lv, Av = sp.IndexedBase("lV_s"), sp.IndexedBase("AV_s")
    F1, F2 = sp.IndexedBase("F1_s"), sp.IndexedBase("F2_s")
    Y1, Y2 = sp.IndexedBase("PF1_"), sp.IndexedBase("PF2_")
    pis, pit = Pi[steps - 1 - s, a_, i_], Pi[steps - 1 - t, b_, j_]
    body += [
        *[st for st in first if isinstance(st, Alloc)],
        Alloc("F1_s", ("K", "K", nr)),
        Alloc("F2_s", ("K", "K", nr, nr)),
        Alloc("PF1_", ("K", "K", nr)),
        Alloc("PF2_", ("K", "K", nr, nr)),
        Alloc("lV_s", ("K", "K", nr)),
        Alloc("AV_s", ("K", "K", nr, nr)),
        Repeat("s_", steps, (Repeat("t_", steps, (
            *[st for st in first if not isinstance(st, Alloc)],
            assign(comp("F1_s", (i_, j_, r), inv_n * f1)),
            assign(comp("F2_s", (i_, j_, r, r2), inv_n * f2)),
            # Pi^s on the first index, then Pi^t on the second
            assign(comp("PF1_", (a_, j_, r), sp.Sum(pis * F1[i_, j_, r], (i_, 0, i_.upper)))),
            assign(comp("PF2_", (a_, j_, r, r2), sp.Sum(pis * F2[i_, j_, r, r2], (i_, 0, i_.upper)))),
            assign(comp("lV_s", (a_, b_, r), lv[a_, b_, r] + sp.Sum(pit * Y1[a_, j_, r], (j_, 0, j_.upper)))),
            assign(comp("AV_s", (a_, b_, r, r2), Av[a_, b_, r, r2] + sp.Sum(
                pit * Y2[a_, j_, r, r2], (j_, 0, j_.upper)))),
        )),)),
    ]
    # after the steps: the symmetric part of AV, then CVV and CMV from lV and it
    SA = sp.IndexedBase("SAV_")
    cvv = sp.IndexedBase(excess_vv_name(inner))
    stmts.append(Alloc(cvv.name, ("K", "K", "K", "K"), when_finite))
    body += [
        Alloc("SAV_", ("K", "K", nr, nr)),
        assign(comp("SAV_", (a_, b_, r, r2), Av[a_, b_, r, r2] + Av[a_, b_, r2, r])),
        assign(comp(cvv.name, (a_, b_, c_, d_), sp.Sum(
            lv[a_, b_, r] * lv[c_, d_, r], (r, 0, r.upper)) + sp.Sum(
            SA[a_, b_, r, r2] * SA[c_, d_, r, r2] / 2, (r, 0, r.upper), (r2, 0, r2.upper)))),
    ]
    mfams = sorted({x.name: x for pair in pairs for x in pair}.values(), key=lambda f: [g.name for g in
                   model.random_families].index(f.name))  # fmt: skip
    # per task quantity X: GA_X[c, d, ix, r2] = sum_r L_X[ix, r] SAV[c, d, r, r2] and
    # GL_X[c, d, ix] = sum_r L_X[ix, r] lV[c, d, r]
    for X in mfams:
        ia = _named(X.kinds, "x")
        LX = loading_base(X.name)
        body += [
            Alloc(f"GA_{X.name}_", ("K", "K", *_dims(X.kinds), nr)),
            Alloc(f"GL_{X.name}_", ("K", "K", *_dims(X.kinds))),
            assign(comp(f"GA_{X.name}_", (c_, d_, *ia, r2),
                        sp.Sum(LX[ia + (r,)] * SA[c_, d_, r, r2], (r, 0, r.upper)))),
            assign(comp(f"GL_{X.name}_", (c_, d_, *ia),
                        sp.Sum(LX[ia + (r,)] * lv[c_, d_, r], (r, 0, r.upper)))),
        ]
    for X, Y in pairs:
        ia, ib = _named(X.kinds, "x"), _named(Y.kinds, "y")
        muX, muY = mean_base(X.name)[ia], mean_base(Y.name)[ib]
        GA, GLX, GLY = (sp.IndexedBase(f"GA_{X.name}_"), sp.IndexedBase(f"GL_{X.name}_"),
                        sp.IndexedBase(f"GL_{Y.name}_"))  # fmt: skip
        e = sp.Sum(GA[(c_, d_, *ia, r2)] * loading_base(Y.name)[ib + (r2,)], (r2, 0, r2.upper))
        e += muX * GLY[(c_, d_, *ib)] + muY * GLX[(c_, d_, *ia)]
        body.append(assign(comp(excess_name(X, Y), (c_, d_, *ia, *ib), e)))
    return stmts + [Guard(_finite_support(inner), tuple(body))]


def excess_vv_name(inner) -> str:
    """``CVV_<adapted>[a, b, c, d] = Cov(V_ab(xi), V_cd(xi))`` over the task draws."""
    return f"CVV_{inner.adapted.name}"


def support_families(inner) -> tuple[str, ...]:
    """The task quantities with a support-set covariance (``V_<name>``, returned by
    the task program beside the means and loadings): the adapted readout when the
    support set may be finite."""
    return (inner.adapted.name,) if sp.sympify(inner.support) != sp.oo else ()


def support_covariances(inner) -> dict:
    """``(X, Y) -> name`` of the support-set covariances that the task program returns
    beside the means and loadings (docs/models/anil.md 5.6): ``V_<adapted>`` of the
    adapted readout, and at second order its covariance with each sensitivity family
    ``V_<adapted>_dQ`` ... (half the tangent of ``V``: what the expected query loss reads
    through the support directions); empty for a population support loss."""
    if not support_families(inner):
        return {}
    a = inner.adapted.name
    out = {(a, a): SUPPORT_COV.format(a)}
    for f in inner.sensitivities:
        out[(a, f.name)] = SUPPORT_COV.format(f.name)
    return out


def covariance_component(x, y, noise, support=None):
    """``S_X__Y[ix, iy] = sum_r L_X[ix, r] L_Y[iy, r]``: the covariance of two task
    quantities over the draws (docs/models/anil.md 5.3), plus their support-set
    covariance where ``support`` (``support_covariances``) has one (5.6)."""
    from .flow import Component, average

    ix = _idx(x.kinds)
    iy = _idx(y.kinds, len(ix))
    r = sp.Idx("r_", K if noise.kind == STUDENT else M)
    e = sp.Sum(loading_base(x.name)[ix + (r,)] * loading_base(y.name)[iy + (r,)], (r, 0, r.upper))
    name = (support or {}).get((x.name, y.name))
    if name is not None:
        e += sp.IndexedBase(name)[ix + iy]
    return Component(f"S_{x.name}__{y.name}", ix + iy, average(expand(e), "linear", {}))
