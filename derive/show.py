"""``python -m derive show MODEL``: the derived flow, as equations in the primitives."""

from __future__ import annotations

import sympy as sp

from .flow import FlowIR, build_flow
from .gaussian import cov_symbol
from .symbols import STUDENT, K, M, field_kind, lam, nu

_FIELD_TEX = {lam: r"\lambda", nu: r"\nu"}


def _lhs(component, derivative=True) -> str:
    idx = ",".join(str(i.label) for i in component.free)
    name = f"{component.name}[{idx}]" if idx else component.name
    return f"d{name}/dalpha" if derivative else name


def text(ir: FlowIR) -> str:
    m = ir.model
    out = [
        f"model {m.name}: {m.doc} ({m.section}), activation {ir.activation}",
        "fields: "
        + ", ".join(f"{f}[0..{n}-1] (rows {at}..{at + n}-1 of C)" for f, at, n in m.layout),
        "covariance of the fields: " + "; ".join(_block(f1, f2, e) for (f1, f2), e in m.covariance.items()),
        "a primitive's arguments are fields, e.g. I3(lambda[k], nu[n], lambda[j0]).",
        "",
        "flow:",
    ]
    for c in ir.derivatives:
        terms = c.terms or ()
        out.append(f"  {_lhs(c)} =")
        if not terms:
            out.append("      0")
        for t in terms:
            out.append(f"      + {sp.sstr(t.as_expr())}")
    out.append("")
    out.append("metrics:")
    for c in ir.metrics:
        out.append(f"  {c.name} =")
        for t in c.terms:
            out.append(f"      + {sp.sstr(t.as_expr())}")
    out.append("")
    if ir.program is not None:
        out.append("task program (derive/meta.py: means mu_X and loadings L_X over the task's draws):")
        out += _program(ir.program.statements, "  ")
        out.append("")
    out.append("primitives (C_xy = covariance of u_x and u_y):")
    for d in ir.primitives:
        args = ", ".join(f"u_{a}" for a in d.labels)
        out.append(f"  {d.name}({args}) = E[{_factors(d)}]")
        out.append(f"      = {sp.sstr(d.expr)}")
        for line in d.provenance:
            out.append(f"      by: {line}")
    return "\n".join(out) + "\n"


def _program(stmts, pad: str) -> list[str]:
    from . import meta

    out = []
    for st in stmts:
        if isinstance(st, meta.Assign):
            rhs = " + ".join(sp.sstr(t.as_expr()) for t in st.component.terms) or "0"
            out.append(f"{pad}{st.out}[{', '.join(st.target)}] = {rhs}")
        elif isinstance(st, meta.Let):
            out.append(f"{pad}{st.target} = {st.source}")
        elif isinstance(st, meta.Repeat):
            out.append(f"{pad}repeat {st.var} = 0 .. {sp.sstr(st.count)} - 1:")
            out += _program(st.body, pad + "    ")
        elif isinstance(st, meta.Guard):
            out.append(f"{pad}if {st.cond if isinstance(st.cond, str) else sp.sstr(st.cond)}:")
            out += _program(st.body, pad + "    ")
        elif isinstance(st, meta.Directions):
            what = {"Q": "Q_ab (a <= b)", "R": "R_ab", "start": "the start's entry a_"}[st.kind]
            out.append(f"{pad}for each direction along {what} (dC = its covariance perturbation):")
            out += _program(st.body, pad + "    ")
    return out


def _block(f1, f2, entry) -> str:
    i = sp.Idx("i", K if field_kind(f1) == STUDENT else M)
    j = sp.Idx("j", K if field_kind(f2) == STUDENT else M)
    return f"Cov({f1}[i], {f2}[j]) = {sp.sstr(entry(i, j))}"


def _factors(d) -> str:
    sym = {"g": "g", "gp": "g'", "gpp": "g''", "id": ""}
    return " ".join(f"{sym[k]}(u_{a})" if sym[k] else f"u_{a}" for k, a in zip(d.kinds, d.labels))


# how names of model files and of the task program print in LaTeX (other names
# print as sympy prints them); shared by ``show --latex`` and the docs pages
_TEX_NAMES = {
    "lambda": r"\lambda",
    "nu": r"\nu",
    "nu_task": r"\tilde{\nu}",
    "v_task": r"\tilde{v}",
    "vs": r"v^{*}",
    "vbar": r"\bar{v}",
    "adapted": r"a'",
    "a_best": r"a^{*}",
    "eps_B": r"\epsilon_{B}",
    "eta_a": r"\eta_{a}",
    "eta_v": r"\eta_{v}",
    "alpha_in": r"\alpha_{\mathrm{in}}",
    "n_q": r"n_{q}",
    "n_s": r"n_{s}",
    "order": r"\mathrm{order}",
}
_DERIVATIVE = {"dQ": "Q", "dR": "R", "da": "a"}


