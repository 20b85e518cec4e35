"""Trajectories: the arrays of docs/interface.md, and writing them whole or not at all."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from derive import __version__


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
        """Write ``trajectory.npz`` and ``metadata.json`` into ``out``; each file
        appears complete (written to a temporary name, then renamed)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".trajectory-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **self.arrays)
            fd2, tmp2 = tempfile.mkstemp(dir=out, prefix=".metadata-", suffix=".json")
            with os.fdopen(fd2, "w") as fh:
                json.dump(self.metadata, fh, indent=2, sort_keys=True, default=_jsonable)
                fh.write("\n")
            os.replace(tmp, out / "trajectory.npz")
            os.replace(tmp2, out / "metadata.json")
        finally:
            for t in (tmp, locals().get("tmp2")):
                if t and os.path.exists(t):
                    os.unlink(t)
        return out

    @classmethod
    def load(cls, out: str | Path) -> Trajectory:
        out = Path(out)
        with np.load(out / "trajectory.npz") as data:
            arrays = {k: np.array(data[k]) for k in data.files}
        meta = json.loads((out / "metadata.json").read_text())
        return cls(arrays, meta)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"cannot store {type(x)} in metadata")


def metadata(kind: str, kernel, params: dict, **extra) -> dict:
    """What ran: model, parameters, command line, versions, hash of the kernel file."""
    return {
        "kind": kind,
        "model": kernel.model.name,
        "activation": kernel.activation,
        "params": dict(params),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "",
        "version": __version__,
        "kernel_sha256": kernel.file_hash,
        "kernel_inputs_sha256": kernel.module.INPUTS_SHA256,
        **extra,
    }
