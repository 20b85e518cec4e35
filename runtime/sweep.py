"""Sweeps: many flows (and optionally simulations) over a grid of parameters, on Dask.

``sweep(spec)`` reads a TOML spec (docs/interface.md), checks all of it before any
work starts, creates ``sweep.zarr`` (an xarray dataset: one dimension per swept
parameter, plus ``alpha`` and the unit dimensions), and runs one Dask task per
point. Each task runs ``runtime.integrate.flow`` exactly as ``flow`` does (so a
point's trajectory is the one a single run gives, to the bit for fixed steps) and
writes its point into the store itself: the point's data first, then its ``done``
flag. Every variable has one chunk per point, so tasks never write the same file,
and a rewritten point writes the same numbers: a task that a dead worker lost and
Dask ran again, or a point whose data was written but not its flag when the run
was killed, costs a recomputation, never a wrong or half-written point. A rerun
of the same spec into the same folder computes only the points not done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from derive import __version__
from derive.models import MODEL_NAMES, get_model

from .init import Init, sampled_init
from .integrate import ATOL, METHODS, RTOL, FlowDiverged, SimulationDiverged, flow, record_times, steps_for
from .kernels import load
from .output import OutputError, check_out_dir
from .trajectory import command_line, jsonable

STORE = "sweep.zarr"
# top-level keys of a spec and the tables it may hold
TOP_KEYS = ("model", "activation", "t_max", "method", "dt", "rtol", "atol", "record_every")
TABLES = ("params", "grid", "init", "simulate")
SCENARIOS = ("reference",)
# the first step of method "adaptive" when the spec gives no dt (flow's default)
ADAPTIVE_DT = 0.01
# records of a sweep without record_every
DEFAULT_RECORDS = 100
# the main metric of a point's summaries, the first of these the model has
MAIN_METRICS = ("eps_meta", "eps_g")


class SweepSpecError(ValueError):
    """A spec that cannot run, named by its key (``grid.eta``, ``init.sample.K``)."""


class SweepInterrupted(KeyboardInterrupt):
    """An interrupt (Ctrl-C, SIGTERM) of a sweep: ``done`` of ``total`` points are in
    ``out``; the same command computes the rest."""

    def __init__(self, out: Path, done: int, total: int):
        self.out, self.done, self.total = out, done, total
        super().__init__(f"{done} of {total} points done")


# --------------------------------------------------------------------------- the spec
@dataclass
class Plan:
    """A checked spec: everything a point needs, and the dataset's layout."""

    model: str
    activation: str
    t_max: float
    method: str
    dt: float
    rtol: float | None
    atol: float | None
    record_every: float
    params: dict[str, float]
    grid: dict[str, list]  # swept keys in the spec's order (and "seed" of a sampled start)
    init: dict
    simulate: dict | None
    alpha: np.ndarray
    K: int
    M: int
    text: str  # the spec as given (TOML text or JSON of the dict)
    key: str = ""  # sha256 of what determines the results
    init_arrays: dict = field(default_factory=dict)  # an init file's content

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.grid)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.grid.values())

    def points(self):
        """(index, values) of every point, in C order of the grid."""
        for idx in itertools.product(*(range(n) for n in self.shape)):
            yield idx, {k: self.grid[k][i] for k, i in zip(self.grid, idx)}

    def point_params(self, values: dict) -> dict[str, float]:
        spec = get_model(self.model)
        names = {p.name for p in spec.params}
        return {**self.params, **{k: float(v) for k, v in values.items() if k in names}}

    def point_init(self, values: dict) -> Init:
        how = self.init["how"]
        if how == "file":
            a = self.init_arrays
            vectors = {k: v for k, v in a.items() if k not in ("Q", "R", "T")}
            return Init(a["Q"], a["R"], a["T"], vectors)
        if how == "scenario":
            from .scenarios import reference_init

            d = values.get("d", self.init["d"])
            return reference_init(float(d), self.K, self.M)
        s = self.init
        return sampled_init(self.model, self.K, self.M, s["N"], int(values["seed"]), s["sigma0"])


