"""Acceptance model: ANIL whose task readouts are correlated across teacher units.

``v_task_m = vbar_m + s (xi_m + rho sum_n xi_n)``: the task covariance is
``s^2 (I + rho 1 1^T)^2`` instead of ``s^2 I``. Everything else is docs/models/anil.md
at first order. Only this file declares it.
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
rho = Param("rho", 0.5, "correlation of the task readouts across teacher units", minimum=None)
s = Param("s", 1.0, "task spread")
sigma = Param("sigma", 0.0, "label noise")

a = Vector("a", STUDENT, "readout initialisation", default=0.0)
vbar = Vector("vbar", TEACHER, "mean task readout", default=0.0)
xi = TaskNoise("xi", TEACHER, "the task's draws")
adapted = TaskVector("adapted", (STUDENT,), "adapted readout")
nn = teacher_index("nn")
v_task = TaskVector(
    "v_task",
    (TEACHER,),
    "task readout, correlated across teacher units",
    law=lambda m: vbar.base[m] + s.symbol * (xi.base[m] + rho.symbol * teacher_sum(xi.base[nn], nn)),
)

j, m = student_index("j"), teacher_index("m")


def output(c):
    return student_sum(c[j] * g(lam[j]), j)


y_task = teacher_sum(v_task.base[m] * g(nu_task[m]), m)
inner = InnerLoop(
    adapted=adapted,
    start=a,
    noise=xi,
    loss=lambda c: (output(c) - y_task - sigma.symbol * zeta) ** 2 / 2,
    steps=S.symbol,
    rate=alpha_in.symbol,
)

MODEL = Model(
    name="correlated_tasks",
    doc="ANIL with task readouts correlated across teacher units",
    section="tests/acceptance_meta",
    params=(eta, eta_a, alpha_in, S, rho, s, sigma),
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
    task_vectors=(adapted, v_task),
    inner_loop=inner,
    activations=("erf",),
)

PARAMS = {"eta": 0.8, "eta_a": 0.3, "alpha_in": 0.7, "S": 2, "rho": 0.6, "s": 0.9, "sigma": 0.2}
WRONG = {"rho": 0.0}  # a flow with uncorrelated task readouts
