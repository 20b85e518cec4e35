"""Forward-mode differentiation of a generated right-hand side (the Jacobian that
``runtime.analyze`` linearises the flow with).

The kernel module in ``generated/`` is executed a second time, as plain Python,
with its numbers replaced by dual numbers ``value + tangent . epsilon`` (one
tangent entry per direction): ``numba.njit`` becomes the identity, ``math`` a
version of its functions that carries derivatives, and ``numpy``'s allocations
arrays of Python objects. Every operation of the generated code then carries
its exact derivative along (the chain rule, applied by the operators), so the
Jacobian is that of the very code that integrates the flow, to round-off, and no
formula is typed here: only the derivatives of the elementary functions the
generated code calls (arithmetic, and sqrt, exp, log, erf, asin differentiated by
sympy; copysign).
"""

from __future__ import annotations

import builtins
import contextlib
import math
import types
from functools import lru_cache
from pathlib import Path

import numpy as np


class Dual:
    """``v + d . epsilon`` with ``d`` an array of tangents (``epsilon_i epsilon_j = 0``)."""

    __slots__ = ("v", "d")
    __array_ufunc__ = None  # numpy scalars defer to Dual's reflected operators

    def __init__(self, v: float, d: np.ndarray):
        self.v = float(v)
        self.d = d

    def __repr__(self):
        return f"Dual({self.v!r}, {self.d!r})"

    def __add__(self, o):
        if isinstance(o, Dual):
            return Dual(self.v + o.v, self.d + o.d)
        return Dual(self.v + o, self.d)

    __radd__ = __add__

    def __sub__(self, o):
        if isinstance(o, Dual):
            return Dual(self.v - o.v, self.d - o.d)
        return Dual(self.v - o, self.d)

    def __rsub__(self, o):
        return Dual(o - self.v, -self.d)

    def __mul__(self, o):
        if isinstance(o, Dual):
            return Dual(self.v * o.v, self.d * o.v + o.d * self.v)
        return Dual(self.v * o, self.d * o)

    __rmul__ = __mul__

    def __truediv__(self, o):
        if isinstance(o, Dual):
            q = self.v / o.v
            return Dual(q, (self.d - o.d * q) / o.v)
        return Dual(self.v / o, self.d / o)

    def __rtruediv__(self, o):
        q = o / self.v
        return Dual(q, self.d * (-q / self.v))

    def __pow__(self, e):
        if isinstance(e, Dual):
            raise TypeError("a power with a dual exponent is not used by the generated code")
        if e == 2:
            return Dual(self.v * self.v, self.d * (2.0 * self.v))
        return Dual(self.v**e, self.d * (e * self.v ** (e - 1)))

    def __rpow__(self, base):
        val = base**self.v
        return Dual(val, self.d * (val * math.log(base)))

    def __neg__(self):
        return Dual(-self.v, -self.d)

    def __pos__(self):
        return self

    def __abs__(self):
        return -self if self.v < 0 else self

    def __float__(self):
        return self.v

    # comparisons (the branches of the generated code) by value
    def __lt__(self, o):
        return self.v < _value(o)

    def __le__(self, o):
        return self.v <= _value(o)

    def __gt__(self, o):
        return self.v > _value(o)

    def __ge__(self, o):
        return self.v >= _value(o)

    def __eq__(self, o):
        return self.v == _value(o)

    def __ne__(self, o):
        return self.v != _value(o)

    __hash__ = None


def _value(x):
    return x.v if isinstance(x, Dual) else x


def _unary(f, df):
    def g(x):
        if isinstance(x, Dual):
            return Dual(f(x.v), x.d * df(x.v))
        return f(x)

    return g


def _copysign(x, y):
    sign = math.copysign(1.0, _value(y))
    if isinstance(x, Dual):
        return x * (sign * math.copysign(1.0, x.v))
    return math.copysign(x, _value(y))


def _derivative_rules() -> dict:
    """Dual versions of the elementary functions the generated code calls, their
    derivatives by sympy (no formula typed here)."""
    import sympy as sp

    z = sp.Symbol("z")
    out = {"copysign": _copysign}
    for name in ("sqrt", "exp", "log", "erf", "asin"):
        df = sp.lambdify(z, sp.diff(getattr(sp, name)(z), z), "math")
        out[name] = _unary(getattr(math, name), df)
    return out


