r"""Model ``anil``: meta-learning a shared representation on streaming tasks.

The page docs/models/anil.md is rendered from this docstring (from its first
heading on) and the declarations below (``python -m derive docs``); it is
section 5 of the docs.

## 5. Meta-learning on streaming tasks

The model of Wang, Yip & Li (2024, [arXiv:2408.12545](https://arxiv.org/abs/2408.12545)):
gradient-based meta-learning of a two-layer network in the teacher-student
setting. All tasks share the teacher's features; each task has its own readout.
The first layer of the meta-learner (the representation) learns in an outer loop
across tasks, while an inner loop adapts the readout to each task: the ANIL form
of MAML. At large N, a few inner-loop steps on the first layer would move the
fields by O(1/sqrt(N)) only, so only the readout adapts.

## 5.1 Tasks

The teacher features $B_m$ have overlaps $T$ (default $T = I$). Task $\tau$
draws its readout

$$
\tilde v^\tau = \bar v + s\, \xi^\tau, \qquad \xi^\tau \sim \mathcal{N}(0, I_M),
$$

independently of every other task ($\bar v$: the mean readout, `vbar`;
$s \ge 0$: the spread of the tasks). With feature variability $\epsilon_B \ge 0$
the task also uses teacher vectors $B_m + \epsilon_B z^\tau_m$, fresh
$z^\tau_m \sim \mathcal{N}(0, I_N)$. Its teacher fields $\tilde\nu_m$ (`nu_task`) then
differ from the shared teacher's $\nu_m$ (the ones $R$ measures) by an
independent unit Gaussian times $\epsilon_B$:
$\mathrm{Cov}(\lambda, \tilde\nu) = R$, $\mathrm{Cov}(\nu, \tilde\nu) = T$,
$\mathrm{Cov}(\tilde\nu, \tilde\nu) = T + \epsilon_B^2 I$. A task's labels are
$y = \sum_m \tilde v^\tau_m\, g(\tilde\nu_m) + \sigma \zeta$.

## 5.2 The meta-learner

A first layer $W$ of K units and a readout initialisation $a \in \mathbb{R}^K$.
With a readout $c$ the output is $f_c(x) = \sum_k c_k\, g(\lambda_k)$.

## 5.3 Inner loop

Starting from $c^{(0)} = a$, $S \ge 0$ steps of gradient descent with rate
$\alpha_\mathrm{in}$ on the task's support loss give the adapted readout
$a' = c^{(S)}$ (`adapted` in the model file):
$c^{(s+1)} = c^{(s)} - \alpha_\mathrm{in} \nabla_c L_\mathrm{sup}(c^{(s)})$.

With the support loss over the whole population ($n_s = \infty$, the default),
$L_\mathrm{sup}(c) = \tfrac12 \mathrm{E}_x[(f_c - y)^2]$ and
$\nabla_c L_\mathrm{sup} = C c - D \tilde v^\tau$ with
$C_{kl} = I_2(\lambda_k, \lambda_l)$ and $D_{km} = I_2(\lambda_k, \tilde\nu_m)$.
The recursion is linear:

$$
a' = A_S\, a + G_S\, \tilde v^\tau, \qquad A_S = (I - \alpha_\mathrm{in} C)^S, \qquad
G_S = \alpha_\mathrm{in} \sum_{s < S} (I - \alpha_\mathrm{in} C)^s D,
$$

so over the tasks $(a', \tilde v^\tau)$ is jointly Gaussian, with mean
$(A_S a + G_S \bar v, \bar v)$ and covariance

$$
s^2 \begin{pmatrix} G_S G_S^T & G_S \\ G_S^T & I \end{pmatrix}.
$$

The engine does not use this closed form: it derives the support gradient from the model's
loss and runs the recursion on the task's means and loadings
(derive/meta.py), which also covers other inner losses.

## 5.4 Outer loop

Every step draws a new task, adapts to it, then takes $n_q$ fresh query samples
of the task (default 1), with $\delta = f_{a'}(x) - y$.

- First order (`order = 1`, FO-ANIL):
  $w_k \leftarrow w_k - \frac{\eta}{\sqrt N}\, a'_k\, \delta\, g'(\lambda_k)\, x$ and
  $a \leftarrow a - \frac{\eta_a}{N}\, \delta\, g(\lambda)$, each averaged over
  the $n_q$ query samples.
- Second order (`order = 2`): the exact gradient of the query loss through the
  inner loop. $w_k$ moves in addition by
  $-\eta \sum_j \delta\, g(\lambda_j)\, \partial a'_j / \partial w_k$, and $a$ by
  $-\frac{\eta_a}{N} A_S^T \delta\, g(\lambda)$ instead of the first-order step.
  $a'$ depends on $W$ only through $Q$ and $R$, so (with $Q$ a symmetric
  variable: $Q_{kl}$ and $Q_{lk}$ are one entry)

$$
\frac{\partial a'_j}{\partial w_k} = \frac1N \Big[\sum_l \frac{\partial a'_j}{\partial Q_{kl}}
(1 + \delta_{kl})\, w_l + \sum_m \frac{\partial a'_j}{\partial R_{km}} B_m\Big].
$$

With $\epsilon_B > 0$ it is $T$, not $T + \epsilon_B^2 I$, that enters the
contraction of this direction at large N.

$\eta_a = 0$ (the default) keeps the readout initialisation fixed (default $a = 0$).

## 5.5 Flows

Both the query sample's fields and the task's $z = (a', \tilde v^\tau)$ are
averaged over; with $d = y - f_{a'}$, at first order

$$
\frac{dR_{kn}}{d\alpha} = \eta\, \mathrm{E}[a'_k\, g'(\lambda_k)\, \nu_n\, d], \qquad
\frac{da_j}{d\alpha} = \eta_a\, \mathrm{E}[g(\lambda_j)\, d],
$$

$$
\frac{dQ_{kl}}{d\alpha} = \eta\, \mathrm{E}[a'_k\, g'(\lambda_k)\, \lambda_l\, d] + (k \leftrightarrow l)
+ \frac{\eta^2}{n_q}\, \mathrm{E}[a'_k a'_l\, g'(\lambda_k)\, g'(\lambda_l)\, d^2].
$$

Each expectation is a product of task moments of $z$ (means, covariances, and
fourth moments by Isserlis' theorem) and primitives $I_2, I_3, I_4, J_2$ of the
fields. At second order, $-\eta \sum_j \mathrm{E}[\delta\, g(\lambda_j)\, \partial a'_j]$
is added, contracted as the chain rule of 5.4 says; for $dR_{kn}$ with

$$
\sum_l \frac{\partial a'_j}{\partial Q_{kl}} (1 + \delta_{kl}) R_{ln}
+ \sum_m \frac{\partial a'_j}{\partial R_{km}} T_{mn},
$$

for $dQ_{kl}$ the same with $Q_{il}$ and $R_{lm}$, plus $(k \leftrightarrow l)$.
Cross terms of first- and second-order steps are O(1/N).

## 5.6 Finite support sets

With `n_s` finite, each task's inner loop uses $n_s$ fresh support samples: the
sample matrices $\hat C = \frac1{n_s} \sum_\mu g^\mu g^{\mu T}$ and
$\hat h = \frac1{n_s} \sum_\mu y^\mu g^\mu$ replace $C$ and $D \tilde v^\tau$, so
that $a'$ depends on the support set as well as on the task. At first order the
update of 5.4 is unchanged, and the flows of 5.5 hold with the moments of
$z = (a', \tilde v^\tau)$ over the task and the support set. The fourth moments
(the $\eta^2$ term of $dQ$) are those of a support set that is Gaussian *given
the task*: Isserlis' value from the means and covariances, plus, because the
support set's covariance $V(\xi)$ of $a'$ depends on the task draws $\xi$, the
covariance over the tasks of $V(\xi)$ with the products of the conditional means
(`CMV_*` in the generated code) and with itself (`CVV_*`). A closure Gaussian
over task and support set jointly leaves out these terms, an error of order
$1/n_s$ (in the reference scenario's start at $n_s = 3$ it made $dQ$ 20 % too
small); what remains is the non-Gaussian part of the support set (its third and
fourth cumulants, of order $1/n_s^2$).

The engine derives these moments from the per-sample support loss
(derive/meta.py, `_support_moments`). The sample gradient at a readout $c$ is
$\frac1{n_s}\sum_\mu A(x^\mu)\, w$ with $w = (c, \tilde v^\tau, 1)$ and $A$ the
per-sample gradient's coefficients; its fluctuation $\varepsilon(c)$ has
covariance $\frac1{n_s} N[w, w']$, with $N$ the covariance of the coefficients
over the fields, whose entries are expectations of four $g$ factors ($G_4$ of
docs/conventions.md section 2). Perturbing the recursion to first order in the
fluctuation, $J^{(s+1)} = P J^{(s)} - B\, \varepsilon(c^{(s)})$ with
$P = \partial c^{(s+1)} / \partial c^{(s)}$ and $B = \partial c^{(s+1)}/\partial h$,
gives the support set's covariance of $a'$, $V = \mathrm{E}[J^{(S)} J^{(S)T}]$,
which is added to the task covariance; to second order the mean moves by
$m^{(S)}$, $m^{(s+1)} = P m^{(s)} + \partial^2_{H c}c^{(s+1)} : \mathrm{Cov}(\delta H, J^{(s)})$
(an affine function of the task draws, so it shifts the loadings too). One
inner step is exact at every $n_s$ ($a' = a + \alpha_\mathrm{in} \bar r$, an
average of i.i.d. terms); more steps are exact to $O(1/n_s)$, with an error
$O(1/n_s^2)$. $n_s = \infty$ is the population flow exactly.

At second order the gradient through the inner loop runs along the support
inputs as well: $w_k$ receives $\sum_\mu \gamma^\mu_k x^\mu$ with
$\gamma^\mu_k = b \cdot \partial a' / \partial \lambda^\mu_k$, $b = \partial L_q / \partial a'$.
Two facts make it derivable. Moving $w_k$ along a direction $u$ moves every support
field $\lambda^\mu_k$ by $u \cdot x^\mu / \sqrt N$, which is how the support set's
covariance moves when $Q_{kl}$ ($u = w_l$) or $R_{kn}$ ($u = B_n$) moves; so
$\mathrm{E}[\sum_\mu \gamma^\mu_k\, u \cdot x^\mu / \sqrt N]$ is the derivative of
the expected query loss along that change of the *support* covariance alone,
contracted with $Q$, $R$, $T$ as in 5.5. And the query loss is quadratic in $a'$:
its expectation reads only the mean of $a'$ (population iterate plus mean shift)
and its covariance $V$. The engine differentiates the support block of the task
program along every direction of $Q$, $R$ and the start $a$ (derive/meta.py
`tangent`, forward mode: every array $X$ it computes gets a tangent `D_X`, every
primitive its derivative along $dC$, `G4_dir` included); the tangent of the mean
shift joins the sensitivity's mean and loading, and half the tangent of $V$ is
the support-set covariance of $a'$ with the sensitivity (`V_adapted_dQ`, ...),
since $\tfrac12 \mathrm{tr}(C\, dV) = \sum_{jl} C_{jl} \mathrm{Cov}(a'_j, dV_{jl}/2)$.
With one inner step these terms are exact at every $n_s$; with more, to
$O(1/n_s)$ like the moments they differentiate.

The $\eta^2$ term $\mathrm{E}[\sum_\mu \gamma^\mu_k \gamma^\mu_l]$ (`GG_adapted`) is of
order $1/n_s$ and is derived to leading order: with
$\psi_{jk}(c; x) = \partial^2 \ell / \partial c_j \partial \lambda_k$ ($\ell$ the
per-sample support loss), $\partial a'/\partial \lambda^\mu_k = -\frac1{n_s}
\sum_s \Pi^s \psi_k(c^{(s)}; x^\mu)$ with $\Pi^s = P^{S-1-s} B$, so
$\mathrm{GG}_{kl} = \frac1{n_s} \sum_{s,t} \mathrm{E}_\tau[\sum_{jj'}
(\Pi^{sT} \mathrm{E}_q[b b^T] \Pi^t)_{jj'}\, \mathrm{E}_x[\psi_{jk}(c^{(s)}) \psi_{j'l}(c^{(t)})]]$,
$\mathrm{E}_q[b b^T] = \mathrm{E}[b_1 b_1^T]/n_q + (1 - 1/n_q) \mathrm{E}[b] \mathrm{E}[b]^T$;
both factors are quadratic in the task draws and their product is averaged over
the task exactly. Against the closure-free Monte Carlo at the validation start
(one inner step, $s = 1.5$) it is 5 % low at $n_s = 3$ (the next order,
$1/n_s^2$) and within the sampling error at $n_s = 10$.

## 5.7 Metrics

All are errors on a new task, $\tfrac12 \mathrm{E}_\tau \mathrm{E}_x[(f - y_\mathrm{clean})^2]$, with closed
forms in $I_2$ and the task moments:

- `eps_pre`: with the readout before adaptation, $a$;
- `eps_meta`: with the adapted readout $a'$ (the meta-generalisation error, what
  is trained); with a finite `n_s`, after adapting on $n_s$ support samples,
  averaged over the task and the support set (exact from the first and second
  moments of 5.6);
- `eps_opt`: with the best readout for the task, $a^* = C^{+} D \tilde v^\tau$:
  the quality of the representation alone.

The metrics are functions of the state and of the inner loop's settings only,
not of the outer order: they are derived for every `n_s` at both orders (the
meta-test, `runtime.metatest`, tests a second-order trajectory at finite `n_s`).

The normalised overlaps $r_{km} = R_{km} / \sqrt{Q_{kk} T_{mm}}$ measure
specialisation: one student unit per teacher unit with $|r| \to 1$.
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
    nu_task,
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
s = Param("s", 1.0, "task spread: v_task = vbar + s xi")
eps_B = Param("eps_B", 0.0, "feature variability across tasks: B_m + eps_B z_m")
sigma = Param("sigma", 0.0, "standard deviation of the additive Gaussian label noise")

a = Vector("a", STUDENT, "readout initialisation (meta-learned when eta_a > 0)", default=0.0)
vbar = Vector("vbar", TEACHER, "mean task readout", default=0.0)
xi = TaskNoise("xi", TEACHER, "the task's draws, xi ~ N(0, I_M)")
adapted = TaskVector("adapted", (STUDENT,), "adapted readout a' after the inner loop")
v_task = TaskVector(
    "v_task", (TEACHER,), "task readout vbar + s xi", law=lambda m: vbar.base[m] + s.symbol * xi.base[m]
)
a_best = TaskVector("a_best", (STUDENT,), "best readout for the task, C^+ D v_task")

j, m = student_index("j"), teacher_index("m")


def output(c):
    """Student output with readout ``c``: sum_j c_j g(lambda_j)."""
    return student_sum(c[j] * g(lam[j]), j)


y_task = teacher_sum(v_task.base[m] * g(nu_task[m]), m)

second = sp.Piecewise((1, sp.Eq(order.symbol, 2)), (0, True))
first = 1 - second

inner = InnerLoop(
    adapted=adapted,
    start=a,
    noise=xi,
    # the per-sample support loss of a readout c on a noisy label: its expectation
    # over the fields and the noise is the population support loss of docs/models/anil.md 5.3
    loss=lambda c: (output(c) - y_task - sigma.symbol * zeta) ** 2 / 2,
    steps=S.symbol,
    rate=alpha_in.symbol,
    optimal=a_best,
    second_order=second,
    support=n_s.symbol,
)


def readout_gradient(loss, k):
    """dL/da_k: dL/da'_k at first order, sum_j (da'_j/da_k) dL/da'_j at second order."""
    jj = student_index("jj")
    return first * sp.diff(loss, adapted.base[k]) + second * student_sum(
        inner.da.base[jj, k] * sp.diff(loss, adapted.base[jj]), jj
    )


MODEL = Model(
    name="anil",
    doc="meta-learning a shared representation, ANIL on streaming tasks (Wang, Yip & Li 2024)",
    section="docs/models/anil.md",
    params=(eta, eta_a, alpha_in, S, order, n_q, n_s, s, eps_B, sigma),
    vectors=(a, vbar),
    student_output=output(adapted.base),
    teacher_output=y_task,
    noise=sigma.symbol,
    first_layer=FirstLayer(rate=eta.symbol, batch=n_q.symbol, meta=MetaGradient(inner, second)),
    readout_updates=(ReadoutUpdate(a, rate=eta_a.symbol, gradient=readout_gradient),),
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
        (nu_task, nu_task): lambda i, k: T[i, k] + eps_B.symbol**2 * sp.KroneckerDelta(i, k),
    },
    task_vectors=(adapted, v_task, a_best),
    inner_loop=inner,
)
