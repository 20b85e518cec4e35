"""Initial conditions (docs/simulation.md section 6): order parameters and the networks behind them.

Two routes, both exact:
- ``sample_network``: a seeded random network (``w_k ~ N(0, sigma0^2 I_N)``,
  teacher vectors orthonormalised and scaled so that ``T`` is exactly as asked);
  ``Init.from_network`` reads its order parameters, so flow and simulation start
  from the same point;
- ``realise``: vectors with exactly the given ``Q0, R0, T`` (``w_k = (R0 T^-1 B)_k``
  plus a part orthogonal to the teacher with Gram matrix ``Q0 - R0 T^-1 R0^T``).
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from derive.model import OVERLAPS, UNITS, Model
from derive.models import get_model


@dataclass
class Init:
    """Initial order parameters and readouts. The order parameters are those of
    derive/model.py ``OVERLAPS``, one field each in its order: ``Q`` (K,K),
    ``R`` (K,M), ``T`` (M,M)."""

    Q: np.ndarray
    R: np.ndarray
    T: np.ndarray
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def overlaps(self) -> dict[str, np.ndarray]:
        """The order parameters by name, in the order of ``OVERLAPS``."""
        return {o.name: getattr(self, o.name) for o in OVERLAPS}

    @property
    def K(self) -> int:
        return _units(self.overlaps)["K"]

    @property
    def M(self) -> int:
        return _units(self.overlaps)["M"]

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.overlaps, **self.vectors}

    def validate(self, model: Model, tol: float = 1e-10) -> Init:
        """Check each order parameter (real, finite, of its shape, symmetric where
        ``OVERLAPS`` says so), that the teacher's overlaps are positive definite,
        and that some network has all of them (their Gram matrix, docs/conventions.md 1, is
        positive semi-definite); fill default readouts."""
        arrays = {o.name: _real(f"{o.name} ({o.doc})", getattr(self, o.name)) for o in OVERLAPS}
        units: dict[str, int] = {}
        for o in _square_first():
            a = arrays[o.name]
            want = f"{o.name} ({o.doc}) must have shape ({', '.join(o.dims)})"
            if a.ndim != len(o.dims):
                raise ValueError(f"{want}, got shape {a.shape}")
            for unit, n in zip(o.dims, a.shape):
                units.setdefault(unit, n)
            expected = tuple(units[unit] for unit in o.dims)
            if min(expected) < 1:
                raise ValueError(f"{want} with {', '.join(sorted(set(o.dims)))} >= 1, got {a.shape}")
            if a.shape != expected:
                raise ValueError(f"{want} = {expected}, got {a.shape}")
        for o in OVERLAPS:
            a = arrays[o.name]
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{o.name} has non-finite entries")
            if o.symmetric and not np.allclose(a, a.T, rtol=0, atol=tol * max(1.0, np.abs(a).max())):
                raise ValueError(f"{o.name} ({o.doc}) must be symmetric")
        for o in OVERLAPS:
            if o.pair == ("B", "B"):  # realise() builds the teacher from its Cholesky factor
                eig = np.linalg.eigvalsh(arrays[o.name])
                if eig[0] <= tol * max(1.0, eig[-1]):
                    raise ValueError(
                        f"{o.name} ({o.doc}) must be positive definite (the teacher vectors linearly "
                        f"independent); its smallest eigenvalue is {eig[0]:.3g}"
                    )
        full, name = _gram(arrays)
        eig = np.linalg.eigvalsh((full + full.T) / 2)
        if eig[0] < -tol * max(1.0, eig[-1]):
            raise ValueError(
                f"the overlap matrix {name} must be positive semi-definite "
                f"(smallest eigenvalue {eig[0]:.3g}); no network has these overlaps"
            )
        vectors = readouts(model, units["K"], units["M"], self.vectors)
        for o in OVERLAPS:
            if o.symmetric:  # exactly symmetric, not to round-off
                arrays[o.name] = (arrays[o.name] + arrays[o.name].T) / 2
        return Init(**arrays, vectors=vectors)

    @classmethod
    def from_file(cls, path: str | Path, model: Model) -> Init:
        """Read the order parameters (``Q``, ``R``, ``T``) and the model's readouts
        from an ``.npz`` file (``numpy.savez``)."""
        path = Path(path)
        wanted = f"an .npz archive (numpy.savez) of {_contents(model)}"
        if path.is_dir():
            raise ValueError(f"init file {path} is a directory; it must be {wanted}")
        if not path.is_file():
            raise FileNotFoundError(f"init file {path} does not exist")
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic == b"\x93NUMPY":
            raise ValueError(f"init file {path} holds a single array (.npy); it must be {wanted}")
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"init file {path} is not an .npz archive (or is truncated); it must be {wanted}"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: np.array(data[k]) for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            msg = " ".join(str(exc).split())
            raise ValueError(f"init file {path} cannot be read ({msg}); it must be {wanted}") from None
        names = [o.name for o in OVERLAPS]
        missing = [k for k in names if k not in arrays]
        if missing:
            raise ValueError(f"init file {path} lacks {', '.join(missing)} (needs {', '.join(names)})")
        vectors = {k: v for k, v in arrays.items() if k not in names}
        try:
            return cls(**{k: arrays[k] for k in names}, vectors=vectors).validate(model)
        except ValueError as exc:
            raise ValueError(f"init file {path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.arrays())

    @classmethod
    def from_network(cls, W: np.ndarray, B: np.ndarray, vectors: dict, model: Model) -> Init:
        """The order parameters of a student ``W`` (K, N) and a teacher ``B`` (M, N)."""
        return cls(**{o.name: o.of(W, B) for o in OVERLAPS}, vectors=dict(vectors)).validate(model)


def readouts(model: Model, K: int, M: int, vectors: dict | None = None) -> dict[str, np.ndarray]:
    """The readouts of ``model`` for K student and M teacher units: those given
    in ``vectors``, checked, and the model's defaults for the others."""
    vectors = vectors or {}
    known = {v.name: v for v in model.vectors}
    for name in vectors:
        if name not in known:
            names = ", ".join(known) or "none"
            raise ValueError(f"model {model.name!r} has no readout {name!r}; its readouts: {names}")
    out = {}
    for v in model.vectors:
        n = K if v.over == "student" else M
        a = _real(f"{v.name} ({v.doc})", vectors.get(v.name, np.full(n, v.default)))
        if a.shape != (n,):
            raise ValueError(f"{v.name} ({v.doc}) must have shape ({n},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{v.name} has non-finite entries")
        out[v.name] = a
    return out


