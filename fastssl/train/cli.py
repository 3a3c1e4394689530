"""``fastssl train [--config NAME_OR_PATH] [SECTION.KEY=VALUE ...]``: pretrain with a shipped or custom recipe.

With no arguments it runs the embedded default (``digits_demo``): a few minutes of MoCo v2 on the offline
shifted-digits data on a CPU, printing kNN accuracy of the random-init and trained backbones side by side.
"""

from __future__ import annotations

import argparse
import sys

from fastssl.train.config import ConfigError, load_config, shipped_configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="shipped recipe name (see --list) or a YAML path")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint of this run) or a checkpoint path")
    parser.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE, e.g. optim.lr=0.03 run.epochs=100")


def knn_table(history: list[dict]) -> str:
    """Random-init vs trained kNN top-1, side by side, per backbone."""
    if not history:
        return ""
    first, last = history[0], history[-1]
    names = [k for k in last if k not in ("step", "tag")]
    lines = [f"{'kNN top-1':<12}{'random init':>14}{'trained':>12}{'gain':>9}"]
    for name in names:
        before, after = first.get(name), last[name]
        gain = f"{after - before:+.3f}" if before is not None else ""
        before_text = f"{before:.3f}" if before is not None else "-"
        lines.append(f"{name:<12}{before_text:>14}{after:>12.3f}{gain:>9}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(shipped_configs()))
        return 0
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"fastssl train: config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    from fastssl.train.trainer import NonFiniteLossError, train

    try:
        result = train(config)
    except ConfigError as error:
        print(f"fastssl train: config error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"fastssl train: {error}", file=sys.stderr)
        return 3
    table = knn_table(result["knn_history"])
    print(
        f"\n{result['name']}: {result['steps']} steps of {result['method']} in {result['train_seconds']:.0f} s "
        f"({result['stop_reason']})" + (f"\n{table}" if table else "")
    )
    print(f"outputs: {result['out_dir']} (metrics.json, scalars.csv, checkpoints/)")
    return 0
