"""The figures: every curve visible and named, numbers as printed, titles that say what ran."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime import cli, plots


@pytest.fixture()
def figures(monkeypatch):
    """The figures drawn, kept open (instead of written) for inspection."""
    drawn = []

    def keep(fig, path):
        drawn.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield drawn
    for fig in drawn:
        plots._plt().close(fig)


@pytest.fixture(scope="module")
def runs():
    init = runtime.Init(0.01 * np.eye(2), np.full((2, 2), 0.01), np.eye(2))
    fl = runtime.flow("scm", init, t_max=0.5, dt=0.01, record_every=0.1)
    one = runtime.simulate("scm", N=100, seeds=1, t_max=0.5, init=init, record_every=0.1)
    two = runtime.simulate("scm", N=100, seeds=2, t_max=0.5, init=init, record_every=0.1)
    return fl, one, two


def test_numbers_have_three_decimals_and_no_negative_zero():
    assert plots.number(0.998) == "0.998" and plots.number(0.9996) == "1.000"
    assert plots.number(-0.0004) == "0.000" and plots.number(-0.0) == "0.000"
    assert plots.number(-0.0006) == "-0.001"


def test_overlaps_every_flow_curve_has_its_own_dashes_and_the_legend_says_lines_and_points(figures, runs):
    fl, _, two = runs
    plots.plot_overlaps(fl, two, "overlaps.png")
    ax = figures[0].axes[0]
    flow_lines = [line for line in ax.lines if line.get_linestyle() != "None"]  # not the points
    assert len(flow_lines) == 4
    # coinciding curves stay visible: four dash patterns, widths decreasing
    assert len({str(line._unscaled_dash_pattern) for line in flow_lines}) == 4
    widths = [line.get_linewidth() for line in flow_lines]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    legend = ax.get_legend()
    title = legend.get_title().get_text()
    assert "lines: flow" in title and "points: simulation" in title and "2 seeds, mean +- s.e.m." in title
    assert [t.get_text() for t in legend.get_texts()] == ["r[0,0]", "r[0,1]", "r[1,0]", "r[1,1]"]
    assert len(ax.containers) == 4 and all(c.has_yerr for c in ax.containers)


@pytest.mark.parametrize("which", ["overlaps", "metric"])
def test_one_seed_is_one_seed_without_error_bars(figures, runs, which):
    fl, one, _ = runs
    if which == "overlaps":
        plots.plot_overlaps(fl, one, "overlaps.png")
        text = figures[0].axes[0].get_legend().get_title().get_text()
    else:
        plots.plot_metric(fl, one, "eps_g", "eps_g.png")
        text = " ".join(t.get_text() for t in figures[0].axes[0].get_legend().get_texts())
    assert "1 seed" in text and "seeds" not in text and "s.e.m." not in text
    assert figures[0].axes[0].containers and not any(c.has_yerr for c in figures[0].axes[0].containers)


def test_final_r_is_printed_with_three_decimals(figures, runs):
    fl, one, _ = runs
    plots.plot_r_heatmap(fl, one, "r_final.png")
    texts = [t.get_text() for ax in figures[0].axes[:2] for t in ax.texts]
    assert len(texts) == 8 and all(len(t.split(".")[1]) == 3 and not t.startswith("-0.000") for t in texts)
    assert figures[0].axes[1].get_title() == "simulation (1 seed)"


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            "flow --model anil --set alpha_in=0.5 --set eta=1 --K 3 --t-max 0.1 --dt 0.01",
            "anil flow, alpha_in = 0.5, K = 3, M = 2, start sampled at N = 1000, seed 0",
        ),
        (
            "simulate --model scm --activation linear --set eta=0.5 --n 50 --seeds 3 --seed 7 --t-max 0.1",
            "scm simulation (linear), eta = 0.5, K = 2, M = 2, N = 50, 3 seeds from 7",
        ),
        ("simulate --model scm --n 50 --seeds 1 --t-max 0.1", "scm simulation, K = 2, M = 2, N = 50, seed 0"),
    ],
)
def test_command_line_figures_title_the_model_parameters_and_sizes(args, expected, tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(cli, "_figure", lambda fl, sim, out, title: titles.append(title))
    assert cli.main([*args.split(), "--no-progress", "--out", str(tmp_path / "out")]) == 0
    assert titles == [expected]
