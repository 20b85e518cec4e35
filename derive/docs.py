"""``python -m derive docs``: the pages of docs/ that are generated from the model files.

Each model's page (docs/models/MODEL.md) is its module docstring (the prose:
equations, conventions, scalings) followed by what the model file declares,
printed from the very objects the engine derives from: the parameter table from
its ``Param``s, its readouts and task quantities, the covariance blocks of its
fields, its network, loss and update rules, its metrics, and the derived flow of
``python -m derive show MODEL --latex``. The index (docs/README.md) lists the
models. The other pages of docs/ are written by hand and are not touched here.

Like generated/, the pages are a pure function of the sources: ``python -m
derive check`` compares docs/ with a fresh rendering, byte for byte.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path

import sympy as sp

from .codegen import ROOT, environment
from .flow import build_flow
from .model import Model, Param
from . import models as models_package
from .models import MODEL_NAMES, get_model, model_file
from .show import latex_equations, signed, tex, tex_name
from .regenerate import differences
from .symbols import STUDENT, K, field_doc, field_kind, zeta

DOCS = ROOT / "docs"
TEMPLATES = Path(__file__).resolve().parent / "templates" / "docs"
INDEX = "README.md"


def page_name(model: str) -> str:
    """The page of a model, relative to docs/."""
    return f"models/{model}.md"


def _number(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def allowed(p: Param) -> str:
    """A parameter's allowed values in words."""
    if p.choices is not None:
        return " or ".join(_number(c) for c in p.choices)
    kind = "integer " if p.integer else ""
    words = f"{kind}{p.range}" if (p.minimum is not None or p.maximum is not None) else f"any {kind}value"
    return words + (", or inf" if p.allow_inf else "")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def _field(f, i) -> str:
    return f"{tex_name(str(f))}_{{{i}}}"


def _covariance(model: Model) -> list[str]:
    out = []
    for (f1, f2), entry in model.covariance.items():
        i = sp.Symbol("i" if field_kind(f1) == STUDENT else "m")
        j = sp.Symbol("j" if field_kind(f2) == STUDENT else "n")
        out.append(rf"\mathrm{{Cov}}({_field(f1, i)}, {_field(f2, j)}) = {tex(entry(i, j))}")
    return out


def _fields(model: Model) -> list[dict]:
    return [
        {
            "tex": _field(f, "i" if field_kind(f) == STUDENT else "m"),
            "name": str(f),
            "doc": field_doc(f),
            "rows": f"{sp.sstr(at)} .. {sp.sstr(at + n - 1)}",
            "count": "K" if n == K else "M",
        }
        for f, at, n in model.layout
    ]


def _collapse(expr: sp.Expr) -> sp.Expr:
    """``sum_p delta_{k p} F(p)`` -> ``F(k)``: the sums a derivative by ``x[k]`` leaves."""

    def fold(e):
        if len(e.limits) != 1 or not isinstance(e.function, sp.Mul):
            return e
        (p, _, _), = e.limits
        for d in e.function.atoms(sp.KroneckerDelta):
            if p in d.args and d in e.function.args:
                other = d.args[0] if d.args[1] == p else d.args[1]
                return (e.function / d).xreplace({p: other})
        return e

    return expr.replace(lambda e: isinstance(e, sp.Sum), fold)


def _at_k(expr: sp.Expr, k: sp.Idx) -> str:
    """LaTeX of a per-unit gradient with its free index printed as ``k``."""
    return tex(_collapse(expr).xreplace({k: sp.Symbol("k")}))


def _updates(model: Model) -> list[str]:
    """The update rules as declared, each one LaTeX line."""
    loss = model.sample_loss
    first = model.first_layer
    (k,), grad = first.sample_gradient(loss)
    shrink = "" if first.decay == 0 else rf"\left(1 - \frac{{{tex(first.decay)}}}{{N}}\right) "
    if first.batch == 1:
        step = r"G_k\, x"
    else:
        step = rf"\frac{{1}}{{{tex(first.batch)}}}\sum_{{\mu}} G_k^{{(\mu)}}\, x^{{(\mu)}}"
    out = [
        rf"w_k \leftarrow {shrink}w_k - \frac{{{tex(first.rate)}}}{{\sqrt{{N}}}}\, {step},"
        rf"\qquad G_k = \frac{{\partial L}}{{\partial \lambda_k}} = {_at_k(grad, k)}"
    ]
    if first.meta is not None:
        ad = tex_name(first.meta.inner.adapted.name)
        out.append(
            rf"w_k \mathrel{{+}}= - {tex(first.rate)}\, {tex(first.meta.weight)} \sum_j "
            rf"\frac{{\partial L}}{{\partial {ad}_j}} \frac{{\partial {ad}_j}}{{\partial w_k}},\qquad "
            rf"\frac{{\partial {ad}_j}}{{\partial w_k}} = \frac{{1}}{{N}}\Big[\sum_l "
            rf"\frac{{\partial {ad}_j}}{{\partial Q_{{kl}}}} (1 + \delta_{{kl}})\, w_l + \sum_m "
            rf"\frac{{\partial {ad}_j}}{{\partial R_{{km}}}} B_m\Big]"
        )
    for r in model.readout_updates:
        c = tex_name(r.vector.name)
        (kk,), h = r.sample_gradient(loss)
        decay = "" if r.decay == 0 else rf"\left(1 - \frac{{{tex(r.decay)}}}{{N}}\right) "
        out.append(
            rf"{c}_k \leftarrow {decay}{c}_k - \frac{{{tex(r.rate)}}}{{N}}\, H_k,"
            rf"\qquad H_k = {_at_k(h, kk)}"
        )
    return out


