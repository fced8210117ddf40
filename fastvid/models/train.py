"""Training example: any registered model on the synthetic motion clips (``fastvid.models.synthetic``),
on the CPU, with a progress bar on stderr; prints train and held-out accuracy.

    python -m fastvid train --model slow_fusion
    python -m fastvid train --model c3d --frames 16 --size 32 --set "channels=(8, 16, 32, 32, 32)" --set fc_features=64

The builder gets ``num_classes=4`` and, where its signature has them, ``frames``, ``height`` and
``width`` (the clip size); ``--set KEY=VALUE`` adds more builder arguments (VALUE as a Python literal).
Models whose ``forward`` has a ``flow`` argument (``two_stream``) also get the clips' exact optical
flow ``[B, 2, T-1, H, W]``; a model returning a tuple (scores, extras) is scored on its first item.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional, TextIO

import torch
from torch import Tensor, nn

from ._registry import _BUILDERS, build, list_models
from .synthetic import NUM_CLASSES, MotionClips, motion_clips


class TrainResult(NamedTuple):
    train_accuracy: float
    test_accuracy: float
    epoch_losses: List[float]  # mean training loss of each epoch
    seconds: float


class ProgressBar:
    """A one-line progress bar rewritten in place on ``stream`` (stderr): ``label [####----] i/n text``."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream  # looked up now: tests and tools swap sys.stderr

    def update(self, done: int, text: str = "") -> None:
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {text}")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def builder_arguments(name: str, frames: int, size: int, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The keyword arguments to build model ``name`` for 4-class clips of ``frames × size × size``:
    ``num_classes``, and ``frames``/``height``/``width`` where the builder accepts them."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    parameters = inspect.signature(_BUILDERS[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    wanted = {"num_classes": NUM_CLASSES, "frames": frames, "height": size, "width": size}
    kwargs = {key: value for key, value in wanted.items() if takes_any or key in parameters}
    kwargs.update(extra or {})
    return kwargs


def takes_flow(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``flow`` argument (two-stream models)."""
    return "flow" in inspect.signature(model.forward).parameters


def class_scores(model: nn.Module, videos: Tensor, flow: Optional[Tensor]) -> Tensor:
    """Runs ``model`` on a batch and returns its class scores ``[B, num_classes]``."""
    out = model(videos, flow) if takes_flow(model) else model(videos)
    return out[0] if isinstance(out, (tuple, list)) else out


def accuracy(model: nn.Module, clips: MotionClips, batch_size: int = 64) -> float:
    """Fraction of ``clips`` whose argmax score is the label (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(clips.labels), batch_size):
            batch = slice(start, start + batch_size)
            flow = clips.flow[batch] if clips.flow is not None else None
            predicted = class_scores(model, clips.videos[batch], flow).argmax(dim=1)
            correct += int((predicted == clips.labels[batch]).sum())
    model.train(was_training)
    return correct / len(clips.labels)


def train_model(model: nn.Module, train_clips: MotionClips, test_clips: MotionClips, epochs: int = 5,
                batch_size: int = 32, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> TrainResult:
    """Trains ``model`` with Adam and cross-entropy on ``train_clips``; returns its accuracy on the
    training clips and on the held-out ``test_clips``."""
    started = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    num_clips = len(train_clips.labels)
    batches_per_epoch = (num_clips + batch_size - 1) // batch_size
    epoch_losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(num_clips, generator=generator)
        bar = ProgressBar(batches_per_epoch, f"epoch {epoch + 1}/{epochs}") if progress else None
        total_loss = 0.0
        for step in range(batches_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            flow = train_clips.flow[batch] if train_clips.flow is not None else None
            scores = class_scores(model, train_clips.videos[batch], flow)
            loss = nn.functional.cross_entropy(scores, train_clips.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            if bar:
                bar.update(step + 1, f"loss {total_loss / (step + 1):.3f}")
        epoch_losses.append(total_loss / batches_per_epoch)
    return TrainResult(accuracy(model, train_clips), accuracy(model, test_clips), epoch_losses,
                       time.perf_counter() - started)


def run(name: str, epochs: int = 5, frames: int = 16, size: int = 32, batch_size: int = 32, seed: int = 0,
        train_clips: int = 512, test_clips: int = 256, lr: float = 3e-3, noise: float = 0.5,
        model_kwargs: Optional[Dict[str, Any]] = None, progress: bool = True) -> TrainResult:
    """Builds model ``name`` for the clip size (seeded with ``seed``), generates the training and
    held-out clips (different seeds), trains and returns the accuracies."""
    torch.manual_seed(seed)
    model = build(name, **builder_arguments(name, frames, size, model_kwargs))
    flow = takes_flow(model)
    train_set = motion_clips(train_clips, frames, size, seed=2 * seed, noise=noise, flow=flow)
    test_set = motion_clips(test_clips, frames, size, seed=2 * seed + 1, noise=noise, flow=flow)
    return train_model(model, train_set, test_set, epochs, batch_size, lr, seed, progress)


# ------------------------------------------------------------------------------ command line
def _literal_assignment(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name (fastvid.models.list_models())")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=32, help="clip height and width in pixels (default 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the initialisation and the batch order")
    parser.add_argument("--train-clips", type=int, default=512)
    parser.add_argument("--test-clips", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--noise", type=float, default=0.5, help="standard deviation of the background noise")
    parser.add_argument("--set", dest="model_kwargs", action="append", type=_literal_assignment, default=[],
                        metavar="KEY=VALUE", help="extra builder argument, e.g. --set 'channels=(8, 16)'")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    result = run(args.model, args.epochs, args.frames, args.size, args.batch_size, args.seed, args.train_clips,
                 args.test_clips, args.lr, args.noise, dict(args.model_kwargs), progress=not args.quiet)
    print(f"model {args.model}: train accuracy {result.train_accuracy:.3f}, held-out accuracy "
          f"{result.test_accuracy:.3f} (chance {1 / NUM_CLASSES:.3f}), {result.seconds:.1f} s")
    return 0


__all__ = ["TrainResult", "ProgressBar", "builder_arguments", "takes_flow", "class_scores", "accuracy",
           "train_model", "run", "add_arguments", "main"]
