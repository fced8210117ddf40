"""Command line: ``python -m fastvid <command>`` (also installed as the ``fastvid`` script).

Commands:
  info    what is compiled and usable here (fastvid.info())
  bench   fastvid vs native PyTorch benchmarks (fastvid/bench); ``bench --report FILE`` prints
          the table of a results file
  train   train a registered model on synthetic data (motion clips: classify; moving digits:
          --task predict), on the CPU by default, data-parallel under torchrun (fastvid/models/train.py)

A command is a (name, help, add_arguments, run) entry in ``_commands()``; a new command is
one more entry there. Heavy imports happen inside the command, so ``info`` and ``--help`` stay fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, NamedTuple, Optional

from fastvid import _argtypes


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------ info
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _info(args: argparse.Namespace) -> int:
    import fastvid
    info = fastvid.info()
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key.ljust(width)} : {value}")
    return 0


# ------------------------------------------------------------------------------ bench
def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvid.bench import cli
    cli.add_arguments(parser)


def _bench(args: argparse.Namespace) -> int:
    from fastvid.bench import cli
    return cli.main(args)


# ------------------------------------------------------------------------------ train
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvid.models import train
    train.add_arguments(parser)


def _train(args: argparse.Namespace) -> int:
    from fastvid.models import train
    return train.main(args)


def _commands() -> List[Command]:
    return [
        Command("info", "print what is compiled and usable (fastvid.info())", _info_arguments, _info),
        Command("bench", "benchmark fastvid against native PyTorch and print the table", _bench_arguments, _bench),
        Command("train", "train a registered model on synthetic clips (classify, or --task predict future "
                "frames) and print how well it does; data-parallel under torchrun",
                _train_arguments, _train),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvid",
                                     description="fastvid: fused temporal layers for video networks")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for command in _commands():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, command_parser=sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fastvid`` and the ``fastvid`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except _argtypes.UsageError as error:  # raised by the commands' own argument checks, before any work
        args.command_parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
