"""Command line of runtime: the main job, flow, simulate, models, study, sweep, validate,
analyze, metatest.

The commands and files: docs/interface.md; the models' equations and
parameters: docs/README.md and docs/models/MODEL.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import signal
import sys
import threading
from pathlib import Path


import numpy as np

from derive.models import MODEL_NAMES, get_model

from .init import Init, sampled_init
from .integrate import (
    ATOL,
    METHODS,
    RTOL,
    FlowDiverged,
    LARGE_STATE,
    FlowInterrupted,
    SimulationDiverged,
    SimulationInterrupted,
    flow,
    steps_for,
)
from .output import check_out_dir, write_text
from .plots import plot_metric, plot_metrics
from .scenarios import (
    REFERENCE,
    STUDIES,
    VALIDATION_MIN_N,
    VALIDATION_RECORD,
    main_job,
    run_study,
    summary_lines,
    validate,
    validate_support,
)
from .few_shot import metatest
from .simulate import simulate
from .trajectory import Trajectory, jsonable

RUNS = Path("runs")


def parse_sets(items: list[str], model: str) -> dict[str, float]:
    """``key=value`` pairs, each checked against the model's parameters."""
    spec = get_model(model)
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, val = item.split("=", 1)
        key = key.strip()
        try:
            num = float(val)
        except ValueError:
            raise ValueError(f"--set {key}: {val!r} is not a number") from None
        try:
            out[key] = spec.param(key).check(num)
        except ValueError as exc:
            raise ValueError(f"--set {item}: {exc}") from None
    return out


class _BadOption(Exception):
    """An option argparse refuses; ``main`` says it in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block)."""

    def error(self, message: str):
        raise _BadOption(f"{message} (see {self.prog} --help)")