def _number(key: str, value, minimum=None, positive=False, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepSpecError(f"{key}: must be a number, got {value!r}")
    value = float(value)
    bad = not math.isfinite(value) or (minimum is not None and value < minimum) or (positive and value <= 0)
    if integer and math.isfinite(value) and value != int(value):
        bad = True
    if bad:
        what = "a positive number" if positive else f"a number >= {minimum:g}" if minimum is not None else ""
        what = f"a whole number >= {minimum:g}" if integer else what
        raise SweepSpecError(f"{key}: must be {what or 'a finite number'}, got {value!r}")
    return int(value) if integer else value


def _unknown(where: str, table: dict, allowed) -> None:
    for k in table:
        if k not in allowed:
            raise SweepSpecError(f"{where}{k}: unknown key; allowed: {', '.join(allowed)}")


def read_spec(spec: str | Path | dict) -> tuple[dict, str, Path]:
    """The spec as a dict, its text, and the folder its relative paths start from."""
    if isinstance(spec, dict):
        return spec, json.dumps(jsonable(spec), sort_keys=True), Path.cwd()
    path = Path(spec)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepSpecError(f"spec {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SweepSpecError(f"spec {path}: not valid TOML ({exc})") from None
    return data, text, path.resolve().parent


def plan(spec: str | Path | dict) -> Plan:
    """Check a spec whole (docs/interface.md) and return its ``Plan``; a bad spec
    raises ``SweepSpecError`` naming the key, before any work."""
    data, text, base = read_spec(spec)
    _unknown("", data, TOP_KEYS + TABLES)
    for t in TABLES:
        if t in data and not isinstance(data[t], dict):
            raise SweepSpecError(f"{t}: must be a table ([{t}])")
    model = data.get("model")
    if model is None:
        raise SweepSpecError(f"model: missing; one of {', '.join(MODEL_NAMES)}")
    if model not in MODEL_NAMES:
        raise SweepSpecError(f"model: unknown model {model!r}; known: {', '.join(MODEL_NAMES)}")
    spec_model = get_model(model)
    activation = data.get("activation", "erf")
    if activation not in spec_model.activations:
        raise SweepSpecError(
            f"activation: model {model} is built for {', '.join(spec_model.activations)}, not {activation!r}"
        )
    if "t_max" not in data:
        raise SweepSpecError("t_max: missing (the final alpha)")
    t_max = _number("t_max", data["t_max"], positive=True)
    method = data.get("method", "adaptive")
    if method not in METHODS:
        raise SweepSpecError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    rtol = atol = None
    if method == "adaptive":
        dt = _number("dt", data.get("dt", ADAPTIVE_DT), positive=True)
        rtol = _number("rtol", data.get("rtol", RTOL), positive=True)
        atol = _number("atol", data.get("atol", ATOL), minimum=0.0)
    else:
        for k in ("rtol", "atol"):
            if k in data:
                raise SweepSpecError(f"{k}: a tolerance of method = 'adaptive', not {method!r}")
        if "dt" not in data:
            raise SweepSpecError(f"dt: missing (the step of method = {method!r})")
        dt = _number("dt", data["dt"], positive=True)
    every = _number("record_every", data.get("record_every", t_max / DEFAULT_RECORDS), positive=True)
    try:
        if method == "adaptive":
            n_rec = steps_for(t_max, every, "t_max", "record_every")
            alpha = record_times(n_rec + 1, every, t_max, n_rec)
        else:
            n_steps = steps_for(t_max, dt, "t_max")
            rec = steps_for(every, dt, "record_every")
            if n_steps % rec:
                raise ValueError(f"t_max = {t_max:g} is not a multiple of record_every = {every:g}")
            alpha = np.arange(n_steps // rec + 1) * (rec * dt)
    except ValueError as exc:
        raise SweepSpecError(str(exc)) from None

    def check_param(key: str, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SweepSpecError(f"{key}: must be a number, got {value!r}")
        try:  # the message of --set
            return spec_model.param(name).check(value)
        except ValueError as exc:
            raise SweepSpecError(f"{key}: {exc}") from None

    params = {k: check_param(f"params.{k}", k, v) for k, v in data.get("params", {}).items()}
    init_table = data.get("init")
    if not init_table:
        raise SweepSpecError(
            "init: missing; one of file = 'init.npz', scenario = 'reference', sample = {...}"
        )
    hows = [k for k in ("file", "scenario", "sample") if k in init_table]
    if len(hows) != 1:
        got = ", ".join(hows) or "none"
        raise SweepSpecError(f"init: give exactly one of file, scenario, sample (got {got})")
    how = hows[0]
    grid_table = data.get("grid", {})
    if not grid_table:
        raise SweepSpecError("grid: missing or empty; a sweep needs at least one list of values ([grid])")
    grid: dict[str, list] = {}
    for k, values in grid_table.items():
        key = f"grid.{k}"
        if not isinstance(values, list):
            raise SweepSpecError(f"{key}: must be a list of values, got {values!r}")
        if not values:
            raise SweepSpecError(f"{key}: empty list; give at least one value")
        if k in params:
            raise SweepSpecError(f"{key}: also fixed in [params]; give it in one place")
        if k == "d":
            if how != "scenario":
                raise SweepSpecError(f"{key}: the asymmetry d is swept with init.scenario only")
            grid[k] = [_number(f"{key}[{i}]", v) for i, v in enumerate(values)]
        elif any(p.name == k for p in spec_model.params):
            grid[k] = [check_param(f"{key}[{i}]", k, v) for i, v in enumerate(values)]
            if spec_model.param(k).integer or spec_model.param(k).choices:
                if all(float(v).is_integer() for v in grid[k]):
                    grid[k] = [int(v) for v in grid[k]]
        else:
            raise SweepSpecError(
                f"{key}: unknown parameter {k!r}; model {model} has "
                + ", ".join(p.name for p in spec_model.params)
                + (", and d (the asymmetry of init.scenario)" if how == "scenario" else "")
            )
        if len(set(grid[k])) != len(grid[k]):
            raise SweepSpecError(f"{key}: a value is repeated")
    init, K, M, init_arrays = _init(init_table, how, model, base, grid)
    # the flow's own checks (derived for these values?) at every point
    for combo in itertools.product(*(grid[k] for k in grid if k not in ("d", "seed"))):
        values = {**params, **dict(zip([k for k in grid if k not in ("d", "seed")], map(float, combo)))}
        try:
            spec_model.check_flow(spec_model.resolve_params(values))
        except ValueError as exc:
            raise SweepSpecError(f"grid: {exc}") from None
    simulate = _simulate(data.get("simulate"), alpha)
    p = Plan(
        model, activation, t_max, method, dt, rtol, atol, every, params, grid, init, simulate,
        alpha, K, M, text, init_arrays=init_arrays,
    )  # fmt: skip
    p.key = _plan_key(p)
    return p


def _init(table: dict, how: str, model: str, base: Path, grid: dict):
    spec_model = get_model(model)
    if how == "file":
        _unknown("init.", table, ("file",))
        path = Path(table["file"])
        path = path if path.is_absolute() else base / path
        try:
            init = Init.from_file(path, spec_model)
        except (OSError, ValueError) as exc:
            raise SweepSpecError(f"init.file: {exc}") from None
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in init.arrays().items()}
        return {"how": "file", "file": str(path)}, init.K, init.M, arrays
    if how == "scenario":
        _unknown("init.", table, ("scenario", "d", "K", "M"))
        if table["scenario"] not in SCENARIOS:
            raise SweepSpecError(f"init.scenario: unknown scenario {table['scenario']!r}; known: reference")
        if model != "anil":
            raise SweepSpecError(f"init.scenario: the reference scenario is of model anil, not {model}")
        if "d" in table and "d" in grid:
            raise SweepSpecError("init.d: also swept in [grid]; give it in one place")
        d = _number("init.d", table.get("d", 1e-3))
        K = _number("init.K", table.get("K", 2), minimum=1, integer=True)
        M = _number("init.M", table.get("M", 2), minimum=1, integer=True)
        for dv in grid.get("d", [d]):  # every start a network can have
            from .scenarios import reference_init

            try:
                reference_init(dv, K, M).validate(spec_model)
            except ValueError as exc:
                raise SweepSpecError(f"{'grid.d' if 'd' in grid else 'init.d'} = {dv:g}: {exc}") from None
        return {"how": "scenario", "scenario": table["scenario"], "d": d}, K, M, {}
    sample = table["sample"]
    if not isinstance(sample, dict):
        raise SweepSpecError("init.sample: must be a table {K = .., M = .., sigma0 = .., seeds = [..]}")
    _unknown("init.", table, ("sample",))
    _unknown("init.sample.", sample, ("K", "M", "N", "sigma0", "seeds"))
    K = _number("init.sample.K", sample.get("K", 2), minimum=1, integer=True)
    M = _number("init.sample.M", sample.get("M", 2), minimum=1, integer=True)
    N = _number("init.sample.N", sample.get("N", 1000), minimum=K + M, integer=True)
    sigma0 = _number("init.sample.sigma0", sample.get("sigma0", 0.1), minimum=0.0)
    seeds = sample.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise SweepSpecError(f"init.sample.seeds: must be a non-empty list of seeds, got {seeds!r}")
    seeds = [_number(f"init.sample.seeds[{i}]", s, minimum=0, integer=True) for i, s in enumerate(seeds)]
    if len(set(seeds)) != len(seeds):
        raise SweepSpecError("init.sample.seeds: a seed is repeated")
    if "seed" in grid:
        raise SweepSpecError("grid.seed: the seeds of a sampled start are init.sample.seeds")
    grid["seed"] = seeds
    return {"how": "sample", "N": N, "sigma0": sigma0}, K, M, {}


def _simulate(table, alpha) -> dict | None:
    if table is None:
        return None
    _unknown("simulate.", table, ("n", "seeds", "seed"))
    if "n" not in table:
        raise SweepSpecError("simulate.n: missing (the input dimension N)")
    n = _number("simulate.n", table["n"], minimum=1, integer=True)
    seeds = _number("simulate.seeds", table.get("seeds", 4), minimum=1, integer=True)
    seed = _number("simulate.seed", table.get("seed", 0), minimum=0, integer=True)
    every = alpha[1] - alpha[0]
    if abs(every * n - round(every * n)) > 1e-9 or abs(alpha[-1] * n - round(alpha[-1] * n)) > 1e-9:
        raise SweepSpecError(
            f"simulate.n: record_every = {every:g} and t_max = {alpha[-1]:g} must be whole numbers "
            f"of steps 1/n = 1/{n}"
        )
    return {"n": n, "seeds": seeds, "seed": seed}


def _plan_key(p: Plan) -> str:
    """sha256 of what determines a sweep's results: the resolved settings, the grid,
    the start (an init file by its content) and the kernel file that runs."""
    kernel = load(p.model, p.activation)
    what = {
        "model": p.model, "activation": p.activation, "t_max": p.t_max, "method": p.method, "dt": p.dt,
        "rtol": p.rtol, "atol": p.atol, "record_every": p.record_every, "params": p.params,
        "grid": p.grid, "init": {k: v for k, v in p.init.items() if k != "file"}, "simulate": p.simulate,
        "K": p.K, "M": p.M, "kernel_sha256": kernel.file_hash,
    }  # fmt: skip
    h = hashlib.sha256(json.dumps(jsonable(what), sort_keys=True).encode())
    for k in sorted(p.init_arrays):
        h.update(k.encode() + np.ascontiguousarray(p.init_arrays[k]).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- layout
def _unit_dims(shape: tuple[str, ...]) -> tuple[str, ...]:
    """Dimension names of a kernel shape: K -> k then l, M -> m then n."""
    names = {"K": ["k", "l"], "M": ["m", "n"]}
    used = {"K": 0, "M": 0}
    out = []
    for s in shape:
        out.append(names[s][used[s]])
        used[s] += 1
    return tuple(out)


def layout(p: Plan) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
    """Every variable of the dataset: name -> (dims, shape, dtype); the grid
    dimensions first, one chunk per point."""
    kernel = load(p.model, p.activation)
    g, n = p.dims, len(p.alpha)
    size = {"k": p.K, "l": p.K, "m": p.M, "n": p.M}
    out = {}
    for name, shape in kernel.module.STATE:
        dims = _unit_dims(shape)
        out[name] = (g + ("alpha",) + dims, (n,) + tuple(size[d] for d in dims), "f8")
    for name, shape in kernel.module.CONSTS:
        dims = _unit_dims(shape)
        out[name] = (g + dims, tuple(size[d] for d in dims), "f8")
    out["r"] = (g + ("alpha", "k", "m"), (n, p.K, p.M), "f8")
    for name in kernel.metric_names:
        out[name] = (g + ("alpha",), (n,), "f8")
    for name in summary_names(kernel.metric_names):
        out[name] = (g, (), "f8")
    if p.method == "adaptive":
        for name in ("rhs_evaluations", "steps_accepted", "steps_rejected"):
            out[name] = (g, (), "i8")
    out["diverged_alpha"] = (g, (), "f8")
    if p.simulate:
        for name in ("r", *kernel.metric_names):
            for stat in ("mean", "sem"):
                dims = ("alpha", "k", "m") if name == "r" else ("alpha",)
                out[f"sim_{name}_{stat}"] = (g + dims, tuple(size.get(d, n) for d in dims), "f8")
    out["run"] = (g, (), "i4")
    out["done"] = (g, (), "i1")
    return out


def summary_names(metric_names) -> list[str]:
    return [f"final_{m}" for m in metric_names] + list(SUMMARY_KEYS)


# analyze.summaries' keys besides the final metrics
SUMMARY_KEYS = (
    "plateau_level",
    "plateau_start",
    "plateau_end",
    "plateau_left",
    "plateaus",
    "escape_alpha",
    "specialisation_alpha",
)


def summarise(traj) -> dict[str, float]:
    """The summaries of one point: those of ``runtime analyze`` (``analyze.summaries``:
    the first plateau found by the flow's own speed, its level, start, end and
    whether the flow left it, the escape and specialisation alphas, the number of
    plateaus, each metric's final value); nan where a trajectory is too short to
    read (a flow that diverged at once)."""
    from .analyze import AnalysisError, summaries

    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged flow's last records
            return summaries(traj)
    except AnalysisError:
        return {}


# --------------------------------------------------------------------------- a point
def run_point(p: Plan, values: dict):
    """The flow of one point, ``flow`` exactly as the ``flow`` command runs it (a
    ``FlowDiverged`` keeps the records before the divergence), and its simulation."""
    init = p.point_init(values)
    params = p.point_params(values)
    extra = {"rtol": p.rtol, "atol": p.atol} if p.method == "adaptive" else {}
    try:
        traj = flow(
            p.model, init, params, t_max=p.t_max, dt=p.dt, method=p.method, record_every=p.record_every,
            activation=p.activation, **extra,
        )  # fmt: skip
        diverged = math.nan
    except FlowDiverged as exc:
        traj, diverged = exc.trajectory, exc.alpha
    sim = None
    if p.simulate:
        from .simulate import simulate

        try:
            sim = simulate(
                p.model, params, N=p.simulate["n"], seeds=p.simulate["seeds"], t_max=p.t_max, init=init,
                record_every=p.record_every, seed=p.simulate["seed"], activation=p.activation, workers=1,
            )  # fmt: skip
        except SimulationDiverged:
            pass  # the simulation's variables stay nan at this point
    return traj, diverged, sim


def point_data(p: Plan, values: dict) -> dict[str, np.ndarray]:
    """Every variable of one point (``layout`` without the grid dimensions)."""
    kernel = load(p.model, p.activation)
    traj, diverged, sim = run_point(p, values)
    lay = layout(p)
    out = {
        name: np.full(shape, np.nan if dt == "f8" else 0, dtype=dt) for name, (_, shape, dt) in lay.items()
    }
    if traj is not None:
        n = len(traj.alpha)
        if not np.allclose(traj.alpha, p.alpha[:n], rtol=0, atol=1e-9 * p.t_max):
            raise RuntimeError("the flow's records are not at the sweep's times")
        for name, (dims, _, _) in lay.items():
            if name in traj.arrays and not name.startswith("sim_"):
                a = np.asarray(traj.arrays[name])
                if "alpha" in dims:
                    out[name][:n] = a
                else:
                    out[name][...] = a
        out.update({k: np.asarray(v) for k, v in summarise(traj).items() if k in out})
        if n < len(p.alpha):  # diverged: the final values are those at t_max, never reached
            for m in kernel.metric_names:
                out[f"final_{m}"][...] = np.nan
        for k in ("rhs_evaluations", "steps_accepted", "steps_rejected"):
            if k in out:
                out[k][...] = traj.metadata.get(k, 0)
    out["diverged_alpha"][...] = diverged
    if sim is not None:
        n = len(sim.alpha)
        for name in ("r", *kernel.metric_names):
            for stat in ("mean", "sem"):
                out[f"sim_{name}_{stat}"][:n] = sim.arrays[f"{name}_{stat}"]
    return out


def _task(p: Plan, store: str, index: tuple[int, ...], values: dict, run: int) -> tuple[int, ...]:
    """A Dask task: compute a point and write it into the store, data then flag."""
    data = point_data(p, values)
    data["run"][...] = run
    write_point(p, Path(store), index, data)
    return index


# stores whose layout write_point has checked in this process: (store, spec key)
_CHECKED: set = set()


def write_point(p: Plan, store: Path, index: tuple[int, ...], data: dict) -> None:
    """Write one point's chunks, each whole or not at all, the ``done`` flag last.

    Every array of the store has one chunk per point, stored uncompressed (codec
    ``bytes``, little-endian) under zarr format 3's default chunk keys, so a chunk
    file is the point's values in C order, at ``NAME/c/i/j/.../0/0`` (the grid
    index, then 0 for each dimension of the point). Writing those bytes directly
    costs about 0.05 ms a chunk, where zarr's own writes cost about 1 ms each (its
    codec pipeline and event loop), more than a point's flow; the layout is
    checked against each array's ``zarr.json`` once per process and store."""
    if (str(store), p.key) not in _CHECKED:
        _check_layout(p, store)
        _CHECKED.add((str(store), p.key))
    grid = [str(i) for i in index]
    chunks = [(n, v) for n, v in data.items() if n != "done"] + [("done", np.ones((), np.int8))]
    for name, value in chunks:  # the done flag last: a point is done once all of it is written
        a = np.asarray(value)
        path = store.joinpath(name, "c", *grid, *("0" for _ in range(a.ndim)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        tmp.write_bytes(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
        os.replace(tmp, path)  # a reader (or a rerun) sees the old chunk or the new one


def _check_layout(p: Plan, store: Path) -> None:
    """Refuse a store whose chunks are not where and how ``write_point`` writes them."""
    for name, (dims, shape, dt) in layout(p).items():
        meta = json.loads((store / name / "zarr.json").read_text())
        codecs = [c["name"] for c in meta.get("codecs", [])]
        key = meta.get("chunk_key_encoding", {})
        chunks = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        endian = meta.get("codecs", [{}])[0].get("configuration", {}).get("endian", "little")
        ok = (
            codecs == ["bytes"]
            and endian == "little"
            and key.get("name") == "default"
            and key.get("configuration", {}).get("separator", "/") == "/"
            and chunks == [1] * len(p.shape) + list(shape)
            and np.dtype(meta.get("data_type")) == np.dtype(dt)
        )
        if not ok:
            raise RuntimeError(f"{store / name}: not the layout of a sweep (chunks per point, uncompressed)")


# --------------------------------------------------------------------------- the store
def create_store(p: Plan, path: Path) -> None:
    """Write the empty dataset (metadata only; unwritten chunks read as nan, and
    ``done`` as 0) to a temporary folder, then rename it to ``path``: whole or not at all."""
    import dask.array as da
    import xarray as xr

    kernel = load(p.model, p.activation)
    coords = {k: np.asarray(v) for k, v in p.grid.items()}
    coords["alpha"] = p.alpha
    for d, n in (("k", p.K), ("l", p.K), ("m", p.M), ("n", p.M)):
        coords[d] = np.arange(n)
    variables, encoding = {}, {}
    for name, (dims, shape, dt) in layout(p).items():
        fill = np.nan if dt == "f8" else 0
        # one dask chunk (nothing is computed), one zarr chunk per point
        variables[name] = (dims, da.full(p.shape + shape, fill, dtype=dt, chunks=-1))
        # uncompressed: write_point writes the chunks' bytes itself
        encoding[name] = {"chunks": (1,) * len(p.shape) + shape, "compressors": None}
    used = {d for dims, _ in variables.values() for d in dims}
    ds = xr.Dataset(variables, coords={k: v for k, v in coords.items() if k in used})
    ds.attrs.update(attributes(p, kernel))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata: an extension of zarr format 3
            ds.to_zarr(tmp / STORE, compute=False, mode="w", encoding=encoding)
        os.replace(tmp / STORE, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def attributes(p: Plan, kernel) -> dict:
    import dask
    import numba
    import sympy
    import xarray
    import zarr

    versions = {
        "metaflow-ts": __version__, "numpy": np.__version__, "numba": numba.__version__,
        "sympy": sympy.__version__, "dask": dask.__version__, "xarray": xarray.__version__,
        "zarr": zarr.__version__, "python": sys.version.split()[0],
    }  # fmt: skip
    return {
        "kind": "sweep",
        "model": p.model,
        "activation": p.activation,
        "spec": p.text,
        "spec_sha256": p.key,
        "settings": json.dumps(
            jsonable(
                {
                    "t_max": p.t_max,
                    "method": p.method,
                    "dt": p.dt,
                    "rtol": p.rtol,
                    "atol": p.atol,
                    "record_every": p.record_every,
                    "params": p.params,
                    "init": p.init,
                    "simulate": p.simulate,
                }
            ),
            sort_keys=True,
        ),  # fmt: skip
        "command": command_line(),
        "version": __version__,
        "versions": json.dumps(versions, sort_keys=True),
        "kernel_sha256": kernel.file_hash,
        "kernel_inputs_sha256": kernel.module.INPUTS_SHA256,
    }


def _open_done(path: Path, p: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The ``done`` mask of an existing store of the same spec (OutputError otherwise)."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        key = group.attrs.get("spec_sha256")
        done = np.asarray(group["done"][...]).astype(bool)
        run = np.asarray(group["run"][...])
    except Exception as exc:  # noqa: BLE001 - any unreadable store is refused whole
        raise OutputError(
            f"{path} exists but is not a readable sweep ({exc}); remove it or give another --out"
        ) from None
    if key != p.key:
        raise OutputError(
            f"{path} holds a sweep of another spec (or of another kernel); give another --out, "
            "or remove it to start again"
        )
    if done.shape != p.shape:
        raise OutputError(f"{path}: its grid has shape {done.shape}, the spec's {p.shape}")
    return done, run


# --------------------------------------------------------------------------- running
def warm_kernels(p: Plan):
    """A Dask worker plugin that loads the kernel once per worker process, before
    any task: its first flow reads numba's cache (or compiles), later tasks find
    the kernel loaded (``runtime.kernels.load`` keeps it)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class WarmKernels(WorkerPlugin):
        name = "metaflow-ts-kernels"

        def setup(self, worker=None):
            _, values = next(p.points())
            every = float(p.alpha[1])
            extra = {"rtol": p.rtol, "atol": p.atol} if p.method == "adaptive" else {}
            flow(
                p.model, p.point_init(values), p.point_params(values), t_max=every, dt=min(p.dt, every),
                method=p.method, record_every=every, activation=p.activation, **extra,
            )  # fmt: skip

    return WarmKernels()


def default_out(p: Plan) -> Path:
    return Path("runs") / f"sweep-{p.model}-{p.key[:10]}"


def sweep(
    spec_or_path: str | Path | dict,
    scheduler: str | None = None,
    workers: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log=None,
):
    """Run the sweep of a spec (docs/interface.md) and return its ``xarray.Dataset``.

    ``scheduler``: the address of a running Dask scheduler (``tcp://host:8786``);
    without it, an embedded ``LocalCluster`` of ``workers`` processes (default one
    per core), one thread each. ``out`` (default ``runs/sweep-<model>-<hash>``)
    receives ``sweep.zarr``; a store of the same spec there is resumed (only the
    points not done are computed), one of another spec is refused. The spec is
    checked whole before any work (``SweepSpecError`` naming the key). An
    interrupt raises ``SweepInterrupted`` once the cluster is stopped; the points
    done are kept. ``log`` (a function of a string, default stderr with
    ``progress``) hears the dashboard's address and how many points run.
    """
    import xarray as xr

    p = plan(spec_or_path)
    say = log or (_stderr if progress else (lambda message: None))
    if workers is not None:
        if scheduler is not None:
            raise SweepSpecError(
                "workers: the number of workers of the embedded cluster; not with a scheduler "
                "(--workers is not for --scheduler)"
            )
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise SweepSpecError(f"workers: must be a whole number >= 1, got {workers!r}")
    if out is None:
        out = check_out_dir(default_out(p), "the sweep folder (or give --out)")
    else:
        out = check_out_dir(out)
    path = out / STORE
    total = int(np.prod(p.shape))
    if path.exists():
        done, run = _open_done(path, p)
        this_run = int(run[done].max()) + 1 if done.any() else 1
    else:
        out.mkdir(parents=True, exist_ok=True)
        create_store(p, path)
        done, this_run = np.zeros(p.shape, bool), 1
    todo = [(idx, values) for idx, values in p.points() if not done[idx]]
    before = total - len(todo)
    if todo:
        say(f"sweep: {len(todo)} of {total} points to compute ({before} done before), into {path}")
        try:
            # the workers write the store: an absolute path, whatever their working folder
            _compute(p, str(path.resolve()), todo, this_run, scheduler, workers, progress, say, before, total)
        except SweepInterrupted as exc:  # the store says which points are done
            import zarr

            exc.done = int(np.asarray(zarr.open_array(str(path / "done"), mode="r")[...]).sum())
            exc.out = out
            raise
    else:
        say(f"sweep: all {total} points done before, in {path}")
    with xr.open_zarr(path, chunks=None) as ds:  # without dask: zarr reads the chunks concurrently
        result = ds.load()
    result.attrs["points_computed"] = len(todo)
    result.attrs["out"] = str(out)
    return result


def plot_summaries(ds, path: Path) -> Path:
    """The final main metric and the escape alpha against the first swept parameter,
    a line per value of the second (the other swept parameters at their first value)."""
    from .plots import _plt, _save

    plt = _plt()
    finals = [k for k in ds.data_vars if k.startswith("final_")]
    main = next((f"final_{m}" for m in MAIN_METRICS if f"final_{m}" in ds), finals[0])
    dims = list(ds.done.dims)
    sel = ds.isel({d: 0 for d in dims[2:]})
    x = dims[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, (main, "escape_alpha")):
        lines = sel[dims[1]].values if len(dims) > 1 else [None]
        for v in lines:
            y = sel[name] if v is None else sel[name].sel({dims[1]: v})
            ax.plot(sel[x].values, y.values, "o-", label=None if v is None else f"{dims[1]} = {v:g}")
        if not np.isfinite(sel[name].values).any():
            ax.text(0.5, 0.5, f"no {name} (nan at every point)", ha="center", transform=ax.transAxes)
        ax.set_xlabel(x)
        ax.set_ylabel(name)
        if len(dims) > 1:
            ax.legend(fontsize=7)
    fixed = ", ".join(f"{d} = {float(ds[d].values[0]):g}" for d in dims[2:])
    fig.suptitle(f"sweep of {ds.attrs['model']}" + (f" ({fixed})" if fixed else ""))
    fig.tight_layout()
    return _save(fig, path)


# The embedded cluster's settings. Each point's own work is small (a reference flow to
# alpha = 300 takes about 10 ms), so the worker's statistical profiler (a thread that
# samples the stacks every 10 ms) cost most of a point's time (writes 4x slower, the
# GIL taken from the writing thread); the scheduler sends all the points to the workers
# at once rather than one more as each ends (benchmarks/sweep_speed.py).
EMBEDDED_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.scheduler.worker-saturation": "inf",
}


def _compute(p, store, todo, this_run, scheduler, workers, progress, say, before, total):
    import dask
    from distributed import Client, LocalCluster, as_completed
    from distributed import progress as dask_progress

    cluster = None
    client = None
    futures = []
    try:
        if scheduler is None:
            n = workers or os.cpu_count() or 1
            with dask.config.set(EMBEDDED_CONFIG):
                cluster = LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                    silence_logs=50,
                )  # fmt: skip
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout="10s")
            except (OSError, TimeoutError, ValueError) as exc:
                why = f"scheduler: cannot reach a Dask scheduler at {scheduler} ({exc})"
                raise SweepSpecError(why) from None
        say(_dashboard(client, embedded=cluster is not None))
        plugin = warm_kernels(p)
        client.register_plugin(plugin, name=plugin.name)
        futures = [
            client.submit(_task, p, store, idx, values, this_run, key=f"point-{p.key[:12]}-{idx}", pure=False)
            for idx, values in todo
        ]
        if progress:  # Dask's text progress bar (on stdout), until every point is done or failed
            dask_progress(futures, notebook=False, multi=False)
            print(flush=True)
        for fut in as_completed(futures):
            fut.result()  # a point's error is raised here
    except KeyboardInterrupt:
        if client is not None and futures:
            try:
                client.cancel(futures)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        raise SweepInterrupted(Path(store).parent, before, total) from None
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _dashboard(client, embedded: bool) -> str:
    """The line that says where Dask's dashboard is (served only where bokeh is installed:
    here for the embedded cluster, by the scheduler's own process otherwise)."""
    import importlib.util

    if embedded and importlib.util.find_spec("bokeh") is None:
        return "sweep: Dask's dashboard needs bokeh (pip install bokeh); the progress bar follows"
    return f"sweep: Dask dashboard at {client.dashboard_link}"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
