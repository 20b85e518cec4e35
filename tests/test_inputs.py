"""Bad inputs get a clear error that names what is wrong; outputs are whole or absent.

Python calls raise ``ValueError`` (``FileNotFoundError`` for a missing file)
whose message names the parameter; the command line turns them into exit code 2
and a message on stderr (``runtime.cli.main`` in-process where the exit code is
the point, a real ``python -m runtime`` subprocess for the end-to-end cases).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import runtime
from derive.model import OVERLAPS
from derive.models import get_model
from runtime import Init, Trajectory, scenarios
from runtime.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent

Q0 = np.array([[0.5, 0.1], [0.1, 0.4]])
R0 = np.array([[0.3, 0.05], [-0.1, 0.2]])
GOOD = Init(Q0, R0, np.eye(2))


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def messages(err: str) -> list[str]:
    """The lines of stderr but the notice of a first run that it compiles the kernels."""
    return [line for line in err.strip().splitlines() if not line.startswith("compiling the ")]


def write_init(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


# --- parameters -----------------------------------------------------------------


@pytest.mark.parametrize(
    "model,name", [("scm", "eta"), ("scm", "sigma"), ("two_layer", "eta_v"), ("two_layer", "kappa")]
)
def test_negative_parameter_is_rejected_by_flow(model, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b.*>= 0"):
        runtime.flow(model, GOOD, {name: -1.0}, t_max=0.1, dt=0.01)


def test_negative_rate_is_rejected_by_simulate():
    with pytest.raises(ValueError, match=r"\beta\b"):
        runtime.simulate("scm", {"eta": -1.0}, N=100, seeds=1, t_max=0.1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameter_is_rejected(value):
    with pytest.raises(ValueError, match=r"\bsigma\b.*finite"):
        runtime.flow("scm", GOOD, {"sigma": value}, t_max=0.1, dt=0.01)


def test_negative_rate_on_the_command_line(tmp_path):
    out = tmp_path / "out"
    res = run_cli(
        *"flow --model scm --set eta=-1 --t-max 0.1 --dt 0.01 --no-progress --out".split(), str(out)
    )
    assert res.returncode == 2, res.stderr
    assert "eta" in res.stderr and "-1" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "model,names", [("scm", ["eta", "sigma"]), ("two_layer", ["eta", "eta_v", "kappa", "sigma"])]
)
def test_unknown_parameter_lists_the_models_parameters(model, names):
    with pytest.raises(ValueError) as info:
        runtime.flow(model, GOOD, {"etta": 1.0}, t_max=0.1, dt=0.01)
    msg = str(info.value)
    assert "etta" in msg and model in msg
    for n in names:
        assert n in msg


def test_unknown_parameter_on_the_command_line(capsys):
    assert cli_main("flow --model two_layer --set alpha_in=1 --t-max 0.1 --dt 0.01".split()) == 2
    err = capsys.readouterr().err
    assert "alpha_in" in err
    for n in ("eta", "eta_v", "kappa", "sigma"):
        assert n in err


@pytest.mark.parametrize("item", ["eta", "eta=abc"])
def test_malformed_set_on_the_command_line(item, capsys):
    assert cli_main(["flow", "--model", "scm", "--set", item, "--t-max", "0.1", "--dt", "0.01"]) == 2
    assert "eta" in capsys.readouterr().err


# --- models -----------------------------------------------------------------------


def test_unknown_model_in_python():
    for call in (
        lambda: runtime.load("nosuchmodel"),
        lambda: runtime.flow("nosuchmodel", GOOD),
        lambda: runtime.simulate("nosuchmodel", N=100),
    ):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "nosuchmodel" in msg and "scm" in msg and "two_layer" in msg


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation.*tanh"):
        runtime.load("scm", "tanh")


def test_unknown_model_on_the_command_line(tmp_path):
    res = run_cli(*"flow --model nosuchmodel --t-max 0.1 --dt 0.01 --out".split(), str(tmp_path / "o"))
    assert res.returncode == 2
    assert "nosuchmodel" in res.stderr and "scm" in res.stderr and "two_layer" in res.stderr
    assert not (tmp_path / "o").exists()


# --- sizes and initial conditions -----------------------------------------------------


@pytest.mark.parametrize("K,M,name", [(0, 2, "K"), (2, 0, "M"), (-1, 1, "K")])
def test_sample_network_needs_units(K, M, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        runtime.sample_network(K, M, 100, np.random.default_rng(0))


def test_no_student_units_in_simulate_and_cli(capsys):
    with pytest.raises(ValueError, match=r"\bK\b"):
        runtime.simulate("scm", N=100, K=0, t_max=0.1)
    assert cli_main(["flow", "--model", "scm", "--K", "0", "--t-max", "0.1", "--dt", "0.01"]) == 2
    assert "K" in capsys.readouterr().err


def test_overlaps_no_network_can_have():
    # |R| larger than Q and T allow: [[Q, R], [R^T, T]] has a negative eigenvalue
    bad = Init(np.eye(2) * 0.5, np.eye(2), np.eye(2))
    with pytest.raises(ValueError, match=r"positive semi-definite") as info:
        runtime.flow("scm", bad, t_max=0.1, dt=0.01)
    assert "[[Q, R], [R^T, T]]" in str(info.value)
    with pytest.raises(ValueError, match=r"positive semi-definite"):
        runtime.simulate("scm", N=100, init=bad, t_max=0.1)
    with pytest.raises(ValueError, match=r"positive semi-definite"):
        runtime.flow("scm", Init(-np.eye(2), np.zeros((2, 2)), np.eye(2)), t_max=0.1, dt=0.01)


@pytest.mark.parametrize("which", ["Q", "T"])
def test_non_symmetric_overlaps(which):
    A = np.array([[1.0, 0.2], [0.1, 1.0]])
    init = Init(A, np.zeros((2, 2)), np.eye(2)) if which == "Q" else Init(np.eye(2), np.zeros((2, 2)), A)
    with pytest.raises(ValueError, match=rf"\b{which}\b.*symmetric"):
        runtime.flow("scm", init, t_max=0.1, dt=0.01)


def test_empty_q():
    with pytest.raises(ValueError, match=r"\bQ\b"):
        runtime.flow("scm", Init(np.zeros((0, 0)), np.zeros((0, 2)), np.eye(2)), t_max=0.1, dt=0.01)


INIT_FILES = {
    # name: (arrays in the file, model, words the message must contain)
    "R_wrong_shape": (
        {"Q": Q0, "R": np.zeros((3, 2)), "T": np.eye(2)},
        "scm",
        ["R", "(K, M) = (2, 2)", "(3, 2)"],
    ),
    "R_wrong_shape_K_M": ({"Q": Q0, "R": np.zeros((2, 3)), "T": np.eye(2)}, "two_layer", ["R", "(2, 3)"]),
    "Q_not_square": (
        {"Q": np.zeros((2, 3)), "R": R0, "T": np.eye(2)},
        "scm",
        ["Q", "(K, K) = (2, 2)", "(2, 3)"],
    ),
    "T_not_a_matrix": ({"Q": Q0, "R": R0, "T": np.ones(2)}, "scm", ["T", "(M, M)", "(2,)"]),
    # T must be positive definite (realise builds the teacher from its Cholesky factor)
    "T_singular": (
        {"Q": Q0, "R": np.zeros((2, 2)), "T": np.ones((2, 2))},
        "scm",
        ["T", "positive definite", "linearly independent", "smallest eigenvalue"],
    ),
    "T_indefinite": (
        {"Q": Q0, "R": np.zeros((2, 2)), "T": np.diag([1.0, -0.5])},
        "scm",
        ["T", "positive definite", "-0.5"],
    ),
    # complex or non-numeric entries are refused, not cast (the imaginary part was dropped)
    "Q_complex": ({"Q": Q0 + 0.1j, "R": R0, "T": np.eye(2)}, "scm", ["Q", "real numbers", "complex"]),
    "Q_text": ({"Q": np.array([["a", "b"], ["c", "d"]]), "R": R0, "T": np.eye(2)}, "scm", ["Q", "real"]),
    "v_complex": (
        {"Q": Q0, "R": R0, "T": np.eye(2), "v": np.ones(2) * 1j},
        "two_layer",
        ["v", "real numbers", "complex"],
    ),
    "v_wrong_length": (
        {"Q": Q0, "R": R0, "T": np.eye(2), "v": np.ones(3), "vs": np.ones(2)},
        "two_layer",
        ["v", "(2,)", "(3,)"],
    ),
    "vs_wrong_length": (
        {"Q": Q0, "R": R0, "T": np.eye(2), "v": np.ones(2), "vs": np.ones(3)},
        "two_layer",
        ["vs", "(2,)"],
    ),
    "missing_T": ({"Q": Q0, "R": R0}, "scm", ["T"]),
    "missing_Q_and_R": ({"T": np.eye(2)}, "two_layer", ["Q", "R"]),
    "unknown_readout": ({"Q": Q0, "R": R0, "T": np.eye(2), "a": np.ones(2)}, "two_layer", ["'a'", "v", "vs"]),
    "readout_in_scm": ({"Q": Q0, "R": R0, "T": np.eye(2), "v": np.ones(2)}, "scm", ["'v'", "scm"]),
    "non_finite": ({"Q": Q0, "R": np.array([[np.nan, 0], [0, 0]]), "T": np.eye(2)}, "scm", ["R", "finite"]),
}


@pytest.mark.parametrize("case", list(INIT_FILES))
def test_bad_init_file(case, tmp_path, capsys):
    arrays, model, words = INIT_FILES[case]
    path = write_init(tmp_path / "init.npz", **arrays)
    with pytest.raises(ValueError) as info:
        Init.from_file(path, get_model(model))
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    out = tmp_path / "out"
    args = ["flow", "--model", model, "--init", path, "--out", str(out)]
    code = cli_main(args + "--t-max 0.1 --dt 0.01 --no-progress".split())
    assert code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("case", ["T_singular", "T_indefinite", "Q_complex", "Q_text"])
def test_bad_overlaps_in_python(case):
    arrays, model, words = INIT_FILES[case]
    init = Init(**arrays)
    for call in (
        lambda: runtime.flow(model, init, t_max=0.1, dt=0.01),
        lambda: runtime.simulate(model, N=100, init=init, t_max=0.1),
    ):
        with pytest.raises(ValueError) as info:
            call()
        for w in words:
            assert w in str(info.value), f"{w!r} not in {info.value}"


def _truncated_npz(path):
    GOOD.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INIT_PATHS = {
    # name: (file name, how it is made, words the message must contain besides the file name)
    "truncated_npz": ("init.npz", _truncated_npz, ["not an .npz archive", "truncated"]),
    "npy": ("init.npy", lambda p: np.save(p, Q0), ["single array (.npy)", ".npz"]),
    "text_named_npz": ("init.npz", lambda p: p.write_text("Q = [[1, 0], [0, 1]]\n"), ["not an .npz archive"]),
    "directory": ("init.npz", lambda p: p.mkdir(), ["is a directory"]),
}


@pytest.mark.parametrize("case", list(BAD_INIT_PATHS))
def test_unreadable_init_file(case, tmp_path):
    name, make, words = BAD_INIT_PATHS[case]
    path = tmp_path / name
    make(path)
    # what the file must be: an .npz of the order parameters, with their shapes
    words = [name, *words, "Q (K, K), R (K, M), T (M, M)"]
    with pytest.raises(ValueError) as info:
        Init.from_file(path, get_model("scm"))
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    out = tmp_path / "out"
    res = run_cli(
        *"flow --model scm --t-max 0.1 --dt 0.01 --no-progress --init".split(), str(path), "--out", str(out)
    )
    assert res.returncode == 2, res.stderr
    for w in words:
        assert w in res.stderr, f"{w!r} not in {res.stderr}"
    assert "Traceback" not in res.stderr and "pickle" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "command,option",
    [
        ("flow", "--K 3"),
        ("flow", "--M 3"),
        ("flow", "--sigma0 0.5"),
        ("flow", "--n 50"),
        ("flow", "--K 2"),  # given, even at its default
        ("simulate", "--M 3"),
    ],
)
def test_init_fixes_the_sampled_start(command, option, tmp_path, capsys):
    init = write_init(tmp_path / "init.npz", Q=Q0, R=R0, T=np.eye(2))
    out = tmp_path / "out"
    steps = "--dt 0.01" if command == "flow" else "--n 100 --seeds 1"
    args = f"{command} --model scm --t-max 0.1 {steps} --no-progress {option} --init {init} --out {out}"
    assert cli_main(args.split()) == 2
    err = capsys.readouterr().err
    assert option.split()[0] in err and "--init" in err and "fixes K and M" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_init_fields_follow_the_order_parameter_table():
    """Init has one field per order parameter of derive/model.py OVERLAPS, in its order."""
    assert [f.name for f in dataclasses.fields(Init)] == [o.name for o in OVERLAPS] + ["vectors"]


def test_missing_init_file(tmp_path, capsys):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        Init.from_file(path, get_model("scm"))
    assert cli_main(["flow", "--model", "scm", "--init", str(path), "--t-max", "0.1", "--dt", "0.01"]) == 2
    assert "nope.npz" in capsys.readouterr().err


def test_good_init_file_round_trip(tmp_path):
    init = Init(Q0, R0, np.eye(2), {"v": np.array([0.5, 1.5]), "vs": np.array([1.0, 2.0])})
    init.save(tmp_path / "i.npz")
    back = Init.from_file(tmp_path / "i.npz", get_model("two_layer"))
    for k, a in init.arrays().items():
        assert np.array_equal(back.arrays()[k], a), k
    # readouts left out of the file take the model's defaults (all ones)
    write_init(tmp_path / "j.npz", Q=Q0, R=R0, T=np.eye(2))
    back = Init.from_file(tmp_path / "j.npz", get_model("two_layer"))
    assert np.array_equal(back.vectors["v"], np.ones(2)) and np.array_equal(back.vectors["vs"], np.ones(2))


# --- steps and recording ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"dt": 0.0}, "dt"),
        ({"dt": -0.01}, "dt"),
        ({"dt": float("nan")}, "dt"),
        ({"t_max": 0.0}, "t_max"),
        ({"t_max": -1.0}, "t_max"),
        ({"t_max": 1.005}, "t_max"),  # not a whole number of steps of 0.01
        ({"t_max": 1.0, "dt": 0.3}, "t_max"),
        ({"record_every": 0.015}, "record_every"),  # not a multiple of dt
        ({"record_every": 0.005}, "record_every"),  # shorter than dt
        ({"record_every": 0.3}, "record_every"),  # a multiple of dt, but t_max is not a multiple of it
        ({"method": "heun"}, "method"),
    ],
)
def test_bad_steps(kw, name):
    args = {"t_max": 1.0, "dt": 0.01, **kw}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        runtime.flow("scm", GOOD, **args)


def test_bad_dt_on_the_command_line(capsys):
    assert cli_main(["flow", "--model", "scm", "--t-max", "1", "--dt", "0", "--no-progress"]) == 2
    assert "dt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"N": 3, "K": 2, "M": 2, "t_max": 1.0, "record_every": 1.0}, "N"),
        (
            {"N": 4, "init": Init(np.eye(3), np.zeros((3, 2)), np.eye(2)), "t_max": 1.0, "record_every": 1.0},
            "N",
        ),
        ({"N": 0}, "N"),
        ({"N": 100, "seeds": 0}, "seeds"),
        ({"N": 100, "seeds": -2}, "seeds"),
        ({"N": 100, "t_max": 0.105}, "t_max"),  # not a whole number of steps 1/N
        ({"N": 100, "t_max": 1.0, "record_every": 0.015}, "record_every"),
        ({"N": 100, "t_max": 1.0, "record_every": 0.3}, "record_every"),
    ],
)
def test_bad_simulation_sizes(kw, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        runtime.simulate("two_layer", **kw)


def test_too_few_seeds_on_the_command_line(capsys):
    assert cli_main("simulate --model scm --n 100 --seeds 0 --t-max 0.1 --no-progress".split()) == 2
    assert "seeds" in capsys.readouterr().err


# --- whole or nothing ------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_diverging_flow_on_the_command_line_saves_the_records_before_it(tmp_path, existing):
    init = write_init(tmp_path / "init.npz", Q=Q0, R=R0, T=np.eye(2))
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    cmd = "flow --model scm --activation linear --set eta=100 --t-max 2 --dt 0.01 --no-progress"
    res = run_cli(*cmd.split(), "--init", init, "--out", str(out))
    assert res.returncode == 3
    assert "diverged" in res.stderr and "alpha" in res.stderr and "partial" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(messages(res.stderr)) == 1
    # the records before the divergence, marked partial; no figure, no temporary file
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "trajectory.npz"]
    traj = Trajectory.load(out)
    meta = traj.metadata
    assert meta["complete"] is False and meta["stopped"] == "diverged"
    diverged_at = float(res.stderr.split("alpha = ")[1].split()[0])
    assert 0 < meta["alpha_reached"] == traj.alpha[-1] < diverged_at < 2
    assert np.all(np.isfinite(traj.Q)) and traj.Q.shape == (len(traj.alpha), 2, 2)


def test_diverging_simulation_on_the_command_line_writes_nothing(tmp_path):
    init = write_init(tmp_path / "init.npz", Q=Q0, R=R0, T=np.eye(2))
    out = tmp_path / "out"
    cmd = "simulate --model scm --activation linear --set eta=100 --n 100 --seeds 2 --t-max 2 --no-progress"
    res = run_cli(*cmd.split(), "--init", init, "--out", str(out))
    assert res.returncode != 0
    assert "diverged" in res.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_diverging_simulation_is_reported_without_a_traceback(tmp_path, capsys):
    init = write_init(tmp_path / "init.npz", Q=Q0, R=R0, T=np.eye(2))
    with np.errstate(all="ignore"):
        cmd = (
            "simulate --model scm --activation linear --set eta=100 --n 100 --seeds 1 --t-max 2 --no-progress"
        )
        code = cli_main(cmd.split() + ["--init", init, "--out", str(tmp_path / "o")])
    assert code in (2, 3)
    assert "diverged" in capsys.readouterr().err


# --- reproducibility ----------------------------------------------------------------------


def sim(seed, seeds=2):
    init = Init(Q0, R0, np.eye(2), {"v": np.array([0.8, 1.1])})
    return runtime.simulate(
        "two_layer", {"eta_v": 0.5, "sigma": 0.3}, N=200, seeds=seeds, t_max=0.5, init=init, seed=seed
    )


def test_same_seed_same_simulation():
    a, b = sim(3), sim(3)
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k], equal_nan=True), k


def test_different_seed_different_simulation():
    a, b = sim(3), sim(4)
    for k in ("Q", "R", "v", "eps_g"):
        assert not np.array_equal(a.arrays[k][:, -1], b.arrays[k][:, -1]), k


def test_seed_index_i_uses_seed_plus_i():
    """simulate(seed=s, seeds=2) runs seeds s and s + 1: its second run is simulate(seed=s + 1)'s first."""
    a, b = sim(3), sim(4, seeds=1)
    for k in ("Q", "R", "v", "eps_g"):
        assert np.array_equal(a.arrays[k][1], b.arrays[k][0]), k


