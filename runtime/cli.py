"""Command line of runtime: the main job, flow, simulate, models, study, validate.

The commands and files: docs/interface.md; the models' equations and
parameters: docs/README.md and docs/models/MODEL.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


from derive.models import MODEL_NAMES, get_model

from .init import Init, sampled_init
from .integrate import METHODS, FlowDiverged, SimulationDiverged, flow
from .plots import plot_metric, plot_metrics
from .scenarios import REFERENCE, STUDIES, main_job, run_study, validate
from .simulate import simulate

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
        out[key] = spec.param(key).check(num)
    return out


def _out_dir(args, kind: str, config: dict) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return RUNS / f"{kind}-{config.get('model', 'main')}-{digest}"


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
    p.add_argument("--t-max", type=float, required=True, help="final alpha")
    p.add_argument(
        "--record-every",
        type=float,
        default=None,
        help="recording interval in alpha (default: every step for flow, about 100 records for simulate)",
    )
    p.add_argument("--K", type=int, help="student units for a sampled start (no --init; default 2)")
    p.add_argument("--M", type=int, help="teacher units for a sampled start (no --init; default 2)")
    p.add_argument(
        "--sigma0", type=float, help="std of the sampled first-layer weights (no --init; default 0.1)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sampled start (simulate: of the first seed)"
    )
    p.add_argument("--out", help="output directory (default: runs/<kind>-<model>-<config hash>)")
    p.add_argument("--no-progress", action="store_true")
    if flow_cmd:
        p.add_argument("--dt", type=float, required=True)
        p.add_argument("--method", default="euler", choices=METHODS)
        p.add_argument(
            "--parallel",
            default="auto",
            choices=("auto", "on", "off"),
            help="share each step among numba's threads (NUMBA_NUM_THREADS); auto: from K = 12 "
            "up, for runs of over a minute (the threaded loops compile on each start); "
            "the result is the same either way",
        )
        p.add_argument(
            "--n", type=int, help="N of the sampled network behind a sampled start (no --init; default 1000)"
        )
    else:
        p.add_argument("--n", type=int, required=True, help="input dimension N")
        p.add_argument("--seeds", type=int, default=5, help="number of independent runs")


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


def cmd_flow(args) -> Path:
    _sampled_start(args, SAMPLED_START_FLOW)
    params = parse_sets(args.set, args.model)
    init = _init(args, args.model)
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
        parallel={"auto": None, "on": True, "off": False}[args.parallel],
    )
    # the thread count does not change the result, so it does not name the run
    config = {k: v for k, v in vars(args).items() if k != "parallel"}
    out = _out_dir(args, "flow", {"model": args.model, **config})
    traj.save(out)
    _figure(traj, None, out, f"{args.model} flow")
    return out


def cmd_simulate(args) -> Path:
    _sampled_start(args, SAMPLED_START)
    params = parse_sets(args.set, args.model)
    init = Init.from_file(args.init, get_model(args.model)) if args.init else None
    traj = simulate(
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
    out = _out_dir(args, "simulate", {"model": args.model, **vars(args)})
    traj.save(out)
    _figure(None, traj, out, f"{args.model} simulation")
    return out


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
    out = Path(args.out) if args.out else _out_dir(args, "main", REFERENCE)
    main_job(out, REFERENCE, progress=True)
    return out


def cmd_study(args) -> Path:
    names = list(STUDIES) if args.name == "all" else [args.name]
    out = Path(args.out) if args.out else RUNS / "studies"
    for name in names:
        print(f"study {name}: {' '.join(STUDIES[name].__doc__.split())}")
        result = run_study(name, out, progress=True)
        for label, val in result.items():
            what = "" if ":" in label else "final eps_meta "
            print(f"    {label:<44} {what}{val:.4f}")
    return out


def cmd_validate(args) -> Path:
    rows = validate(sizes=tuple(args.sizes), seeds=args.seeds, t_max=args.t_max)
    out = Path(args.out) if args.out else RUNS / "validation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    parser.add_argument("--out", help="output directory of the main job")
    sub = parser.add_subparsers(dest="command")
    _add_common(sub.add_parser("flow", help="integrate the flow of one model"), True)
    _add_common(sub.add_parser("simulate", help="run the finite-N simulation of one model"), False)
    sub.add_parser("models", help="list the models and their parameters (equations: docs/models/)")
    p_study = sub.add_parser("study", help="one of the studies of the meta-learning model, or all")
    p_study.add_argument("name", choices=[*STUDIES, "all"])
    p_study.add_argument("--out", help="output directory (default runs/studies)")
    p_val = sub.add_parser("validate", help="flow against simulation at two sizes, many seeds (minutes)")
    p_val.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    p_val.add_argument("--seeds", type=int, default=10)
    p_val.add_argument("--t-max", type=float, default=2.0)
    p_val.add_argument("--out", help="output directory (default runs/validation)")
    args = parser.parse_args(argv)
    try:
        if args.command == "models":
            cmd_models(args)
            return 0
        commands = {"flow": cmd_flow, "simulate": cmd_simulate, "study": cmd_study, "validate": cmd_validate}
        out = commands.get(args.command, cmd_main)(args)
    except (FlowDiverged, SimulationDiverged) as exc:
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results written to {out}")
    return 0
