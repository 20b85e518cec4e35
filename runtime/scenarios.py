"""The main job, the studies and the validation (docs/models/anil.md and docs/simulation.md).

- ``main_job``: the reference scenario of docs/simulation.md section 7, flow and a
  finite-N simulation beside it, with its figures;
- ``STUDIES``: one figure each on a question the paper raises (inner rate and
  steps, over-parameterisation, task variability, first against second order);
- ``validate``: flow against simulation at two sizes, many seeds, printed in
  units of the seeds' standard error (not run by CI).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from .few_shot import DEFAULT_N_S, _positions, metatest
from .init import Init
from .integrate import FlowDiverged, FlowInterrupted, SimulationInterrupted, flow
from .output import write_text
from .plots import _plt, _save, annotate_matrix, plot_metrics, plot_overlaps, plot_r_heatmap
from .simulate import simulate
from .trajectory import Trajectory

META_METRICS = ("eps_meta", "eps_pre", "eps_opt")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reference_init(d: float = 1e-3, K: int = 2, M: int = 2, q0: float = 0.01, r0: float = 0.01) -> Init:
    """docs/simulation.md section 7: ``Q0 = q0 I``, ``R0 = r0 (all ones) + d (+1 on the
    diagonal, -1 off it)`` (for K != M the pattern is unit k favouring teacher k mod M)."""
    R0 = np.full((K, M), r0)
    for k in range(K):
        for m in range(M):
            R0[k, m] += d if k % M == m else -d
    return Init(q0 * np.eye(K), R0, np.eye(M), {"a": np.zeros(K), "vbar": np.zeros(M)})


# docs/simulation.md section 7, the main job's default
REFERENCE = {
    "model": "anil",
    "params": {
        "eta": 1.0,
        "eta_a": 0.0,
        "alpha_in": 1.0,
        "S": 1,
        "order": 1,
        "n_q": 1,
        "s": 1.0,
        "eps_B": 0.0,
        "sigma": 0.0,
    },
    "d": 1e-3,
    "t_max": 300.0,
    "dt": 0.01,
    "record_every": 2.0,
    "N": 1000,
    "seeds": 4,
    "sim_record_every": 5.0,
}


def align_units(sim: Trajectory, reference: np.ndarray) -> Trajectory:
    """Relabel each seed's student units to match ``reference`` (K, M) overlaps at
    the last time: hidden units are exchangeable, and seeds may specialise in
    different pairings, which a plain mean over seeds would blur."""
    a = dict(sim.arrays)
    K = a["Q"].shape[-1]
    for s_ in range(a["Q"].shape[0]):
        best = max(
            itertools.permutations(range(K)), key=lambda p: float(np.sum(a["r"][s_, -1][list(p)] * reference))
        )
        p = list(best)
        a["Q"][s_] = a["Q"][s_][:, p][:, :, p]
        for name in ("R", "r"):
            a[name][s_] = a[name][s_][:, p]
        for name in ("a", "v"):
            if name in a and a[name].ndim == 3:
                a[name][s_] = a[name][s_][:, p]
    n = a["Q"].shape[0]
    for name in ("Q", "R", "r", "a", "v"):
        if name in a and a[name].ndim >= 2 and a[name].shape[0] == n:
            a[f"{name}_mean"] = a[name].mean(0)
            a[f"{name}_sem"] = (
                a[name].std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(a[name].shape[1:], np.nan)
            )
    return Trajectory(a, dict(sim.metadata, units_aligned_to_flow=True))


def main_job(out: Path, cfg: dict = REFERENCE, progress: bool = True) -> Path:
    """The reference scenario: flow, simulation, trajectories and figures in ``out``."""
    init = reference_init(cfg["d"])
    params = cfg["params"]
    try:  # an interrupted or diverging flow leaves its records in out/flow, continued by a rerun
        fl = flow(
            cfg["model"],
            init,
            params,
            t_max=cfg["t_max"],
            dt=cfg["dt"],
            record_every=cfg["record_every"],
            progress=progress,
            resume=Trajectory.partial_in(out / "flow"),
        )
    except (FlowInterrupted, FlowDiverged) as exc:
        if exc.trajectory is not None:
            exc.out = exc.trajectory.save(out / "flow")
        raise
    try:  # an interrupted simulation leaves the flow and its own records so far
        sim = simulate(
            cfg["model"],
            params,
            N=cfg["N"],
            seeds=cfg["seeds"],
            t_max=cfg["t_max"],
            init=init,
            record_every=cfg["sim_record_every"],
            progress=progress,
        )
    except SimulationInterrupted as exc:
        fl.save(out / "flow")
        exc.out = exc.trajectory.save(out / "simulation")
        raise
    sim = align_units(sim, fl.r[-1])
    fl.save(out / "flow")
    sim.save(out / "simulation")
    title = (
        f"ANIL, K = M = 2, S = {params['S']}, alpha_in = {params['alpha_in']}, eta = {params['eta']}, "
        f"order {params['order']}; simulation N = {cfg['N']}, "
        f"{cfg['seeds']} seed{'s' if cfg['seeds'] != 1 else ''}"
    )
    plot_metrics(fl, sim, META_METRICS, out / "errors.png", title)
    plot_overlaps(fl, sim, out / "overlaps.png", title)
    plot_r_heatmap(fl, sim, out / "r_final.png", f"final r_km at alpha = {cfg['t_max']:g}")
    summary = summarise(fl)
    summary["few_shot"] = few_shot_summary(fl)
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return out


def summarise(fl: Trajectory) -> dict:
    """Plateau and end point of a flow: where the two largest r of unit 0 differ by
    less than 0.05 (the permutation-symmetric phase) and the final values."""
    r = fl.r
    spread = np.abs(np.sort(r, axis=-1)[..., -1] - np.sort(r, axis=-1)[..., -2]).max(-1)
    sym = spread < 0.05
    out = {
        "final_alpha": float(fl.alpha[-1]),
        "final_eps_meta": float(fl.eps_meta[-1]),
        "final_eps_opt": float(fl.eps_opt[-1]),
        "final_max_abs_r": float(np.abs(r[-1]).max()),
    }
    if sym[1:].any():
        idx = np.nonzero(sym)[0]
        out["symmetric_phase_alpha"] = [float(fl.alpha[idx[0]]), float(fl.alpha[idx[-1]])]
        out["symmetric_phase_eps_meta"] = float(fl.eps_meta[idx[-1]])
    return out


# the support sizes of the main job's few-shot summary
SUMMARY_N_S = (1, 5, 20)


def few_shot_summary(fl: Trajectory, n_s=SUMMARY_N_S) -> dict:
    """How the learned representation adapts to new tasks from a few samples:
    ``eps_test`` (runtime.metatest, docs/models/anil.md 5.7) with ``n_s`` support
    samples at the flow's own S and alpha_in, for the final and the initial
    representation and for the teacher's own features."""
    mt = metatest(fl, n_s=n_s)

    def values(array):  # None where the kernel does not derive the setting (metadata["not_derived"])
        return [float(v) if np.isfinite(v) else None for v in array]

    out = {
        "n_s": [float(v) for v in mt.n_s],
        "S": float(mt.S[0]),
        "alpha_in": float(mt.alpha_in[0]),
        "eps_test_final": values(mt.eps_test[-1, :, 0, 0]),
        "eps_test_initial": values(mt.eps_test[0, :, 0, 0]),
        "eps_test_teacher": values(mt.eps_test_teacher[:, 0, 0]),
    }
    if mt.metadata["not_derived"]:
        out["not_derived"] = list(mt.metadata["not_derived"])
    return out


