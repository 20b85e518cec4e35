"""Model ``anil``: meta-learning a shared representation on streaming tasks (MODELS.md section 5).

Tasks: readout ``vt = vbar + s xi``, ``xi ~ N(0, I_M)``, teacher fields ``nut``
with ``Cov(lambda, nut) = R``, ``Cov(nu, nut) = T``, ``Cov(nut, nut) = T + eps_B^2 I``;
labels ``y = sum_m vt_m g(nut_m) + sigma zeta``.
Inner loop: ``S`` steps of gradient descent with rate ``alpha_in`` on the
population support loss from ``c = a``, giving the adapted readout ``ap`` (a').
Outer loop, one task per step, ``n_q`` query samples:
``w_k <- w_k - (eta/sqrt(N)) ap_k delta g'(lambda_k) x`` (+ the gradient through
the inner loop when ``order = 2``), ``a <- a - (eta_a/N) delta g(lambda)``
(``(da'/da)^T delta g(lambda)`` when ``order = 2``).
"""

import math

import sympy as sp

from ..model import (
    FirstLayer,
    InnerLoop,
    MetaGradient,
    Model,
    Param,
    Q,
    R,
    ReadoutUpdate,
    T,
    TaskNoise,
    TaskVector,
    Vector,
)
from ..symbols import (
    STUDENT,
    TEACHER,
    g,
    lam,
    nu,
    nut,
    student_index,
    student_sum,
    teacher_index,
    teacher_sum,
    zeta,
)

eta = Param("eta", 1.0, "outer learning rate of the first layer (step eta/sqrt(N))")
eta_a = Param("eta_a", 0.0, "outer learning rate of the readout initialisation a (step eta_a/N)")
alpha_in = Param("alpha_in", 1.0, "inner-loop learning rate")
S = Param("S", 1.0, "inner-loop steps (0: no adaptation)", integer=True)
order = Param(
    "order", 1.0, "1: first-order ANIL, 2: exact gradient through the inner loop", choices=(1.0, 2.0)
)
n_q = Param("n_q", 1.0, "query samples per task", minimum=1.0, integer=True)
n_s = Param(
    "n_s",
    math.inf,
    "support samples per task (inf: population support loss)",
    minimum=1.0,
    integer=True,
    allow_inf=True,
)
s = Param("s", 1.0, "task spread: vt = vbar + s xi")
eps_B = Param("eps_B", 0.0, "feature variability across tasks: B_m + eps_B z_m")
sigma = Param("sigma", 0.0, "standard deviation of the additive Gaussian label noise")

a = Vector("a", STUDENT, "readout initialisation (meta-learned when eta_a > 0)", default=0.0)
vbar = Vector("vbar", TEACHER, "mean task readout", default=0.0)
xi = TaskNoise("xi", TEACHER, "the task's draws, xi ~ N(0, I_M)")
ap = TaskVector("ap", (STUDENT,), "adapted readout a' after the inner loop")
vt = TaskVector(
    "vt", (TEACHER,), "task readout vbar + s xi", law=lambda m: vbar.base[m] + s.symbol * xi.base[m]
)
aopt = TaskVector("aopt", (STUDENT,), "best readout for the task, C^+ D vt")

j, m = student_index("j"), teacher_index("m")


def output(c):
    """Student output with readout ``c``: sum_j c_j g(lambda_j)."""
    return student_sum(c[j] * g(lam[j]), j)


y_task = teacher_sum(vt.base[m] * g(nut[m]), m)

second = sp.Piecewise((1, sp.Eq(order.symbol, 2)), (0, True))
first = 1 - second

inner = InnerLoop(
    adapted=ap,
    start=a,
    noise=xi,
    # the per-sample support loss of a readout c on a noisy label: its expectation
    # over the fields and the noise is the population support loss of MODELS.md 5.3
    loss=lambda c: (output(c) - y_task - sigma.symbol * zeta) ** 2 / 2,
    steps=S.symbol,
    rate=alpha_in.symbol,
    optimal=aopt,
    second_order=second,
    support=n_s.symbol,
)


def readout_gradient(loss, k):
    """dL/da_k: dL/da'_k at first order, sum_j (da'_j/da_k) dL/da'_j at second order."""
    jj = student_index("jj")
    return first * sp.diff(loss, ap.base[k]) + second * student_sum(
        inner.da.base[jj, k] * sp.diff(loss, ap.base[jj]), jj
    )


MODEL = Model(
    name="anil",
    doc="meta-learning a shared representation, ANIL on streaming tasks (Wang, Yip & Li 2024)",
    section="MODELS.md section 5",
    params=(eta, eta_a, alpha_in, S, order, n_q, n_s, s, eps_B, sigma),
    vectors=(a, vbar),
    student_output=output(ap.base),
    teacher_output=y_task,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol, batch=n_q.symbol, meta=MetaGradient(inner, second)),
    readout_updates=(ReadoutUpdate(a, rate=eta_a.symbol, gradient=readout_gradient),),
    metrics={
        "eps_pre": (output(a.base) - y_task) ** 2 / 2,
        "eps_meta": (output(ap.base) - y_task) ** 2 / 2,
        "eps_opt": (output(aopt.base) - y_task) ** 2 / 2,
    },
    fields=(lam, nu, nut),
    covariance={
        (lam, lam): lambda i, k: Q[i, k],
        (lam, nu): lambda i, k: R[i, k],
        (lam, nut): lambda i, k: R[i, k],
        (nu, nu): lambda i, k: T[i, k],
        (nu, nut): lambda i, k: T[i, k],
        (nut, nut): lambda i, k: T[i, k] + eps_B.symbol**2 * sp.KroneckerDelta(i, k),
    },
    task_vectors=(ap, vt, aopt),
    inner_loop=inner,
    flow_requires=(
        (
            "n_s",
            math.inf,
            "finite support sets, MODELS.md 5.6, are simulated (inner mode samples) but not derived",
        ),
    ),
)
