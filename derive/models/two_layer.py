"""Model ``two_layer``: both layers trained (Goldt et al., NeurIPS 2019), MODELS.md section 4.

Student ``f = sum_k v_k g(lambda_k)``, teacher ``y = sum_m vs_m g(nu_m) + sigma zeta``.
First layer: ``w_k <- (1 - kappa/N) w_k - (eta/sqrt(N)) v_k delta g'(lambda_k) x``;
second layer, when trained (eta_v > 0): ``v_k <- (1 - kappa/N) v_k - (eta_v/N) delta g(lambda_k)``;
``eta_v = 0`` freezes it, decay included.
"""

import sympy as sp

from ..model import FirstLayer, Model, Param, ReadoutUpdate, Vector
from ..symbols import STUDENT, TEACHER, g, lam, nu, student_index, student_sum, teacher_index, teacher_sum

eta = Param("eta", 1.0, "first-layer learning rate (step eta/sqrt(N))")
eta_v = Param("eta_v", 0.0, "second-layer learning rate (step eta_v/N); 0 freezes the readout")
kappa = Param("kappa", 0.0, "weight decay per step kappa/N, not multiplied by a learning rate")
sigma = Param("sigma", 0.0, "standard deviation of the additive Gaussian label noise")

v = Vector("v", STUDENT, "student readout (second layer)", default=1.0)
vs = Vector("vs", TEACHER, "teacher readout (fixed)", default=1.0)

j, m = student_index("j"), teacher_index("m")
f = student_sum(v.base[j] * g(lam[j]), j)
y_clean = teacher_sum(vs.base[m] * g(nu[m]), m)

readout_decay = sp.Piecewise((kappa.symbol, sp.Ne(eta_v.symbol, 0)), (0, True))

MODEL = Model(
    name="two_layer",
    doc="two-layer network, both layers trained (Goldt et al. 2019)",
    section="MODELS.md section 4",
    params=(eta, eta_v, kappa, sigma),
    vectors=(v, vs),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol, decay=kappa.symbol),
    readout_updates=(ReadoutUpdate(v, rate=eta_v.symbol, decay=readout_decay),),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
)
