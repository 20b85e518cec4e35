r"""Model ``scm``: the soft committee machine, only the first layer learns.

The page docs/models/scm.md is rendered from this docstring (from its first
heading on) and the declarations below (``python -m derive docs``); it is section 3 of the docs.

## 3.1 Network

A student of K units learns from a teacher of M units; both sum their hidden
units with unit weights (Saad & Solla, Phys. Rev. E 52, 4225, 1995):

$$
f(x) = \sum_{k} g(\lambda_k), \qquad y = \sum_{m} g(\nu_m) + \sigma \zeta,
$$

with the local fields $\lambda_k = w_k \cdot x / \sqrt{N}$ and
$\nu_m = B_m \cdot x / \sqrt{N}$ of a fresh input $x \sim \mathcal{N}(0, I_N)$
at every step, $\zeta$ a standard Gaussian label noise and
$g(z) = \mathrm{erf}(z/\sqrt{2})$ (or $g(z) = z$), as in
[the conventions](../conventions.md).

## 3.2 Learning rule

Online SGD on the square loss $L = (f - y)^2 / 2$, with the error
$\delta = f - y$:

$$
w_k \leftarrow w_k - \frac{\eta}{\sqrt{N}}\, \delta\, g'(\lambda_k)\, x .
$$

The step is $\eta/\sqrt{N}$ along $x$, so that with $\alpha$ = steps / N as
time the overlaps $Q = w w^T / N$, $R = w B^T / N$ move by O(1) per unit of
$\alpha$ ($T = B B^T / N$ is fixed).

## 3.3 Flow

Written with $d = y - f = -\delta$, one expectation over the Gaussian fields per
term:

$$
\frac{dR_{kn}}{d\alpha} = \eta\, \mathrm{E}[g'(\lambda_k)\, \nu_n\, d], \qquad
\frac{dQ_{kl}}{d\alpha} = \eta\, \mathrm{E}[g'(\lambda_k)\, \lambda_l\, d]
+ \eta\, \mathrm{E}[g'(\lambda_l)\, \lambda_k\, d]
+ \eta^2\, \mathrm{E}[g'(\lambda_k)\, g'(\lambda_l)\, d^2].
$$

Expanding $d$ and $d^2$ as sums over units turns the first two into $I_3$
terms and the last into $I_4$ terms; the label noise adds
$\eta^2 \sigma^2 J_2(\lambda_k, \lambda_l)$ to $dQ_{kl}/d\alpha$. The engine
does this expansion itself (below, "Derived flow").

## 3.4 Metric

The generalisation error, label noise excluded:

$$
\epsilon_g = \tfrac12 \mathrm{E}[(f - y_\mathrm{clean})^2]
= \tfrac12 \Big[\sum_{kl} I_2(\lambda_k, \lambda_l) - 2 \sum_{km} I_2(\lambda_k, \nu_m)
+ \sum_{mn} I_2(\nu_m, \nu_n)\Big].
$$

`scm` is [`two_layer`](two_layer.md) with all readouts 1, $\eta_v = 0$ and
$\kappa = 0$; the tests hold the two against each other.
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
    section="docs/models/scm.md",
    params=(eta, sigma),
    vectors=(),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
)
