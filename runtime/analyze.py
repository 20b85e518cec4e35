"""The phases of a flow: plateaus, escape and specialisation, and the linear
stability of each plateau (``python -m runtime analyze --traj DIR``).

- **Speed.** At each recorded state the kernel's own right-hand side gives the
  velocity ``f = d(state)/d(alpha)`` of the order parameters that evolve (the
  upper triangle of ``Q``, ``R``, the readouts whose rate or decay is not zero;
  ``T`` and frozen readouts are constants): the speed is ``|f|`` (Euclidean).
- **Plateaus** (``find_plateaus``): maximal runs of records where the speed is
  at most ``fraction`` (default 0.5) times the typical speed around them
  (``typical_speed``: the smaller of the largest speeds before and after the
  record; after the last peak of the speed, the speed of that peak), lasting
  at least ``min_length`` alpha (default 5 % of the recorded span). No error
  threshold: the rule sees only how fast the flow moves, relative to itself,
  so it finds the slow phases between fast ones at any scale; the slow start
  of a flow from small weights is not one (nothing faster came before it). A
  plateau that lasts until the last record is *not left* (the final state, or
  a plateau the run did not escape by its end).
- **Escape** alpha: the end of the first plateau the flow leaves; **specialisation**
  alpha: the first record where the units' specialisation (for each student unit
  the gap between its largest and second-largest ``|r_km|``, averaged over units)
  reaches half its final value, when that final value is at least 0.5 (else nan).
- **Fixed point** of a plateau (``plateau_fixed_point``): Newton's method on the
  right-hand side from the plateau's slowest record and from records spread
  over it (a plateau on the way between fixed points may reach a different one
  from each; the one nearest to the last record, where the flow leaves, is
  kept), with the Jacobian of the
  generated code by forward differentiation (runtime/tangent.py), damped by
  halving the step until ``|f|`` falls; its eigenvalues give the linear
  stability. With ``lambda_max`` the largest real part, the amplitude ``A`` of
  the unstable mode (the length of the component of ``x - x*`` in its
  eigenspace, projected along the other eigenvectors) grows
  like ``exp(lambda_max alpha)``: from the plateau's start it reaches
  ``escape_amplitude`` (default 0.1) at the predicted escape
  ``alpha_start + ln(escape_amplitude / A_start) / lambda_max``; an initial
  asymmetry ``d`` smaller by a decade delays it by ``ln(10) / lambda_max``
  (reference scenario: 24.8, against 24.1 measured between flows at d = 1e-4 ..
  1e-7; tests/test_analyze.py). The constant ``escape_amplitude`` only shifts
  the predicted escape (0.1 puts it ~12 alpha before ``escape_alpha`` there).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sympy as sp

from .kernels import Kernel, load
from .output import atomic_path, write_text
from .tangent import jacobian_full
from .trajectory import Trajectory, jsonable

# the defaults of the plateau rule (module docstring)
FRACTION = 0.5
MIN_LENGTH = 0.05  # of the recorded span of alpha
ESCAPE_AMPLITUDE = 0.1
NEWTON_TOL = 1e-12
NEWTON_STEPS = 50
STALL_STEPS = 10


class AnalysisError(ValueError):
    """A trajectory that cannot be analysed (named, with what is allowed)."""


# --------------------------------------------------------------------------- the flow as a function
@dataclass
class Flow:
    """The right-hand side of a trajectory's flow in the coordinates that evolve.

    ``names`` label the coordinates (``Q[0,1]``, ``R[1,0]``, ``a[0]``); ``embed``
    (size(state), n) maps them to the kernel's state vector (an off-diagonal
    ``Q_kl`` is one variable, written to ``Q[k,l]`` and ``Q[l,k]``); ``rows`` pick
    their derivatives out of the kernel's."""

    kernel: Kernel
    K: int
    M: int
    c: np.ndarray
    p: np.ndarray
    names: list[str]
    embed: np.ndarray
    rows: np.ndarray
    base: np.ndarray  # a state holding the constant entries (frozen readouts)

    def state(self, x: np.ndarray) -> np.ndarray:
        """The kernel's state vector of the coordinates ``x``."""
        y = self.base.copy()
        moving = self.embed.any(axis=1)
        y[moving] = (self.embed @ x)[moving]
        return y

    def coordinates(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y)[..., self.rows]

    def rhs(self, x: np.ndarray) -> np.ndarray:
        y = self.state(x)
        dy = np.empty_like(y)
        self.kernel.module.rhs(y, self.c, self.p, self.K, self.M, dy)
        return dy[self.rows]

    def jacobian(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(f, J)`` at ``x``: the right-hand side and its Jacobian, by forward
        differentiation of the generated code (runtime/tangent.py)."""
        f, J = jacobian_full(self.kernel, self.state(x), self.c, self.p, self.K, self.M, self.embed)
        return f[self.rows], J[self.rows]

    def unpack(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.kernel.unpack_state(self.state(x), self.K, self.M).items()}


def _evolving_readouts(kernel: Kernel, values: dict) -> set[str]:
    """The readout vectors whose rule moves them at these parameters (rate or decay not 0)."""
    subs = {s: values[s.name] for rule in kernel.model.readout_updates for s in _symbols(rule)}
    out = set()
    for rule in kernel.model.readout_updates:
        rate, decay = (float(sp.sympify(e).subs(subs)) for e in (rule.rate, rule.decay))
        if rate != 0 or decay != 0:
            out.add(rule.vector.name)
    return out


def _symbols(rule):
    return sp.sympify(rule.rate).free_symbols | sp.sympify(rule.decay).free_symbols


def flow_of(traj: Trajectory) -> Flow:
    """The ``Flow`` of a saved flow trajectory (its model, parameters and constants)."""
    try:
        return _flow_of(traj)
    except KeyError as exc:
        raise AnalysisError(
            f"--traj: the trajectory has no {exc.args[0]!r} (not written by a flow?)"
        ) from None


def _flow_of(traj: Trajectory) -> Flow:
    meta = traj.metadata
    kernel = load(meta["model"], meta.get("activation", "erf"))
    values = kernel.model.resolve_params({k: float(v) for k, v in meta["params"].items()})
    K, M = int(meta["K"]), int(meta["M"])
    c = kernel.pack_consts(traj.arrays, K, M)
    p = kernel.param_vector(values)
    moving = _evolving_readouts(kernel, values)
    readouts = {v.name for v in kernel.model.state_vectors}
    names, rows, cols = [], [], []
    size = kernel.state_size(K, M)
    layout = kernel.unpack_state(np.arange(size), K, M)
    for name, _ in kernel.module.STATE:
        idx = layout[name]
        if name == "Q":
            for k in range(K):
                for l_ in range(k, K):
                    names.append(f"Q[{k},{l_}]")
                    rows.append(idx[k, l_])
                    cols.append({idx[k, l_], idx[l_, k]})
        elif name in readouts and name not in moving:
            pass  # a frozen readout: a constant
        else:
            for pos in np.ndindex(idx.shape):
                names.append(f"{name}[{','.join(map(str, pos))}]")
                rows.append(idx[pos])
                cols.append({idx[pos]})
    embed = np.zeros((size, len(names)))
    for j, entries in enumerate(cols):
        for i in entries:
            embed[i, j] = 1.0
    base = kernel.pack_state({k: traj.arrays[k][0] for k, _ in kernel.module.STATE}, K, M)
    return Flow(kernel, K, M, c, p, names, embed, np.array(rows, dtype=np.int64), base)


def _states(traj: Trajectory, fl: Flow) -> np.ndarray:
    n = len(traj.alpha)
    y = np.concatenate([traj.arrays[k].reshape(n, -1) for k, _ in fl.kernel.module.STATE], axis=1)
    return fl.coordinates(y)


def speeds(traj: Trajectory, fl: Flow | None = None) -> np.ndarray:
    """``|d(state)/d(alpha)|`` at each record (the kernel's right-hand side)."""
    fl = fl or flow_of(traj)
    return np.array([np.linalg.norm(fl.rhs(x)) for x in _states(traj, fl)])


# --------------------------------------------------------------------------- plateaus and summaries
@dataclass
class Plateau:
    """A slow phase of the flow: records ``first..last`` (``start``, ``end`` in alpha)."""

    start: float
    end: float
    level: float  # the metric at the slowest record
    left: bool  # the flow leaves it before its last record
    slowest: int  # index of the slowest record
    speed: float  # the speed there
    state: dict = field(default_factory=dict)  # the order parameters at the slowest record


def metric_name(traj: Trajectory) -> str:
    """The error a trajectory's phases are read on: ``eps_meta`` (anil) or ``eps_g``."""
    for name in ("eps_meta", "eps_g"):
        if name in traj.arrays:
            return name
    raise AnalysisError("the trajectory has neither eps_meta nor eps_g")


def typical_speed(speed: np.ndarray) -> np.ndarray:
    """At each record, the speed the flow has around it: the smaller of the largest
    speeds before and after it. After the last peak (the final stretch where each
    record is at least as fast as every later one, e.g. the approach to the final
    state) there is no faster motion after: there it is the speed of that peak."""
    speed = np.asarray(speed, dtype=np.float64)
    before = np.maximum.accumulate(speed)
    after = np.maximum.accumulate(speed[::-1])[::-1]
    typical = np.minimum(before, after)
    peak = len(speed) - 1
    while peak > 0 and speed[peak - 1] >= after[peak]:
        peak -= 1
    typical[peak:] = speed[peak]
    return typical


def find_plateaus(
    traj: Trajectory,
    speed: np.ndarray,
    fraction: float = FRACTION,
    min_length: float | None = None,
) -> list[Plateau]:
    """The plateaus of the module docstring's rule: maximal runs of records whose
    speed is below ``fraction`` times the typical speed around them (the smaller
    of the largest speeds before and after; before only, for a run that lasts to
    the last record), at least ``min_length`` alpha long (default ``MIN_LENGTH``
    of the recorded span)."""
    alpha = np.asarray(traj.alpha)
    speed = np.asarray(speed, dtype=np.float64)
    n = len(alpha)
    span = float(alpha[-1] - alpha[0])
    min_length = MIN_LENGTH * span if min_length is None else min_length
    slow = speed <= fraction * typical_speed(speed)
    metric = traj.arrays[metric_name(traj)]
    out = []
    i = 0
    while i < n:
        if not slow[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and slow[j + 1]:
            j += 1
        if j > i and alpha[j] - alpha[i] >= min_length:
            k = i + int(np.argmin(speed[i : j + 1]))
            state = {
                name: np.array(traj.arrays[name][k])
                for name in ("Q", "R", "r", "a", "v")
                if name in traj.arrays
            }
            out.append(
                Plateau(
                    float(alpha[i]), float(alpha[j]), float(metric[k]), j < n - 1, k, float(speed[k]), state
                )
            )
        i = j + 1
    return out


def specialisation(r: np.ndarray) -> np.ndarray:
    """Per record, for each student unit the gap between its largest and second
    largest ``|r_km|``, averaged over the units (0 for M = 1)."""
    a = np.sort(np.abs(r), axis=-1)
    if a.shape[-1] < 2:
        return np.zeros(a.shape[:-2])
    return (a[..., -1] - a[..., -2]).mean(-1)


def specialisation_alpha(traj: Trajectory) -> float:
    """The first alpha where ``specialisation`` reaches half its final value, if that
    final value is at least 0.5 (the units have specialised); nan otherwise."""
    spec = specialisation(traj.r)
    final = spec[-1]
    if not final >= 0.5:
        return float("nan")
    return float(traj.alpha[int(np.argmax(spec >= final / 2))])


def _check(traj: Trajectory) -> None:
    kind = traj.metadata.get("kind")
    if kind != "flow":
        raise AnalysisError(f"--traj must be a flow's output (metadata kind 'flow'), got kind {kind!r}")
    if len(traj.alpha) < 3:
        raise AnalysisError(f"--traj has {len(traj.alpha)} records; the analysis needs at least 3")


def _check_rule(fraction: float, min_length: float | None) -> None:
    if not (0 < fraction < 1):
        raise AnalysisError(f"fraction (--fraction) must be between 0 and 1, got {fraction}")
    if min_length is not None and not (min_length >= 0 and math.isfinite(min_length)):
        raise AnalysisError(f"min_length (--min-length) must be a number >= 0, got {min_length}")


def summaries(
    traj: Trajectory, fraction: float = FRACTION, min_length: float | None = None, speed=None
) -> dict[str, float]:
    """Cheap summaries of a flow (no Newton): the first plateau's level, start, end
    and whether the flow left it (1.0 or 0.0; all nan when there is no plateau),
    the escape alpha (end of the first plateau left),
    the specialisation alpha, the number of plateaus and the final errors
    (``final_<metric>``). For sweeps: every value a float."""
    _check_rule(fraction, min_length)
    _check(traj)
    if speed is None:
        speed = speeds(traj)
    plateaus = find_plateaus(traj, speed, fraction, min_length)
    first = plateaus[0] if plateaus else None
    left = [p for p in plateaus if p.left]
    nan = float("nan")
    out = {
        "plateau_level": first.level if first else nan,
        "plateau_start": first.start if first else nan,
        "plateau_end": first.end if first else nan,
        "plateau_left": float(first.left) if first else nan,
        "plateaus": float(len(plateaus)),
        "escape_alpha": left[0].end if left else nan,
        "specialisation_alpha": specialisation_alpha(traj),
    }
    for name in _metrics(traj):
        out[f"final_{name}"] = float(traj.arrays[name][-1])
    return out


def _metrics(traj: Trajectory) -> list[str]:
    kernel = load(traj.metadata["model"], traj.metadata.get("activation", "erf"))
    return [m for m in kernel.metric_names if m in traj.arrays]


# --------------------------------------------------------------------------- fixed points
@dataclass
class FixedPoint:
    """A zero of the right-hand side, its Jacobian's eigenvalues and what they predict."""

    state: dict  # Q, R and the readouts
    coordinates: dict  # name -> value
    rhs_norm: float
    newton_steps: int
    eigenvalues: list  # complex, largest real part first
    lambda_max: float
    predicted_escape: float  # alpha; nan unless unstable
    escape_per_decade: float  # ln(10) / lambda_max: delay per decade of the initial asymmetry
    amplitude_at_start: float  # of the most unstable mode, at the plateau's start


def fixed_point(fl: Flow, x0: np.ndarray, tol: float = NEWTON_TOL, max_steps: int = NEWTON_STEPS):
    """Newton's method on ``fl.rhs`` from ``x0``, damped (the step halved until the
    residual falls); returns ``(x, |f|, steps, J)``. Raises AnalysisError when it
    does not reach ``|f| <= tol``."""
    x = np.array(x0, dtype=np.float64)
    f, J = fl.jacobian(x)
    norm = float(np.linalg.norm(f))
    history = [norm]
    steps = 0
    while norm > tol and steps < max_steps:
        # least squares (the pseudo-inverse): quadratic convergence also onto a manifold
        # of fixed points (a singular Jacobian, e.g. over-parameterised students)
        dx = np.linalg.lstsq(J, -f, rcond=1e-12)[0]
        t = 1.0
        while t >= 1e-6:
            x_new = x + t * dx
            n_new = float(np.linalg.norm(fl.rhs(x_new)))
            if np.isfinite(n_new) and n_new < norm:
                break
            t /= 2
        else:
            break  # no step along the Newton direction lowers the residual
        x = x_new
        steps += 1
        f, J = fl.jacobian(x)
        norm = float(np.linalg.norm(f))
        history.append(norm)
        if steps >= STALL_STEPS and norm > 0.5 * history[-STALL_STEPS]:
            break  # not even halved in STALL_STEPS steps: no fixed point within reach
    if not norm <= tol:
        raise AnalysisError(f"Newton's method did not converge: |rhs| = {norm:.3g} after {steps} steps")
    return x, norm, steps, J


def plateau_fixed_point(fl: Flow, xs: np.ndarray, slowest: int, tol: float = NEWTON_TOL):
    """The fixed point that governs a plateau (its records ``xs``): Newton from its
    slowest record and from records at 0, 1/4, 1/2, 3/4 and all of its length; of
    the fixed points reached, the one nearest to the last record. A plateau can
    lead from one fixed point to another (the flow first passes near a saddle,
    then drifts towards a second one while the unstable mode grows; so does
    ``scm`` with K = M = 2): the escape happens, and its timing is set, near the
    one the flow is at when it leaves. Returns as ``fixed_point``."""
    found, errors = [], []
    n = len(xs) - 1
    for i in sorted({slowest, *(round(n * q) for q in (0, 0.25, 0.5, 0.75, 1))}):
        try:
            found.append(fixed_point(fl, xs[i], tol))
        except AnalysisError as exc:
            errors.append(str(exc))
    if not found:
        raise AnalysisError(errors[0])
    return min(found, key=lambda r: float(np.linalg.norm(xs[-1] - r[0])))


def linear_stability(
    J: np.ndarray,
    x_star: np.ndarray,
    x_start: np.ndarray,
    alpha_start: float,
    escape_amplitude: float = ESCAPE_AMPLITUDE,
):
    """``(eigenvalues, lambda_max, amplitude, predicted escape, per decade)`` of the
    flow linearised at ``x_star`` (Jacobian ``J``): eigenvalues largest real part
    first; the amplitude of the most unstable mode at ``x_start`` (the length of
    the component of ``x_start - x_star`` in the eigenspace of ``lambda_max``,
    projected along the other eigenvectors); the alpha at which it grows to ``escape_amplitude``
    from ``alpha_start``; and ``ln(10) / lambda_max`` (nan unless unstable)."""
    from scipy.linalg import eig

    w, vl, vr = eig(J, left=True, right=True)
    order = np.argsort(-w.real, kind="stable")
    w, vl, vr = w[order], vl[:, order], vr[:, order]
    lam = float(w[0].real)
    # the eigenspace of lambda_max (a symmetry often makes it degenerate; with a complex
    # pair, both): the oblique projection onto it along the others, V (L^H V)^-1 L^H
    scale = 1e-8 * max(1.0, abs(w[0]))
    same = (np.abs(w.real - w[0].real) <= scale) & (np.abs(np.abs(w.imag) - abs(w[0].imag)) <= scale)
    V, L = vr[:, same], vl[:, same]
    dx = x_start - x_star
    amp = float(np.linalg.norm(V @ np.linalg.solve(L.conj().T @ V, L.conj().T @ dx)))
    if lam > 0 and amp > 0:
        predicted = alpha_start + math.log(escape_amplitude / amp) / lam
        per_decade = math.log(10) / lam
    else:
        predicted, per_decade = float("nan"), float("nan")
    return w, lam, amp, predicted, per_decade


# --------------------------------------------------------------------------- the analysis
@dataclass
class PlateauAnalysis:
    plateau: Plateau
    fixed_point: FixedPoint | None
    error: str | None = None


@dataclass
class Analysis:
    """What ``analyze`` finds (module docstring): the plateaus with their fixed points,
    the escape and specialisation alphas, the final errors, the summaries."""

    model: str
    metric: str
    coordinates: list[str]
    plateaus: list[PlateauAnalysis]
    escape_alpha: float
    specialisation_alpha: float
    final: dict[str, float]
    summaries: dict[str, float]
    rule: dict
    alpha: np.ndarray = field(repr=False, default=None)
    speed: np.ndarray = field(repr=False, default=None)

    def to_dict(self) -> dict:
        """Strict-JSON-able (complex eigenvalues as [re, im], non-finite as strings)."""
        plats = []
        for pa in self.plateaus:
            d = {"plateau": asdict(pa.plateau), "error": pa.error}
            if pa.fixed_point is not None:
                fp = asdict(pa.fixed_point)
                fp["eigenvalues"] = [[float(z.real), float(z.imag)] for z in pa.fixed_point.eigenvalues]
                d["fixed_point"] = fp
            plats.append(d)
        out = {
            "model": self.model,
            "metric": self.metric,
            "coordinates": self.coordinates,
            "rule": self.rule,
            "plateaus": plats,
            "escape_alpha": self.escape_alpha,
            "specialisation_alpha": self.specialisation_alpha,
            "final": self.final,
            "summaries": self.summaries,
        }
        return jsonable(out)


def as_trajectory(traj_or_dir) -> Trajectory:
    """A ``Trajectory`` as it is, or loaded from a flow's output folder."""
    if isinstance(traj_or_dir, Trajectory):
        return traj_or_dir
    path = Path(traj_or_dir)
    if not path.is_dir():
        raise AnalysisError(f"--traj {path}: no such folder")
    missing = [n for n in ("trajectory.npz", "metadata.json") if not (path / n).is_file()]
    if missing:
        raise AnalysisError(f"--traj {path} is not a trajectory folder (no {' or '.join(missing)})")
    try:
        return Trajectory.load(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise AnalysisError(f"--traj {path}: cannot read the trajectory ({exc})") from None


def analyze(
    traj_or_dir,
    fraction: float = FRACTION,
    min_length: float | None = None,
    escape_amplitude: float = ESCAPE_AMPLITUDE,
    tol: float = NEWTON_TOL,
) -> Analysis:
    """The phases of a flow (a ``Trajectory`` or the folder of one) and the linear
    stability of each plateau: see the module docstring for the rules."""
    _check_rule(fraction, min_length)
    if not (escape_amplitude > 0 and math.isfinite(escape_amplitude)):
        raise AnalysisError(
            f"escape_amplitude (--escape-amplitude) must be a positive number, got {escape_amplitude}"
        )
    traj = as_trajectory(traj_or_dir)
    _check(traj)
    fl = flow_of(traj)
    xs = _states(traj, fl)
    speed = np.array([np.linalg.norm(fl.rhs(x)) for x in xs])
    plateaus = find_plateaus(traj, speed, fraction, min_length)
    summ = summaries(traj, fraction, min_length, speed)
    out = []
    for pl in plateaus:
        first = int(np.searchsorted(traj.alpha, pl.start))
        last = int(np.searchsorted(traj.alpha, pl.end))
        try:
            x, norm, steps, J = plateau_fixed_point(fl, xs[first : last + 1], pl.slowest - first, tol)
        except AnalysisError as exc:
            out.append(PlateauAnalysis(pl, None, str(exc)))
            continue
        w, lam, amp, predicted, per_decade = linear_stability(J, x, xs[first], pl.start, escape_amplitude)
        fp = FixedPoint(
            fl.unpack(x),
            dict(zip(fl.names, map(float, x))),
            norm,
            steps,
            list(w),
            lam,
            predicted,
            per_decade,
            amp,
        )
        out.append(PlateauAnalysis(pl, fp))
    metric = metric_name(traj)
    final = {m: float(traj.arrays[m][-1]) for m in _metrics(traj)}
    rule = {
        "speed": "|d(state)/d(alpha)| of the evolving order parameters (the kernel's right-hand side)",
        "fraction": fraction,
        "largest_speed": float(np.max(speed)),
        "min_length": MIN_LENGTH * float(traj.alpha[-1] - traj.alpha[0])
        if min_length is None
        else min_length,
        "escape_amplitude": escape_amplitude,
    }
    return Analysis(
        traj.metadata["model"],
        metric,
        fl.names,
        out,
        summ["escape_alpha"],
        summ["specialisation_alpha"],
        final,
        summ,
        rule,
        np.asarray(traj.alpha),
        speed,
    )


# --------------------------------------------------------------------------- report and files
def report(result: Analysis) -> str:
    """A readable summary of an analysis."""
    lines = [
        f"{result.model}: {len(result.plateaus)} plateau(s) (speed below {result.rule['fraction']:g} of the "
        f"typical speed around it, at least {result.rule['min_length']:.3g} long in alpha)"
    ]
    for i, pa in enumerate(result.plateaus):
        p = pa.plateau
        status = "left" if p.left else "not left (lasts to the last record)"
        lines.append(
            f"  plateau {i}: alpha {p.start:.4g} .. {p.end:.4g}, {result.metric} = {p.level:.5g}, {status}"
        )
        if pa.fixed_point is None:
            lines.append(f"    fixed point: {pa.error}")
            continue
        fp = pa.fixed_point
        eig = ", ".join(_complex(z) for z in fp.eigenvalues)
        lines.append(f"    fixed point: |rhs| = {fp.rhs_norm:.2e} after {fp.newton_steps} Newton steps")
        for name in ("Q", "R", "a", "v"):
            if name in fp.state:
                lines.append(f"      {name} = {np.round(np.asarray(fp.state[name]), 5).tolist()}")
        lines.append(f"    eigenvalues: {eig}")
        if fp.lambda_max > 0:
            lines.append(
                f"    unstable: lambda_max = {fp.lambda_max:.5g}; escape delayed by ln(10)/lambda_max = "
                f"{fp.escape_per_decade:.4g} per decade of the initial asymmetry; predicted escape alpha "
                f"{fp.predicted_escape:.4g} (amplitude {fp.amplitude_at_start:.3g} at the plateau's start)"
            )
        else:
            lines.append(f"    stable: lambda_max = {fp.lambda_max:.5g}")
    lines.append(
        f"escape alpha {result.escape_alpha:.4g}, specialisation alpha {result.specialisation_alpha:.4g}"
    )
    lines.append("final: " + ", ".join(f"{k} = {v:.5g}" for k, v in result.final.items()))
    return "\n".join(lines)


def _complex(z) -> str:
    z = complex(z)
    return f"{z.real:.4g}" if abs(z.imag) < 1e-12 else f"{z.real:.4g}{z.imag:+.4g}i"


def write(result: Analysis, traj: Trajectory, out: str | Path) -> Path:
    """``analysis.json`` and ``analysis.png`` (the metric against alpha, plateaus
    shaded, predicted escapes marked) in ``out``, each whole or not at all."""
    out = Path(out)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    plot(result, traj, out / "analysis.png")
    write_text(out / "analysis.json", text)
    return out


def plot(result: Analysis, traj: Trajectory, path: Path) -> None:
    from .plots import _plt

    plt = _plt()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
    alpha = np.asarray(traj.alpha)
    ax.plot(alpha, traj.arrays[result.metric], label=result.metric)
    bx.semilogy(alpha, np.maximum(result.speed, 1e-300), color="C1", label="speed |d state / d alpha|")
    threshold = result.rule["fraction"] * typical_speed(result.speed)
    bx.semilogy(alpha, threshold, color="grey", ls=":", label="plateau threshold")
    for i, pa in enumerate(result.plateaus):
        for a_ in (ax, bx):
            a_.axvspan(
                pa.plateau.start, pa.plateau.end, color="C2", alpha=0.15, label="plateau" if i == 0 else None
            )
        fp = pa.fixed_point
        if fp is not None and math.isfinite(fp.predicted_escape):
            ax.axvline(fp.predicted_escape, color="C3", ls="--", label="predicted escape" if i == 0 else None)
    ax.set_ylabel(result.metric)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    bx.set_xlabel("alpha")
    bx.set_ylabel("speed")
    bx.legend(fontsize=8)
    ax.set_title(f"{result.model}: phases of the flow")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


__all__ = ["Analysis", "analyze", "find_plateaus", "fixed_point", "flow_of", "speeds", "summaries"]
