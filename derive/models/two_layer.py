r"""Model ``two_layer``: a two-layer network whose two layers both learn.

The page docs/models/two_layer.md is rendered from this docstring (from its first
heading on) and the declarations below (``python -m derive docs``); it is
section 4 of the docs.

## 4.1 Network

As [`scm`](scm.md), with readouts: a student readout $v \in \mathbb{R}^K$ that
learns and a fixed teacher readout $v^* \in \mathbb{R}^M$ (`vs` in files and on
the command line), as in Goldt et al. (NeurIPS 2019):

$$
f(x) = \sum_{k} v_k\, g(\lambda_k), \qquad y = \sum_{m} v^*_m\, g(\nu_m) + \sigma \zeta .
$$

## 4.2 Learning rules

Online SGD on $L = (f - y)^2 / 2$ with $\delta = f - y$, and a weight decay
$\kappa \ge 0$ that is not multiplied by a learning rate (the convention of
Goldt et al.'s code):

$$
w_k \leftarrow \Big(1 - \frac{\kappa}{N}\Big) w_k - \frac{\eta}{\sqrt{N}}\, v_k\, \delta\, g'(\lambda_k)\, x,
\qquad
v_k \leftarrow \Big(1 - \frac{\kappa}{N}\Big) v_k - \frac{\eta_v}{N}\, \delta\, g(\lambda_k).
$$

The first layer steps by $\eta/\sqrt{N}$ along the input, the readout by
$\eta_v/N$: both then change by O(1) per unit of $\alpha$ = steps / N. With
$\eta_v = 0$ the readout is frozen, decay included (the flow's readout decay is
$\kappa$ only when $\eta_v \ne 0$).

## 4.3 Flow

With $d = y - f$:

$$
\frac{dR_{kn}}{d\alpha} = \eta\, v_k\, \mathrm{E}[g'(\lambda_k)\, \nu_n\, d] - \kappa R_{kn},
$$

$$
\frac{dQ_{kl}}{d\alpha} = \eta\, v_k\, \mathrm{E}[g'(\lambda_k)\, \lambda_l\, d]
+ \eta\, v_l\, \mathrm{E}[g'(\lambda_l)\, \lambda_k\, d]
+ \eta^2 v_k v_l\, \mathrm{E}[g'(\lambda_k)\, g'(\lambda_l)\, d^2] - 2 \kappa Q_{kl},
$$

$$
\frac{dv_k}{d\alpha} = \eta_v\, \mathrm{E}[g(\lambda_k)\, d] - \kappa v_k
\quad (\eta_v \ne 0;\ \text{else } 0).
$$

The decay terms are deterministic; products of decay and gradient steps are
O(1/N) and drop out.

## 4.4 Metric

$$
\epsilon_g = \tfrac12 \Big[\sum_{kl} v_k v_l I_2(\lambda_k, \lambda_l)
- 2 \sum_{km} v_k v^*_m I_2(\lambda_k, \nu_m) + \sum_{mn} v^*_m v^*_n I_2(\nu_m, \nu_n)\Big]
$$

(label noise excluded).
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
    section="docs/models/two_layer.md",
    params=(eta, eta_v, kappa, sigma),
    vectors=(v, vs),
    student_output=f,
    teacher_output=y_clean,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol, decay=kappa.symbol),
    readout_updates=(ReadoutUpdate(v, rate=eta_v.symbol, decay=readout_decay),),
    metrics={"eps_g": (f - y_clean) ** 2 / 2},
)
