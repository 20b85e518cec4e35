"""The command lines of docs/interface.md, run as a user runs them (subprocesses, outputs in tmp_path)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import runtime
from derive.models import MODEL_NAMES, get_model
from runtime import Init

ROOT = Path(__file__).resolve().parent.parent


def run(package, *args):
    res = subprocess.run(
        [sys.executable, "-m", package, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return res


def test_models_lists_every_model_with_its_parameters():
    res = run("runtime", "models")
    assert res.returncode == 0, res.stderr
    # split the listing into one block per model (a block starts with "name:" at column 0)
    blocks, headers, current = {}, {}, None
    for line in res.stdout.splitlines():
        if line and not line[0].isspace():
            current = line.split(":", 1)[0]
            blocks[current], headers[current] = [], line
        elif current and line.strip():
            blocks[current].append(line.split()[0])
    # every registered model, each with its parameters then its vectors, in declaration order
    assert list(blocks) == list(MODEL_NAMES)
    for name in MODEL_NAMES:
        spec = get_model(name)
        assert blocks[name] == [p.name for p in spec.params] + [v.name for v in spec.vectors], name
        assert headers[name].endswith("activations " + ", ".join(spec.activations)), name
    assert blocks["scm"] == ["eta", "sigma"]
    # each parameter with its default and meaning
    assert "default" in res.stdout and "learning rate" in res.stdout and "noise" in res.stdout


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.npz"
    Init(
        np.array([[0.6, 0.1, 0.0], [0.1, 0.5, -0.1], [0.0, -0.1, 0.7]]),
        np.array([[0.4, 0.1], [-0.2, 0.3], [0.1, 0.4]]),
        np.eye(2),
        {"v": np.array([0.8, 1.1, 0.6]), "vs": np.array([1.0, 0.7])},
    ).save(path)
    return path


def test_flow_command(init_file, tmp_path):
    out = tmp_path / "flow"
    cmd = "flow --model two_layer --set eta_v=0.5 --t-max 1 --dt 0.01 --record-every 0.1 --no-progress"
    res = run("runtime", *cmd.split(), "--init", str(init_file), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    K, M, n = 3, 2, 11
    with np.load(out / "trajectory.npz") as data:
        arrays = {k: np.array(data[k]) for k in data.files}
    expected = {"alpha": (n,), "Q": (n, K, K), "R": (n, K, M), "T": (M, M), "v": (n, K), "eps_g": (n,)}
    for name, shape in expected.items():
        assert arrays[name].shape == shape, name
    np.testing.assert_allclose(arrays["alpha"], np.linspace(0, 1, n), atol=1e-12)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"] == "two_layer"
    assert meta["params"]["eta_v"] == 0.5 and meta["params"]["eta"] == 1.0
    assert "flow" in meta["command"] and "--set" in meta["command"]
    assert meta["version"] and len(meta["kernel_sha256"]) == 64
    # the command line is a thin layer: the same numbers as the Python call
    init = Init.from_file(init_file, runtime.load("two_layer").model)
    py = runtime.flow("two_layer", init, {"eta_v": 0.5}, t_max=1.0, dt=0.01, record_every=0.1)
    for name in expected:
        assert np.array_equal(arrays[name], py.arrays[name]), name


def test_flow_command_rk4_differs_from_euler(init_file, tmp_path):
    outs = {}
    for method in ("euler", "rk4"):
        outs[method] = tmp_path / method
        cmd = f"flow --model two_layer --t-max 0.5 --dt 0.05 --method {method} --no-progress"
        res = run("runtime", *cmd.split(), "--init", str(init_file), "--out", str(outs[method]))
        assert res.returncode == 0, res.stderr
    with np.load(outs["euler"] / "trajectory.npz") as e, np.load(outs["rk4"] / "trajectory.npz") as r:
        assert e["Q"].shape == r["Q"].shape == (11, 3, 3)
        assert not np.array_equal(e["Q"][-1], r["Q"][-1])
    assert json.loads((outs["rk4"] / "metadata.json").read_text())["method"] == "rk4"


def test_flow_command_adaptive(init_file, tmp_path):
    """--method adaptive with its tolerances: --dt is the first step, --record-every
    need not be a multiple of it; the counts are in the metadata; the same numbers as
    the Python call."""
    out = tmp_path / "adaptive"
    cmd = "flow --model two_layer --t-max 1 --dt 0.3 --record-every 0.25 --method adaptive --no-progress"
    res = run(
        "runtime",
        *cmd.split(),
        "--rtol",
        "1e-9",
        "--atol",
        "1e-11",
        "--init",
        str(init_file),
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["method"] == "adaptive" and meta["rtol"] == 1e-9 and meta["atol"] == 1e-11
    assert meta["rhs_evaluations"] == 1 + 6 * (meta["steps_accepted"] + meta["steps_rejected"])
    init = Init.from_file(init_file, runtime.load("two_layer").model)
    py = runtime.flow(
        "two_layer", init, {}, t_max=1.0, dt=0.3, record_every=0.25, method="adaptive", rtol=1e-9, atol=1e-11
    )
    with np.load(out / "trajectory.npz") as tr:
        assert tr["Q"].shape == (5, 3, 3)
        assert np.array_equal(tr["Q"], py.Q)
    # tolerances belong to the adaptive method
    bad = run(
        "runtime",
        *cmd.replace("adaptive", "rk4").split(),
        "--rtol",
        "1e-9",
        "--init",
        str(init_file),
        "--out",
        str(tmp_path / "bad"),
    )
    assert bad.returncode == 2 and "--rtol: tolerances of --method adaptive, not rk4" in bad.stderr


def test_simulate_command(tmp_path):
    out = tmp_path / "sim"
    cmd = "simulate --model scm --n 200 --seeds 3 --t-max 0.5 --no-progress"
    res = run("runtime", *cmd.split(), "--out", str(out))
    assert res.returncode == 0, res.stderr
    # default: about 100 records, the largest divisor of the 100 steps (0.5 * 200) not above 1: every step
    S, n, K, M = 3, 101, 2, 2
    with np.load(out / "trajectory.npz") as data:
        arrays = {k: np.array(data[k]) for k in data.files}
    assert arrays["alpha"].shape == (n,)
    assert arrays["T"].shape == (M, M)
    expected = {"Q": (K, K), "R": (K, M), "eps_g": ()}
    for name, shape in expected.items():
        assert arrays[name].shape == (S, n, *shape), name
        assert arrays[f"{name}_mean"].shape == (n, *shape), name
        assert arrays[f"{name}_sem"].shape == (n, *shape), name
        np.testing.assert_allclose(arrays[f"{name}_mean"], arrays[name].mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(
            arrays[f"{name}_sem"], arrays[name].std(axis=0, ddof=1) / np.sqrt(S), rtol=1e-12, atol=1e-15
        )
    assert np.all(arrays["eps_g_sem"][1:] > 0)  # the seeds really differ
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"] == "scm" and meta["params"] == {"eta": 1.0, "sigma": 0.0}
    assert meta["N"] == 200 and meta["seeds"] == 3 and meta["seeds_used"] == [0, 1, 2]


def test_derive_show_text():
    res = run("derive", "show", "two_layer")
    assert res.returncode == 0, res.stderr
    for needle in ("dQ[k,l]/dalpha", "dR[k,n]/dalpha", "dv[k]/dalpha", "I4(", "I3(", "I2(", "J2(", "eps_g"):
        assert needle in res.stdout, needle
    # the primitives' derived forms are printed too, with how they were derived
    assert "asin" in res.stdout and "by:" in res.stdout


def test_derive_show_latex():
    res = run("derive", "show", "two_layer", "--latex")
    assert res.returncode == 0, res.stderr
    assert r"\begin{align}" in res.stdout and r"\end{align}" in res.stdout
    assert r"\frac{d Q_{kl}}{d\alpha}" in res.stdout
    assert r"\frac{d v_{k}}{d\alpha}" in res.stdout
    assert r"\eta" in res.stdout and "I_{4}" in res.stdout


def test_derive_show_unknown_model():
    res = run("derive", "show", "nosuchmodel")
    assert res.returncode == 2
    assert "nosuchmodel" in res.stderr
    assert "Traceback" not in res.stderr


def test_interrupted_flow_keeps_its_records_and_the_same_command_completes_it(tmp_path):
    out = tmp_path / "flow"
    cmd = "flow --model anil --set order=2 --K 4 --M 4 --t-max 400 --dt 0.01 --record-every 1 --no-progress"
    args = [sys.executable, "-m", "runtime", *cmd.split(), "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = proc.stderr.readline()  # once the first steps are timed
        while started.startswith("compiling the "):  # a first run: numba compiles the kernels
            started = proc.stderr.readline()
        assert "ms per step" in started, started
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert stopped_after < 5.0  # about 1 s, generous for a busy machine
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # (printed after the first line above)
    assert err.startswith("interrupted at alpha = ") and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "trajectory.npz"]  # no figure
    partial = runtime.Trajectory.load(out)
    meta = partial.metadata
    assert meta["complete"] is False and meta["stopped"] == "interrupted"
    assert 0 < partial.alpha[-1] == meta["alpha_reached"] < 400
    assert float(err.split("alpha = ")[1].split(";")[0]) == meta["alpha_reached"]
    assert partial.Q.shape == (len(partial.alpha), 4, 4) and np.all(np.isfinite(partial.eps_meta))
    # the same command continues from the last record and completes the run
    res = run("runtime", *cmd.split(), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"from alpha = {meta['alpha_reached']:g}" in res.stdout
    full = runtime.Trajectory.load(out)
    assert full.metadata["complete"] is True and full.metadata["resumed_from_alpha"] == meta["alpha_reached"]
    ref = runtime.flow(
        "anil", runtime.sampled_init("anil", 4, 4, 1000, 0), {"order": 2}, t_max=400, dt=0.01, record_every=1
    )
    assert set(full.arrays) == set(ref.arrays)
    for name, a in ref.arrays.items():
        np.testing.assert_allclose(full.arrays[name], a, rtol=1e-12, atol=1e-14, err_msg=name)


def test_interrupted_simulation_stops_at_once_and_keeps_its_records(tmp_path):
    out = tmp_path / "sim"
    cmd = "simulate --model two_layer --n 2000 --seeds 4 --t-max 50"  # ~ 10 s in two worker processes
    args = [sys.executable, "-m", "runtime", *cmd.split(), "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        # the progress bar past its start: the seeds are running and have made records
        while not re.search(r"simulate two_layer[^\r\n]*?\b[1-9][0-9]?%\|", seen):
            char = proc.stderr.read(1)
            assert char, seen
            seen += char
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert stopped_after < 5.0  # about 1 s (it was 14-17 s, the workers running on)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at alpha = ") and str(out) in last
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "trajectory.npz"]
    partial = runtime.Trajectory.load(out)
    meta = partial.metadata
    assert meta["complete"] is False and meta["seeds_asked"] == 4 and 1 <= meta["seeds"] <= 4
    assert 0 < partial.alpha[-1] == meta["alpha_reached"] < 50
    n_seeds, n_t = meta["seeds"], len(partial.alpha)
    assert meta["seeds_used"] == list(range(n_seeds))
    assert partial.Q.shape == (n_seeds, n_t, 2, 2) and partial.eps_g_mean.shape == (n_t,)
    # the records are those of a run that stops there by itself
    short = runtime.simulate("two_layer", N=2000, seeds=n_seeds, t_max=partial.alpha[-1], record_every=0.5)
    for name in ("Q", "R", "v", "eps_g"):
        assert np.array_equal(partial.arrays[name], short.arrays[name]), name


def test_metadata_is_strict_json_with_integers_and_the_command_as_typed(tmp_path):
    out = tmp_path / "my out"  # a space: the command is quoted as a shell would need it
    args = [*"flow --model anil --set S=2 --t-max 0.1 --dt 0.01 --no-progress --out".split(), str(out)]
    res = run("runtime", *args)
    assert res.returncode == 0, res.stderr
    text = (out / "metadata.json").read_text()

    def no_constant(name):
        raise AssertionError(f"metadata.json holds the non-JSON token {name}")

    meta = json.loads(text, parse_constant=no_constant)
    params = meta["params"]
    assert params["n_s"] == "inf"  # the default: the population support loss
    for name, value in (("S", 2), ("order", 1), ("n_q", 1)):
        assert params[name] == value and isinstance(params[name], int), name
    assert isinstance(params["eta"], float)
    assert meta["command"] == shlex.join(["python", "-m", "runtime", *args])
    assert meta["complete"] is True


def test_run_folder_does_not_depend_on_options_that_do_not_change_the_result(tmp_path):
    def folder(*extra):
        cmd = [sys.executable, "-m", "runtime", *"flow --model scm --t-max 0.1 --dt 0.01".split(), *extra]
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1].split()[-1]

    plain = folder()
    assert plain.startswith("runs/flow-scm-")
    assert folder("--no-progress") == folder("--parallel", "off") == plain
    assert folder("--set", "eta=0.5") != plain
    # with an init file, by its content; the options of a sampled start do not count
    Init(np.eye(2), np.zeros((2, 2)), np.eye(2)).save(tmp_path / "a.npz")
    Init(np.eye(2), np.zeros((2, 2)), np.eye(2)).save(tmp_path / "b.npz")
    Init(np.eye(2), np.full((2, 2), 0.1), np.eye(2)).save(tmp_path / "c.npz")
    from_a = folder("--init", "a.npz")
    # (--K, --M, --sigma0, --n beside --init are refused: tests/test_inputs.py)
    assert folder("--init", "b.npz", "--seed", "5") == from_a != plain
    assert folder("--init", "c.npz") != from_a


def test_interrupted_main_job_keeps_its_flow_and_the_simulation_so_far(tmp_path):
    out = tmp_path / "main"
    args = [sys.executable, "-m", "runtime", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "simulate anil" not in seen:  # the flow is done (0.1 s), the simulation running
            char = proc.stderr.read(1)
            assert char, seen
            seen += char
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted at alpha = ")
    assert sorted(p.name for p in out.iterdir()) == ["flow", "simulation"]  # no figure, no summary
    fl = runtime.Trajectory.load(out / "flow")
    assert fl.metadata["complete"] is True and fl.alpha[-1] == 300
    sim = runtime.Trajectory.load(out / "simulation")
    # the records so far: at least the start (a busy machine may not reach the first record in 1 s)
    assert sim.metadata["complete"] is False and 0 <= sim.alpha[-1] < 300


def _wait_for(proc, text: str) -> str:
    seen = ""
    while text not in seen:
        char = proc.stderr.read(1)
        assert char, seen
        seen += char
    return seen


@pytest.mark.parametrize(
    "cmd, started",
    [
        ("flow --model anil --set order=2 --K 4 --M 4 --t-max 400 --dt 0.01 --record-every 1", "ms per step"),
        ("simulate --model two_layer --n 2000 --seeds 1 --t-max 50", "simulate two_layer"),  # one process
    ],
    ids=["flow", "simulate"],
)
def test_sigterm_is_an_interrupt_that_keeps_the_records_exit_143(tmp_path, cmd, started):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "runtime", *cmd.split(), "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, started)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert stopped_after < 5.0  # about 1 s, generous for a busy machine
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated at alpha = ") and str(out) in last
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "trajectory.npz"]
    meta = runtime.Trajectory.load(out).metadata
    assert meta["complete"] is False and meta["stopped"] == "interrupted" and meta["alpha_reached"] > 0


def test_a_first_run_says_it_is_compiling_before_its_progress_bar_starts(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}  # an empty cache: numba compiles

    def go(*args):
        cmd = [sys.executable, "-m", "runtime", *args, "--out", str(tmp_path / args[0])]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
        return res.stderr

    flow_cmd = ("flow", "--model", "scm", "--activation", "linear", "--t-max", "1", "--dt", "0.01")
    err = go(*flow_cmd)
    notice = "compiling the kernels of scm/linear (first run only"
    assert err.count(notice) == 1 and err.index(notice) < err.index("flow scm"), err
    # the bar starts its clock after the compilation: no step is timed at seconds
    assert "s/step" not in err, err
    assert "compiling" not in go(*flow_cmd)  # now loaded from numba's cache
    err = go("simulate", "--model", "two_layer", "--activation", "linear", "--n", "50", "--seeds", "2",
             "--t-max", "0.2")  # fmt: skip
    notice = "compiling the simulator's kernels of two_layer/linear (first run only"
    assert err.count(notice) == 1 and err.index(notice) < err.index("simulate two_layer"), err


def test_study_prints_one_progress_line_and_no_blank_lines(tmp_path):
    res = run("runtime", "study", "symmetry", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "" not in res.stdout.strip().splitlines()
    # a bar per flow left a cleared line each (dozens in a log that shows the carriage returns)
    shown = [
        line
        for line in res.stderr.replace("\r", "\n").splitlines()
        if line.strip() and not line.startswith("compiling the ")  # a first run
    ]
    assert all(line.startswith("study symmetry: ") for line in shown), shown
    lines = res.stderr.replace("\r", "\n").strip().splitlines()
    assert [line for line in lines if not line.startswith("compiling the ")] == shown  # no blank lines
    assert res.stderr.endswith("\n") and shown[-1].startswith("study symmetry: 4 flows")
