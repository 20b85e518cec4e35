"""Figures: the flow as lines, the simulation as points with error bars (mean +- s.e.m.)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .output import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Write ``fig`` to ``path`` whole or not at all, and close it."""
    plt = _plt()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130)
    finally:
        plt.close(fig)
    return path


def plot_metric(
    flow, sim=None, metric: str = "eps_g", path: str | Path = "eps_g.png", title: str = ""
) -> Path:
    """``metric`` against alpha: flow line, simulation mean +- s.e.m. over seeds."""
    return plot_metrics(flow, sim, [metric], path, title)


# The flow's r_km often coincide in pairs (e.g. on the symmetric plateau): each
# curve its own dash pattern and width, the widest drawn first, so that all show.
LINESTYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _seeds_label(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds, mean +- s.e.m."


def _yerr(sim, name: str, index=...):
    """The simulation's standard errors, or None (no bars) for a single seed."""
    if sim.arrays[name].shape[0] < 2:
        return None
    return sim.arrays[f"{name}_sem"][index]


def plot_overlaps(flow, sim=None, path: str | Path = "overlaps.png", title: str = "") -> Path:
    """Normalised overlaps r_km = R_km / sqrt(Q_kk T_mm) against alpha: the flow as
    lines (a dash pattern each), the simulation as points (a marker each)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    src = flow if flow is not None else sim
    K, M = src.arrays["R"].shape[-2:]
    handles = []
    for k in range(K):
        for m in range(M):
            i = k * M + m
            color = f"C{i % 10}"
            style = LINESTYLES[i % len(LINESTYLES)]
            width = max(2.8 - 0.6 * (i % len(LINESTYLES)), 1.0)
            marker = MARKERS[i % len(MARKERS)]
            if flow is not None:
                ax.plot(flow.alpha, flow.r[:, k, m], linestyle=style, lw=width, color=color, zorder=2 + i)
            if sim is not None:
                ax.errorbar(
                    sim.alpha,
                    sim.r_mean[:, k, m],
                    yerr=_yerr(sim, "r", (slice(None), k, m)),
                    fmt=marker,
                    ms=3,
                    color=color,
                    capsize=2,
                    alpha=0.8,
                    zorder=10 + i,
                )
            handles.append(
                Line2D(
                    [], [], color=color, linestyle=style if flow is not None else "none", lw=width,
                    marker=marker if sim is not None else None, ms=4, label=f"r[{k},{m}]",
                )
            )  # fmt: skip
    what = []
    if flow is not None:
        what.append("lines: flow (N -> inf)")
    if sim is not None:
        n_seeds = sim.arrays["r"].shape[0]
        what.append(f"points: simulation\nN = {sim.metadata.get('N')}, {_seeds_label(n_seeds)}")
    ax.set_xlabel("alpha (steps / N)")
    ax.set_ylabel("r_km = R_km / sqrt(Q_kk T_mm)")
    ax.set_title(title, fontsize=9)
    ax.legend(
        handles=handles,
        fontsize=8,
        title="\n".join(what),
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        alignment="left",
    )
    return _save(fig, path)


def plot_metrics(flow, sim, metrics, path, title: str = "", logy: bool | None = None) -> Path:
    """Metrics against alpha: flow lines, simulation points (mean +- s.e.m. over
    seeds). ``logy=None`` uses a log scale when the values span more than 20x."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for i, name in enumerate(metrics):
        color = f"C{i}"
        if flow is not None:
            ax.plot(flow.alpha, flow.arrays[name], "-", color=color, label=f"{name} (flow, N -> inf)")
        if sim is not None:
            n_seeds = sim.arrays[name].shape[0]
            ax.errorbar(
                sim.alpha,
                sim.arrays[f"{name}_mean"],
                yerr=_yerr(sim, name),
                fmt="o",
                ms=2.5,
                color=color,
                capsize=1.5,
                alpha=0.8,
                label=f"{name} (simulation N = {sim.metadata.get('N')}, {_seeds_label(n_seeds)})",
            )
    ax.set_xlabel("alpha (steps / N)")
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "error")
    if logy is None:
        src = flow.arrays[metrics[0]] if flow is not None else sim.arrays[f"{metrics[0]}_mean"]
        vals = np.asarray(src)
        logy = bool(np.all(vals > 0) and vals.max() / max(vals.min(), 1e-300) > 20)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def number(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals, never "-0.000"."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def annotate_matrix(ax, r) -> None:
    """Values on a heat map of r in [-1, 1], integer ticks."""
    K, M = r.shape
    for k in range(K):
        for m in range(M):
            ax.text(
                m,
                k,
                number(r[k, m]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(r[k, m]) > 0.5 else "black",
            )
    ax.set_xticks(range(M))
    ax.set_yticks(range(K))


def plot_r_heatmap(flow, sim, path, title: str = "") -> Path:
    """The final normalised overlaps r_km as heat maps (flow, and simulation mean)."""
    plt = _plt()
    panels = [("flow", flow.r[-1])] if flow is not None else []
    if sim is not None:
        n = sim.r.shape[0]
        panels.append((f"simulation ({'1 seed' if n == 1 else f'mean of {n} seeds'})", sim.r_mean[-1]))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels) + 0.8, 3.2), constrained_layout=True, squeeze=False
    )
    for ax, (name, r) in zip(axes[0], panels):
        im = ax.imshow(r, vmin=-1, vmax=1, cmap="RdBu_r")
        K, M = r.shape
        annotate_matrix(ax, r)
        ax.set_xticks(range(M))
        ax.set_yticks(range(K))
        ax.set_xlabel("teacher unit m")
        ax.set_ylabel("student unit k")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="r_km")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
