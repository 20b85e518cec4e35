"""``python -m derive show MODEL``: the derived flow, as equations in the primitives."""

from __future__ import annotations

import sympy as sp

from .flow import FlowIR, build_flow
from .gaussian import cov_symbol
from .symbols import STUDENT, K, M, field_kind, lam, nu

_FIELD_TEX = {lam: r"\lambda", nu: r"\nu"}


def _rhs(component) -> sp.Expr:
    return sp.Add(*[t.as_expr() for t in component.terms]) if component.terms else sp.S.Zero


def _plain(expr: sp.Expr) -> sp.Expr:
    """Indices printed by their names, without their ranges."""
    return expr.xreplace({i: sp.Symbol(str(i.label)) for i in expr.atoms(sp.Idx)})


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


def latex(ir: FlowIR) -> str:
    m = ir.model
    out = [f"% model {m.name} ({m.section}), activation {ir.activation}", r"\begin{align}"]
    lines = []
    for c in ir.derivatives:
        idx = "".join(str(i.label) for i in c.free)
        lhs = rf"\frac{{d {c.name}_{{{idx}}}}}{{d\alpha}}"
        lines.append(rf"{lhs} &= {sp.latex(_plain(_rhs(c)))}")
    for c in ir.metrics:
        name = c.name.replace("eps", "\\epsilon")
        lines.append(rf"{name} &= {sp.latex(_plain(_rhs(c)))}")
    for d in ir.primitives:
        args = ", ".join(f"u_{a}" for a in d.labels)
        sub = {cov_symbol(a, b): sp.Symbol(f"C_{{{a}{b}}}") for a in d.labels for b in d.labels}
        lines.append(rf"\mathrm{{{d.name}}}({args}) &= {sp.latex(d.expr.xreplace(sub))}")
    out.append(" \\\\\n".join(lines))
    out.append(r"\end{align}")
    return "\n".join(out) + "\n"


def show(model: str, activation: str = "erf", as_latex: bool = False) -> str:
    ir = build_flow(model, activation)
    return latex(ir) if as_latex else text(ir)
