"""Command line of derive (docs/interface.md): regenerate, check, docs, show."""

from __future__ import annotations

import argparse
import sys
import time


def _error(message: str) -> int:
    """Report a user-facing failure as one line on stderr; exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _write_docs(models) -> int:
    """Write the generated pages of docs/ for ``models`` (default: all)."""
    from . import docs
    from .gaussian import UnreducibleExpectation

    try:
        names = docs.write_docs(models=models)
    except (UnreducibleExpectation, ValueError) as exc:
        return _error(str(exc))
    print(f"wrote {len(names)} pages to {docs.DOCS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_regen = sub.add_parser(
        "regenerate", help="rewrite generated/ and the generated pages of docs/ from the model definitions"
    )
    p_check = sub.add_parser(
        "check", help="exit 1 with a diff if generated/ or docs/ differs from a fresh rendering"
    )
    p_docs = sub.add_parser(
        "docs", help="rewrite the generated pages of docs/ (docs/README.md, docs/models/MODEL.md)"
    )
    for p in (p_regen, p_check, p_docs):
        p.add_argument("models", nargs="*", metavar="MODEL", help="only these models (default: all)")
    p_show = sub.add_parser("show", help="print the derived flow of a model")
    p_show.add_argument("model")
    p_show.add_argument("--activation", default="erf", help="erf (default) or linear")
    p_show.add_argument("--latex", action="store_true", help="print LaTeX instead of text")
    args = parser.parse_args(argv)

    from .gaussian import UnreducibleExpectation
    from .models import MODEL_NAMES
    from .regenerate import DeriveError

    asked = [args.model] if args.command == "show" else args.models
    for name in asked:
        if name not in MODEL_NAMES:
            return _error(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    models = tuple(dict.fromkeys(asked)) or None

    if args.command == "regenerate":
        from . import regenerate as regen

        t0 = time.perf_counter()
        try:
            names = regen.regenerate(
                progress=lambda s: print(f"  deriving {s}", file=sys.stderr), models=models
            )
        except DeriveError as exc:
            return _error(str(exc))
        dt = time.perf_counter() - t0
        print(f"wrote {len(names)} files to {regen.GENERATED} in {dt:.1f} s")
        return _write_docs(models)
    if args.command == "docs":
        return _write_docs(models)
    if args.command == "check":
        from . import docs
        from . import regenerate as regen

        try:
            ok, report = regen.check(models=models)
            docs_ok, docs_report = docs.check_docs(models=models)
        except DeriveError as exc:
            return _error(str(exc))
        except (UnreducibleExpectation, ValueError) as exc:
            return _error(str(exc))
        print(report)
        print(docs_report)
        return 0 if ok and docs_ok else 1
    if args.command == "show":
        from .show import show

        try:
            print(show(args.model, args.activation, args.latex), end="")
        except (UnreducibleExpectation, ValueError) as exc:
            return _error(f"model {args.model}, activation {args.activation}: {exc}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