def tex_name(name: str) -> str:
    """LaTeX of a name: a model's symbols (``nu_task`` -> tilde nu), the task program's
    moments (``mu_adapted`` -> mu_{a'}, ``S_adapted__v_task`` -> Sigma_{a' tilde v}) and the
    inner loop's sensitivities (``adapted_dQ`` -> partial_Q a')."""
    if name in _TEX_NAMES:
        return _TEX_NAMES[name]
    if name.startswith("mu_"):
        return rf"\mu_{{{tex_name(name[3:])}}}"
    if name.startswith("S_") and "__" in name:
        x, y = name[2:].split("__", 1)
        return rf"\Sigma_{{{tex_name(x)}\,{tex_name(y)}}}"
    head, _, tail = name.rpartition("_")
    if head and tail in _DERIVATIVE:
        return rf"\partial_{{{_DERIVATIVE[tail]}}}{tex_name(head)}"
    return sp.latex(sp.Symbol(name))


class _Iverson(sp.Function):
    """``[cond]``: 1 where ``cond`` holds, else 0, printed as an Iverson bracket."""

    nargs = 1

    def _latex(self, printer):
        return rf"[{printer._print(self.args[0])}]"


def _iverson(expr: sp.Expr) -> sp.Expr:
    """``Piecewise((v, cond), (0, True))`` as ``v [cond]``, which reads in one line."""

    def fold(e):
        if len(e.args) == 2 and e.args[1] == (0, True):
            value, cond = e.args[0]
            return value * _Iverson(cond)
        return e

    return expr.replace(lambda e: isinstance(e, sp.Piecewise), fold)


def tex(expr) -> str:
    """LaTeX of a model or flow expression: indices by their names without their
    ranges (a model file's bound indices ``_b0, _b1`` as ``p_0, p_1``), and the
    names of ``tex_name``."""
    expr = sp.sympify(expr)
    idx = {}
    for i in expr.atoms(sp.Idx):
        label = str(i.label)
        if label.startswith("_b"):
            label = f"p_{label[2:]}"
        idx[i] = sp.Symbol(label)
    expr = _iverson(expr.xreplace(idx))
    names = {s: tex_name(s.name) for s in expr.atoms(sp.Symbol) if tex_name(s.name) != sp.latex(s)}
    out = sp.latex(expr, symbol_names=names)
    return out.replace(r"\operatorname{gpp}", "g''").replace(r"\operatorname{gp}", "g'")


def latex_equations(ir: FlowIR) -> list[tuple[str, list[str]]]:
    """(left-hand side, LaTeX of each term) of every flow component, metric and
    primitive of ``ir``: what ``show --latex`` prints and the docs pages show."""
    out = []
    for c in ir.derivatives:
        idx = "".join(str(i.label) for i in c.free)
        lhs = rf"\frac{{d {tex_name(c.name)}_{{{idx}}}}}{{d\alpha}}"
        out.append((lhs, [tex(t.as_expr()) for t in c.terms] or ["0"]))
    for c in ir.metrics:
        name = tex_name(c.name).replace("eps", "\\epsilon")
        out.append((name, [tex(t.as_expr()) for t in c.terms] or ["0"]))
    for d in ir.primitives:
        args = ", ".join(f"u_{a}" for a in d.labels)
        sub = {cov_symbol(a, b): sp.Symbol(f"C_{{{a}{b}}}") for a in d.labels for b in d.labels}
        out.append((rf"\mathrm{{{d.name}}}({args})", [sp.latex(d.expr.xreplace(sub))]))
    return out


def signed(term: str) -> str:
    """A term after the first one, with its sign: ``+ t`` or ``- t``."""
    return f"- {term[1:].lstrip()}" if term.startswith("-") else f"+ {term}"


def latex(ir: FlowIR) -> str:
    m = ir.model
    out = [f"% model {m.name} ({m.section}), activation {ir.activation}", r"\begin{align}"]
    lines = []
    for lhs, terms in latex_equations(ir):
        first, rest = terms[0], terms[1:]
        lines.append(rf"{lhs} &= {first}" + "".join(" \\\\\n&\\quad " + signed(t) for t in rest))
    out.append(" \\\\\n".join(lines))
    out.append(r"\end{align}")
    return "\n".join(out) + "\n"


def show(model: str, activation: str = "erf", as_latex: bool = False) -> str:
    ir = build_flow(model, activation)
    return latex(ir) if as_latex else text(ir)
