"""The ``te-fx`` command.

    te-fx demo     tiny HF models with te_fx injected: which layers run on TE, which fall back and why

Exit codes: 0 success, 1 the demo found a mismatch, 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_FAMILIES, run_demo
    from .tiny_models import FAMILIES

    families = tuple(args.family) or DEMO_FAMILIES
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"te-fx demo: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    return 0 if run_demo(families) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="te-fx", description="TransformerEngine attention for HF causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log te_fx's decisions (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run te_fx on tiny models built from configs (no downloads)")
    demo.add_argument("family", nargs="*", default=[], help="model families (default: a representative set)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``te-fx`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