def _number(kind, minimum, what: str):
    """An argparse type: a finite ``kind`` (int or float) of at least ``minimum``
    (above it when ``what`` says positive)."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        strict = what.startswith("a positive")
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


POSITIVE = _number(float, 0.0, "a positive number")
NON_NEGATIVE = _number(float, 0.0, "a number >= 0")
COUNT = _number(int, 1, "a whole number >= 1")
SEED = _number(int, 0, "a whole number >= 0 (a numpy seed)")


def _check_steps(args) -> None:
    """--t-max, --record-every against the step (--dt, or 1/--n for a simulation),
    by the options' names, before anything is computed."""
    if args.command == "flow" and args.method != "adaptive":
        given = [f"--{k}" for k in ("rtol", "atol") if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: tolerances of --method adaptive, not {args.method}")
    if args.command == "flow" and args.method == "adaptive":
        # steps set by the tolerances; the records come from the dense output
        every = args.record_every if args.record_every is not None else args.dt
        steps_for(args.t_max, every, "--t-max", "--record-every" if args.record_every else "--dt")
        return
    if args.command == "flow":
        step, step_name = args.dt, "--dt"
    else:
        step, step_name = 1.0 / args.n, "1/--n"
        if not args.init and args.n < args.K + args.M:
            raise ValueError(f"--n {args.n} must be at least --K + --M = {args.K + args.M}")
    n_steps = steps_for(args.t_max, step, "--t-max", step_name)
    if args.record_every is not None:
        rec = steps_for(args.record_every, step, "--record-every", step_name)
        if n_steps % rec:
            raise ValueError(
                f"--t-max {args.t_max:g} is not a multiple of --record-every {args.record_every:g}"
            )


# options that do not change the result, so do not name the run folder
NOT_IN_RUN_NAME = ("out", "no_progress", "parallel", "command")


def _out_dir(args, kind: str, config: dict) -> Path:
    """``--out``, or ``runs/<kind>-<model>-<hash of what the run computes>``; checked
    to be a writable folder before anything is computed (OutputError otherwise)."""
    if getattr(args, "out", None):
        return check_out_dir(args.out)
    config = {k: v for k, v in config.items() if k not in NOT_IN_RUN_NAME}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return check_out_dir(
        RUNS / f"{kind}-{config.get('model', 'main')}-{digest}", "the run folder (or give --out)"
    )


def _config(args, params: dict) -> dict:
    """What a command computes: its options, with the parameters as resolved and an
    init file by its content; the options of a sampled start are left out when an
    init file gives the start (all but N and the seed for a simulation)."""
    # the tolerances only when given (method adaptive), so that other runs keep their folders
    config = {k: v for k, v in vars(args).items() if k != "set" and not (k in TOLERANCES and v is None)}
    if args.init:
        unused = ("K", "M", "sigma0") if args.command == "simulate" else ("K", "M", "sigma0", "seed", "n")
        config = {k: v for k, v in config.items() if k not in unused}
        try:
            config["init"] = hashlib.sha256(Path(args.init).read_bytes()).hexdigest()
        except OSError:
            pass  # reported when the file is read
    return {**config, "params": params}


TOLERANCES = ("rtol", "atol")

# The options of a sampled start and their defaults (flow: and --n, the N of the
# sampled network); None on the parser, so that a value given with --init is seen.
SAMPLED_START = {"K": 2, "M": 2, "sigma0": 0.1}
SAMPLED_START_FLOW = {**SAMPLED_START, "n": 1000}


def _sampled_start(args, defaults: dict) -> None:
    """Refuse the options of a sampled start next to --init, which fixes K and M
    and the start; fill their defaults otherwise."""
    given = [f"--{k}" for k in defaults if getattr(args, k) is not None]
    if args.init and given:
        options = ", ".join(f"--{k}" for k in defaults)
        raise ValueError(
            f"{', '.join(given)} cannot be used with --init: the init file fixes K and M and the "
            f"starting overlaps ({options} are for a sampled start, without --init)"
        )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _init(args, model: str) -> Init:
    spec = get_model(model)
    if args.init:
        return Init.from_file(args.init, spec)
    return sampled_init(spec, args.K, args.M, args.n, args.seed, args.sigma0)


def _add_common(p: argparse.ArgumentParser, flow_cmd: bool) -> None:
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--activation", default="erf", choices=("erf", "linear"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model parameter (see `python -m runtime models`)",
    )
    p.add_argument("--init", help="initial order parameters (.npz with Q, R, T and the readouts)")
    p.add_argument("--t-max", type=POSITIVE, required=True, help="final alpha")
    p.add_argument(
        "--record-every",
        type=POSITIVE,
        default=None,
        help="recording interval in alpha (default: every step for flow, about 100 records for simulate)",
    )
    p.add_argument("--K", type=COUNT, help="student units for a sampled start (no --init; default 2)")
    p.add_argument("--M", type=COUNT, help="teacher units for a sampled start (no --init; default 2)")
    p.add_argument(
        "--sigma0", type=NON_NEGATIVE, help="std of the sampled first-layer weights (no --init; default 0.1)"
    )
    p.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help="seed of the sampled start, >= 0 (simulate: of the first run; run i uses seed + i, so "
        "batches that must not share runs need seeds at least --seeds apart)",
    )
    p.add_argument("--out", help="output directory (default: runs/<kind>-<model>-<config hash>)")
    p.add_argument("--no-progress", action="store_true")
    if flow_cmd:
        p.add_argument(
            "--dt", type=POSITIVE, required=True, help="the step; with --method adaptive, the first step"
        )
        p.add_argument(
            "--method",
            default="euler",
            choices=METHODS,
            help="euler, rk4 (fixed steps of --dt; --record-every a multiple of it), or adaptive "
            "(Dormand-Prince 5(4) with error control: steps set by --rtol and --atol, records "
            "from its dense output, --t-max a multiple of --record-every)",
        )
        p.add_argument(
            "--rtol", type=POSITIVE, help=f"relative tolerance of --method adaptive (default {RTOL:g})"
        )
        p.add_argument(
            "--atol", type=POSITIVE, help=f"absolute tolerance of --method adaptive (default {ATOL:g})"
        )
        p.add_argument(
            "--parallel",
            default="auto",
            choices=("auto", "on", "off"),
            help="share each step among numba's threads (NUMBA_NUM_THREADS); auto: from K = 12 "
            "up, for runs of over a minute (the threaded loops compile on each start); "
            "the result is the same either way",
        )
        p.add_argument(
            "--n",
            type=COUNT,
            help="N of the sampled network behind a sampled start (no --init; default 1000)",
        )
    else:
        p.add_argument("--n", type=COUNT, required=True, help="input dimension N")
        p.add_argument("--seeds", type=COUNT, default=5, help="number of independent runs")


