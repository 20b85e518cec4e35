"""runtime.analyze: the Jacobian of the generated right-hand side against finite
differences, Newton's fixed point of the reference plateau, the plateau rule, the
escape time that linear stability predicts against flows, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import Init
from runtime.analyze import AnalysisError, analyze, as_trajectory, flow_of, summaries
from runtime.cli import main
from runtime.scenarios import REFERENCE, escape_alpha, reference_init

ROOT = Path(__file__).resolve().parent.parent
PARAMS = REFERENCE["params"]
EVERY = 0.5


def reference_flow(d: float, t_max: float = 200.0):
    return runtime.flow(
        "anil", reference_init(d), PARAMS, t_max=t_max, dt=0.01, method="adaptive", record_every=EVERY
    )


@pytest.fixture(scope="module")
def flows():
    """The reference scenario at d = 0 (the symmetric start) and 1e-4 .. 1e-7."""
    return {d: reference_flow(d) for d in (0.0, 1e-4, 1e-5, 1e-6, 1e-7)}


def central_differences(fl, x, h=1e-6):
    J = np.empty((x.size, x.size))
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = h * max(1.0, abs(x[j]))
        J[:, j] = (fl.rhs(x + e) - fl.rhs(x - e)) / (2 * e[j])
    return J


GENERIC = Init(
    np.array([[0.7, 0.2, -0.1], [0.2, 0.5, 0.1], [-0.1, 0.1, 0.6]]),
    np.array([[0.4, 0.1], [-0.2, 0.3], [0.1, 0.35]]),
    np.array([[1.0, 0.2], [0.2, 0.8]]),
    {},
)


@pytest.mark.parametrize(
    "model, activation, params, moving",
    [
        ("anil", "erf", {"eta_a": 0.5, "S": 2, "alpha_in": 0.6, "order": 2}, True),
        ("anil", "erf", {"eps_B": 0.5, "sigma": 0.3, "n_q": 2}, False),
        ("anil", "linear", {"eta_a": 0.5, "S": 2, "alpha_in": 0.3, "order": 2}, True),
        ("two_layer", "erf", {"eta_v": 0.5, "kappa": 0.1, "sigma": 0.2}, True),
        ("two_layer", "linear", {"eta_v": 0.5, "sigma": 0.2}, True),
        ("scm", "erf", {"sigma": 0.2}, False),
    ],
)
def test_jacobian_matches_central_differences(model, activation, params, moving):
    """Every generated module runs under the dual numbers of runtime/tangent.py,
    and its Jacobian equals central differences of the compiled right-hand side."""
    vec = {
        "anil": {"a": np.array([0.3, -0.2, 0.1]), "vbar": np.array([0.4, 0.2])},
        "two_layer": {"v": np.array([0.5, 0.8, -0.3]), "vs": np.array([1.0, 0.7])},
        "scm": {},
    }[model]
    # one record of a flow, as a saved trajectory holds it (no integration: nothing more to compile)
    kernel = runtime.load(model, activation)
    arrays = {"Q": GENERIC.Q[None], "R": GENERIC.R[None], "T": GENERIC.T, "alpha": np.zeros(1)}
    arrays.update({k: v[None] if k in dict(kernel.module.STATE) else v for k, v in vec.items()})
    meta = {"kind": "flow", "model": model, "activation": activation, "K": 3, "M": 2}
    meta["params"] = kernel.model.resolve_params(params)
    fl = flow_of(runtime.Trajectory(arrays, meta))
    readout = "a" if model == "anil" else "v"
    # Q as 6 symmetric variables, R, and the readouts when their rate is not zero
    assert len(fl.names) == 6 + 6 + 3 * moving and (f"{readout}[2]" in fl.names) == moving
    x = fl.coordinates(fl.base)
    f, J = fl.jacobian(x)
    np.testing.assert_allclose(f, fl.rhs(x), rtol=0, atol=1e-15)
    fd = central_differences(fl, x)
    assert np.max(np.abs(J - fd)) <= 1e-8 * np.max(np.abs(J)), np.max(np.abs(J - fd))  # seen: 1e-10
    assert np.max(np.abs(J)) > 1e-2  # not trivially zero


def test_frozen_readouts_are_constants(flows):
    fl = flow_of(flows[1e-5])
    # eta_a = 0: a does not move, so it is no coordinate (its Jacobian row would be zero)
    assert fl.names == ["Q[0,0]", "Q[0,1]", "Q[1,1]", "R[0,0]", "R[0,1]", "R[1,0]", "R[1,1]"]


def test_plateau_fixed_point_and_the_escape_it_predicts(flows):
    res = analyze(flows[1e-6])
    first = res.plateaus[0]
    fp = first.fixed_point
    assert first.plateau.left and fp is not None
    assert fp.rhs_norm < 1e-10
    # the permutation-symmetric plateau: units identical, all r equal, about 0.68 (MODELS.md 7)
    Q, R = np.array(fp.state["Q"]), np.array(fp.state["R"])
    assert abs(Q[0, 0] - Q[1, 1]) < 1e-9 and abs(Q[0, 0] - Q[0, 1]) < 1e-9
    assert np.ptp(R) < 1e-9
    r = R[0, 0] / Q[0, 0] ** 0.5
    assert 0.6 < r < 0.75
    assert 0.185 < first.plateau.level < 0.2
    # unstable: its growth rate sets the delay per decade of the initial asymmetry d,
    # measured by the project's escape_alpha on flows at d = 1e-4 .. 1e-7
    assert fp.lambda_max > 0
    ds = [1e-4, 1e-5, 1e-6, 1e-7]
    esc = [escape_alpha(flows[d], flows[0.0]) for d in ds]
    slope = np.polyfit(np.log10(1 / np.array(ds)), esc, 1)[0]
    assert abs(fp.escape_per_decade - slope) < 0.1 * slope, (fp.escape_per_decade, slope, esc)
    assert math.isclose(fp.escape_per_decade, math.log(10) / fp.lambda_max)
    # the last plateau is the specialised state: stable, not left
    last = res.plateaus[-1]
    assert not last.plateau.left and last.fixed_point.lambda_max < 0
    assert last.fixed_point.rhs_norm < 1e-10
    # JSON whole and strict
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert '"eigenvalues"' in text


def test_plateau_detection_at_d_1e5(flows):
    tr = flows[1e-5]
    s = summaries(tr)
    esc = escape_alpha(tr, flows[0.0])
    # the plateau starts once eps_meta has settled near 0.19, and ends at the escape
    i = int(np.searchsorted(tr.alpha, s["plateau_start"]))
    assert 35 <= s["plateau_start"] <= 60 and abs(tr.eps_meta[i] - 0.19) < 0.01
    assert abs(s["plateau_end"] - esc) < 5, (s, esc)
    assert s["escape_alpha"] == s["plateau_end"]
    assert s["escape_alpha"] < s["specialisation_alpha"] < 150
    assert s["final_eps_meta"] == pytest.approx(tr.eps_meta[-1])
    assert all(isinstance(v, float) for v in s.values())
    # with no initial asymmetry the flow stays on the plateau: never escapes, never specialises
    s0 = summaries(flows[0.0])
    assert math.isnan(s0["escape_alpha"]) and math.isnan(s0["specialisation_alpha"])


def test_cli_flow_then_analyze(tmp_path):
    init = reference_init(1e-5)
    np.savez(tmp_path / "init.npz", Q=init.Q, R=init.R, T=init.T, a=np.zeros(2), vbar=np.zeros(2))
    flow_cmd = [
        "flow",
        "--model",
        "anil",
        "--init",
        str(tmp_path / "init.npz"),
        "--t-max",
        "150",
        "--dt",
        "0.01",
        "--method",
        "adaptive",
        "--record-every",
        "0.5",
        "--out",
        str(tmp_path / "f"),
    ]
    assert main(flow_cmd) == 0
    # analyze as a user runs it (the flow above ran in this process, to save a start)
    analyze_cmd = ["analyze", "--traj", str(tmp_path / "f"), "--out", str(tmp_path / "a")]
    res = subprocess.run(
        [sys.executable, "-m", "runtime", *analyze_cmd], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "plateau 0" in res.stdout and "lambda_max" in res.stdout
    data = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert data["plateaus"][0]["fixed_point"]["rhs_norm"] < 1e-10
    assert (tmp_path / "a" / "analysis.png").stat().st_size > 0
    # without --out, beside the trajectory
    assert main(["analyze", "--traj", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "analysis.json").read_text()) == data


def test_bad_input_is_one_line_naming_traj(tmp_path, capsys, flows):
    def error(*argv):
        assert main(["analyze", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "--traj" in error("--traj", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "not a trajectory folder" in error("--traj", str(tmp_path / "empty"))
    flows[1e-5].save(tmp_path / "ok")
    assert "--fraction" in error("--traj", str(tmp_path / "ok"), "--fraction", "1.5")
    assert "--out" in error("--traj", str(tmp_path / "ok"), "--out", str(tmp_path / "ok" / "metadata.json"))
    sim = runtime.Trajectory(dict(flows[1e-5].arrays), {**flows[1e-5].metadata, "kind": "simulation"})
    sim.save(tmp_path / "sim")
    assert "kind 'simulation'" in error("--traj", str(tmp_path / "sim"))
    (tmp_path / "sim" / "trajectory.npz").write_bytes(b"not a zip file")
    assert "cannot read the trajectory" in error("--traj", str(tmp_path / "sim"))
    meta = {k: v for k, v in flows[1e-5].metadata.items() if k != "params"}
    runtime.Trajectory(dict(flows[1e-5].arrays), meta).save(tmp_path / "noparams")
    assert "'params'" in error("--traj", str(tmp_path / "noparams"))
    with pytest.raises(AnalysisError, match="--traj"):
        as_trajectory(tmp_path / "missing")


def test_scm_plateau_escape_per_decade():
    """A second model: the soft committee machine (K = M = 2) from the same kind of
    nearly symmetric start. Its plateau leads from the identical-units saddle to
    the symmetric one with Q_00 != Q_01 (Saad & Solla's plateau), which sets the
    escape: the plateau's end (``escape_alpha`` of summaries, no symmetric flow
    needed) moves by ln(10) / lambda_max per decade of d."""

    def start(d):
        R = np.full((2, 2), 0.01) + d * np.array([[1.0, -1.0], [-1.0, 1.0]])
        return Init(0.01 * np.eye(2), R, np.eye(2), {})

    ds = [1e-4, 1e-5, 1e-6, 1e-7]
    runs = {d: runtime.flow("scm", start(d), {"eta": 1.0}, t_max=300, dt=0.01, method="adaptive",
                            record_every=EVERY) for d in ds}  # fmt: skip
    esc = [summaries(runs[d])["escape_alpha"] for d in ds]
    slope = np.polyfit(np.log10(1 / np.array(ds)), esc, 1)[0]
    fp = analyze(runs[1e-6]).plateaus[0].fixed_point
    Q, R = fp.state["Q"], fp.state["R"]
    assert fp.rhs_norm < 1e-10 and np.ptp(R) < 1e-9 and Q[0, 0] - Q[0, 1] > 0.05
    assert abs(fp.escape_per_decade - slope) < 0.1 * slope, (fp.escape_per_decade, slope, esc)