def summary_lines(summary: dict) -> list[str]:
    """The main job's summary as printed lines."""
    lines = [
        f"final alpha {summary['final_alpha']:g}: eps_meta {summary['final_eps_meta']:.4f}, "
        f"eps_opt {summary['final_eps_opt']:.4f}, max |r| {summary['final_max_abs_r']:.3f}"
    ]
    if "symmetric_phase_alpha" in summary:
        a0, a1 = summary["symmetric_phase_alpha"]
        lines.append(
            f"permutation-symmetric phase: alpha {a0:g} .. {a1:g}, "
            f"eps_meta {summary['symmetric_phase_eps_meta']:.4f}"
        )
    fs = summary.get("few_shot")
    if fs:
        lines.append(
            f"few-shot eps_test, adapting on n_s samples (S = {fs['S']:g}, alpha_in = {fs['alpha_in']:g}):"
        )
        whats = (("final", "learned representation"), ("initial", "initial representation"),
                 ("teacher", "teacher's features"))  # fmt: skip
        for key, what in whats:
            values = ", ".join(
                f"n_s = {n:g}: " + ("not derived" if v is None else f"{v:.4f}")
                for n, v in zip(fs["n_s"], fs[f"eps_test_{key}"])
            )
            lines.append(f"    {what:<24} {values}")
    return lines


def escape_alpha(fl: Trajectory, symmetric: Trajectory, margin: float = 0.01) -> float:
    """Where ``fl`` leaves the permutation-symmetric plateau: the first alpha at which
    its eps_meta falls ``margin`` below that of ``symmetric``, the flow from the
    exactly symmetric start (``reference_init(0)``, which stays on the plateau),
    recorded at the same times; linear between records, nan if it never does."""
    if not np.array_equal(fl.alpha, symmetric.alpha):
        raise ValueError("the flow and the symmetric flow must be recorded at the same times")
    gap = symmetric.eps_meta - margin - fl.eps_meta  # > 0 once escaped
    idx = np.nonzero(gap > 0)[0]
    if idx.size == 0:
        return float("nan")
    i = int(idx[0])
    if i == 0:
        return float(fl.alpha[0])
    a0, a1, g0, g1 = fl.alpha[i - 1], fl.alpha[i], gap[i - 1], gap[i]
    return float(a0 + (a1 - a0) * (-g0) / (g1 - g0))