def _figure(fl, sim, out: Path, title: str) -> None:
    src = fl if fl is not None else sim
    if "eps_g" in src.arrays:
        plot_metric(fl, sim, "eps_g", out / "eps_g.png", title)
    else:
        plot_metrics(
            fl,
            sim,
            [k for k in ("eps_meta", "eps_pre", "eps_opt") if k in src.arrays],
            out / "errors.png",
            title,
        )


def _title(args, params: dict, traj: Trajectory, kind: str) -> str:
    """The figure's title: the model, the parameters given other than their
    defaults, K and M, and the start (init file or seed; a simulation's N and seeds)."""
    spec = get_model(args.model)
    parts = [f"{args.model} {kind}" + (f" ({args.activation})" if args.activation != "erf" else "")]
    parts += [f"{k} = {v:g}" for k, v in params.items() if v != spec.param(k).default]
    parts.append(f"K = {traj.metadata['K']}, M = {traj.metadata['M']}")
    if kind == "simulation":
        n = traj.metadata["seeds"]
        seeds = f"seed {args.seed}" if n == 1 else f"{n} seeds from {args.seed}"
        parts.append(f"N = {args.n}, {seeds}")
    if args.init:
        parts.append(f"start {Path(args.init).name}")
    elif kind == "flow":
        parts.append(f"start sampled at N = {args.n}, seed {args.seed}")
    return ", ".join(parts)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_seed(args) -> None:
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0 (a numpy seed), got {args.seed}")


def cmd_flow(args) -> Path:
    _sampled_start(args, SAMPLED_START_FLOW)
    _check_seed(args)
    _check_steps(args)
    params = parse_sets(args.set, args.model)
    out = _out_dir(args, "flow", _config(args, params))
    if not args.init and args.K * (args.K + args.M) >= LARGE_STATE:
        _log(f"sampling a start of K = {args.K}, M = {args.M} and checking its overlaps (slow for large K)")
    init = _init(args, args.model)
    resume = Trajectory.partial_in(out)
    try:
        traj = flow(
            args.model,
            init,
            params,
            t_max=args.t_max,
            dt=args.dt,
            method=args.method,
            record_every=args.record_every,
            activation=args.activation,
            progress=not args.no_progress,
            rtol=args.rtol,
            atol=args.atol,
            parallel={"auto": None, "on": True, "off": False}[args.parallel],
            resume=resume,
            log=_log,
        )
    except (FlowInterrupted, FlowDiverged) as exc:
        if exc.trajectory is not None:
            exc.trajectory.save(out)
            exc.out = out
        raise
    if "resumed_from_alpha" in traj.metadata:
        print(f"continued the partial run in {out} from alpha = {traj.metadata['resumed_from_alpha']:g}")
    traj.save(out)
    _figure(traj, None, out, _title(args, params, traj, "flow"))
    return out


def cmd_simulate(args) -> Path:
    _sampled_start(args, SAMPLED_START)
    _check_seed(args)
    _check_steps(args)
    params = parse_sets(args.set, args.model)
    init = Init.from_file(args.init, get_model(args.model)) if args.init else None
    out = _out_dir(args, "simulate", _config(args, params))
    try:
        traj = _simulate(args, params, init)
    except SimulationInterrupted as exc:
        exc.trajectory.save(out)
        exc.out = out
        raise
    traj.save(out)
    _figure(None, traj, out, _title(args, params, traj, "simulation"))
    return out


def _simulate(args, params, init):
    return simulate(
        args.model,
        params,
        N=args.n,
        seeds=args.seeds,
        t_max=args.t_max,
        init=init,
        K=args.K,
        M=args.M,
        sigma0=args.sigma0,
        record_every=args.record_every,
        seed=args.seed,
        activation=args.activation,
        progress=not args.no_progress,
    )


