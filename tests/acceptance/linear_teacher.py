"""Acceptance model: an erf student learning a linear teacher.

Student ``f = sum_k v_k g(lambda_k)``; teacher ``y = sum_m vs_m nu_m + sigma zeta``,
the bare fields (no activation). First layer
``w_k <- (1 - kappa/N) w_k - (eta/sqrt(N)) dL/dlambda_k x``, readout
``v_k <- (1 - kappa/N) v_k - (eta_v/N) dL/dv_k``, square loss.
"""

from derive.model import FirstLayer, Model, Param, ReadoutUpdate, Vector
from derive.symbols import (
    STUDENT,
    TEACHER,
    g,
    lam,
    nu,
    student_index,
    student_sum,
    teacher_index,
    teacher_sum,
)

eta = Param("eta", 1.0, "first-layer learning rate (step eta/sqrt(N))")
eta_v = Param("eta_v", 0.5, "readout learning rate (step eta_v/N)")
kappa = Param("kappa", 0.0, "weight decay per step kappa/N, both layers")
sigma = Param("sigma", 0.0, "standard deviation of the additive label noise")

v = Vector("v", STUDENT, "student readout")
vs = Vector("vs", TEACHER, "teacher readout (fixed)")

j, m = student_index("j"), teacher_index("m")
f = student_sum(v.base[j] * g(lam[j]), j)
y_clean = teacher_sum(vs.base[m] * nu[m], m)

MODEL = Model(
    name="linear_teacher",
    doc="erf student, linear teacher, both layers trained",
    section="tests/acceptance",
    params=(eta, eta_v, kappa, sigma),
    vectors=(v, vs),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol, decay=kappa.symbol),
    readout_updates=(ReadoutUpdate(v, rate=eta_v.symbol, decay=kappa.symbol),),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
)

# settings of tests/test_acceptance.py
ACTIVATION = "erf"
K, M = 2, 2
PARAMS = {"eta": 1.0, "eta_v": 0.5, "kappa": 0.1, "sigma": 0.6}
WRONG = {"eta": 1.0, "eta_v": 0.5, "kappa": 0.1}  # the flow without the label noise
