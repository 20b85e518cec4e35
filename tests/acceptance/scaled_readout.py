"""Acceptance model: a committee averaged over its K units, both layers trained.

Student ``f = (1/K) sum_k v_k g(lambda_k)`` (the 1/K of the mean-field scaling,
with K a symbol of the flow); teacher ``y = sum_m vs_m g(nu_m) + sigma zeta``.
First layer ``w_k <- w_k - (eta/sqrt(N)) dL/dlambda_k x``, readout
``v_k <- v_k - (eta_v/N) dL/dv_k``, square loss.
"""

from derive import symbols
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
sigma = Param("sigma", 0.0, "standard deviation of the additive label noise")

v = Vector("v", STUDENT, "student readout")
vs = Vector("vs", TEACHER, "teacher readout (fixed)")

j, m = student_index("j"), teacher_index("m")
f = student_sum(v.base[j] * g(lam[j]), j) / symbols.K
y_clean = teacher_sum(vs.base[m] * g(nu[m]), m)

MODEL = Model(
    name="scaled_readout",
    doc="committee with output scaled by 1/K, both layers trained",
    section="tests/acceptance",
    params=(eta, eta_v, sigma),
    vectors=(v, vs),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol),
    readout_updates=(ReadoutUpdate(v, rate=eta_v.symbol),),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
)

# settings of tests/test_acceptance.py: K differs from M, so that a 1/K read as 1/M shows
ACTIVATION = "erf"
K, M = 3, 2
PARAMS = {"eta": 1.5, "eta_v": 1.0, "sigma": 0.2}
WRONG = {"eta": 1.5, "eta_v": 0.0, "sigma": 0.2}  # the flow with a frozen readout
