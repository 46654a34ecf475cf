"""The ``te-fx`` command.

    te-fx demo            tiny HF models through te_fx: which layers run on TE, which fall back and why
    te-fx check           versions, GPU, TransformerEngine and its backend for a typical shape; what is missing
    te-fx explain MODEL   per layer, what te_fx's three ways in do with MODEL (a tiny model family, a local
                          config.json or checkpoint folder; nothing is downloaded) and why
    te-fx bench           benchmarks against every alternative, report and plots under bench/results/<card>/

Exit codes: 0 success; 1 the demo found a mismatch, check found something missing for the default executor,
explain could not complete its analysis, or a benchmark target failed; 2 bad usage (unknown family or model,
missing path, unreadable config, benchmark arguments that cannot work); 3 the benchmark cannot run here (no GPU for
a GPU profile, TE missing).

This module sits outside the te_fx package on purpose: importing te_fx imports torch and transformers and registers
te_fx with them (seconds), so the arguments are parsed first and each command imports what it needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["build_parser", "main"]


def _demo(args: argparse.Namespace) -> int:
    from te_fx.tools.demo import DEMO_FAMILIES, run_demo
    from te_fx.tools.tiny_models import FAMILIES

    families = tuple(args.family) or DEMO_FAMILIES
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"te-fx demo: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    return 0 if run_demo(families) else 1


def _check(args: argparse.Namespace) -> int:
    import json

    from te_fx.tools.check import format_check, run_check

    result = run_check()
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_check(result))
    return 0 if result.ok else 1


def _explain(args: argparse.Namespace) -> int:
    import json

    from te_fx.tools.explain import AnalysisError, ModelConfigError, explain, format_explanation

    try:
        result = explain(args.model, compile_path=not args.no_compile)
    except ModelConfigError as error:
        print(f"te-fx explain: {error}", file=sys.stderr)
        return 2
    except AnalysisError as error:
        print(f"te-fx explain: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_explanation(result))
    return 1 if result.errors else 0


def _bench(args: argparse.Namespace) -> int:
    from bench.run import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (imports nothing beyond the standard library and bench's argument list)."""
    from bench.args import add_arguments

    verbose = argparse.ArgumentParser(add_help=False)  # -v before or after the command
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log te_fx's decisions (INFO)")  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="te-fx", description="TransformerEngine attention for HF causal LMs", parents=[verbose]
    )
    commands = parser.add_subparsers(dest="command", metavar="{demo,check,explain,bench}")
    demo = commands.add_parser(
        "demo", parents=[verbose], help="run te_fx on tiny models built from configs (no downloads)"
    )
    demo.add_argument("family", nargs="*", default=[], help="model families (default: a representative set)")
    demo.set_defaults(handler=_demo)
    check = commands.add_parser(
        "check", parents=[verbose], help="versions, GPU and TransformerEngine: what is there and what is missing"
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(handler=_check)
    explain = commands.add_parser(
        "explain", parents=[verbose], help="per layer, what te_fx's ways in do with a model and why (no downloads)"
    )
    explain.add_argument(
        "model", help="a tiny model family (as te-fx demo takes), else a local config.json or checkpoint folder"
    )
    explain.add_argument("--json", action="store_true", help="print the result as JSON")
    explain.add_argument("--no-compile", action="store_true", help="skip the compile-path analysis (faster)")
    explain.set_defaults(handler=_explain)
    bench = commands.add_parser(
        "bench", parents=[verbose], help="benchmarks: report.md, results.json, plots; targets as PASS/FAIL"
    )
    add_arguments(bench).set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``te-fx`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown arguments are reported before a missing command
    if args.command is None:
        parser.error("choose a command: demo, check, explain or bench (te-fx COMMAND --help for its options)")
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.handler(args)
    except BrokenPipeError:  # `te-fx demo | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