# --------------------------------------------------------------------------- studies
def _curves(ax, runs, metric, logy=True):
    for label, tr in runs:
        ax.plot(tr.alpha, tr.arrays[metric], label=label)
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _run(params, init, t_max, progress):
    """One flow of a study; ``progress`` is the study's bar (``run_study``), which
    counts the flows (a bar per flow left a line each in logs), or None."""
    base = dict(REFERENCE["params"])
    base.update(params)
    bar = progress if hasattr(progress, "update") else None
    log = (lambda message: bar.write(message, file=sys.stderr)) if bar is not None else None
    tr = flow("anil", init, base, t_max=t_max, dt=0.01, record_every=1.0, log=log)
    if bar is not None:
        bar.update(1)
    return tr


def study_inner(out: Path, progress: bool) -> dict:
    """eps_meta against alpha for the inner rate alpha_in (S = 1) and the number of
    inner steps S (alpha_in = 0.5; S = 0 is no adaptation)."""
    init = reference_init(1e-3)
    by_rate = [
        (f"alpha_in = {a_}", _run({"alpha_in": a_}, init, 300, progress)) for a_ in (0.25, 0.5, 1.0, 1.5)
    ]
    by_steps = [(f"S = {s_}", _run({"S": s_, "alpha_in": 0.5}, init, 300, progress)) for s_ in (0, 1, 2, 4)]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    _curves(axes[0], by_rate, "eps_meta")
    axes[0].set_title("inner learning rate (S = 1)")
    _curves(axes[1], by_steps, "eps_meta")
    axes[1].set_title("inner steps (alpha_in = 0.5)")
    _save(fig, out / "inner.png")
    return {label: float(tr.eps_meta[-1]) for label, tr in by_rate + by_steps}


def study_overparam(out: Path, progress: bool) -> dict:
    """K = 2, 3, 4 student units for M = 2 teacher units."""
    runs = [(f"K = {K}", _run({}, reference_init(1e-3, K=K, M=2), 400, progress)) for K in (2, 3, 4)]
    plt = _plt()
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.2 * (1 + len(runs)), 3.6), constrained_layout=True)
    _curves(axes[0], runs, "eps_meta")
    axes[0].set_title("eps_meta, M = 2")
    for ax, (label, tr) in zip(axes[1:], runs):
        im = ax.imshow(tr.r[-1], vmin=-1, vmax=1, cmap="RdBu_r")
        annotate_matrix(ax, tr.r[-1])
        ax.set_title(f"final r_km, {label}")
        ax.set_xlabel("teacher m")
        ax.set_ylabel("student k")
    fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
    _save(fig, out / "overparam.png")
    return {label: float(tr.eps_meta[-1]) for label, tr in runs}


def study_variability(out: Path, progress: bool) -> dict:
    """Task spread s and feature variability eps_B: eps_meta and eps_opt."""
    init = reference_init(1e-3)
    by_s = [(f"s = {s_}", _run({"s": s_}, init, 300, progress)) for s_ in (0.5, 1.0, 2.0)]
    by_eps = [(f"eps_B = {e}", _run({"eps_B": e}, init, 300, progress)) for e in (0.0, 0.5, 1.0)]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for (label, tr), s_ in zip(by_s, (0.5, 1.0, 2.0)):
        # with vbar = 0 the labels scale with s: errors divided by s^2 compare shapes
        axes[0].plot(tr.alpha, tr.eps_meta / s_**2, label=f"{label}: eps_meta / s^2")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("alpha")
    axes[0].set_ylabel("eps_meta / s^2")
    axes[0].legend(fontsize=7)
    axes[0].set_title("task spread s (readout v_task = s xi)")
    for i, (label, tr) in enumerate(by_eps):
        axes[1].plot(tr.alpha, tr.eps_meta, color=f"C{i}", label=f"{label}: eps_meta")
        axes[1].plot(tr.alpha, tr.eps_opt, "--", color=f"C{i}", label=f"{label}: eps_opt")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("alpha")
    axes[1].legend(fontsize=7)
    axes[1].set_title("feature variability eps_B (s = 1)")
    _save(fig, out / "variability.png")
    return {label: float(tr.eps_meta[-1]) for label, tr in by_s + by_eps}