def cmd_models(args) -> None:
    for name in MODEL_NAMES:
        spec = get_model(name)
        print(f"{name}: {spec.doc} ({spec.section}); activations {', '.join(spec.activations)}")
        for p in spec.params:
            bounded = p.minimum is not None or p.maximum is not None
            rng = f", {p.range}" if bounded else ""
            print(f"    {p.name:<8} default {p.default:<6g}{rng}  {p.doc}")
        for v in spec.vectors:
            print(f"    {v.name:<8} readout over {v.over} units, default all {v.default:g}: {v.doc}")
        print()


def cmd_main(args) -> Path:
    out = _out_dir(args, "main", REFERENCE)
    main_job(out, REFERENCE, progress=True)
    for line in summary_lines(json.loads((out / "summary.json").read_text())):
        print(line)
    return out


def cmd_study(args) -> Path:
    names = list(STUDIES) if args.name == "all" else [args.name]
    out = check_out_dir(args.out or RUNS / "studies")
    for name in names:
        print(f"study {name}: {' '.join(STUDIES[name].__doc__.split())}")
        result = run_study(name, out, progress=True)
        for label, val in result.items():
            what = "" if ":" in label else "final eps_meta "
            print(f"    {label:<44} {what}{val:.4f}")
    return out


def cmd_sweep(args) -> Path:
    from .sweep import plot_summaries, sweep

    ds = sweep(
        args.spec,
        scheduler=args.scheduler,
        workers=args.workers,
        out=args.out,
        progress=not args.no_progress,
    )
    print(f"computed {ds.attrs['points_computed']} of {ds.done.size} points")
    out = Path(ds.attrs["out"])
    plot_summaries(ds, out / "summaries.png")
    return out


def cmd_validate(args) -> Path:
    defaults = {"sizes": [1000, 4000], "seeds": 20, "t_max": 4.0} if args.support else {
        "sizes": [250, 1000], "seeds": 10, "t_max": 2.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (a standard error needs two runs), got {args.seeds}")
    if args.only is not None:
        from .scenarios import SUPPORT_CLOSURE_LIMITED, VALIDATION_SUPPORT

        if not args.support:
            raise ValueError("--only selects configurations of --support; give --support")
        labels = [c[0] for c in VALIDATION_SUPPORT + SUPPORT_CLOSURE_LIMITED]
        if not any(o in lab for o in args.only for lab in labels):
            raise ValueError(f"--only {' '.join(args.only)} matches no configuration of --support (they are: "
                             f"{'; '.join(labels)})")  # fmt: skip
    steps_for(args.t_max, VALIDATION_RECORD, "--t-max", f"{VALIDATION_RECORD:g} (the recording interval)")
    if min(args.sizes) < VALIDATION_MIN_N:
        raise ValueError(f"--sizes must be >= {VALIDATION_MIN_N} (N >= K + M of the compared networks), "
                         f"got {min(args.sizes)}")  # fmt: skip
    for N in args.sizes:  # whole numbers of steps 1/N
        if abs(VALIDATION_RECORD * N - round(VALIDATION_RECORD * N)) > 1e-9:
            raise ValueError(
                f"--sizes {N}: alpha is recorded every {VALIDATION_RECORD:g}, which must be a whole number "
                "of steps 1/N (an even N)"
            )
        steps_for(args.t_max, 1.0 / N, "--t-max", f"1/N (--sizes {N})")
    out = check_out_dir(args.out or RUNS / ("validation-support" if args.support else "validation"))
    if args.support:
        rows = validate_support(sizes=tuple(args.sizes), seeds=args.seeds, t_max=args.t_max, only=args.only)
    else:
        rows = validate(sizes=tuple(args.sizes), seeds=args.seeds, t_max=args.t_max)
    if not all(row["agree"] for row in rows):
        args.exit_code = 1  # the results are written; the verdict is the exit code
    write_text(out / "validation.json", json.dumps(jsonable(rows), indent=2, allow_nan=False) + "\n")
    return out


def cmd_analyze(args) -> Path:
    from .analyze import analyze, as_trajectory, report, write

    traj = as_trajectory(args.traj)
    out = check_out_dir(args.out, "--out") if args.out else check_out_dir(args.traj, "--traj (without --out)")
    result = analyze(traj, args.fraction, args.min_length, args.escape_amplitude)
    print(report(result))
    write(result, traj, out)
    return out


def _support_size(text: str) -> float:
    """An argparse type: a whole number >= 1, or inf (the population support loss)."""
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or inf, got {text!r}") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or inf, got {text!r}")
    return value