_MATH = _derivative_rules()


def _math_module() -> types.ModuleType:
    """``math`` with dual-aware versions of the functions the generated code calls;
    any other function of ``math`` given a dual is an error, not a silent value."""
    mod = types.ModuleType("math")
    for name in dir(math):
        if not name.startswith("_"):
            setattr(mod, name, getattr(math, name))
    for name in dir(math):
        f = getattr(math, name)
        if callable(f) and not name.startswith("_") and name not in _MATH:
            setattr(mod, name, _refuse_dual(f, name))
    for name, f in _MATH.items():
        setattr(mod, name, f)
    return mod


def _refuse_dual(f, name):
    def g(*args):
        if any(isinstance(a, Dual) for a in args):
            raise TypeError(f"math.{name} has no derivative rule in runtime/tangent.py")
        return f(*args)

    return g


def _floating(dtype) -> bool:
    return dtype is None or dtype is float or np.dtype(dtype).kind == "f"


def _numpy_module() -> types.SimpleNamespace:
    """``numpy`` whose floating allocations are object arrays (holding floats or duals)."""

    def empty(shape, dtype=None):
        if _floating(dtype):
            out = np.empty(shape, dtype=object)
            out.fill(0.0)
            return out
        return np.zeros(shape, dtype)

    def empty_like(a, dtype=None):
        return empty(np.shape(a), a.dtype if dtype is None and a.dtype != object else dtype)

    def refuse(name):
        def f(*args, **kw):
            raise TypeError(f"numpy.{name} has no derivative rule in runtime/tangent.py")

        return f

    linalg = types.SimpleNamespace(
        **{n: refuse(f"linalg.{n}") for n in dir(np.linalg) if not n.startswith("_")}
    )
    ns = types.SimpleNamespace(**{n: getattr(np, n) for n in dir(np) if not n.startswith("_")})
    ns.empty = ns.zeros = empty
    ns.empty_like = ns.zeros_like = empty_like
    ns.linalg = linalg
    return ns


def _njit(*args, **kw):
    if len(args) == 1 and callable(args[0]) and not kw:
        return args[0]
    return lambda f: f


# objmode (a block numba runs in Python, derive/meta.py Outlined) is plain Python here
_NUMBA = types.SimpleNamespace(njit=_njit, jit=_njit, prange=range, objmode=contextlib.nullcontext)


@lru_cache(maxsize=None)
def plain_module(path: str) -> types.SimpleNamespace:
    """The generated module at ``path`` executed as plain Python over dual numbers."""
    source = Path(path).read_text()
    stubs = {"numba": _NUMBA, "math": _math_module(), "numpy": _numpy_module()}

    def importer(name, globals=None, locals=None, fromlist=(), level=0):
        if name in stubs:
            return stubs[name]
        return builtins.__import__(name, globals, locals, fromlist, level)

    namespace = {"__builtins__": {**vars(builtins), "__import__": importer}, "__name__": "tangent_of_kernel"}
    exec(compile(source, path, "exec"), namespace)
    return types.SimpleNamespace(**namespace)


def jacobian_full(kernel, y: np.ndarray, c: np.ndarray, p: np.ndarray, K: int, M: int, directions):
    """``(f, J)``: the kernel's right-hand side at ``y`` and its derivatives along each
    column of ``directions`` (size(y), n): ``J = d rhs / d y . directions`` (size(y), n)."""
    plain = plain_module(kernel.module.__file__)
    directions = np.asarray(directions, dtype=np.float64)
    yd = np.empty(y.size, dtype=object)
    for i in range(y.size):
        yd[i] = Dual(y[i], directions[i].copy())
    cd = np.array([float(x) for x in c] + [0.0], dtype=object)[: c.size]
    pd = np.array([float(x) for x in p] + [0.0], dtype=object)[: p.size]
    dy = np.empty(y.size, dtype=object)
    dy.fill(0.0)
    plain.rhs(yd, cd, pd, K, M, dy)
    n = directions.shape[1]
    f = np.array([_value(x) for x in dy])
    J = np.array([x.d if isinstance(x, Dual) else np.zeros(n) for x in dy]).reshape(y.size, n)
    return f, J
