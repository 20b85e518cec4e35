"""The vocabulary of model files (docs/conventions.md section 1).

A model file writes its network with these sympy objects:

- ``K``, ``M``: numbers of student and teacher units;
- ``student_index(name)`` / ``teacher_index(name)``: summation indices over
  ``0..K-1`` and ``0..M-1``;
- ``lam[k]`` and ``nu[m]``: the local fields of student and teacher units;
- ``nu_task[m]``: the teacher fields of the current task (meta-learning,
  docs/models/anil.md 5.1), which differ from ``nu`` when the task's features vary (``eps_B > 0``);
- ``field_family(name, kind, doc)``: a further family of fields, declared once
  (for example in a model file) with the kind of unit that indexes it; a model
  lists the families it uses in ``Model.fields``, and their rows in the
  covariance follow that order (``Model.layout``);
- ``g``: the activation, left abstract here (``g.diff`` gives ``gp`` = g',
  ``gp.diff`` gives ``gpp``); the derivation substitutes a concrete activation
  only when it evaluates Gaussian expectations;
- ``zeta``: a standard Gaussian label noise, independent of every field.

The kind of an index (student or teacher) is read from its range, so that
``lam[k]`` with a teacher index is caught as an error.
"""

from __future__ import annotations

import sympy as sp

K = sp.Symbol("K", integer=True, positive=True)
M = sp.Symbol("M", integer=True, positive=True)

STUDENT = "student"
TEACHER = "teacher"

# every declared field family (by name), with the kind of unit that indexes it and its doc
_FIELDS: dict[str, tuple[str, str]] = {}


def field_family(name: str, kind: str, doc: str) -> sp.IndexedBase:
    """Declare a family of local fields indexed by student or teacher units; the
    one place its kind is written (read by ``field_kind``)."""
    if kind not in (STUDENT, TEACHER):
        raise ValueError(f"field family {name!r}: kind must be {STUDENT!r} or {TEACHER!r}, got {kind!r}")
    if name in _FIELDS and _FIELDS[name][0] != kind:
        raise ValueError(f"field family {name!r} is already declared with kind {_FIELDS[name][0]!r}")
    _FIELDS[name] = (kind, doc)
    return sp.IndexedBase(name)


def field_kind(base) -> str:
    """``STUDENT`` or ``TEACHER``: the kind of unit that indexes the field family ``base``."""
    try:
        return _FIELDS[str(base)][0]
    except KeyError:
        raise ValueError(f"{base} is not a declared field family") from None


def field_doc(base) -> str:
    return _FIELDS[str(base)][1]


lam = field_family("lambda", STUDENT, "student fields w_k . x / sqrt(N)")
nu = field_family("nu", TEACHER, "teacher fields B_m . x / sqrt(N)")
nu_task = field_family("nu_task", TEACHER, "the current task's teacher fields (docs/models/anil.md 5.1)")
zeta = sp.Symbol("zeta", real=True)


def is_field(e) -> bool:
    """A local field of a declared family: ``lam[k]``, ``nu[m]``, ``nu_task[m]``, ..."""
    return isinstance(e, sp.Indexed) and str(e.base) in _FIELDS


class gpp(sp.Function):
    """Second derivative of the activation, g''(z)."""

    nargs = 1


class gp(sp.Function):
    """Derivative of the activation, g'(z)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return gpp(self.args[0])


class g(sp.Function):
    """The activation g(z); made concrete by an Activation at expectation time."""

    nargs = 1

    def fdiff(self, argindex=1):
        return gp(self.args[0])


def student_index(name: str) -> sp.Idx:
    """A summation index over the K student units."""
    return sp.Idx(name, K)


def teacher_index(name: str) -> sp.Idx:
    """A summation index over the M teacher units."""
    return sp.Idx(name, M)


def index_kind(idx: sp.Idx) -> str:
    """``STUDENT`` or ``TEACHER``, from the index range."""
    upper = idx.upper
    if upper == K - 1:
        return STUDENT
    if upper == M - 1:
        return TEACHER
    raise ValueError(f"index {idx} has range {idx.lower}..{upper}; expected 0..K-1 or 0..M-1")


def student_sum(expr: sp.Expr, idx: sp.Idx) -> sp.Sum:
    """sum over the student units, ``idx = 0..K-1``."""
    if index_kind(idx) != STUDENT:
        raise ValueError(f"student_sum needs a student index, got {idx}")
    return sp.Sum(expr, (idx, 0, K - 1))


def teacher_sum(expr: sp.Expr, idx: sp.Idx) -> sp.Sum:
    """sum over the teacher units, ``idx = 0..M-1``."""
    if index_kind(idx) != TEACHER:
        raise ValueError(f"teacher_sum needs a teacher index, got {idx}")
    return sp.Sum(expr, (idx, 0, M - 1))


def rename_bound(expr: sp.Expr, prefix: str = "_b") -> sp.Expr:
    """Rename every summation index to a fresh name (``_b0``, ``_b1``, ...), so
    that differentiating by ``x[k]`` can never confuse a model file's bound
    index with a free index of the same name."""
    counter = iter(range(10**6))

    def walk(e):
        if isinstance(e, sp.Sum):
            body = walk(e.function)
            limits = []
            for idx, lo, hi in e.limits:
                new = sp.Idx(f"{prefix}{next(counter)}", (idx.lower, idx.upper))
                body = body.xreplace({idx: new})
                limits.append((new, lo, hi))
            return sp.Sum(body, *limits)
        if e.args and not isinstance(e, (sp.Indexed, sp.Idx)):
            return e.func(*[walk(a) for a in e.args])
        return e

    return walk(sp.sympify(expr))


class finite(sp.logic.boolalg.BooleanFunction):
    """``finite(n)``: true when the support-set size ``n`` is finite. It guards the
    terms that vanish with a population support loss (``n = inf``, where their task
    arrays are zero), so that codegen runs them only under ``if math.isfinite(n)``
    (derive/flow.py ``average``, derive/codegen.py ``_guarded``). A number decides
    it at once; a parameter stays a condition, whatever sympy assumes of it."""

    @classmethod
    def eval(cls, n):
        if n.is_number:
            return sp.true if n.is_finite else sp.false
        return None
