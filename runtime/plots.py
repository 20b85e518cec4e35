"""Figures: the flow as lines, the simulation as points with error bars (mean +- s.e.m.)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(
    flow, sim=None, metric: str = "eps_g", path: str | Path = "eps_g.png", title: str = ""
) -> Path:
    """``metric`` against alpha: flow line, simulation mean +- s.e.m. over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    if flow is not None:
        ax.plot(flow.alpha, flow.arrays[metric], "-", color="C0", label="flow (N -> inf)")
    if sim is not None:
        n_seeds = sim.arrays[metric].shape[0]
        ax.errorbar(
            sim.alpha,
            sim.arrays[f"{metric}_mean"],
            yerr=sim.arrays[f"{metric}_sem"],
            fmt="o",
            ms=3,
            color="C1",
            capsize=2,
            label=f"simulation N = {sim.metadata.get('N')}, {n_seeds} seeds (mean +- s.e.m.)",
        )
    ax.set_xlabel("alpha (steps / N)")
    ax.set_ylabel(metric)
    vals = np.asarray(flow.arrays[metric] if flow is not None else sim.arrays[f"{metric}_mean"])
    if np.all(vals > 0) and vals.max() / max(vals.min(), 1e-300) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_overlaps(flow, sim=None, path: str | Path = "overlaps.png", title: str = "") -> Path:
    """Normalised overlaps r_km = R_km / sqrt(Q_kk T_mm) against alpha."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    src = flow if flow is not None else sim
    K, M = src.arrays["R"].shape[-2:]

    def r_of(Q, R, T):
        return R / np.sqrt(np.einsum("...kk->...k", Q)[..., :, None] * np.diag(T)[None, :])

    for k in range(K):
        for m in range(M):
            color = f"C{(k * M + m) % 10}"
            if flow is not None:
                r = r_of(flow.Q, flow.R, flow.T)
                ax.plot(flow.alpha, r[:, k, m], "-", color=color, label=f"r[{k},{m}]")
            if sim is not None:
                r = r_of(sim.Q, sim.R, sim.T)
                ax.errorbar(
                    sim.alpha,
                    r.mean(0)[:, k, m],
                    yerr=r.std(0, ddof=1)[:, k, m] / np.sqrt(r.shape[0]),
                    fmt="o",
                    ms=2.5,
                    color=color,
                    capsize=2,
                )
    ax.set_xlabel("alpha (steps / N)")
    ax.set_ylabel("r_km = R_km / sqrt(Q_kk T_mm)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