# --- saving and loading ------------------------------------------------------------------


def kernel_file_sha(model, activation="erf"):
    return hashlib.sha256((ROOT / "generated" / f"{model}_{activation}.py").read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["flow", "simulation"])
def test_trajectory_round_trip_and_metadata(kind, tmp_path):
    params = {"eta": 0.9, "eta_v": 0.5}
    init = Init(Q0, R0, np.eye(2), {"v": np.array([0.8, 1.1])})
    if kind == "flow":
        traj = runtime.flow("two_layer", init, params, t_max=0.5, dt=0.01, record_every=0.1)
    else:
        traj = runtime.simulate("two_layer", params, N=100, seeds=2, t_max=0.5, init=init)
    out = traj.save(tmp_path / "nested" / "out")
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "trajectory.npz"]
    back = Trajectory.load(out)
    assert set(back.arrays) == set(traj.arrays)
    for k, a in traj.arrays.items():
        assert back.arrays[k].shape == a.shape, k
        assert np.array_equal(back.arrays[k], a, equal_nan=True), k
    meta = json.loads((out / "metadata.json").read_text())
    assert back.metadata == meta
    assert meta["model"] == "two_layer"
    assert meta["params"] == {"eta": 0.9, "eta_v": 0.5, "kappa": 0.0, "sigma": 0.0}  # all, defaults included
    assert isinstance(meta["command"], str)
    assert meta["version"] == importlib.metadata.version("metaflow-ts")
    assert meta["kernel_sha256"] == kernel_file_sha("two_layer")


