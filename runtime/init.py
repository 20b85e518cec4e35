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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from derive.model import Model
from derive.models import get_model


@dataclass
class Init:
    """Initial order parameters ``Q`` (K,K), ``R`` (K,M), ``T`` (M,M) and readouts."""

    Q: np.ndarray
    R: np.ndarray
    T: np.ndarray
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.Q.shape[0]

    @property
    def M(self) -> int:
        return self.T.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"Q": self.Q, "R": self.R, "T": self.T, **self.vectors}

    def validate(self, model: Model, tol: float = 1e-10) -> Init:
        """Check shapes, symmetry and positive semi-definiteness; fill default readouts."""
        Q, R, T = (np.asarray(a, dtype=np.float64) for a in (self.Q, self.R, self.T))
        if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or Q.shape[0] < 1:
            raise ValueError(f"Q must be a square (K, K) matrix with K >= 1, got shape {Q.shape}")
        if T.ndim != 2 or T.shape[0] != T.shape[1] or T.shape[0] < 1:
            raise ValueError(f"T must be a square (M, M) matrix with M >= 1, got shape {T.shape}")
        K, M = Q.shape[0], T.shape[0]
        if R.shape != (K, M):
            raise ValueError(f"R must have shape (K, M) = ({K}, {M}), got {R.shape}")
        for name, a in (("Q", Q), ("R", R), ("T", T)):
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} has non-finite entries")
        for name, a in (("Q", Q), ("T", T)):
            if not np.allclose(a, a.T, rtol=0, atol=tol * max(1.0, np.abs(a).max())):
                raise ValueError(f"{name} must be symmetric")
        full = np.block([[Q, R], [R.T, T]])
        eig = np.linalg.eigvalsh((full + full.T) / 2)
        if eig[0] < -tol * max(1.0, eig[-1]):
            raise ValueError(
                "the overlap matrix [[Q, R], [R^T, T]] must be positive semi-definite "
                f"(smallest eigenvalue {eig[0]:.3g}); no network has these overlaps"
            )
        vectors = {}
        known = {v.name: v for v in model.vectors}
        for name in self.vectors:
            if name not in known:
                names = ", ".join(known) or "none"
                raise ValueError(f"model {model.name!r} has no readout {name!r}; its readouts: {names}")
        for v in model.vectors:
            n = K if v.over == "student" else M
            a = np.asarray(self.vectors.get(v.name, np.full(n, v.default)), dtype=np.float64)
            if a.shape != (n,):
                raise ValueError(f"{v.name} ({v.doc}) must have shape ({n},), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{v.name} has non-finite entries")
            vectors[v.name] = a
        return Init((Q + Q.T) / 2, R, (T + T.T) / 2, vectors)

    @classmethod
    def from_file(cls, path: str | Path, model: Model) -> Init:
        """Read ``Q``, ``R``, ``T`` and the model's readouts from an ``.npz`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"init file {path} does not exist")
        with np.load(path) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
        missing = [k for k in ("Q", "R", "T") if k not in arrays]
        if missing:
            raise ValueError(f"init file {path} lacks {', '.join(missing)} (needs Q, R, T)")
        vectors = {k: v for k, v in arrays.items() if k not in ("Q", "R", "T")}
        return cls(arrays["Q"], arrays["R"], arrays["T"], vectors).validate(model)

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.arrays())

    @classmethod
    def from_network(cls, W: np.ndarray, B: np.ndarray, vectors: dict, model: Model) -> Init:
        N = W.shape[1]
        return cls(W @ W.T / N, W @ B.T / N, B @ B.T / N, dict(vectors)).validate(model)


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
    v = Init(np.eye(K), np.zeros((K, M)), np.eye(M), dict(vectors or {})).validate(model).vectors
    return Init.from_network(W, B, v, model)
