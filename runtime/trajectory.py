"""Trajectories: the arrays of docs/interface.md, and writing them whole or not at all."""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from derive import __version__

from .output import atomic_path


@dataclass
class Trajectory:
    """Recorded order parameters and metrics against ``alpha``.

    ``arrays`` holds ``alpha`` (n,), ``Q`` (n,K,K), ``R`` (n,K,M), ``T`` (M,M), the
    model's readouts over time (e.g. ``v`` (n,K)) and its metrics (e.g. ``eps_g``
    (n,)). A simulation has a leading seed axis on everything but ``alpha`` and
    ``T``, plus ``*_mean`` and ``*_sem`` over seeds. Arrays are also attributes.
    """

    arrays: dict[str, np.ndarray]
    metadata: dict = field(default_factory=dict)

    def __getattr__(self, name):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self.arrays))

    def save(self, out: str | Path) -> Path:
        """Write ``trajectory.npz`` and ``metadata.json`` into ``out``, both whole or
        neither: each is written to a temporary name beside it, and both are renamed
        only once both are written."""
        out = Path(out)
        text = json.dumps(jsonable(self.metadata), indent=2, sort_keys=True, allow_nan=False) + "\n"
        with atomic_path(out / "trajectory.npz") as npz, atomic_path(out / "metadata.json") as meta:
            with open(npz, "wb") as fh:
                np.savez(fh, **self.arrays)
            meta.write_text(text)
        return out

    @classmethod
    def load(cls, out: str | Path) -> Trajectory:
        out = Path(out)
        with np.load(out / "trajectory.npz") as data:
            arrays = {k: np.array(data[k]) for k in data.files}
        meta = json.loads((out / "metadata.json").read_text())
        return cls(arrays, meta)

    @classmethod
    def partial_in(cls, out: str | Path) -> Trajectory | None:
        """The partial trajectory of a flow that an interrupt or a divergence left in
        ``out`` (``metadata["complete"]`` false), or None."""
        out = Path(out)
        try:
            meta = json.loads((out / "metadata.json").read_text())
            if meta.get("complete", True) or meta.get("kind") != "flow":
                return None
            return cls.load(out)
        except (OSError, ValueError, KeyError):
            return None


def jsonable(x):
    """``x`` with numpy values as Python ones and non-finite floats as the strings
    ``"inf"``, ``"-inf"``, ``"nan"`` (JSON has no such numbers)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"cannot store {type(x)} in metadata")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python -m PACKAGE ...`` for a package run with ``-m``
    (whose ``sys.argv[0]`` is the path of its ``__main__.py``), quoted by ``shlex``."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0]:
        return ""
    head = [argv[0]]
    if Path(argv[0]).name == "__main__.py":
        head = ["python", "-m", Path(argv[0]).parent.name]
    return shlex.join(head + list(argv[1:]))


def metadata(kind: str, kernel, params: dict, **extra) -> dict:
    """What ran: model, parameters, command line, versions, hash of the kernel file."""
    # whole-number parameters as integers: those declared so, and choices among whole numbers (order)
    integer = {
        p.name
        for p in kernel.model.params
        if p.integer or (p.choices and all(float(c).is_integer() for c in p.choices))
    }
    return {
        "kind": kind,
        "model": kernel.model.name,
        "activation": kernel.activation,
        "params": {k: int(v) if k in integer and math.isfinite(v) else v for k, v in params.items()},
        "command": command_line(),
        "complete": True,
        "version": __version__,
        "kernel_sha256": kernel.file_hash,
        "kernel_inputs_sha256": kernel.module.INPUTS_SHA256,
        **extra,
    }