def test_metadata_of_the_linear_kernel_hashes_the_linear_file(tmp_path):
    traj = runtime.flow("scm", GOOD, t_max=0.1, dt=0.01, activation="linear")
    assert traj.metadata["kernel_sha256"] == kernel_file_sha("scm", "linear")
    assert traj.metadata["kernel_sha256"] != kernel_file_sha("scm", "erf")


# --- output location ---------------------------------------------------------------------

COMMANDS = {
    # command: (arguments before --out, the name in runtime.cli of the computation it starts)
    "flow": ("flow --model scm --t-max 0.1 --dt 0.01 --no-progress", "flow"),
    "simulate": ("simulate --model scm --n 50 --seeds 2 --t-max 0.1 --no-progress", "simulate"),
    "study": ("study symmetry", "run_study"),
    "validate": ("validate --seeds 2", "validate"),
    "main": ("", "main_job"),
}


def bad_out(tmp_path, kind):
    """An --out that cannot receive results, and what the message must say."""
    if kind == "existing_file":
        path = tmp_path / "taken"
        path.write_text("keep me\n")
        return path, "is an existing file"
    if kind == "under_a_file":
        (tmp_path / "taken").write_text("keep me\n")
        return tmp_path / "taken" / "sub" / "out", "is under the file"
    folder = tmp_path / "readonly"
    folder.mkdir()
    return folder / "out", "cannot write in"


