"""Acceptance model: the square loss plus an L2 penalty on the output, through ``loss=``.

Student ``f = sum_k v_k g(lambda_k)``; teacher ``y = sum_m vs_m g(nu_m) + sigma zeta``;
loss ``L = (f - y)^2 / 2 + gamma f^2 / 2``. First layer
``w_k <- w_k - (eta/sqrt(N)) dL/dlambda_k x``, readout ``v_k <- v_k - (eta_v/N) dL/dv_k``.
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
gamma = Param("gamma", 0.0, "strength of the penalty gamma f^2 / 2 on the output")
sigma = Param("sigma", 0.0, "standard deviation of the additive label noise")

v = Vector("v", STUDENT, "student readout")
vs = Vector("vs", TEACHER, "teacher readout (fixed)")

j, m = student_index("j"), teacher_index("m")
f = student_sum(v.base[j] * g(lam[j]), j)
y_clean = teacher_sum(vs.base[m] * g(nu[m]), m)


def penalised_square_loss(f, y):
    return (f - y) ** 2 / 2 + gamma.symbol * f**2 / 2


MODEL = Model(
    name="output_penalty",
    doc="square loss plus gamma f^2 / 2, both layers trained",
    section="tests/acceptance",
    params=(eta, eta_v, gamma, sigma),
    vectors=(v, vs),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol),
    readout_updates=(ReadoutUpdate(v, rate=eta_v.symbol),),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
    loss=penalised_square_loss,
)

# settings of tests/test_acceptance.py
ACTIVATION = "erf"
K, M = 2, 2
PARAMS = {"eta": 1.0, "eta_v": 0.5, "gamma": 0.3, "sigma": 0.2}
WRONG = {"eta": 1.0, "eta_v": 0.5, "gamma": 0.0, "sigma": 0.2}  # the flow without the penalty
