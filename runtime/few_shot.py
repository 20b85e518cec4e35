"""The few-shot meta-test of a learned representation (eps_meta of docs/models/anil.md 5.7
at test-time settings).

At each recorded point of a flow trajectory of a meta-learning model, the
representation ``(Q, R, a)`` is tested on new tasks with test-time settings of
its own: ``n_s`` support samples, ``S`` inner steps, rate ``alpha_in``. The
meta-test error ``eps_test`` is the kernel's ``eps_meta`` metric (``metrics`` of
the generated module) at the recorded order parameters with these settings
substituted into the parameters: no gradient and no flow, a metric of the state.
Beside it, ``eps_test_teacher``: the same metric for the teacher's own features
(``Q = R = T``, M units, readout start ``vbar``, the mean task readout).

The metric is a function of the state: it does not depend on how the state was
trained (the outer order, the outer rates), so a trajectory of a flow at second
order is tested like one at first order, finite support sets included, though
the flow itself does not derive that combination (``Model.flow_requires``). A
setting whose metrics the kernel does not derive (``Model.metric_requires``,
none for anil) is not evaluated: its entries are NaN and the result says why
(``metadata["not_derived"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .kernels import load
from .output import atomic_path
from .trajectory import Trajectory, jsonable

DEFAULT_N_S = (1, 2, 5, 10, 20, 50, math.inf)


@dataclass
class MetaTest:
    """``alpha`` (n,), the settings ``n_s`` (j,), ``S`` (k,), ``alpha_in`` (l,),
    ``eps_test`` (n, j, k, l) and ``eps_test_teacher`` (j, k, l) as ``arrays`` (also
    attributes); ``metadata``: the trajectory's model, parameters and the settings
    not derived by the kernel."""

    arrays: dict
    metadata: dict = field(default_factory=dict)

    def __getattr__(self, name):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def save(self, out: str | Path, title: str = "") -> Path:
        """Write ``metatest.npz`` and ``metatest.png`` into ``out``, each whole or not at all."""
        out = Path(out)
        with atomic_path(out / "metatest.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.arrays)
        plot_metatest(self, out / "metatest.png", title)
        return out


def _settings(values, name: str, spec, kind) -> np.ndarray:
    """The test values of parameter ``name``, each checked against its range."""
    out = []
    for v in np.atleast_1d(np.asarray(values, dtype=float)):
        out.append(spec.param(name).check(v))
    if not out:
        raise ValueError(f"parameter {name}: give at least one test value")
    return np.array(out, dtype=kind)


def metatest(traj: Trajectory, n_s=None, S=None, alpha_in=None) -> MetaTest:
    """``eps_test`` (eps_meta of docs/models/anil.md 5.7 at test settings) along the flow
    trajectory ``traj`` (a ``Trajectory`` of a model with an inner loop, as ``flow`` returns or
    ``Trajectory.load`` reads): at every recorded alpha and every combination of
    the test settings ``n_s``, ``S``, ``alpha_in`` (defaults: n_s = 1, 2, 5, 10, 20,
    50, inf and the trajectory's own S and alpha_in)."""
    meta = traj.metadata
    if meta.get("kind") != "flow":
        raise ValueError(
            f"metatest reads a flow trajectory, got a {meta.get('kind', 'unknown')!r} one "
            "(a simulation has one per seed: run the flow of its settings)"
        )
    kernel = load(meta["model"], meta.get("activation", "erf"))
    spec = kernel.model
    if spec.inner_loop is None or "eps_meta" not in kernel.metric_names:
        raise ValueError(
            f"metatest needs a meta-learning model (an inner loop and eps_meta), got {meta['model']!r}"
        )
    params = spec.resolve_params({k: float(v) for k, v in meta["params"].items()})
    n_s = _settings(DEFAULT_N_S if n_s is None else n_s, "n_s", spec, float)
    S = _settings(params["S"] if S is None else S, "S", spec, float)
    alpha_in = _settings(params["alpha_in"] if alpha_in is None else alpha_in, "alpha_in", spec, float)
    K, M = traj.R.shape[-2:]
    vectors = {v.name: traj.arrays[v.name] for v in spec.vectors}
    states = np.stack(
        [
            kernel.pack_state({name: traj.arrays[name][t] for name, _ in kernel.module.STATE}, K, M)
            for t in range(len(traj.alpha))
        ]
    )
    consts = kernel.pack_consts({name: traj.arrays[name] for name, _ in kernel.module.CONSTS}, K, M)
    # the teacher's own features: M units with Q = R = T, the readout start vbar
    T = traj.T
    teacher = {"Q": T, "R": T}
    for v in spec.state_vectors:
        teacher[v.name] = np.asarray(vectors[spec.const_vectors[0].name], dtype=float)
    teacher_state = kernel.pack_state(teacher, M, M)
    teacher_consts = kernel.pack_consts({name: traj.arrays[name] for name, _ in kernel.module.CONSTS}, M, M)
    col = list(kernel.metric_names).index("eps_meta")
    shape = (len(n_s), len(S), len(alpha_in))
    eps = np.full((len(traj.alpha), *shape), np.nan)
    eps_teacher = np.full(shape, np.nan)
    not_derived: list[str] = []
    for j, k, l_ in np.ndindex(*shape):
        values = {**params, "n_s": n_s[j], "S": S[k], "alpha_in": alpha_in[l_]}
        try:
            spec.check_metrics(values)
        except ValueError as exc:
            if str(exc) not in not_derived:
                not_derived.append(str(exc))
            continue
        p = kernel.param_vector(values)
        eps[:, j, k, l_] = kernel.metrics(states, consts, p, K, M)[:, col]
        eps_teacher[j, k, l_] = kernel.metrics(teacher_state, teacher_consts, p, M, M)[col]
    arrays = {
        "alpha": np.asarray(traj.alpha, dtype=float),
        "n_s": n_s,
        "S": S,
        "alpha_in": alpha_in,
        "eps_test": eps,
        "eps_test_teacher": eps_teacher,
    }
    info = {
        "model": spec.name,
        "activation": kernel.activation,
        "params": jsonable(params),
        "K": int(K),
        "M": int(M),
        "not_derived": not_derived,
    }
    return MetaTest(arrays, info)


def _positions(n_s: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """x positions of the support sizes on a log axis, inf one decade past the largest
    finite one (or at 1 alone), and their tick labels."""
    finite = n_s[np.isfinite(n_s)]
    at_inf = 10 * finite.max() if finite.size else 1.0
    return np.where(np.isfinite(n_s), n_s, at_inf), [f"{v:g}" if math.isfinite(v) else "inf" for v in n_s]


def plot_metatest(result: MetaTest, path, title: str = "", curves: int = 4) -> Path:
    """The few-shot learning curves: ``eps_test`` against the test support size at
    ``curves`` alphas of the trajectory (the initial representation first, the last),
    and the teacher's own features, one panel per (S, alpha_in)."""
    from .plots import _plt, _save

    plt = _plt()
    a = result.arrays
    n_s, S, alpha_in = a["n_s"], a["S"], a["alpha_in"]
    x, labels = _positions(n_s)
    order = np.argsort(x)
    n = len(a["alpha"])
    picks = sorted(set(np.linspace(0, n - 1, min(curves, n)).round().astype(int)))
    panels = [(k, l_) for k in range(len(S)) for l_ in range(len(alpha_in))]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, len(picks)))
    for ax, (k, l_) in zip(axes.ravel(), panels):
        for c, t in zip(colors, picks):
            what = "initial representation" if t == 0 else f"alpha = {a['alpha'][t]:g}"
            ax.plot(x[order], a["eps_test"][t, order, k, l_], "o-", color=c, label=what)
        ax.plot(x[order], a["eps_test_teacher"][order, k, l_], "s--", color="k", label="teacher's features")
        ax.set_xscale("log")
        ax.set_xticks(x[order], [labels[i] for i in order])
        ax.minorticks_off()
        ax.set_xlabel("support samples n_s at test")
        ax.set_ylabel("eps_test")
        ax.set_title(f"S = {S[k]:g}, alpha_in = {alpha_in[l_]:g}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=7)
    head = title or f"meta-test of {result.metadata.get('model', '')}"
    missing = [f"{v:g}" for j, v in enumerate(n_s) if np.all(np.isnan(a["eps_test"][:, j]))]
    if missing:
        head += f"\n(n_s = {', '.join(missing)}: not derived by the kernel yet, not drawn)"
    fig.suptitle(head, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
