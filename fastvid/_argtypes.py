"""argparse types shared by the command-line tools (``python -m fastvid bench`` / ``train``): a bad
number is an argparse error naming the option, not a traceback or a silently ignored value."""
from __future__ import annotations

import argparse
import math


def _number(kind, low: float, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):  # nan / inf would pass the comparisons below
            raise argparse.ArgumentTypeError(f"{what}, got {text} (not a finite number)")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True, "must be a positive integer")
non_negative_int = _number(int, 0, False, "must be an integer >= 0")
positive_float = _number(float, 0.0, True, "must be > 0")
non_negative_float = _number(float, 0.0, False, "must be >= 0")


class UsageError(Exception):
    """An option combination argparse cannot check by itself: ``python -m fastvid`` prints it as the
    command's usage error (exit status 2), before any work."""


def device(text: str) -> str:
    """``--device``: a torch device string of a kind fastvid runs on (cpu, cuda) and this machine has."""
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device")
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"fastvid runs on cpu or cuda, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch.cuda.is_available() is False)")
    return text
