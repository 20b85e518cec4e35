"""Command line of derive (INTERFACE.md): regenerate, check, show."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("regenerate", help="rewrite generated/ from the model definitions")
    sub.add_parser("check", help="exit 1 with a diff if generated/ differs from a fresh rendering")
    p_show = sub.add_parser("show", help="print the derived flow of a model")
    p_show.add_argument("model")
    p_show.add_argument("--activation", default="erf", help="erf (default) or linear")
    p_show.add_argument("--latex", action="store_true", help="print LaTeX instead of text")
    args = parser.parse_args(argv)

    if args.command == "regenerate":
        from .regenerate import GENERATED, regenerate

        t0 = time.perf_counter()
        names = regenerate(progress=lambda s: print(f"  deriving {s}", file=sys.stderr))
        dt = time.perf_counter() - t0
        print(f"wrote {len(names)} files to {GENERATED} in {dt:.1f} s")
        return 0
    if args.command == "check":
        from .regenerate import check

        ok, report = check()
        print(report)
        return 0 if ok else 1
    if args.command == "show":
        from .show import show

        try:
            print(show(args.model, args.activation, args.latex), end="")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
