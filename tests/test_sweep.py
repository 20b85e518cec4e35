"""python -m runtime sweep (runtime/sweep.py): the points against single flow calls,
resuming, a worker killed mid-sweep, an interrupted command rerun, bad specs.

One LocalCluster of two worker processes is shared by the module (its start-up
costs seconds); the interrupted command starts its own, of one worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import flow
from runtime.output import OutputError
from runtime.scenarios import reference_init
from runtime.sweep import SweepSpecError, plan, point_data, summarise, sweep

ROOT = Path(__file__).resolve().parent.parent


def tiny(**over) -> dict:
    """A 2 x 2 sweep of the reference scenario, fixed-step RK4, alpha to 2."""
    spec = {
        "model": "anil",
        "t_max": 2.0,
        "method": "rk4",
        "dt": 0.01,
        "record_every": 0.5,
        "params": {"eta": 1.0},
        "grid": {"alpha_in": [0.5, 1.0], "S": [1, 2]},
        "init": {"scenario": "reference"},
    }
    spec.update(over)
    return spec


def slow(n_alpha_in: int = 3) -> dict:
    """Points of about 0.25-0.6 s each (RK4 at dt = 0.001 to alpha 16), so that a
    worker can be killed, or the command interrupted, between points."""
    return tiny(
        t_max=16.0, dt=0.001, record_every=1.0, grid={"alpha_in": [0.5, 1.0, 1.5][:n_alpha_in], "S": [1, 2]}
    )


@pytest.fixture(scope="module")
def cluster():
    import dask
    from distributed import LocalCluster

    from runtime.sweep import EMBEDDED_CONFIG

    with dask.config.set(EMBEDDED_CONFIG):  # as the embedded cluster of runtime.sweep
        cl = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cl:
        yield cl


def to_toml(spec: dict) -> str:
    """The TOML text of a spec of numbers, strings and flat tables."""

    def value(v):
        return repr(v) if not isinstance(v, str) else f'"{v}"'

    lines = [f"{k} = {value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for k, table in spec.items():
        if isinstance(table, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"


_EXPECTED: dict = {}


def expected(spec: dict) -> dict:
    """Every point computed in this process, without Dask: the uninterrupted dataset."""
    p = plan(spec)
    if p.key not in _EXPECTED:
        _EXPECTED[p.key] = {idx: point_data(p, values) for idx, values in p.points()}
    return _EXPECTED[p.key]


def assert_dataset_is(ds, points: dict) -> None:
    assert ds.done.values.all()
    for idx, data in points.items():
        for name, value in data.items():
            if name not in ("run", "done"):
                np.testing.assert_array_equal(ds[name].values[idx], value, err_msg=f"{name} at {idx}")


def test_points_are_single_flows_bit_for_bit(cluster, tmp_path):
    spec = tiny()
    ds = sweep(spec, scheduler=cluster.scheduler_address, out=tmp_path / "s", progress=False)
    assert ds.sizes["alpha_in"] == 2 and ds.sizes["S"] == 2 and ds.sizes["alpha"] == 5
    assert list(ds.S.values) == [1, 2] and ds.attrs["kind"] == "sweep" and ds.attrs["kernel_sha256"]
    assert ds.attrs["points_computed"] == 4 and (ds.run.values == 1).all()
    for i, alpha_in in enumerate([0.5, 1.0]):
        for j, S in enumerate([1, 2]):
            tr = flow("anil", reference_init(1e-3), {"eta": 1.0, "alpha_in": alpha_in, "S": S},
                      t_max=2.0, dt=0.01, method="rk4", record_every=0.5)  # fmt: skip
            point = ds.isel(alpha_in=i, S=j)
            for name in ("Q", "R", "a", "r", "eps_meta", "eps_pre", "eps_opt"):
                np.testing.assert_array_equal(point[name].values, tr.arrays[name], err_msg=name)
            np.testing.assert_array_equal(point.T.values, tr.T)
            assert float(point.final_eps_meta) == tr.eps_meta[-1]
    # a rerun of the same spec computes nothing; another spec in the same folder is refused
    again = sweep(spec, scheduler=cluster.scheduler_address, out=tmp_path / "s", progress=False)
    assert again.attrs["points_computed"] == 0
    assert again.drop_attrs().identical(ds.drop_attrs())
    with pytest.raises(OutputError, match="another spec"):
        sweep(tiny(params={"eta": 0.5}), scheduler=cluster.scheduler_address, out=tmp_path / "s")


def test_adaptive_point_and_sampled_starts(cluster, tmp_path):
    spec = tiny(method="adaptive", rtol=1e-7, grid={"eta": [1.0]}, params={},
                init={"sample": {"K": 2, "M": 2, "N": 50, "seeds": [3, 4]}})  # fmt: skip
    spec.pop("dt")
    ds = sweep(spec, scheduler=cluster.scheduler_address, out=tmp_path / "a", progress=False)
    assert ds.Q.dims == ("eta", "seed", "alpha", "k", "l") and list(ds.seed.values) == [3, 4]
    from runtime import sampled_init

    tr = flow("anil", sampled_init("anil", 2, 2, 50, 4), {"eta": 1.0}, t_max=2.0, method="adaptive",
              rtol=1e-7, record_every=0.5)  # fmt: skip
    np.testing.assert_array_equal(ds.Q.values[0, 1], tr.Q)
    assert int(ds.rhs_evaluations.values[0, 1]) == tr.metadata["rhs_evaluations"]


def _kill_a_busy_worker_after_first_point(cluster, store: Path, killed: list) -> None:
    import zarr
    from distributed import Client

    with Client(cluster) as client:
        pids = client.run(os.getpid)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                done = int(np.asarray(zarr.open_array(str(store / "done"), mode="r")[...]).sum())
            except Exception:  # noqa: BLE001 - the store is not created yet
                done = 0
            busy = [w for w, keys in client.processing().items() if keys]
            if done >= 1 and busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append((pids[busy[0]], done))
                return
            time.sleep(0.02)


def test_a_killed_worker_loses_no_point(cluster, tmp_path):
    spec = slow()
    killed: list = []
    out = tmp_path / "k"
    killer = threading.Thread(
        target=_kill_a_busy_worker_after_first_point, args=(cluster, out / "sweep.zarr", killed)
    )
    killer.start()
    ds = sweep(spec, scheduler=cluster.scheduler_address, out=out, progress=False)
    killer.join()
    assert killed and killed[0][1] < 6, "no worker was killed in the middle of the sweep"
    assert ds.attrs["points_computed"] == 6 and (ds.run.values == 1).all()
    assert_dataset_is(ds, expected(spec))


def test_interrupted_command_rerun_computes_only_the_missing_points(cluster, tmp_path, capsys):
    spec = slow()
    path = tmp_path / "spec.toml"
    path.write_text(to_toml(spec))
    out = tmp_path / "i"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "sweep", str(path), "--workers", "1", "--out", str(out),
         "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    import zarr

    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(np.asarray(zarr.open_array(str(out / "sweep.zarr" / "done"), mode="r")[...]).sum())
        except Exception:  # noqa: BLE001 - not created yet
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    first = np.asarray(zarr.open_array(str(out / "sweep.zarr" / "done"), mode="r")[...]).astype(bool)
    assert 2 <= first.sum() < 6
    assert stderr.splitlines()[-1] == (
        f"interrupted; {first.sum()} of 6 points done in {out} (the same command computes the rest)"
    )
    # the same command again (on the module's cluster, --scheduler): only the missing points
    from runtime.cli import main

    assert main(["sweep", str(path), "--scheduler", cluster.scheduler_address, "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert f"computed {6 - first.sum()} of 6 points" in capsys.readouterr().out
    assert (out / "summaries.png").stat().st_size > 0
    import xarray as xr

    with xr.open_zarr(out / "sweep.zarr", chunks=None) as ds:
        ds = ds.load()
    assert (ds.run.values[first] == 1).all() and (ds.run.values[~first] == 2).all()
    assert_dataset_is(ds, expected(spec))


BAD = [
    ({"model": "nosuch"}, "model: unknown model 'nosuch'"),
    ({"params": {"etaa": 1.0}}, "params.etaa: model 'anil' has no parameter 'etaa'"),
    ({"params": {"eta": -1.0}}, "params.eta: parameter eta must be >= 0"),
    ({"grid": {"alpha_in": [0.5], "bogus": [1]}}, "grid.bogus: unknown parameter 'bogus'"),
    ({"grid": {"alpha_in": []}}, "grid.alpha_in: empty list"),
    ({"grid": {}}, "grid: missing or empty"),
    ({"grid": {"S": [1, 1.5]}}, r"grid.S\[1\]: parameter S must be an integer"),
    ({"grid": {"order": [1, 3]}}, r"grid.order\[1\]: parameter order must be 1 or 2"),
    ({"grid": {"eta": 1.0}}, "grid.eta: must be a list"),
    ({"grid": {"eta": [1.0]}, "params": {"eta": 1.0}}, "grid.eta: also fixed in"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"init": {}}, "init: missing"),
    ({"init": {"scenario": "other"}}, "init.scenario: unknown scenario"),
    ({"init": {"file": "nosuch.npz"}}, "init.file:"),
    ({"init": {"sample": {"K": 2, "seeds": []}}}, "init.sample.seeds: must be a non-empty list"),
    ({"grid": {"d": [1e-3]}, "init": {"sample": {}}}, "grid.d: the asymmetry d is swept with init.scenario"),
    ({"rtol": 1e-6}, "rtol: a tolerance of method = 'adaptive'"),
    ({"method": "leapfrog"}, "method: must be one of"),
    ({"record_every": 0.3}, "t_max = 2 is not a multiple of record_every = 0.3"),
    ({"record_every": 0.005}, "record_every = 0.005 is not a whole number of steps dt = 0.01"),
    ({"t_max": -1}, "t_max: must be a positive number"),
    ({"simulate": {"n": 3, "seeds": 2}}, "simulate.n: record_every"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_spec_fails_before_any_work(tmp_path, change, message):
    out = tmp_path / "never"
    with pytest.raises(SweepSpecError, match=message):
        sweep(tiny(**change), out=out, progress=False)
    assert not out.exists()


def test_bad_spec_on_the_command_line(tmp_path, capsys):
    from runtime.cli import main

    path = tmp_path / "bad.toml"
    path.write_text(to_toml(tiny(grid={"alpha_in": [0.5, -1.0]})))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: grid.alpha_in[1]: parameter alpha_in must be >= 0 (inner-loop learning rate), got -1"
    ]
    assert not (tmp_path / "o").exists()


def test_simulations_beside_the_flows(cluster, tmp_path):
    from runtime import simulate

    spec = tiny(grid={"alpha_in": [1.0]}, t_max=1.0, simulate={"n": 40, "seeds": 2, "seed": 5})
    ds = sweep(spec, scheduler=cluster.scheduler_address, out=tmp_path / "sim", progress=False)
    sim = simulate("anil", {"eta": 1.0, "alpha_in": 1.0}, N=40, seeds=2, seed=5, t_max=1.0,
                   init=reference_init(1e-3), record_every=0.5, workers=1)  # fmt: skip
    assert ds.sim_eps_meta_mean.dims == ("alpha_in", "alpha")
    np.testing.assert_array_equal(ds.sim_eps_meta_mean.values[0], sim.eps_meta_mean)
    np.testing.assert_array_equal(ds.sim_r_sem.values[0], sim.r_sem)


def test_summaries_are_those_of_analyze():
    """A point's summaries are runtime analyze's (plateaus by the flow's own speed),
    computed on the point's trajectory: equal to analyze.summaries of the same flow."""
    from runtime.analyze import summaries

    start = reference_init(1e-5)
    fl = flow("anil", start, {}, t_max=120.0, dt=0.01, method="adaptive", record_every=1.0)
    got = summarise(fl)
    assert got == summaries(fl)
    assert 40 < got["plateau_start"] < got["escape_alpha"] < 90 and got["plateau_left"] == 1.0
    assert got["plateau_level"] == pytest.approx(0.19, abs=0.01)


def test_init_file_relative_to_the_spec(tmp_path):
    start = reference_init(2e-3)
    start.vectors["a"] = np.array([0.1, -0.2])
    start.save(tmp_path / "start.npz")
    spec = tiny(init={"file": "start.npz"})
    path = tmp_path / "spec.toml"
    path.write_text(to_toml(spec))
    p = plan(path)
    init = p.point_init(next(p.points())[1])
    np.testing.assert_array_equal(init.R, start.R)
    np.testing.assert_array_equal(init.vectors["a"], start.vectors["a"])
    # the key follows the file's content, not its name
    other = reference_init(3e-3)
    other.save(tmp_path / "start.npz")
    assert plan(path).key != p.key


def test_a_diverging_point_keeps_its_records_before_it():
    # linear activation, eta far too large: Q grows by ~5000x per record until it overflows
    spec = {"model": "scm", "activation": "linear", "t_max": 80.0, "method": "euler", "dt": 0.5,
            "record_every": 0.5, "grid": {"eta": [50.0]},
            "init": {"sample": {"K": 2, "M": 2, "N": 50}}}  # fmt: skip
    p = plan(spec)
    data = point_data(p, {"eta": 50.0, "seed": 0})
    assert np.isfinite(data["diverged_alpha"]) and 0 < data["diverged_alpha"] <= 80
    finite = np.isfinite(data["eps_g"])
    assert finite[0] and not finite[-1]
    assert np.all(finite[: finite.sum()])  # the records before the divergence, nan after
    assert np.isnan(data["final_eps_g"])  # the value at t_max, which it never reached
