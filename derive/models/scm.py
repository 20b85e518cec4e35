"""Model ``scm``: soft committee machine, first layer only (Saad & Solla 1995), MODELS.md section 3.

Student ``f = sum_k g(lambda_k)``, teacher ``y = sum_m g(nu_m) + sigma zeta``;
``w_k <- w_k - (eta/sqrt(N)) delta g'(lambda_k) x``.
"""

from ..model import FirstLayer, Model, Param
from ..symbols import g, lam, nu, student_index, student_sum, teacher_index, teacher_sum

eta = Param("eta", 1.0, "learning rate (step eta/sqrt(N))")
sigma = Param("sigma", 0.0, "standard deviation of the additive Gaussian label noise")

j, m = student_index("j"), teacher_index("m")
f = student_sum(g(lam[j]), j)
y_clean = teacher_sum(g(nu[m]), m)

MODEL = Model(
    name="scm",
    doc="soft committee machine, first layer only (Saad & Solla 1995)",
    section="MODELS.md section 3",
    params=(eta, sigma),
    vectors=(),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
)
