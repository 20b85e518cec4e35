"""Flows of the current kernels against those of an earlier commit, case by case.

    python benchmarks/compare_release.py [--commit REF] [--model anil]

Loads ``generated/{model}_erf.py`` as it was at ``REF`` (default: the parent of
the first commit of this redesign, 401085a) beside the current one, integrates the
same flows with each (the reference scenario of docs/simulation.md section 7 to alpha = 300 at
orders 1 and 2, and the validation configurations of ``runtime validate``), and
prints the largest difference of every recorded state and metric. A refactor of
the derivation should leave them equal to round-off.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.kernels import Kernel, load  # noqa: E402
from runtime.scenarios import REFERENCE, VALIDATION, reference_init, validation_init  # noqa: E402


def old_kernel(commit: str, model: str, activation: str) -> Kernel:
    text = subprocess.run(
        ["git", "show", f"{commit}:generated/{model}_{activation}.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="release-"))
    path = folder / f"release_{model}_{activation}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    new = load(model, activation)
    return Kernel(module, new.model, activation)


def run(kernel: Kernel, init, params: dict, t_max: float, dt: float, every: int):
    values = kernel.model.resolve_params(params)
    K, M = init.K, init.M
    y = kernel.pack_state({"Q": init.Q, "R": init.R, **init.vectors}, K, M)
    c = kernel.pack_consts({"T": init.T, **init.vectors}, K, M)
    p = kernel.param_vector(values)
    n = int(round(t_max / dt))
    traj = np.empty((n // every + 1, y.size))
    traj[0] = y
    kernel.module.run_euler(y, c, p, K, M, dt, n, every, traj, 0)
    return traj, kernel.metrics(traj, c, p, K, M)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="401085a")
    parser.add_argument("--model", default="anil")
    args = parser.parse_args(argv)
    new, old = load(args.model, "erf"), old_kernel(args.commit, args.model, "erf")
    cases = [
        ("reference, order 1", reference_init(), {**REFERENCE["params"]}, 300.0, 0.01, 200),
        ("reference, order 2", reference_init(), {**REFERENCE["params"], "order": 2}, 300.0, 0.01, 200),
    ]
    cases += [(f"validation {cfg}", validation_init(), cfg, 2.0, 0.005, 100) for cfg in VALIDATION]
    worst = 0.0
    for name, init, params, t_max, dt, every in cases:
        ys_new, m_new = run(new, init, params, t_max, dt, every)
        ys_old, m_old = run(old, init, params, t_max, dt, every)
        d_state = float(np.max(np.abs(ys_new - ys_old)))
        d_metric = float(np.max(np.abs(m_new - m_old)))
        worst = max(worst, d_state, d_metric)
        print(f"{name:<75} max |state diff| {d_state:.2e}   max |metric diff| {d_metric:.2e}")
    print(f"largest difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