def _inner_loop(model: Model) -> dict | None:
    inner = model.inner_loop
    if inner is None:
        return None
    c = sp.IndexedBase("c")
    return {
        "adapted": tex_name(inner.adapted.name),
        "start": tex_name(inner.start.name),
        "steps": tex(inner.steps),
        "rate": tex(inner.rate),
        "loss": tex(inner.loss(c)),
        "regulariser": tex(inner.regulariser(c)),
        "optimal": tex_name(inner.optimal.name) if inner.optimal is not None else None,
        "second_order": tex(inner.second_order),
    }


def _task_vectors(model: Model) -> list[dict]:
    out = []
    for t in model.task_vectors:
        idx = [sp.Symbol("k" if kind == STUDENT else "m") for kind in t.kinds]
        name = tex_name(t.name)
        sub = ",".join(str(i) for i in idx)
        law = tex(t.law(*idx)) if t.law is not None else None
        out.append({"name": t.name, "tex": f"{name}_{{{sub}}}", "doc": t.doc, "law": law})
    return out


def _activation(model: Model) -> str:
    """The activation the page shows the derived flow for: erf when the model has it."""
    return "erf" if "erf" in model.activations else sorted(model.activations)[0]


def model_context(model: Model, source: str | None = None) -> dict:
    act = _activation(model)
    ir = build_flow(model, act)
    equations = [
        {"lhs": lhs, "first": terms[0], "rest": [signed(t) for t in terms[1:]]}
        for lhs, terms in latex_equations(ir)
    ]
    n_flow = len(ir.derivatives)
    n_metrics = len(ir.metrics)
    return {
        "name": model.name,
        "doc": model.doc,
        "model_file": source or model_file(model.name),
        "prose": _prose(model),
        "params": [
            {"name": p.name, "default": _number(p.default), "allowed": _cell(allowed(p)), "doc": _cell(p.doc)}
            for p in model.params
        ],
        "vectors": [
            {
                "name": v.name,
                "over": "student units (K), evolves" if v.over == STUDENT else "teacher units (M), constant",
                "default": _number(v.default),
                "doc": _cell(v.doc),
            }
            for v in model.vectors
        ],
        "fields": _fields(model),
        "covariance": _covariance(model),
        "student_output": tex(model.student_output),
        "teacher_output": tex(model.teacher_output),
        "noise": tex(model.noise * zeta),
        "loss": tex(model.sample_loss),
        "updates": _updates(model),
        "inner": _inner_loop(model),
        "task_vectors": _task_vectors(model),
        "metrics": [{"name": tex_name(n).replace("eps", r"\epsilon"), "integrand": tex(e)}
                    for n, e in model.metrics.items()],
        "flow_requires": [
            {"name": n, "value": _number(v), "why": why,
             "when": ", ".join(f"{k} = {_number(x)}" for k, x in (w[0] if w else {}).items())}
            for n, v, why, *w in model.flow_requires
        ],
        "activation": act,
        "flow": equations[:n_flow],
        "metric_flows": equations[n_flow : n_flow + n_metrics],
        "primitives": equations[n_flow + n_metrics :],
    }


def _prose(model: Model) -> str:
    """The module docstring of a registered model's file from its first markdown
    heading on: the hand-written part of its page (empty for a model outside
    the registry)."""
    if model.name not in MODEL_NAMES:
        return ""
    doc = inspect.getdoc(importlib.import_module(f"{models_package.__name__}.{model.name}")) or ""
    lines = doc.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("#")), len(lines))
    return "\n".join(lines[first:]).strip()


def render_model_page(model: Model, source: str | None = None, prose: str | None = None) -> str:
    """The page of a ``Model`` object (registered or not)."""
    ctx = model_context(model, source)
    if prose is not None:
        ctx["prose"] = prose
    return environment(TEMPLATES).get_template("model.md.jinja").render(**ctx)


def render_index(models=MODEL_NAMES) -> str:
    rows = [{"name": n, "doc": get_model(n).doc, "page": page_name(n)} for n in models]
    return environment(TEMPLATES).get_template("index.md.jinja").render(models=rows)


def render_docs(models=None) -> dict[str, str]:
    """Path relative to docs/ -> text of every generated page of ``models``
    (default: all), the index included."""
    names = MODEL_NAMES if models is None else models
    files = {INDEX: render_index()}
    for n in names:
        files[page_name(n)] = render_model_page(get_model(n))
    return dict(sorted(files.items()))


def _owned(rel: str, models) -> bool:
    """Whether docs/``rel`` is a generated page of the run over ``models``:
    the index and the model pages (with every model, any page under models/)."""
    if rel == INDEX:
        return True
    if models is None:
        return rel.startswith("models/")
    return rel in {page_name(m) for m in models}


def _existing(out: Path, models) -> set[str]:
    if not out.is_dir():
        return set()
    have = {p.relative_to(out).as_posix() for p in out.rglob("*.md")}
    return {r for r in have if _owned(r, models)}


def write_docs(out: Path = DOCS, models=None) -> list[str]:
    """Write the generated pages of ``models`` (default: all) into ``out``; with
    every model, a page under models/ that no model produces is removed."""
    files = render_docs(models)
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="\n", encoding="utf-8") as fh:
            fh.write(text)
    for rel in _existing(out, models) - set(files):
        (out / rel).unlink()
    return list(files)


def check_docs(out: Path = DOCS, models=None) -> tuple[bool, str]:
    """Compare the generated pages of ``models`` (default: all) in ``out`` with a fresh rendering."""
    files = render_docs(models)
    have = _existing(out, models)
    report = differences(files, have, out, "docs")
    if report:
        fix = "python -m derive docs" + "".join(f" {m}" for m in models or ())
        report.append(f"docs/ is out of date; fix with: {fix}")
        return False, "\n".join(report)
    return True, f"docs/ is up to date ({len(files)} generated pages)"

