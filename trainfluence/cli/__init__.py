"""The ``trainfluence`` command line: one subcommand per stage of the pipeline.

Bad input (a :class:`~trainfluence.errors.UserError`) is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import UserError
from . import audit_cmd, cache_cmd, demo_cmd, evaluate_cmd, explain_cmd, internal_cmd, saliency_cmd, train_cmd

COMMANDS = [demo_cmd, train_cmd, evaluate_cmd, cache_cmd, explain_cmd, audit_cmd, saliency_cmd, internal_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainfluence",
        description="Which training images made my model predict this? Which training labels are wrong? "
        "Influence functions, mislabel audits and pixel saliency for PyTorch image classifiers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"trainfluence: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainfluence: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