def study_order(out: Path, progress: bool) -> dict:
    """First against second order, for two inner rates."""
    init = reference_init(1e-3)
    runs = []
    for a_ in (0.5, 1.0):
        for o in (1, 2):
            runs.append(
                (f"order {o}, alpha_in = {a_}", _run({"order": o, "alpha_in": a_}, init, 300, progress))
            )
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    _curves(axes[0], runs, "eps_meta")
    axes[0].set_title("eps_meta")
    for i, (label, tr) in enumerate(runs):
        axes[1].plot(tr.alpha, np.abs(tr.r[:, 0, 0] - tr.r[:, 0, 1]), color=f"C{i}", label=label)
    axes[1].set_xlabel("alpha")
    axes[1].set_ylabel("|r_00 - r_01| (symmetry breaking)")
    axes[1].legend(fontsize=7)
    _save(fig, out / "order.png")
    return {label: float(tr.eps_meta[-1]) for label, tr in runs}


def study_symmetry(out: Path, progress: bool) -> dict:
    """The initial asymmetry d of the reference start: the permutation-symmetric
    plateau (all r_km equal) lasts longer the smaller d is."""
    runs = [(f"d = {d:g}", _run({}, reference_init(d), 300, progress)) for d in (1e-3, 1e-4, 1e-5, 1e-6)]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    _curves(axes[0], runs, "eps_meta")
    axes[0].set_title("eps_meta, reference scenario")
    for i, (label, tr) in enumerate(runs):
        axes[1].plot(tr.alpha, tr.r[:, 0, 0], color=f"C{i}", label=f"{label}: r_00")
        axes[1].plot(tr.alpha, tr.r[:, 0, 1], "--", color=f"C{i}", label=f"{label}: r_01")
    axes[1].set_xlabel("alpha")
    axes[1].set_ylabel("r_km of student unit 0")
    axes[1].legend(fontsize=7, ncol=2)
    _save(fig, out / "symmetry.png")
    result = {}
    for label, tr in runs:
        summary = summarise(tr)
        result[label] = float(tr.eps_meta[-1])
        if "symmetric_phase_alpha" in summary:
            result[f"{label}: symmetric phase until alpha"] = summary["symmetric_phase_alpha"][1]
            result[f"{label}: eps_meta at its end"] = summary["symmetric_phase_eps_meta"]
    return result


def study_phase(out: Path, progress: bool) -> dict:
    """The escape from the permutation-symmetric plateau against the initial
    asymmetry d: escape_alpha of adaptive flows at d = 1e-3 .. 1e-8, beside the
    delay that linear stability predicts (runtime.analyze: ln(10) / lambda_max per
    decade at the plateau's fixed point, drawn through the flow at d = 1e-6); and
    heat maps of escape_alpha and the final eps_meta at d = 1e-5 over (alpha_in, S)
    and (alpha_in, eta)."""
    from .analyze import analyze

    bar = progress if hasattr(progress, "update") else None
    ds = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
    runs = {}
    for d in [0.0, *ds]:
        runs[d] = flow("anil", reference_init(d), REFERENCE["params"], t_max=300, dt=0.01, method="adaptive",
                       record_every=0.5)  # fmt: skip
        if bar is not None:
            bar.update(1)
    esc = np.array([escape_alpha(runs[d], runs[0.0]) for d in ds])
    anchor = ds.index(1e-6)
    fixed = [pa.fixed_point for pa in analyze(runs[1e-6]).plateaus if pa.plateau.left and pa.fixed_point]
    per_decade = fixed[0].escape_per_decade if fixed else float("nan")
    decades = np.log10(1 / np.array(ds))
    predicted = esc[anchor] + (decades - decades[anchor]) * per_decade
    measured = float(np.polyfit(decades[1:], esc[1:], 1)[0])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.semilogx(ds, esc, "o", label=f"escape_alpha of the flows ({measured:.3g} per decade for d <= 1e-4)")
    ax.semilogx(
        ds, predicted, "--", label=f"linear stability: ln(10)/lambda_max = {per_decade:.3g} per decade"
    )
    ax.invert_xaxis()
    ax.set_xlabel("initial asymmetry d")
    ax.set_ylabel("escape alpha")
    ax.set_title("anil reference scenario: escape from the symmetric plateau")
    ax.legend(fontsize=8)
    _save(fig, out / "phase.png")
    result = {f"d = {d:g}: escape alpha": float(e) for d, e in zip(ds, esc)}
    result["escape alpha per decade of d: measured (d <= 1e-4)"] = measured
    result["escape alpha per decade of d: ln(10)/lambda_max"] = per_decade
    result.update(_phase_maps(out, bar))
    return result


PHASE_ALPHA_IN = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
PHASE_GRIDS = {"S": (1, 2, 3, 4), "eta": (0.25, 0.5, 1.0, 2.0)}


