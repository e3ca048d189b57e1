"""The ``trainfluence`` command line: one subcommand per stage of the pipeline.

Parsers are built from the settings dataclasses without importing torch, so ``--help`` and a bad flag answer at
once.  Bad input (a :class:`~trainfluence.errors.UserError`, a usage error, a full disk) is one line on stderr with
exit code 2; an interrupt (Ctrl-C, SIGTERM) cleans up temporary files and folders and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from ..errors import UserError
from ..runtime import tune_allocator
from . import audit_cmd, cache_cmd, demo_cmd, evaluate_cmd, explain_cmd, internal_cmd, saliency_cmd, train_cmd
from .flags import Parser

COMMANDS = [demo_cmd, train_cmd, evaluate_cmd, cache_cmd, explain_cmd, audit_cmd, saliency_cmd, internal_cmd]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks and context managers clean up."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="trainfluence",
        description="Which training images made my model predict this? Which training labels are wrong? "
        "Influence functions, mislabel audits and pixel saliency for PyTorch image classifiers.",
        epilog="Progress goes to stderr: bars on a terminal, a line every 30 s otherwise "
        "(TRAINFLUENCE_PROGRESS=0 silences it, =1 forces bars, =lines forces lines). "
        "On Linux with glibc the allocator's mmap/trim thresholds are fixed at start, which makes batch loops "
        "faster (TRAINFLUENCE_MALLOC=default keeps glibc's own).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else 0
    tune_allocator()  # before any tensor: batch loops reuse heap memory instead of mmap per batch (runtime.py)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"trainfluence: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from ..files import DISK_FULL, disk_full

        if exc.errno in DISK_FULL:
            print(f"trainfluence: error: {disk_full(exc, exc.filename or 'a file')}", file=sys.stderr)
            return 2
        raise
    except Terminated:
        print("trainfluence: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("trainfluence: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