def _real(what: str, value) -> np.ndarray:
    """``value`` as a float64 array, if it holds real numbers."""
    a = np.asarray(value)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{what} must hold real numbers, got an array of {a.dtype}")
    return a.astype(np.float64)


def _square_first() -> list:
    """The order parameters, those of one kind of unit with itself (Q, T) first:
    they fix K and M, against which the others are checked."""
    return sorted(OVERLAPS, key=lambda o: len(set(o.dims)))


def _units(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """K and M, read off the order parameters of each kind of unit with itself."""
    out: dict[str, int] = {}
    for o in _square_first():
        for unit, n in zip(o.dims, np.shape(arrays[o.name])):
            out.setdefault(unit, n)
    return out


def _gram(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The Gram matrix over N of the rows of the student W and the teacher B, in
    blocks of the order parameters, and its name (``[[Q, R], [R^T, T]]``)."""
    by_pair = {o.pair: o.name for o in OVERLAPS}
    rows = ("W", "B")
    blocks, names = [], []
    for a in rows:
        blocks.append([])
        names.append([])
        for b in rows:
            if (a, b) in by_pair:
                blocks[-1].append(arrays[by_pair[a, b]])
                names[-1].append(by_pair[a, b])
            else:
                blocks[-1].append(arrays[by_pair[b, a]].T)
                names[-1].append(by_pair[b, a] + "^T")
    name = "[" + ", ".join("[" + ", ".join(row) + "]" for row in names) + "]"
    return np.block(blocks), name


def _contents(model: Model) -> str:
    """What an init file holds, e.g. ``Q (K, K), R (K, M), T (M, M), v (K,)``."""
    parts = [f"{o.name} ({', '.join(o.dims)})" for o in OVERLAPS]
    parts += [f"{v.name} ({UNITS[v.over]},)" for v in model.vectors]
    return ", ".join(parts)


def _psd_sqrt(A: np.ndarray) -> np.ndarray:
    """S with S S^T = A for a symmetric positive semi-definite A."""
    w, V = np.linalg.eigh((A + A.T) / 2)
    if w.size and w[0] < -1e-9 * max(1.0, w[-1]):
        raise ValueError("Q - R T^-1 R^T must be positive semi-definite")
    return V * np.sqrt(np.clip(w, 0.0, None))


def _orthonormal(N: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n orthonormal vectors of R^N as rows."""
    if n > N:
        raise ValueError(f"N = {N} is too small for {n} orthogonal directions")
    q, r = np.linalg.qr(rng.standard_normal((N, n)))
    return (q * np.sign(np.diag(r))).T


def realise(init: Init, N: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Student W (K, N) and teacher B (M, N) with exactly the overlaps of ``init``."""
    K, M = init.K, init.M
    E = _orthonormal(N, K + M, rng) * np.sqrt(N)
    B = np.linalg.cholesky(init.T) @ E[:M]
    A = np.linalg.solve(init.T, init.R.T).T  # R T^-1
    S = _psd_sqrt(init.Q - A @ init.R.T)
    W = A @ B + S @ E[M:]
    return W, B


def sample_network(
    K: int, M: int, N: int, rng: np.random.Generator, sigma0: float = 0.1, T: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random student ``w_k ~ N(0, sigma0^2 I_N)`` and a teacher with overlaps exactly ``T`` (default I)."""
    if K < 1 or M < 1:
        raise ValueError(f"K and M must be >= 1, got K = {K}, M = {M}")
    if sigma0 < 0:
        raise ValueError(f"sigma0 must be >= 0, got {sigma0}")
    T = np.eye(M) if T is None else np.asarray(T, dtype=np.float64)
    B = np.linalg.cholesky(T) @ (_orthonormal(N, M, rng) * np.sqrt(N))
    W = sigma0 * rng.standard_normal((K, N))
    return W, B


def sampled_init(
    model: Model | str, K: int, M: int, N: int, seed: int, sigma0: float = 0.1, vectors=None
) -> Init:
    """The order parameters of the network ``simulate`` builds from the same seed
    (``model``: a model name or its definition)."""
    if isinstance(model, str):
        model = get_model(model)
    rng = np.random.default_rng(seed)
    W, B = sample_network(K, M, N, rng, sigma0)
    return Init.from_network(W, B, readouts(model, K, M, vectors), model)
