"""Acceptance model: ANIL whose inner loop is proximal (iMAML-like).

The inner loop minimises the population support loss plus ``lam_p |c - a|^2 / 2``,
which keeps the adapted readout near its initialisation; the outer loop is
first-order ANIL. Everything else is docs/models/anil.md. Only this file declares it.
"""

import sympy as sp

from derive.model import (
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
from derive.symbols import (
    STUDENT,
    TEACHER,
    g,
    lam,
    nu,
    nu_task,
    student_index,
    student_sum,
    teacher_index,
    teacher_sum,
    zeta,
)

eta = Param("eta", 1.0, "outer rate of the first layer")
eta_a = Param("eta_a", 0.0, "outer rate of the readout initialisation")
alpha_in = Param("alpha_in", 1.0, "inner rate")
S = Param("S", 1.0, "inner steps", integer=True)
lam_p = Param("lam_p", 0.5, "strength of the proximal term lam_p |c - a|^2 / 2")
s = Param("s", 1.0, "task spread")
sigma = Param("sigma", 0.0, "label noise")

a = Vector("a", STUDENT, "readout initialisation", default=0.0)
vbar = Vector("vbar", TEACHER, "mean task readout", default=0.0)
xi = TaskNoise("xi", TEACHER, "the task's draws")
adapted = TaskVector("adapted", (STUDENT,), "adapted readout")
v_task = TaskVector("v_task", (TEACHER,), "task readout", law=lambda m: vbar.base[m] + s.symbol * xi.base[m])
a_best = TaskVector("a_best", (STUDENT,), "best readout for the task")

j, m = student_index("j"), teacher_index("m")


def output(c):
    return student_sum(c[j] * g(lam[j]), j)


y_task = teacher_sum(v_task.base[m] * g(nu_task[m]), m)
jj = student_index("jj")
inner = InnerLoop(
    adapted=adapted,
    start=a,
    noise=xi,
    loss=lambda c: (output(c) - y_task - sigma.symbol * zeta) ** 2 / 2,
    regulariser=lambda c: lam_p.symbol * student_sum((c[jj] - a.base[jj]) ** 2, jj) / 2,
    steps=S.symbol,
    rate=alpha_in.symbol,
    optimal=a_best,
)

MODEL = Model(
    name="proximal_inner_loop",
    doc="ANIL with a proximal inner loop",
    section="tests/acceptance_meta",
    params=(eta, eta_a, alpha_in, S, lam_p, s, sigma),
    vectors=(a, vbar),
    student_output=output(adapted.base),
    teacher_output=y_task,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol, meta=MetaGradient(inner, sp.S.Zero)),
    readout_updates=(
        ReadoutUpdate(a, rate=eta_a.symbol, gradient=lambda loss, k: sp.diff(loss, adapted.base[k])),
    ),
    metrics={
        "eps_pre": (output(a.base) - y_task) ** 2 / 2,
        "eps_meta": (output(adapted.base) - y_task) ** 2 / 2,
        "eps_opt": (output(a_best.base) - y_task) ** 2 / 2,
    },
    fields=(lam, nu, nu_task),
    covariance={
        (lam, lam): lambda i, k: Q[i, k],
        (lam, nu): lambda i, k: R[i, k],
        (lam, nu_task): lambda i, k: R[i, k],
        (nu, nu): lambda i, k: T[i, k],
        (nu, nu_task): lambda i, k: T[i, k],
        (nu_task, nu_task): lambda i, k: T[i, k],
    },
    task_vectors=(adapted, v_task, a_best),
    inner_loop=inner,
    activations=("erf",),
)

# the settings the acceptance test uses
PARAMS = {"eta": 0.8, "eta_a": 0.3, "alpha_in": 0.7, "S": 2, "lam_p": 2.0, "s": 0.9, "sigma": 0.2}
WRONG = {"lam_p": 0.0}  # a flow without the proximal term
