"""The documentation travels with the code (derive/docs.py, docs/).

Every link of README.md, docs/ and the ``--help`` texts stays inside the
repository (relative links resolve to files of the repository, and their
anchors to headings of the page; web links only to the paper's arxiv.org and
doi.org addresses), and the generated pages of docs/ are what the model files
produce: a changed parameter doc, or a changed model docstring, changes its
page and fails the check.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from derive import docs
from derive.models import MODEL_NAMES, get_model

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
URL = re.compile(r"https?://[^\s)>\]`'\"]+")
MD_PATH = re.compile(r"[\w./-]+\.md\b")
WEB_HOSTS = {"arxiv.org", "doi.org"}
OUTSIDE = ("../shared", "MODELS.md", "INTERFACE.md")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", page.read_text(encoding="utf-8"), re.M)}


def bad_links(text: str, base: Path) -> list[str]:
    """The links of a markdown text (relative to folder ``base``) that leave the repository."""
    bad = [f"{word}: outside the repository" for word in OUTSIDE if word in text]
    for url in URL.findall(text):
        if urlparse(url).hostname not in WEB_HOSTS:
            bad.append(f"{url}: web link other than the paper's")
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue  # checked above
        path, _, anchor = target.partition("#")
        dest = (base / path).resolve() if path else None
        if dest is not None and (not dest.is_relative_to(ROOT) or not dest.exists()):
            bad.append(f"{target}: no such file in the repository")
        elif anchor and dest is not None and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    return bad


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_stay_inside_the_repository(page):
    assert bad_links(page.read_text(encoding="utf-8"), page.parent) == []


def test_docs_have_the_pages_the_help_texts_name():
    for rel in ("README.md", "conventions.md", "interface.md", "simulation.md"):
        assert (ROOT / "docs" / rel).is_file(), rel
    for name in MODEL_NAMES:
        assert (ROOT / "docs" / docs.page_name(name)).is_file(), name
        # the section a model names (shown by `runtime models` and in generated/) is its page
        assert get_model(name).section == f"docs/{docs.page_name(name)}"


HELP = [
    ("runtime", []),
    ("runtime", ["flow"]),
    ("runtime", ["simulate"]),
    ("runtime", ["models"]),
    ("runtime", ["study"]),
    ("runtime", ["validate"]),
    ("runtime", ["sweep"]),
    ("derive", []),
    ("derive", ["regenerate"]),
    ("derive", ["check"]),
    ("derive", ["docs"]),
    ("derive", ["show"]),
]


def _main(package):
    if package == "runtime":
        from runtime.cli import main
    else:
        from derive.__main__ import main
    return main


@pytest.mark.parametrize("package, args", HELP, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_help_names_only_files_of_the_repository(package, args, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option, paths unbroken
    with pytest.raises(SystemExit) as exit_:
        _main(package)([*args, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert bad_links(text, ROOT) == []
    for path in MD_PATH.findall(text):
        # docs/models/MODEL.md stands for the page of each model
        for each in {path.replace("MODEL.md", f"{n}.md") for n in MODEL_NAMES}:
            assert (ROOT / each).is_file(), f"python -m {package} {' '.join(args)} --help names {each}"


def test_models_listing_names_the_docs_pages(capsys):
    from runtime.cli import main

    main(["models"])
    text = capsys.readouterr().out
    assert bad_links(text, ROOT) == []
    named = MD_PATH.findall(text)
    assert sorted(named) == sorted(f"docs/{docs.page_name(n)}" for n in MODEL_NAMES)
    assert all((ROOT / p).is_file() for p in named)


def test_bad_links_are_caught():
    assert bad_links("[c](../shared/MODELS.md)", ROOT / "docs")
    assert bad_links("[c](nosuch.md)", ROOT / "docs")
    assert bad_links("[c](conventions.md#no-such-heading)", ROOT / "docs")
    assert bad_links("see https://example.org/x", ROOT)
    assert bad_links("[c](../../README.md)", ROOT / "docs")  # above the repository root
    assert not bad_links("[c](conventions.md#2-gaussian-primitives)", ROOT / "docs")
    assert not bad_links("[p](https://arxiv.org/abs/2408.12545)", ROOT)


# ---------------------------------------------------------------------------
# the generated pages


def test_docs_are_up_to_date():
    ok, report = docs.check_docs()
    assert ok, report


def test_a_changed_parameter_doc_changes_the_page_and_fails_the_check(monkeypatch, tmp_path):
    from derive.models import scm

    page = (ROOT / "docs" / docs.page_name("scm")).read_text(encoding="utf-8")
    eta, *rest = scm.MODEL.params
    changed = dataclasses.replace(scm.MODEL, params=(dataclasses.replace(eta, doc="a changed doc"), *rest))
    monkeypatch.setattr(scm, "MODEL", changed)
    ok, report = docs.check_docs(models=("scm",))
    assert not ok
    assert "+| `eta` | 1 | >= 0 | a changed doc |" in report
    assert report.endswith("fix with: python -m derive docs scm")
    # writing the pages brings them up to date, in a copy of docs/
    out = tmp_path / "docs"
    docs.write_docs(out)
    assert docs.check_docs(out)[0]
    assert (out / docs.page_name("scm")).read_text(encoding="utf-8") != page


def test_a_changed_model_docstring_changes_the_page(monkeypatch):
    from derive.models import scm

    monkeypatch.setattr(scm, "__doc__", "Summary.\n\n## 3.1 Only this\n\nNew prose.\n")
    text = docs.render_model_page(scm.MODEL)
    assert "## 3.1 Only this\n\nNew prose.\n" in text and "## 3.2" not in text
    ok, report = docs.check_docs(models=("scm",))
    assert not ok and "+New prose." in report


def test_check_cli_reports_stale_docs(monkeypatch, capsys):
    from derive import regenerate
    from derive.__main__ import main
    from derive.models import scm

    monkeypatch.setattr(regenerate, "check", lambda models=None: (True, "generated/ is up to date"))
    sigma = scm.MODEL.params[1]
    params = (scm.MODEL.params[0], dataclasses.replace(sigma, default=0.5))
    changed = dataclasses.replace(scm.MODEL, params=params)
    monkeypatch.setattr(scm, "MODEL", changed)
    assert main(["check", "scm"]) == 1
    out = capsys.readouterr().out
    assert "docs/models/scm.md (committed)" in out and "docs/ is out of date" in out


def test_pages_are_the_same_under_another_hash_seed():
    import json
    import os
    import subprocess

    script = "import json, sys\nfrom derive.docs import render_docs\njson.dump(render_docs(), sys.stdout)\n"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == docs.render_docs()


def _math(text: str) -> list[str]:
    """The display ($$ ... $$) and inline ($ ... $) math of a markdown text."""
    blocks = re.findall(r"^\$\$\n(.*?)\n\$\$$", text, re.M | re.S)
    rest = re.sub(r"^\$\$\n.*?\n\$\$$", "", text, flags=re.M | re.S)
    rest = re.sub(r"`[^`]*`", "", rest)  # code spans hold no math
    return blocks + re.findall(r"\$([^$\n]+)\$", rest)


@pytest.mark.parametrize("page", markdown_files()[1:], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_math_is_well_formed(page):
    """Balanced braces and \\left/\\right, \\begin/\\end pairs, and no line break in inline math
    (markdown would eat the backslash), in every formula of the docs."""
    text = page.read_text(encoding="utf-8")
    assert text.count("$$") % 2 == 0
    for formula in _math(text):
        depth = 0
        for ch in re.sub(r"\\[{}]", "", formula):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            assert depth >= 0, formula
        assert depth == 0, formula
        assert len(re.findall(r"\\left\b", formula)) == len(re.findall(r"\\right\b", formula)), formula
        assert re.findall(r"\\begin\{(\w+)\}", formula) == re.findall(r"\\end\{(\w+)\}", formula), formula
    inline = re.findall(r"(?<!\$)\$([^$\n]+)\$(?!\$)", re.sub(r"`[^`]*`", "", text))
    assert not [f for f in inline if "\\\\" in f]


# a page of docs/ and the section numbers after it:
# "docs/models/anil.md 5.1-5.4", "docs/simulation.md section 6"
SECTION_REF = re.compile(
    r"(?<![\w/])(docs/[\w/]+\.md)(?:,? sections?)? ?(\d+(?:\.\d+)?)?(?:-(\d+(?:\.\d+)?))?"
)


def _numbers(page: Path) -> set[str]:
    """The section numbers of a page's headings (``## 5.3 Inner loop`` -> 5.3, ``## 7. The ...`` -> 7)."""
    heads = re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", page.read_text(encoding="utf-8"), re.M)
    return set(heads)


def test_section_references_in_the_sources_name_existing_sections():
    """A comment, docstring or help text citing ``docs/PAGE.md 5.3`` (or ``section 6``) names a
    page of the repository and a numbered heading on it."""
    sources = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("derive", "runtime", "tests", "benchmarks"):
        sources += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".jinja")]
    bad = []
    for src in sources:
        for m in SECTION_REF.finditer(src.read_text(encoding="utf-8")):
            page, numbers = ROOT / m.group(1), [n for n in m.group(2, 3) if n]
            if page.stem.isupper():
                continue  # a placeholder: MODEL.md, NAME.md stand for each model's page
            if not page.is_file():
                bad.append(f"{src.relative_to(ROOT)}: {m.group(0)} (no such page)")
            elif any(n not in _numbers(page) for n in numbers):
                bad.append(f"{src.relative_to(ROOT)}: {m.group(0)} (no such section)")
    assert bad == []
