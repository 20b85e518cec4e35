"""Loading a generated kernel module and packing its flat arrays."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np

from derive.activations import ACTIVATIONS
from derive.model import Model
from derive.models import get_model, model_file


def _dims(shape: tuple[str, ...], K: int, M: int) -> tuple[int, ...]:
    return tuple(K if s == "K" else M for s in shape)


@dataclass(frozen=True)
class Kernel:
    """A generated module with its model definition and layout helpers."""

    module: ModuleType
    model: Model
    activation: str

    @property
    def params(self) -> tuple[str, ...]:
        return self.module.PARAMS

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.module.METRICS

    @property
    def file_hash(self) -> str:
        """sha256 of the generated file that runs (recorded in metadata.json)."""
        return hashlib.sha256(Path(self.module.__file__).read_bytes()).hexdigest()

    def state_size(self, K: int, M: int) -> int:
        return sum(int(np.prod(_dims(s, K, M))) for _, s in self.module.STATE)

    def pack(self, items, arrays: dict[str, np.ndarray], K: int, M: int) -> np.ndarray:
        parts = []
        for name, shape in items:
            a = np.asarray(arrays[name], dtype=np.float64)
            if a.shape != _dims(shape, K, M):
                raise ValueError(f"{name} has shape {a.shape}, expected {_dims(shape, K, M)}")
            parts.append(a.ravel())
        return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros(0)

    def unpack(self, items, flat: np.ndarray, K: int, M: int) -> dict[str, np.ndarray]:
        """Views of a flat array (or of the last axis of a stack of them)."""
        out, o = {}, 0
        lead = flat.shape[:-1]
        for name, shape in items:
            dims = _dims(shape, K, M)
            size = int(np.prod(dims))
            out[name] = flat[..., o : o + size].reshape(lead + dims)
            o += size
        return out

    def consts_size(self, K: int, M: int) -> int:
        return sum(int(np.prod(_dims(s, K, M))) for _, s in self.module.CONSTS)

    def pack_state(self, arrays, K, M):
        return self.pack(self.module.STATE, arrays, K, M)

    def unpack_state(self, y, K, M):
        return self.unpack(self.module.STATE, y, K, M)

    def pack_consts(self, arrays, K, M):
        return self.pack(self.module.CONSTS, arrays, K, M)

    def param_vector(self, values: dict[str, float]) -> np.ndarray:
        return np.array([values[p] for p in self.params], dtype=np.float64)

    def at(self, arrays, params: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """``(y, c, p, K, M)``, the arguments of the module's functions: the state and
        constants packed from ``arrays`` (an ``Init``, or a dict with Q, R, T and the
        readouts) and the vector of the model's parameters ``params`` (defaults filled,
        unknown names refused: ``Model.resolve_params``)."""
        arrays = arrays.arrays() if hasattr(arrays, "arrays") else arrays
        K, M = np.shape(arrays["R"])
        p = self.param_vector(self.model.resolve_params(params))
        return self.pack_state(arrays, K, M), self.pack_consts(arrays, K, M), p, K, M

    def velocity(self, arrays, params: dict) -> dict[str, np.ndarray]:
        """The right-hand side ``d(state)/d(alpha)`` at ``arrays`` (see ``at``), by name."""
        y, c, p, K, M = self.at(arrays, params)
        dy = np.zeros_like(y)
        self.module.rhs(y, c, p, K, M, dy)
        return self.unpack_state(dy, K, M)

    def metrics(self, y: np.ndarray, c: np.ndarray, p: np.ndarray, K: int, M: int) -> np.ndarray:
        """Metrics at one state (1-d y) or at each state of a stack (n, size)."""
        ys = np.atleast_2d(y)
        out = np.empty((ys.shape[0], len(self.metric_names)))
        for i in range(ys.shape[0]):
            self.module.metrics(np.ascontiguousarray(ys[i]), c, p, K, M, out[i])
        return out if y.ndim == 2 else out[0]


def outlined(kernel: "Kernel", p: np.ndarray) -> list:
    """The outlined parts of the kernel's task program (``OUTLINED``, compiled at their
    first use) that a run with the parameter vector ``p`` reaches (``outlined_reached``,
    generated from the branches on the way to them)."""
    names = getattr(kernel.module, "OUTLINED", ())
    if not names or not kernel.module.outlined_reached(p):
        return []
    return [getattr(kernel.module, n) for n in names]


def needs_compiling(*functions) -> bool:
    """Whether a first call of these numba functions compiles them rather than
    loading numba's cache (``NUMBA_CACHE_DIR``, by default ``generated/__pycache__``):
    one of them has no signature in this process and no fresh index in the cache
    (none, or one of an older version of the generated file, which numba recompiles)."""
    for f in functions:
        if getattr(f, "signatures", None):
            continue  # compiled or loaded in this process
        try:
            index = f._cache._cache_file
            if not os.path.exists(index._index_path) or not index._load_index():
                return True
        except AttributeError:  # not cached (the threaded loops), or numba's internals changed
            return True
    return False


def compile_notice(
    kernel: "Kernel",
    what: str = "kernels",
    note: str = "first run only, numba caches them; up to two minutes",
) -> str:
    """The line that tells that a compilation is under way."""
    return f"compiling the {what} of {kernel.model.name}/{kernel.activation} ({note})"


@lru_cache(maxsize=None)
def load(model: str, activation: str = "erf") -> Kernel:
    """The generated kernel of ``model`` with ``activation``, one of the
    activations the model declares (``Model.activations``)."""
    spec = get_model(model)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    if activation not in spec.activations:
        raise ValueError(
            f"model {model!r} is not built for activation {activation!r}; "
            f"its activations: {', '.join(spec.activations)} (Model.activations in {model_file(model)})"
        )
    try:
        module = importlib.import_module(f"generated.{model}_{activation}")
    except ImportError as exc:
        raise RuntimeError(
            f"no generated kernel for {model}/{activation}; run: python -m derive regenerate"
        ) from exc
    if tuple(module.PARAMS) != tuple(p.name for p in spec.params):
        raise RuntimeError(
            f"generated/{model}_{activation}.py is stale (parameters {module.PARAMS} differ from "
            f"the model definition); run: python -m derive regenerate"
        )
    return Kernel(module, spec, activation)


_LOADED = itertools.count()


def load_path(path: str | Path, model: Model, activation: str) -> Kernel:
    """A kernel module rendered outside generated/ (``derive.regenerate.write_module``),
    imported from ``path`` under a module name of its own, with the ``Model`` it
    was rendered from."""
    path = Path(path).resolve()
    name = f"_metaflow_kernel_{next(_LOADED)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import a kernel module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cache locates functions by their module
    spec.loader.exec_module(module)
    if module.MODEL != model.name or module.ACTIVATION != activation:
        raise RuntimeError(
            f"{path} holds the kernel of {module.MODEL}/{module.ACTIVATION}, not {model.name}/{activation}"
        )
    if tuple(module.PARAMS) != tuple(p.name for p in model.params):
        raise RuntimeError(f"{path} is stale (parameters {module.PARAMS} differ from the model definition)")
    return Kernel(module, model, activation)


def as_kernel(model: str | Kernel, activation: str = "erf") -> Kernel:
    """A ``Kernel`` as it is, a model name through ``load``."""
    return model if isinstance(model, Kernel) else load(model, activation)