@pytest.mark.parametrize("kind", ["existing_file", "under_a_file", "read_only"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_unusable_out_is_refused_before_computing(command, kind, tmp_path, monkeypatch, capsys):
    import runtime.cli
    import runtime.output

    args, computation = COMMANDS[command]

    def must_not_run(*a, **k):
        raise AssertionError(f"{computation} ran before --out was checked")

    monkeypatch.setattr(runtime.cli, computation, must_not_run)
    out, words = bad_out(tmp_path, kind)
    if kind == "read_only":  # the probe is refused as by a read-only folder (root writes anywhere)

        def refused(*a, dir=None, **k):
            raise PermissionError(13, "Permission denied", str(dir))

        monkeypatch.setattr(runtime.output.tempfile, "TemporaryFile", refused)
    assert cli_main([*args.split(), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and words in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or out.is_file()
    if (tmp_path / "taken").exists():
        assert (tmp_path / "taken").read_text() == "keep me\n"


def test_read_only_out_folder_on_the_command_line(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        res = run_cli(*COMMANDS["flow"][0].split(), "--out", str(folder / "out"))
    finally:
        folder.chmod(0o755)
    assert res.returncode == 2
    assert "--out" in res.stderr and "cannot write" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("kind", ["existing_file", "under_a_file"])
def test_unusable_out_on_the_command_line(kind, tmp_path):
    out, words = bad_out(tmp_path, kind)
    res = run_cli(*COMMANDS["flow"][0].split(), "--out", str(out))
    assert res.returncode == 2
    assert "--out" in res.stderr and words in res.stderr
    assert "Traceback" not in res.stderr
    assert (tmp_path / "taken").read_text() == "keep me\n"


def test_outputs_are_readable_by_all_and_leave_no_temporary_file(tmp_path):
    out = tmp_path / "out"
    res = run_cli(*COMMANDS["flow"][0].split(), "--out", str(out))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eps_g.png", "metadata.json", "trajectory.npz"]
    for name in names:  # as a new file under the umask of the test run (022 -> 0644)
        mask = os.umask(0)
        os.umask(mask)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def test_a_failed_save_leaves_the_old_files_whole(tmp_path):
    good = runtime.flow("scm", GOOD, t_max=0.1, dt=0.01)
    good.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # the metadata cannot be stored
    with pytest.raises(TypeError):
        Trajectory(good.arrays, {**good.metadata, "oops": object()}).save(tmp_path)
    # the arrays fail half-way through writing (a function cannot be pickled)
    arrays = {**good.arrays, "zz": np.array([lambda: 0], dtype=object)}
    with pytest.raises(Exception, match="pickle"):
        Trajectory(arrays, good.metadata).save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- seeds and validation -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["flow", "simulate"])
def test_negative_seed_on_the_command_line(command, tmp_path):
    out = tmp_path / "out"
    res = run_cli(*COMMANDS[command][0].split(), "--seed", "-1", "--out", str(out))
    assert res.returncode == 2
    assert "--seed" in res.stderr and ">= 0" in res.stderr and "-1" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_negative_seed_in_python():
    with pytest.raises(ValueError, match=r"\bseed\b.*>= 0"):
        runtime.simulate("scm", N=100, seeds=2, t_max=0.1, seed=-1)


VALIDATE = "validate --sizes 200 --seeds 8 --t-max 1".split()


def test_validate_needs_two_seeds(tmp_path):
    out = tmp_path / "out"
    res = run_cli("validate", "--seeds", "1", "--out", str(out))
    assert res.returncode == 2
    assert "--seeds" in res.stderr and ">= 2" in res.stderr
    assert "Traceback" not in res.stderr and "zero-size" not in res.stderr
    assert not out.exists()
    with pytest.raises(ValueError, match=r"\bseeds\b.*>= 2"):
        scenarios.validate(seeds=1)


@pytest.mark.parametrize("wrong", [False, True])
def test_validate_gives_a_verdict_per_configuration(wrong, tmp_path, monkeypatch, capsys):
    if wrong:  # a flow whose R moves the wrong way: every configuration must disagree
        real = scenarios.flow

        def backwards_flow(*args, **kw):
            traj = real(*args, **kw)
            traj.arrays["R"] = traj.arrays["R"][:1] - (traj.arrays["R"] - traj.arrays["R"][:1])
            return traj

        monkeypatch.setattr(scenarios, "flow", backwards_flow)
    out = tmp_path / "out"
    code = cli_main([*VALIDATE, "--out", str(out)])
    text = capsys.readouterr().out
    verdicts = [line.split("verdict: ")[1].split()[0] for line in text.splitlines() if "verdict: " in line]
    assert len(verdicts) == len(scenarios.VALIDATION)
    assert "allowed" in text
    rows = json.loads((out / "validation.json").read_text())
    assert [row["agree"] for row in rows] == [v == "agree" for v in verdicts]
    if wrong:
        assert code == 1 and set(verdicts) == {"DISAGREE"}
        assert "6 disagree" in text
    else:
        assert code == 0 and set(verdicts) == {"agree"}


def test_allowance_grows_with_comparisons_and_shrinks_with_seeds():
    a = scenarios.allowance
    assert a(100, 10) > a(10, 10) > a(10, 40) > 2.0
    assert a(1, 10**6) == pytest.approx(2.576, abs=1e-3)  # 1% two-sided, normal


# --- sizes ----------------------------------------------------------------------------------


def test_simulation_too_large_for_the_memory_is_refused_before_allocating(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = run_cli(
        *"simulate --model scm --n 10000000000 --seeds 2 --t-max 1 --no-progress --out".split(), str(out)
    )
    assert time.monotonic() - t0 < 60  # it allocated for 4.5 s before failing
    assert res.returncode == 2
    assert "N = 10000000000" in res.stderr and "GiB" in res.stderr and "memory" in res.stderr
    assert "Traceback" not in res.stderr and "_ArrayMemoryError" not in res.stderr
    assert not out.exists()
    with pytest.raises(ValueError, match=r"N = 10000000000.*GiB"):
        runtime.simulate("scm", N=10**10, seeds=2, t_max=1.0)


def test_flow_trajectory_too_large_is_refused_with_a_hint(tmp_path):
    out = tmp_path / "out"
    res = run_cli(*"flow --model anil --t-max 1e8 --dt 0.01 --no-progress --out".split(), str(out))
    assert res.returncode == 2
    assert "GiB" in res.stderr and "record_every" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()
    # recording less often makes the same run acceptable (not run here: 10^10 steps)
    with pytest.raises(ValueError, match="record_every"):
        runtime.flow("scm", GOOD, t_max=1e8, dt=0.01)


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    import runtime.cli

    def no_memory(*a, **k):
        raise MemoryError("Allocation failed (probably too large).")

    monkeypatch.setattr(runtime.cli, "flow", no_memory)
    out = tmp_path / "out"
    assert cli_main([*COMMANDS["flow"][0].split(), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "memory" in err and "--K" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_large_flow_says_it_is_preparing(tmp_path, monkeypatch, capsys):
    import runtime.cli

    monkeypatch.setattr(runtime.cli, "_init", lambda *a: (_ for _ in ()).throw(ValueError("stop here")))
    assert cli_main("flow --model scm --K 200 --t-max 1 --dt 0.01 --no-progress".split()) == 2
    assert "sampling a start of K = 200" in capsys.readouterr().err


# --- the bad-input table of the command line ------------------------------------------------

FLOW = "flow --model scm --t-max 1 --dt 0.01"
SIM = "simulate --model scm --n 100 --seeds 2 --t-max 0.1"
# A new user's mistakes, each: (command line, words its one-line message must hold, the
# option first). 80 cases here; with the tables of init files (INIT_FILES 16 and
# BAD_INIT_PATHS 4, through the command line), of the sampled start beside --init (6)
# and of --out (test_unusable_out_is_refused_before_computing: 3 kinds x 5 commands),
# 121 bad inputs of the command line, each exit 2 in one line with nothing written.
BAD_INPUTS = [
    # flow: the times
    (FLOW.replace("--t-max 1", "--t-max -1"), ["--t-max", "positive"]),
    (FLOW.replace("--t-max 1", "--t-max 0"), ["--t-max", "positive"]),
    (FLOW.replace("--t-max 1", "--t-max nan"), ["--t-max", "nan"]),
    (FLOW.replace("--t-max 1", "--t-max inf"), ["--t-max", "inf"]),
    (FLOW.replace("--t-max 1", "--t-max ten"), ["--t-max", "ten"]),
    (FLOW.replace("--t-max 1", ""), ["--t-max", "required"]),
    (FLOW.replace("--dt 0.01", "--dt -0.01"), ["--dt", "positive"]),
    (FLOW.replace("--dt 0.01", "--dt 0"), ["--dt", "positive"]),
    (FLOW.replace("--dt 0.01", "--dt nan"), ["--dt"]),
    (FLOW.replace("--dt 0.01", "--dt inf"), ["--dt"]),
    (FLOW.replace("--dt 0.01", "--dt 1e-2x"), ["--dt", "1e-2x"]),
    (FLOW.replace("--dt 0.01", ""), ["--dt", "required"]),
    (FLOW.replace("--dt 0.01", "--dt 0.3"), ["--t-max", "--dt", "whole number of steps"]),
    (FLOW + " --record-every 0.015", ["--record-every", "--dt"]),
    (FLOW + " --record-every 0.005", ["--record-every", "--dt"]),
    (FLOW + " --record-every 0.3", ["--record-every", "multiple"]),
    (FLOW + " --record-every 0", ["--record-every", "positive"]),
    (FLOW + " --record-every -1", ["--record-every", "positive"]),
    (FLOW + " --record-every nan", ["--record-every"]),
    # flow: the sampled start
    (FLOW + " --K 0", ["--K", ">= 1"]),
    (FLOW + " --K -2", ["--K", ">= 1"]),
    (FLOW + " --K 1.5", ["--K", "whole number"]),
    (FLOW + " --K two", ["--K", "two"]),
    (FLOW + " --M 0", ["--M", ">= 1"]),
    (FLOW + " --M -1", ["--M", ">= 1"]),
    (FLOW + " --sigma0 -0.1", ["--sigma0", ">= 0"]),
    (FLOW + " --sigma0 nan", ["--sigma0"]),
    (FLOW + " --sigma0 inf", ["--sigma0"]),
    (FLOW + " --seed -1", ["--seed", ">= 0"]),
    (FLOW + " --seed 1.5", ["--seed", "whole number"]),
    (FLOW + " --n 0", ["--n", ">= 1"]),
    (FLOW + " --n -5", ["--n", ">= 1"]),
    (FLOW + " --init missing.npz", ["missing.npz"]),
    (FLOW + " --init init.npz --K 3", ["--K", "--init"]),
    # flow: the choices
    (FLOW + " --method heun", ["--method", "heun", "euler", "rk4"]),
    (FLOW + " --parallel maybe", ["--parallel", "maybe", "auto"]),
    (FLOW + " --activation tanh", ["--activation", "tanh", "erf", "linear"]),
    (FLOW.replace("scm", "nosuchmodel"), ["--model", "nosuchmodel", "two_layer"]),
    (FLOW.replace("--model scm", ""), ["--model", "required"]),
    (FLOW + " --frobnicate 3", ["--frobnicate"]),
    # the model's parameters
    (FLOW + " --set eta=-1", ["--set eta=-1", ">= 0"]),
    (FLOW + " --set eta=nan", ["eta", "finite"]),
    (FLOW + " --set eta=inf", ["eta", "finite"]),
    (FLOW + " --set eta=fast", ["--set eta", "not a number"]),
    (FLOW + " --set eta", ["--set", "key=value"]),
    (FLOW + " --set eta:0.5", ["--set", "key=value"]),
    (FLOW + " --set =1", ["--set =1", "no parameter", "eta, sigma"]),
    (FLOW + " --set etta=1", ["etta", "eta, sigma"]),
    (FLOW + " --set sigma=-0.5", ["sigma", ">= 0"]),
    (FLOW.replace("scm", "two_layer") + " --set kappa=-1", ["kappa", ">= 0"]),
    (FLOW.replace("scm", "two_layer") + " --set alpha_in=1", ["alpha_in", "eta_v"]),
    (FLOW.replace("scm", "anil") + " --set order=3", ["order", "1 or 2"]),
    (FLOW.replace("scm", "anil") + " --set S=1.5", ["S", "integer"]),
    # simulate
    (SIM.replace("--n 100", "--n 0"), ["--n", ">= 1"]),
    (SIM.replace("--n 100", "--n -100"), ["--n", ">= 1"]),
    (SIM.replace("--n 100", "--n lots"), ["--n", "lots"]),
    (SIM.replace("--n 100", "--n 3"), ["--n 3", "--K + --M = 4"]),
    (SIM.replace("--n 100", ""), ["--n", "required"]),
    (SIM.replace("--seeds 2", "--seeds 0"), ["--seeds", ">= 1"]),
    (SIM.replace("--seeds 2", "--seeds -1"), ["--seeds", ">= 1"]),
    (SIM.replace("--seeds 2", "--seeds 2.5"), ["--seeds", "whole number"]),
    (SIM.replace("--t-max 0.1", "--t-max 0.105"), ["--t-max", "1/--n"]),
    (SIM.replace("--t-max 0.1", "--t-max -0.1"), ["--t-max", "positive"]),
    (SIM + " --record-every 0.015", ["--record-every", "1/--n"]),
    (SIM + " --record-every 0.03", ["--record-every", "multiple"]),
    (SIM + " --seed -3", ["--seed", ">= 0"]),
    (SIM + " --sigma0 -1", ["--sigma0", ">= 0"]),
    (SIM + " --activation relu", ["--activation", "relu"]),
    (SIM.replace("scm", "two_layer") + " --set eta_v=-1", ["eta_v", ">= 0"]),
    # study, validate, the command
    ("study nosuch", ["name", "nosuch", "symmetry"]),
    ("study", ["name", "required"]),
    ("validate --seeds 1", ["--seeds", ">= 2"]),
    ("validate --only order", ["--only", "--support"]),
    ("validate --support --only nosuch", ["--only", "nosuch", "order 2"]),
    ("validate --seeds 0", ["--seeds", ">= 1"]),
    ("validate --sizes 0", ["--sizes", ">= 1"]),
    ("validate --sizes 2", ["--sizes", ">= 4"]),
    ("validate --sizes 251", ["--sizes 251", "even"]),
    ("validate --t-max 0.3", ["--t-max", "whole number of steps"]),
    ("validate --t-max nan", ["--t-max"]),
    ("bogus", ["command", "bogus", "flow"]),
]


def test_the_bad_input_table_has_at_least_the_cases_of_issue_11():
    assert len(BAD_INPUTS) >= 57 and len({cmd for cmd, _ in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("cmd, words", BAD_INPUTS, ids=[cmd for cmd, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_option_exit_2_nothing_written(
    cmd, words, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/, would be made here
    GOOD.save(tmp_path / "init.npz")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main([*cmd.split(), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and captured.out == ""
    for word in words:
        assert word in err, f"{word!r} not in {err}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out folder, no runs/