_support_size.__name__ = "n_s"
STEPS = _number(int, 0, "a whole number >= 0")


def _load_traj(path: str) -> Trajectory:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--traj {path}: no such folder")
    try:
        return Trajectory.load(folder)
    except FileNotFoundError as exc:
        raise ValueError(
            f"--traj {path}: not a trajectory folder ({Path(exc.filename).name} missing)"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--traj {path}: cannot read its trajectory ({exc})") from None


def cmd_metatest(args) -> Path:
    traj = _load_traj(args.traj)
    if traj.metadata.get("model") not in MODEL_NAMES:
        raise ValueError(
            f"--traj {args.traj}: a trajectory of an unknown model {traj.metadata.get('model')!r}"
        )
    config = {"command": "metatest", "model": traj.metadata["model"], "n_s": args.n_s, "S": args.S,
              "alpha_in": args.alpha_in, "traj": str(Path(args.traj).resolve())}  # fmt: skip
    out = _out_dir(args, "metatest", config)  # checked before anything is computed
    try:
        result = metatest(traj, n_s=args.n_s, S=args.S, alpha_in=args.alpha_in)
    except ValueError as exc:
        raise ValueError(f"--traj {args.traj}: {exc}") from None
    missing = [v for j, v in enumerate(result.n_s) if np.all(np.isnan(result.eps_test[:, j]))]
    if missing:
        listed = ", ".join(f"{v:g}" for v in missing)
        _log(f"n_s = {listed}: not evaluated, NaN in eps_test ({result.metadata['not_derived'][0]})")
    result.save(out, f"meta-test of {traj.metadata['model']} ({Path(args.traj).name})")
    return out


class _Terminated:
    """SIGTERM is taken as an interrupt (KeyboardInterrupt): the same partial
    records are saved, and the exit status is 128 + 15 = 143 instead of 130."""

    received = False

    @classmethod
    def handler(cls, signum, frame):
        cls.received = True
        raise KeyboardInterrupt


def _stop_status(what: str = "interrupted") -> tuple[str, int]:
    return ("terminated", 143) if _Terminated.received else (what, 130)


def main(argv: list[str] | None = None) -> int:
    """Run a command; SIGTERM is handled as Ctrl-C is (exit 143) while it runs."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _Terminated.handler) if in_main else None
    _Terminated.received = False
    try:
        return _main(argv)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m runtime", description=__doc__)
    parser.add_argument("--out", help="output directory of the main job")
    sub = parser.add_subparsers(dest="command")
    _add_common(sub.add_parser("flow", help="integrate the flow of one model"), True)
    _add_common(sub.add_parser("simulate", help="run the finite-N simulation of one model"), False)
    sub.add_parser("models", help="list the models and their parameters (equations: docs/models/)")
    p_study = sub.add_parser("study", help="one of the studies of the meta-learning model, or all")
    p_study.add_argument("name", choices=[*STUDIES, "all"])
    p_study.add_argument("--out", help="output directory (default runs/studies)")
    p_sweep = sub.add_parser("sweep", help="flows over a grid of parameters on Dask (resumable)")
    p_sweep.add_argument("spec", help="the sweep's TOML spec (docs/interface.md)")
    p_sweep.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    p_sweep.add_argument(
        "--workers", type=COUNT, help="worker processes of the embedded cluster (default: one per core)"
    )
    p_sweep.add_argument("--out", help="output directory (default: runs/sweep-<model>-<spec hash>)")
    p_sweep.add_argument("--no-progress", action="store_true")
    p_val = sub.add_parser("validate", help="flow against simulation at two sizes, many seeds (minutes)")
    p_val.add_argument("--sizes", type=COUNT, nargs="+", help="default 250 1000 (--support: 1000 4000)")
    p_val.add_argument("--seeds", type=COUNT, help="default 10 (--support: 20)")
    p_val.add_argument("--t-max", type=POSITIVE, help="default 2 (--support: 4)")
    p_val.add_argument(
        "--support", action="store_true",
        help="the finite-support-set flows (first and second order, n_s = 2..10) against simulations with "
        "real support sets",
    )
    p_val.add_argument(
        "--only", nargs="+", metavar="TEXT",
        help="with --support: the configurations whose label contains one of these texts (e.g. 'order 2'; "
        "'closure' runs those not run by default, where the 1/n_s^2 remainder shows)",
    )
    p_val.add_argument("--out", help="output directory (default runs/validation, runs/validation-support)")
    p_an = sub.add_parser("analyze", help="plateaus, escape, fixed points and their stability of a flow")
    p_an.add_argument("--traj", required=True, help="a flow's output folder (trajectory.npz, metadata.json)")
    p_an.add_argument("--out", help="where analysis.json and analysis.png go (default: --traj)")
    p_an.add_argument("--fraction", type=float, default=0.5, help="plateau: speed below this fraction of "
                      "the typical speed around it (default 0.5)")  # fmt: skip
    p_an.add_argument("--min-length", type=float, default=None, help="plateau: at least this long in alpha "
                      "(default 5%% of the recorded span)")  # fmt: skip
    p_an.add_argument("--escape-amplitude", type=float, default=0.1, help="amplitude of the unstable mode "
                      "at which the predicted escape happens (default 0.1)")  # fmt: skip
    p_meta = sub.add_parser("metatest", help="few-shot meta-test along a saved anil flow trajectory")
    p_meta.add_argument(
        "--traj", required=True, help="a flow's output folder (trajectory.npz, metadata.json)"
    )
    p_meta.add_argument(
        "--n-s",
        type=_support_size,
        nargs="+",
        help="test support sizes, >= 1 or inf (default 1 2 5 10 20 50 inf)",
    )
    p_meta.add_argument(
        "--S", type=STEPS, nargs="+", help="test inner steps, >= 0 (default: the trajectory's)"
    )
    p_meta.add_argument(
        "--alpha-in", type=NON_NEGATIVE, nargs="+", help="test inner rates, >= 0 (default: the trajectory's)"
    )
    p_meta.add_argument("--out", help="output directory (default runs/metatest-<model>-<config hash>)")
    try:
        args = parser.parse_args(argv)
    except _BadOption as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "models":
            cmd_models(args)
            return 0
        commands = {"flow": cmd_flow, "simulate": cmd_simulate, "study": cmd_study, "validate": cmd_validate}
        commands["analyze"] = cmd_analyze
        commands["metatest"] = cmd_metatest
        commands["sweep"] = cmd_sweep
        out = commands.get(args.command, cmd_main)(args)
    except (FlowInterrupted, SimulationInterrupted) as exc:
        where = getattr(exc, "out", None)
        again = "continues it" if isinstance(exc, FlowInterrupted) else "runs it again"
        tail = (
            f"partial trajectory saved to {where} (the same command {again})"
            if where
            else "nothing was written"
        )
        what, code = _stop_status()
        print(f"{what} at alpha = {exc.alpha:g}; {tail}", file=sys.stderr)
        return code
    except KeyboardInterrupt as exc:
        what, code = _stop_status()
        if hasattr(exc, "total"):  # a sweep: its points done are kept
            print(
                f"{what}; {exc.done} of {exc.total} points done in {exc.out} (the same command "
                "computes the rest)",
                file=sys.stderr,
            )
            return code
        print(f"{what}; nothing was written", file=sys.stderr)
        return code
    except FlowDiverged as exc:
        where = getattr(exc, "out", None)
        tail = f"; the trajectory up to it saved to {where} (partial)" if where else "; nothing was written"
        print(f"error: {exc}{tail}", file=sys.stderr)
        return 3
    except SimulationDiverged as exc:
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # e.g. a flow's buffers, K (K + M)^2 numbers for some models
        print(
            f"error: this run needs more memory than is available ({exc or 'allocation failed'}); "
            "try a smaller --K (flow) or --n (simulate)",
            file=sys.stderr,
        )
        return 2
    print(f"results written to {out}")
    return getattr(args, "exit_code", 0)
