"""The ``fastssl`` command line: one sub-command per module, imported lazily so ``fastssl --help`` stays fast.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fastssl.demo", "compare the reference and streaming bank losses on random data"),
    "eval": ("fastssl.eval.cli", "evaluate a checkpoint: kNN or linear probe"),
    "train": ("fastssl.train.cli", "pretrain with a shipped or custom recipe"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fastssl",
        description="fastssl: memory-bank self-supervised learning. Pretrain with a recipe (train), evaluate a "
        "checkpoint (eval), or compare the loss backends on random data (demo).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        sub_parser.set_defaults(_module=module_name)
    # Parse only the sub-command name here; the module parses the rest with its own parser.
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # exits with argparse's "invalid choice" message
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub_parser = argparse.ArgumentParser(prog=f"fastssl {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