def _phase_maps(out: Path, bar) -> dict:
    """escape_alpha (against the flow from the symmetric start, nan when it does not
    escape by alpha = 300) and the final eps_meta over alpha_in and each of
    PHASE_GRIDS, the other parameters of the reference scenario, d = 1e-5."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    result = {}
    for row, (name, values) in enumerate(PHASE_GRIDS.items()):
        esc = np.full((len(values), len(PHASE_ALPHA_IN)), np.nan)
        final = np.full_like(esc, np.nan)
        for i, v in enumerate(values):
            for j, a_in in enumerate(PHASE_ALPHA_IN):
                params = {**REFERENCE["params"], "alpha_in": a_in, name: v}
                try:
                    fl, sym = (
                        flow(
                            "anil",
                            reference_init(d),
                            params,
                            t_max=300,
                            dt=0.01,
                            method="adaptive",
                            record_every=1.0,
                        )  # fmt: skip
                        for d in (1e-5, 0.0)
                    )
                except FlowDiverged:
                    continue
                finally:
                    if bar is not None:
                        bar.update(2)
                esc[i, j] = escape_alpha(fl, sym)
                final[i, j] = fl.eps_meta[-1]
        for ax, data, what in ((axes[row, 0], esc, "escape alpha"), (axes[row, 1], final, "final eps_meta")):
            im = ax.imshow(data, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(PHASE_ALPHA_IN)), [f"{a:g}" for a in PHASE_ALPHA_IN])
            ax.set_yticks(range(len(values)), [f"{v:g}" for v in values])
            ax.set_xlabel("alpha_in")
            ax.set_ylabel(name)
            ax.set_title(f"{what} (d = 1e-5; blank: none by alpha = 300)" if what == "escape alpha" else what)
            middle = np.nanmean([np.nanmin(data), np.nanmax(data)]) if np.isfinite(data).any() else 0.0
            for (i, j), val in np.ndenumerate(data):
                if np.isfinite(val):
                    color = "black" if val > middle else "white"  # readable on viridis' light and dark ends
                    ax.text(j, i, f"{val:.3g}", ha="center", va="center", fontsize=7, color=color)
            fig.colorbar(im, ax=ax, shrink=0.8)
        for i, v in enumerate(values):
            for j, a_in in enumerate(PHASE_ALPHA_IN):
                result[f"alpha_in = {a_in:g}, {name} = {v:g}: escape alpha"] = float(esc[i, j])
    _save(fig, out / "phase_maps.png")
    return result


FEWSHOT_N_S = (2, 4, 8, 16, 64, float("inf"))


def _label_n_s(v: float) -> str:
    return f"n_s = {v:g}" if np.isfinite(v) else "n_s = inf"


def study_fewshot(out: Path, progress: bool, t_max: float = 300.0) -> dict:
    """Finite support sets (first order): the reference scenario trained with n_s =
    2, 4, 8, 16, 64, inf support samples per task (adaptive flows); eps_meta against
    alpha, the final Q and r, and the few-shot learning curves (eps_test against the
    test support size, runtime.metatest) of each final representation, beside the
    initial representation and the teacher's own features."""
    bar = progress if hasattr(progress, "update") else None
    init = reference_init(1e-3)
    runs = []
    for n_s in FEWSHOT_N_S:
        params = {**REFERENCE["params"], "n_s": n_s}
        tr = flow("anil", init, params, t_max=t_max, dt=0.01, method="adaptive", record_every=1.0)
        runs.append((_label_n_s(n_s), tr, metatest(tr, n_s=DEFAULT_N_S)))
        if bar is not None:
            bar.update(1)
    first = runs[0][2]
    n_test = first.n_s
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    _curves(axes[0], [(label, tr) for label, tr, _ in runs], "eps_meta")
    axes[0].set_title("eps_meta (after adapting on n_s samples)")
    # the final Q and r: every student unit specialises to one teacher unit, so the
    # diagonal and the largest off-diagonal entries say it all
    x, ticks = _positions(np.array(FEWSHOT_N_S))
    finals = {
        "Q_kk (mean)": [float(np.mean(np.diag(tr.Q[-1]))) for _, tr, _ in runs],
        "max |Q_kl|, k != l": [float(_off(tr.Q[-1])) for _, tr, _ in runs],
    }
    overlaps = {
        "r_kk (mean)": [float(np.mean(np.diag(tr.r[-1]))) for _, tr, _ in runs],
        "max |r_km|, k != m": [float(_off(tr.r[-1])) for _, tr, _ in runs],
    }
    ax = axes[1]
    for i, (name, values) in enumerate(finals.items()):
        ax.plot(x, values, "o-", color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xticks(x, ticks)
    ax.minorticks_off()
    ax.set_xlabel("support samples n_s in training")
    ax.set_ylabel("final Q")
    twin = ax.twinx()
    for i, (name, values) in enumerate(overlaps.items(), start=2):
        twin.plot(x, values, "s--", color=f"C{i}", label=name)
    twin.set_ylabel("final r")
    twin.set_ylim(-0.05, 1.05)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    ax.set_title(f"final order parameters (alpha = {t_max:g})")
    ax = axes[2]
    xt, tick_t = _positions(n_test)
    order = np.argsort(xt)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, len(runs)))
    for c, (label, _, mt) in zip(colors, runs):
        ax.plot(xt[order], mt.eps_test[-1, order, 0, 0], "o-", color=c, label=f"trained with {label}")
    ax.plot(xt[order], first.eps_test[0, order, 0, 0], ":", color="gray", label="initial representation")
    ax.plot(xt[order], first.eps_test_teacher[order, 0, 0], "s--", color="k", label="teacher's features")
    ax.set_xscale("log")
    ax.set_xticks(xt[order], [tick_t[i] for i in order])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("support samples n_s at test")
    ax.set_ylabel("eps_test")
    ax.set_title(f"few-shot curves of the final representations (S = {first.S[0]:g}, "
                 f"alpha_in = {first.alpha_in[0]:g})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out / "fewshot.png")

    def tests(prefix, values):
        return {
            f"{prefix}: eps_test at n_s_test = {_label_n_s(v)[6:]}": float(e) for v, e in zip(n_test, values)
        }

    result = {}
    for i, (label, tr, mt) in enumerate(runs):
        result[label] = float(tr.eps_meta[-1])
        for name, values in (*finals.items(), *overlaps.items()):
            result[f"{label}: final {name}"] = values[i]
        result.update(tests(label, mt.eps_test[-1, :, 0, 0]))
    result.update(tests("initial representation", first.eps_test[0, :, 0, 0]))
    result.update(tests("teacher's features", first.eps_test_teacher[:, 0, 0]))
    return result


def _off(matrix: np.ndarray) -> float:
    """The largest |entry| off the diagonal (k != m) of a (K, M) matrix."""
    mask = ~np.eye(*matrix.shape, dtype=bool)
    return float(np.abs(matrix[mask]).max()) if mask.any() else 0.0


STUDIES = {
    "symmetry": study_symmetry,
    "inner": study_inner,
    "overparam": study_overparam,
    "variability": study_variability,
    "order": study_order,
    "phase": study_phase,
    "fewshot": study_fewshot,
}


def run_study(name: str, out: Path, progress: bool = True) -> dict:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"study {name}", unit=" flows", mininterval=0.5)  # one line, kept
    try:
        result = STUDIES[name](out, bar)
    finally:
        if bar is not None:
            bar.close()
    write_text(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- validation
def validation_init() -> Init:
    """Explicit, N-independent, well-conditioned overlaps away from any plateau."""
    Q = np.array([[0.5, 0.1], [0.1, 0.4]])
    R = np.array([[0.4, 0.1], [0.05, 0.3]])
    return Init(Q, R, np.eye(2), {"a": np.array([0.3, -0.2]), "vbar": np.array([0.4, 0.2])})


VALIDATION = [
    {"order": 1},
    {"order": 2},
    {"order": 1, "eta_a": 0.5, "S": 2, "alpha_in": 0.6},
    {"order": 2, "eta_a": 0.5, "S": 2, "alpha_in": 0.6},
    {"order": 1, "eps_B": 0.5, "sigma": 0.3, "n_q": 2},
    {"order": 2, "eps_B": 0.5, "s": 0.7},
]


# validate records every VALIDATION_RECORD of alpha; its networks have K + M = 4 units
VALIDATION_RECORD = 0.5
VALIDATION_MIN_N = 4


def allowance(n_compared: int, seeds: int, level: float = 0.01) -> float:
    """The |z| (deviation in units of the seeds' standard error) that ``n_compared``
    deviations of an exact flow all stay below with probability ``1 - level``: each
    mean over ``seeds`` runs, divided by its estimated s.e.m., follows Student's t
    with ``seeds - 1`` degrees of freedom; Bonferroni over the comparisons (they
    are correlated along alpha, so this errs towards agreeing)."""
    from scipy.stats import t

    if seeds < 2:
        raise ValueError(f"seeds must be >= 2 for a standard error, got {seeds}")
    return float(t.ppf(1 - level / (2 * max(1, n_compared)), seeds - 1))


def validate(sizes=(250, 1000), seeds: int = 10, t_max: float = 2.0, progress: bool = True) -> list[dict]:
    """Flow against simulation for each configuration of VALIDATION, printed with a
    verdict: a configuration agrees when at every size the largest deviation |z|
    (in s.e.m. of the seeds) is within ``allowance``; each row has ``agree``."""
    if int(seeds) < 2:
        raise ValueError(f"seeds must be >= 2 (a standard error needs two runs), got {seeds}")
    init = validation_init()
    names = ["Q", "R", "a", *META_METRICS]
    rows = []
    print(
        f"anil, K = M = 2, t_max = {t_max}, {seeds} seeds; deviations |z| = |sim mean - flow| / s.e.m. over "
        "all recorded times and entries; agree: max |z| within the allowance (1% chance to exceed it)"
    )
    for cfg in VALIDATION:
        log = _log if progress else None
        fl = flow("anil", init, cfg, t_max=t_max, dt=0.005, record_every=VALIDATION_RECORD, log=log)
        line = {"config": cfg, "agree": True}
        for N in sizes:
            t0 = time.time()
            sim = simulate(
                "anil",
                cfg,
                N=N,
                seeds=seeds,
                t_max=t_max,
                init=init,
                record_every=VALIDATION_RECORD,
                progress=progress,
            )
            z, gap = [], []
            for name in names:
                diff = sim.arrays[f"{name}_mean"][1:] - fl.arrays[name][1:]
                sem = sim.arrays[f"{name}_sem"][1:]
                ok = sem > 1e-10  # constant quantities (a with eta_a = 0) have round-off sems
                z.extend(np.abs(diff[ok] / sem[ok]).ravel())
                gap.extend(np.abs(diff).ravel())
            allowed = allowance(len(z), seeds)
            agree = bool(np.max(z) <= allowed)
            line["agree"] = line["agree"] and agree
            line[N] = {
                "max_z": float(np.max(z)),
                "mean_z": float(np.mean(z)),
                "allowed_z": allowed,
                "agree": agree,
                "mean_gap": float(np.mean(gap)),
                "seconds": time.time() - t0,
            }
            print(
                f"  {json.dumps(cfg):<55} N = {N:>5}: mean |z| {np.mean(z):.2f}, max |z| {np.max(z):.2f} "
                f"(of {len(z)}; allowed {allowed:.3g}), mean |gap| {np.mean(gap):.2e}  "
                f"[{time.time() - t0:.0f} s]"
            )
        verdict = "agree" if line["agree"] else "DISAGREE (max |z| above the allowance)"
        print(f"  {json.dumps(cfg):<55} verdict: {verdict}")
        rows.append(line)
    shrink = sum(row[sizes[-1]]["mean_gap"] < row[sizes[0]]["mean_gap"] for row in rows)
    print(f"gap smaller at N = {sizes[-1]} than at N = {sizes[0]} in {shrink} of {len(rows)} configurations")
    bad = sum(not row["agree"] for row in rows)
    print(f"{len(rows) - bad} of {len(rows)} configurations agree" + (f", {bad} disagree" if bad else ""))
    return rows


def validation_init_wide() -> Init:
    """K = 3 student units for M = 2 teacher units, explicit and well conditioned."""
    R = np.array([[0.4, 0.1], [0.05, 0.3], [0.2, -0.15]])
    A = np.array([[0.3, 0.0, 0.1], [0.1, 0.25, 0.0], [0.0, 0.1, 0.3]])
    Q = R @ R.T + A @ A.T + 0.05 * np.eye(3)
    return Init(Q, R, np.eye(2), {"a": np.array([0.3, -0.2, 0.1]), "vbar": np.zeros(2)})


# finite support sets (docs/models/anil.md 5.6), first order: (label, start, parameters)
VALIDATION_SUPPORT = [
    ("S = 1, n_s = 3", validation_init, {"n_s": 3, "s": 1.5}),
    ("S = 2, n_s = 6", validation_init, {"n_s": 6, "S": 2, "alpha_in": 0.6, "s": 1.5}),
    ("K = 3 > M = 2, eps_B, n_s = 4", validation_init_wide, {"n_s": 4, "eps_B": 0.5, "s": 1.5}),
    ("vbar, eta_a, noise, n_s = 2", validation_init, {"n_s": 2, "eta_a": 0.5, "sigma": 0.3}),
    # second order: the gradient through the inner loop along the support inputs
    ("order 2, S = 1, n_s = 10", validation_init, {"order": 2, "n_s": 10, "s": 1.5}),
    ("order 2, S = 2, eta_a, n_s = 10", validation_init,
     {"order": 2, "n_s": 10, "S": 2, "alpha_in": 0.6, "s": 1.5, "eta_a": 0.5}),
]
# run only when named (validate --support --only closure): second order with fewer
# support samples, where the O(1/n_s^2) remainder of the derivation (the eta^2 term
# at leading order; with S = 2 the moments too) shows at N = 4000 (docs/models/anil.md 5.6)
SUPPORT_CLOSURE_LIMITED = [
    ("closure-limited: order 2, S = 1, n_s = 3", validation_init, {"order": 2, "n_s": 3, "s": 1.5}),
    ("closure-limited: order 2, S = 2, eta_a, n_s = 6", validation_init,
     {"order": 2, "n_s": 6, "S": 2, "alpha_in": 0.6, "s": 1.5, "eta_a": 0.5}),
]
# the band of validate_support: 3 s.e.m. plus this allowance per 1/sqrt(N) (the
# finite-N offset of the seed average, tests/test_flow_vs_simulation.py), on at
# least SUPPORT_FRACTION of the recorded alphas
SUPPORT_C = 0.1
SUPPORT_FRACTION = 0.85


def _band_fraction(fl: Trajectory, sim: Trajectory, N: int, names) -> tuple[float, float]:
    """Fraction of recorded alphas (after the start) where every entry of ``names`` is
    within 3 s.e.m. + SUPPORT_C / sqrt(N) of the flow, and the mean |gap|."""
    ok = np.ones(sim.alpha.size - 1, bool)
    gap = []
    for name in names:
        dev = np.abs(sim.arrays[f"{name}_mean"][1:] - fl.arrays[name][1:])
        band = 3 * sim.arrays[f"{name}_sem"][1:] + SUPPORT_C / np.sqrt(N)
        ok &= (dev <= band).reshape(dev.shape[0], -1).all(axis=1)
        gap.extend(dev.ravel())
    return float(ok.mean()), float(np.mean(gap))


def validate_support(
    sizes=(1000, 4000), seeds: int = 20, t_max: float = 4.0, progress: bool = True, only=None
) -> list[dict]:
    """The finite-support flows (first and second order) against simulations with real
    support sets of n_s samples: eps_meta (after adapting on n_s samples), Q and R within
    3 s.e.m. + SUPPORT_C / sqrt(N) on at least SUPPORT_FRACTION of the recorded alphas,
    at every size, the gap shrinking with N; the population flow (n_s = inf) judged by
    the same comparison, which it should fail. ``only``: the configurations whose label
    contains one of these texts (default all of VALIDATION_SUPPORT)."""
    if int(seeds) < 2:
        raise ValueError(f"seeds must be >= 2 (a standard error needs two runs), got {seeds}")
    known = VALIDATION_SUPPORT if only is None else VALIDATION_SUPPORT + SUPPORT_CLOSURE_LIMITED
    configs = [c for c in known if only is None or any(o in c[0] for o in only)]
    if not configs:
        labels = "; ".join(c[0] for c in known)
        raise ValueError(f"only: {list(only)} matches no configuration (they are: {labels})")
    names = ("eps_meta", "Q", "R")
    rows = []
    print(
        f"anil, finite support sets; {seeds} seeds; fraction of the alphas where eps_meta, Q, R "
        f"are all within 3 s.e.m. + {SUPPORT_C}/sqrt(N) of the flow (agree: >= {SUPPORT_FRACTION:.0%} at "
        "every size)"
    )
    for label, start, cfg in configs:
        init = start()
        log = _log if progress else None
        kw = dict(t_max=t_max, dt=0.005, record_every=VALIDATION_RECORD, log=log)
        fl = flow("anil", init, cfg, **kw)
        pop = flow("anil", init, {**cfg, "n_s": float("inf")}, **kw)
        line = {"config": label, "params": cfg, "agree": True}
        for N in sizes:
            t0 = time.time()
            sim = simulate(
                "anil", cfg, N=N, seeds=seeds, t_max=t_max, init=init, record_every=VALIDATION_RECORD,
                progress=progress,
            )
            frac, gap = _band_fraction(fl, sim, N, names)
            frac_pop, gap_pop = _band_fraction(pop, sim, N, names)
            agree = frac >= SUPPORT_FRACTION
            line["agree"] = line["agree"] and agree
            line[N] = {"fraction": frac, "mean_gap": gap, "population_fraction": frac_pop,
                       "population_mean_gap": gap_pop, "agree": agree, "seconds": time.time() - t0}
            print(
                f"  {label:<32} N = {N:>5}: within the band at {frac:.0%} of the alphas (mean |gap| "
                f"{gap:.2e}); population flow {frac_pop:.0%} (mean |gap| {gap_pop:.2e})  "
                f"[{time.time() - t0:.0f} s]"
            )
        rows.append(line)
        print(f"  {label:<32} verdict: {'agree' if line['agree'] else 'DISAGREE'}")
    shrink = sum(row[sizes[-1]]["mean_gap"] < row[sizes[0]]["mean_gap"] for row in rows)
    print(f"gap smaller at N = {sizes[-1]} than at N = {sizes[0]} in {shrink} of {len(rows)} configurations")
    bad = sum(not row["agree"] for row in rows)
    print(f"{len(rows) - bad} of {len(rows)} configurations agree" + (f", {bad} disagree" if bad else ""))
    return rows


__all__ = [
    "REFERENCE",
    "STUDIES",
    "escape_alpha",
    "main_job",
    "reference_init",
    "run_study",
    "validate",
    "validate_support",
]
