"""G4 = E[g(u_a) g(u_b) g(u_c) g(u_d)] (docs/conventions.md section 2, MODELS.md 2).

The engine derives G4 by Price's theorem along a path that shrinks the covariances of
one field (derive/gaussian.py ``_price_path``): a sympy Integral over t in [0, 1] of
I4-type closed forms, which the code generator prints as a weighted sum over the
nodes of a Gauss-Legendre rule graded towards t = 1 (derive/quadrature.py). Here the
G4 function rendered as a kernel module renders it (derive/codegen.py
``render_primitives``: a G4 that dispatches on the equality pattern of its indices to
forms derived for each) is compared with

- an independent high-order quadrature, typed here: the distinct fields of the four
  arguments, a tensor Gauss-Legendre rule on [-9, 9]^d in the coordinates of a
  Cholesky factor, with one factor that occurs once integrated in closed form
  (E[erf((m + s Z) / sqrt 2)] = erf(m / sqrt(2 (1 + s^2)))); to 1e-10 over 20 random
  covariances and all 15 equality patterns of the four indices;
- Monte Carlo (2e6 samples), within 4 standard errors, every equality pattern;
- for the linear activation, the Isserlis polynomial, exactly.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math

import numpy as np
import pytest
import sympy as sp
from scipy.special import erf

from derive import codegen, quadrature
from derive.gaussian import cov_symbol, expectation, primitive

DIM = 6  # fields of a (K + M)-dimensional covariance, K = M = 3
N_COV = 20


def set_partitions(n: int = 4) -> list[tuple[int, ...]]:
    """The equality patterns of n indices as restricted growth strings: 15 for n = 4,
    from (0, 0, 0, 0) (all equal) to (0, 1, 2, 3) (all distinct)."""
    out = []
    for s in itertools.product(range(n), repeat=n):
        if s[0] == 0 and all(s[i] <= max(s[:i]) + 1 for i in range(1, n)):
            out.append(s)
    return out


PATTERNS = set_partitions()


def _module(tmp_path_factory, activation: str, nodes: int | None = None):
    """The primitives module; ``nodes`` None: the path rule chosen by the largest
    variance of the fields (quadrature.RULES), as the kernels choose it."""
    erf = activation == "erf"
    text = codegen.render_primitives(["G4", "G4_dir"] if erf else ["G4"], activation, nodes, table=erf)
    name = f"g4_{activation}" + ("" if nodes is None else f"_n{nodes}")
    folder = tmp_path_factory.mktemp(name)
    path = folder / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def g4_erf(tmp_path_factory):
    return _module(tmp_path_factory, "erf")


@pytest.fixture(scope="module")
def g4_linear(tmp_path_factory):
    return _module(tmp_path_factory, "linear")


@pytest.fixture(scope="module")
def g4_fixed(tmp_path_factory):
    """``g4_fixed(n)``: the erf module with every integral on the ``n``-point path rule."""
    return functools.cache(lambda n: _module(tmp_path_factory, "erf", n))


def _indices(rng, pattern) -> tuple[int, ...]:
    """Field indices with the equality pattern ``pattern``, distinct blocks on distinct fields."""
    fields = rng.choice(DIM, size=max(pattern) + 1, replace=False)
    return tuple(int(fields[p]) for p in pattern)


# ---------------------------------------------------------------------------
# the independent reference

BOX = 9.0  # the Gaussian mass outside [-9, 9] is 2e-19
REF_NODES = {1: 400, 2: 200, 3: 80}  # per dimension; at 1.5x these the values move by < 3e-12


@functools.lru_cache(maxsize=None)
def _rule(n: int):
    """Gauss-Legendre on [-BOX, BOX] with the standard normal density in the weights."""
    x, w = np.polynomial.legendre.leggauss(n)
    x = BOX * x
    return x, BOX * w * np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)


def g4_reference(C: np.ndarray, idx) -> float:
    """E[prod_i erf(u_{idx_i} / sqrt 2)] by a tensor Gauss-Legendre rule over the
    distinct fields (a Cholesky factor of their covariance), a field that occurs once
    integrated in closed form given the others."""
    fields = sorted(set(idx))
    mult = [idx.count(f) for f in fields]
    order = sorted(range(len(fields)), key=lambda i: (mult[i] == 1, fields[i]))
    fields, mult = [fields[i] for i in order], [mult[i] for i in order]
    S = C[np.ix_(fields, fields)]
    closed = len(fields) > 1 and mult[-1] == 1
    d = len(fields) - 1 if closed else len(fields)
    x, w = _rule(REF_NODES[d])
    Z = np.stack([g.ravel() for g in np.meshgrid(*[x] * d, indexing="ij")])
    W = np.ones(1)
    for _ in range(d):
        W = np.multiply.outer(W, w)
    U = np.linalg.cholesky(S[:d, :d]) @ Z
    prod = np.ones(U.shape[1])
    for i in range(d):
        prod *= erf(U[i] / math.sqrt(2)) ** mult[i]
    if closed:
        beta = np.linalg.solve(S[:d, :d], S[:d, d])
        s2 = S[d, d] - S[:d, d] @ beta
        prod *= erf((beta @ U) / np.sqrt(2 * (1 + s2)))
    return float(prod @ W.ravel())


def test_patterns_are_the_15_set_partitions():
    assert len(PATTERNS) == 15
    assert {(0, 0, 0, 0), (0, 0, 1, 1), (0, 0, 0, 1), (0, 0, 1, 2), (0, 1, 2, 3)} <= set(PATTERNS)


def test_g4_against_high_order_quadrature(g4_erf, random_covariance):
    """Every equality pattern of the four indices on 20 random covariances, to 1e-10."""
    rng = np.random.default_rng(4444)
    failures, worst = [], 0.0
    for _ in range(N_COV):
        C = random_covariance(rng, DIM)
        for pattern in PATTERNS:
            idx = _indices(rng, pattern)
            got, want = g4_erf.G4(C, *idx), g4_reference(C, list(idx))
            worst = max(worst, abs(got - want))
            if not abs(got - want) <= 1e-10:
                failures.append(f"G4{idx} (pattern {pattern}): {got!r} vs quadrature {want!r}")
    assert not failures, "; ".join(failures[:5])
    assert worst > 0.0  # the comparison ran on values, not on copies


def test_g4_is_symmetric_in_its_arguments(g4_erf, random_covariance):
    rng = np.random.default_rng(5)
    C = random_covariance(rng, DIM)
    for idx in [(0, 1, 2, 3), (0, 0, 1, 2), (4, 4, 5, 5), (1, 1, 1, 3)]:
        values = [g4_erf.G4(C, *p) for p in itertools.permutations(idx)]
        assert max(values) - min(values) < 1e-14, idx


def test_g4_table_equals_g4(g4_fixed, random_covariance):
    """G4_table(C, k, l) fills F[p, q] = G4(k, l, p, q) for every (p, q) at once (the
    pair-tilt table per node): equal to the dispatched G4 for every (k, l), k = l and
    p, q in {k, l} included. Both on the 20-point rule (each chooses its rule by the
    variances it reads, the table by all of C's)."""
    g4_erf = g4_fixed(20)
    rng = np.random.default_rng(12)
    n = DIM
    C = random_covariance(rng, n)
    F, B = np.empty((n, n)), np.empty((n, n))
    Cp, A = np.empty((n + 1, n + 1)), np.empty((n + 1, n + 1))
    out, Dn, U0, U1 = (np.empty(n + 1) for _ in range(4))
    worst = 0.0
    for k, j in itertools.product(range(n), repeat=2):
        g4_erf.G4_table(C, k, j, F, Cp, A, B, out, Dn, U0, U1)
        want = np.array([[g4_erf.G4(C, k, j, p, q) for q in range(n)] for p in range(n)])
        worst = max(worst, float(np.max(np.abs(F - want))))
    assert worst < 1e-13


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_kernel_g4_tables_equal_g4(g4_fixed, random_covariance, scale):
    """anil's kernel reads its support covariances' G4 from G4_tables (once per student
    unit k, all l >= k, mirrored): every entry out[k, l, p, q] over a subset of the rows
    of C (students 0..K-1 first, then rows further down) equals the dispatched G4 of
    the primitives module on the rule that quadrature.RULES gives for the largest
    variance of those rows, equal indices included (so the kernel chooses that rule)."""
    from generated import anil_erf

    rng = np.random.default_rng(21)
    n, K = 8, 3
    C = scale * random_covariance(rng, n)
    rows = np.array([0, 1, 2, 5, 6, 7], dtype=np.int64)
    C[4, 4] = 10 * np.max(np.diag(C))  # a row outside the table does not choose the rule
    nodes = quadrature.nodes_for(float(np.max(np.diag(C)[rows])))
    assert nodes == {1.0: 10, 30.0: 24}[scale]  # the two covariances reach two rules
    g4 = g4_fixed(nodes)
    out = np.empty((K, K, len(rows), len(rows)))
    anil_erf.G4_tables(C, K, rows, out)
    want = np.array(
        [[[[g4.G4(C, k, j, p, q) for q in rows] for p in rows] for j in range(K)] for k in range(K)]
    )
    assert np.max(np.abs(out - want)) < 1e-13 * max(1.0, np.max(np.abs(want)))


def _covariance_with_largest_variance(rng, c: float, kind: int) -> np.ndarray:
    """A covariance of DIM fields whose largest variance is c: a random one (kind 0),
    one nearly of rank 2 (1: strong correlations), one with every variance c (2)."""
    if kind == 1:
        A = rng.normal(size=(DIM, 2))
        C = A @ A.T + 1e-3 * np.eye(DIM)
    else:
        A = rng.normal(size=(DIM, DIM))
        C = A @ A.T / DIM + 1e-2 * np.eye(DIM)
    d = np.sqrt(np.diag(C))
    s = np.ones(DIM) if kind == 2 else rng.uniform(0.2, 1.0, DIM)
    s[rng.integers(DIM)] = 1.0
    return c * C / np.outer(d, d) * np.outer(s, s)


# the middle of each rule's range of RULES, and beyond the last bound's half
VARIANCES = [1.0, 2.5, 4.5, 7.0, 16.0, 36.0, 88.0, 256.0, 576.0, 1408.0]


def test_the_rule_of_each_variance_is_within_1e_10(g4_erf, g4_fixed):
    """The kernels' G4 (the path rule of quadrature.RULES for the largest variance of its
    fields) against the 128-point rule, to 1e-10, for largest variances from 1 to 1400
    (the rules of 10 to 64 nodes): random covariances, strongly correlated ones, equal
    variances; every equality pattern with the largest variance's field among the four,
    where the integrand's singularity is nearest. The 20-point rule alone, the kernels'
    rule before RULES, is off by more than 1e-10 from variance 88 (a test that can fail)."""
    rng = np.random.default_rng(2026)
    reference, old = g4_fixed(128), g4_fixed(20)
    worst, old_worst = {}, {}
    for c in VARIANCES:
        for kind in range(3):
            C = _covariance_with_largest_variance(rng, c, kind)
            top = int(np.argmax(np.diag(C)))
            for pattern in PATTERNS:
                fields = rng.choice(DIM, size=max(pattern) + 1, replace=False)
                if top not in fields:
                    fields[0] = top
                idx = tuple(int(fields[p]) for p in pattern)
                want = reference.G4(C, *idx)
                worst[c] = max(worst.get(c, 0.0), abs(g4_erf.G4(C, *idx) - want))
                old_worst[c] = max(old_worst.get(c, 0.0), abs(old.G4(C, *idx) - want))
    bad = {c: e for c, e in worst.items() if not e <= 1e-10}
    assert not bad, f"largest variance: error of the kernels' rule {bad}"
    assert all(old_worst[c] > 1e-10 for c in VARIANCES if c >= 88.0), old_worst


def test_g4_dir_is_the_derivative_along_dc(g4_erf, random_covariance):
    """G4_dir (Price's theorem: I4 and E[g'' g g g] entry by entry of dC, each entry's
    term only where dC is nonzero) against central differences of G4 (its integral
    along Price's path) along a random symmetric dC and along directions of one entry
    (as a kernel's directions of one overlap), repeated indices included."""
    rng = np.random.default_rng(11)
    C = random_covariance(rng, DIM)
    A = rng.normal(size=(DIM, DIM))
    h = 1e-5
    single = []
    for a, b in [(0, 1), (2, 2), (1, 3)]:
        E = np.zeros((DIM, DIM))
        E[a, b] = E[b, a] = 1.0
        single.append(E)
    for dC in [(A + A.T) / 2, *single]:
        for pattern in [(0, 1, 2, 3), (0, 0, 1, 2), (0, 0, 1, 1), (0, 0, 0, 1), (0, 0, 0, 0), (0, 1, 0, 2)]:
            idx = _indices(rng, pattern)
            fd = (g4_erf.G4(C + h * dC, *idx) - g4_erf.G4(C - h * dC, *idx)) / (2 * h)
            assert g4_erf.G4_dir(C, dC, *idx) == pytest.approx(fd, abs=1e-8), (idx, dC)
    # a direction that misses the four fields: exactly zero
    far = np.zeros((DIM, DIM))
    far[DIM - 1, DIM - 1] = 1.0
    assert g4_erf.G4_dir(C, far, 0, 1, 1, 2) == 0.0


MC_SAMPLES = 2_000_000


@pytest.mark.parametrize("seed", [1, 2])
def test_g4_against_monte_carlo(g4_erf, seed, random_covariance):
    rng = np.random.default_rng(7000 + seed)
    C = random_covariance(rng, DIM, eps=0.05)
    u = rng.standard_normal((MC_SAMPLES, DIM)) @ np.linalg.cholesky(C).T
    g = erf(u / math.sqrt(2))
    failures = []
    for pattern in PATTERNS:
        idx = _indices(rng, pattern)
        prod = g[:, idx[0]] * g[:, idx[1]] * g[:, idx[2]] * g[:, idx[3]]
        mean, se = prod.mean(), prod.std(ddof=1) / math.sqrt(MC_SAMPLES)
        value = g4_erf.G4(C, *idx)
        if not abs(value - mean) <= 4 * se:
            failures.append(f"G4{idx}: {value:.6g}, MC {mean:.6g} +- {se:.2g}")
    assert not failures, "; ".join(failures)


def test_monte_carlo_sees_a_gaussian_closure(random_covariance):
    """The Monte Carlo check has the power to see a plausible wrong G4: Wick's rule on
    the pair expectations, I2(a,b) I2(c,d) + I2(a,c) I2(b,d) + I2(a,d) I2(b,c) (exact
    for a linear g), is many standard errors off for erf."""
    rng = np.random.default_rng(7001)
    C = random_covariance(rng, DIM, eps=0.05)
    u = rng.standard_normal((MC_SAMPLES, DIM)) @ np.linalg.cholesky(C).T
    g = erf(u / math.sqrt(2))
    a, b, c, d = 0, 1, 2, 3
    prod = g[:, a] * g[:, b] * g[:, c] * g[:, d]
    se = prod.std(ddof=1) / math.sqrt(MC_SAMPLES)

    def i2(x, y):
        return 2 / math.pi * math.asin(C[x, y] / math.sqrt((1 + C[x, x]) * (1 + C[y, y])))

    wick = i2(a, b) * i2(c, d) + i2(a, c) * i2(b, d) + i2(a, d) * i2(b, c)
    assert abs(wick - prod.mean()) > 4 * se


# ---------------------------------------------------------------------------
# the derivation


def test_g4_is_an_integral_along_prices_path():
    d = expectation(("g", "g", "g", "g"), "erf")
    assert d.name == "G4" and d is primitive("G4", "erf")
    (integral,) = d.expr.atoms(sp.Integral)
    ((t, lo, hi),) = integral.limits
    assert (str(t), lo, hi) == ("t", 0, 1)
    pairs = itertools.combinations_with_replacement("abcd", 2)
    assert d.expr.free_symbols == {cov_symbol(x, y) for x, y in pairs}
    assert "Price's theorem along a path that shrinks the covariances of u_a" in d.provenance[0]
    assert "C_aj -> t C_aj" in d.provenance[0]
    # the integrands come from the engine's rules: a tilt by (a, j) and Price's base case
    assert sum("tilt by u_a, u_" in line for line in d.provenance) == 3


def test_forms_at_equal_indices():
    """The forms the generated G4 dispatches to: one per class of equal indices, the
    path shrinking a field that occurs once where there is one, the pair a, a for
    (a, a, b, b), whose start is I2(a, a) I2(b, b); the dispatch covers the 15 patterns."""
    from derive.gaussian import pattern_forms

    forms = {f.pattern: f for f in pattern_forms(primitive("G4", "erf"))}
    assert set(forms) == {"abcd", "abcc", "abbb", "aabb", "aaaa"}
    assert forms["abcc"].labels == ("a", "b", "c") and forms["aaaa"].labels == ("a",)
    assert "covariances of (u_a, u_b) and the rest" in forms["aabb"].provenance[1]
    (integral,) = forms["aabb"].expr.atoms(sp.Integral)
    start = forms["aabb"].expr - integral
    i2 = primitive("I2", "erf").expr
    c = cov_symbol
    want = i2.xreplace({c("b", "b"): c("a", "a"), c("a", "b"): c("a", "a")}) * i2.xreplace(
        {c("a", "a"): c("b", "b"), c("a", "b"): c("b", "b")}
    )
    assert sp.simplify(start - want) == 0
    code = codegen.primitive_codes(primitive("G4", "erf"))
    assert [p["name"] for p in code] == ["G4_abcd", "G4_abcc", "G4_aabb", "G4_abbb", "G4_aaaa", "G4"]
    dispatch = code[-1]
    assert sum(line.startswith("if ") for line in dispatch["temps"]) == 14  # + the fallthrough aaaa
    assert dispatch["ret"] == "G4_aaaa(C, a)"


def test_g4_linear_is_isserlis_exactly(g4_linear, random_covariance):
    d = primitive("G4", "linear")
    c = cov_symbol
    isserlis = c("a", "b") * c("c", "d") + c("a", "c") * c("b", "d") + c("a", "d") * c("b", "c")
    assert sp.expand(d.expr - isserlis) == 0
    rng = np.random.default_rng(3)
    C = random_covariance(rng, DIM)
    for pattern in PATTERNS:
        a, b, c_, d_ = _indices(rng, pattern)
        want = C[a, b] * C[c_, d_] + C[a, c_] * C[b, d_] + C[a, d_] * C[b, c_]
        assert g4_linear.G4(C, a, b, c_, d_) == pytest.approx(want, rel=1e-15, abs=1e-15)


# ---------------------------------------------------------------------------
# the quadrature and its printing


@pytest.mark.parametrize("n", [1, 5, 20])
def test_gauss_legendre_is_exact_for_polynomials(n):
    t, w = quadrature.gauss_legendre(n)
    assert len(t) == n and all(0 < x < 1 for x in t) and list(t) == sorted(t)
    for k in range(2 * n):
        assert sum(wi * ti**k for ti, wi in zip(t, w)) == pytest.approx(1 / (k + 1), rel=1e-14)


@pytest.mark.parametrize("n", [1, 5, 20])
def test_path_rule_integrates_polynomials_in_t(n):
    """t = 1 - (1 - s)^2: a polynomial of degree k in t is one of degree 2k + 1 in s."""
    t, w = quadrature.path_rule(n)
    assert all(0 < x < 1 for x in t) and list(t) == sorted(t)
    for k in range(n):
        assert sum(wi * ti**k for ti, wi in zip(t, w)) == pytest.approx(1 / (k + 1), rel=1e-14)


def test_gauss_legendre_bad_node_count():
    with pytest.raises(ValueError, match=r"nodes: a whole number >= 1"):
        quadrature.gauss_legendre(0)


def test_integral_printed_as_a_sum_over_nodes():
    """A small integral in, the exact code out: the part free of t before the loop."""
    t = sp.Symbol("t", real=True)
    caa, cab = cov_symbol("a", "a"), cov_symbol("a", "b")
    root = sp.sqrt(1 + caa)
    integral = sp.Integral(cab * t**2 / root + sp.sin(t * cab / root) / root, (t, 0, 1))
    assert codegen.integral_code(integral, "q0", 16) == [
        "s0 = 1/math.sqrt(C_aa + 1)",
        "s1 = C_ab*s0",
        "q0 = 0.0",
        "for node in range(16):",
        "    t = PATH16_T[node]",
        "    q0 += PATH16_W[node]*(s0*math.sin(s1*t) + s1*t**2)",
    ]
    with pytest.raises(ValueError, match="from 0 to 1"):
        codegen.integral_code(sp.Integral(t, (t, 0, 2)), "q0", 16)
    # the kernels' choice: the rule that the selector gives for the largest variance
    assert codegen.integral_code(integral, "q0", None, "s", ["C_aa", "C_bb"])[2:5] == [
        f"sT_, sW_ = {quadrature.SELECTOR}(max(C_aa, C_bb))",
        "q0 = 0.0",
        "for node in range(sT_.shape[0]):",
    ]


def test_rules_choose_more_nodes_for_larger_variances():
    """quadrature.RULES: bounds and counts increasing; nodes_for takes the first bound
    that holds, the last count above it (and for NaN); the printed selector says the
    same, branch by branch."""
    bounds = [b for b, _ in quadrature.RULES]
    counts = [n for _, n in quadrature.RULES]
    assert bounds == sorted(set(bounds)) and counts == sorted(set(counts))
    for (b, n), (_, n_next) in zip(quadrature.RULES, quadrature.RULES[1:]):
        assert quadrature.nodes_for(b) == n and quadrature.nodes_for(b * 1.0001) == n_next
    assert quadrature.nodes_for(1e9) == counts[-1] == quadrature.nodes_for(float("nan"))
    ns = {}
    exec("\n".join(["import numpy as np", *quadrature.selector_code(None)]).replace("@njit", "#"), ns)
    for n in counts:
        for name, values in zip(quadrature.rule_names(n), quadrature.path_rule(n)):
            ns[name] = values
    for c in [0.0, 0.5, *bounds, *(b * 1.0001 for b in bounds), 1e9, float("nan")]:
        t, w = ns[quadrature.SELECTOR](c)
        assert (t, w) == quadrature.path_rule(quadrature.nodes_for(c)), c
