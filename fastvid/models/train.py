"""Training example, two tasks, on the CPU by default, with a progress bar on stderr.

``--task classify`` (default): any registered classifier on the synthetic motion clips
(``fastvid.models.synthetic``); prints train and held-out accuracy.

    python -m fastvid train --model slow_fusion
    python -m fastvid train --model c3d --frames 16 --size 32 --set "channels=(8, 16, 32, 32, 32)" --set fc_features=64

``--task predict``: a frame predictor (a builder with a ``future_frames`` argument, e.g.
``convlstm_forecaster``) on the moving digits (``fastvid.models.moving_digits``): it sees the first
``--input-frames`` frames and predicts the rest; prints the per-frame MSE on held-out clips next to
the copy-last-frame baseline (repeat the last observed frame) and the blank-frame baseline.

    python -m fastvid train --task predict --model convlstm_forecaster

Data-parallel: started by ``torchrun`` (which sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)
every process joins the process group (gloo on the CPU, nccl with ``--device cuda``, one GPU per
process), wraps the model in ``DistributedDataParallel`` and trains on its ``DistributedSampler``
share of each epoch (``--batch-size`` is per process); only rank 0 prints (its first line names the
world size and backend) and writes ``--checkpoint``. ``--sync-bn`` turns BatchNorm layers into
``SyncBatchNorm`` (GPU only: torch synchronises CUDA tensors only).

    torchrun --nproc_per_node=2 -m fastvid train --task predict --model convlstm_forecaster

The builder gets ``num_classes=4`` and, where its signature has them, ``frames``, ``height`` and
``width`` (the clip size); ``--set KEY=VALUE`` adds more builder arguments (VALUE as a Python literal).
Models whose ``forward`` has a ``flow`` argument (``two_stream``) also get the clips' exact optical
flow ``[B, 2, T-1, H, W]``; a model returning a tuple (scores, extras) is scored on its first item.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import os
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .. import _argtypes
from ._registry import _BUILDERS, build, list_models
from .moving_digits import moving_digits
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
    """Runs ``model`` (or its DistributedDataParallel wrapper, whose forward takes ``*inputs``: asked of it, a
    two-stream model got no flow under torchrun) on a batch and returns its class scores ``[B, num_classes]``."""
    out = model(videos, flow) if takes_flow(unwrap(model)) else model(videos)
    return out[0] if isinstance(out, (tuple, list)) else out


class Distributed(NamedTuple):
    """This process's place in a torchrun job."""
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> Optional[Distributed]:
    """Joins the process group described by torchrun's environment variables (gloo for the CPU, nccl
    for CUDA); None when the process was not started by torchrun (no WORLD_SIZE)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend)


def process_device(device: str, distributed: Optional[Distributed]) -> torch.device:
    """``--device`` for this process: under torchrun, CUDA means the GPU ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if device.type == "cuda" and distributed is not None:
        device = torch.device("cuda", distributed.local_rank)
        torch.cuda.set_device(device)
    return device


def prepare_model(model: nn.Module, device: torch.device, distributed: Optional[Distributed],
                  sync_batchnorm: bool = False) -> nn.Module:
    """Moves ``model`` to ``device``; under torchrun wraps it in DistributedDataParallel (after
    turning BatchNorm into SyncBatchNorm when ``sync_batchnorm``)."""
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs --device cuda: torch.nn.SyncBatchNorm synchronises GPU tensors only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if distributed is None:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def accuracy(model: nn.Module, clips: MotionClips, batch_size: int = 64) -> float:
    """Fraction of ``clips`` whose argmax score is the label (eval mode, no grad)."""
    model = unwrap(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(clips.labels), batch_size):
            batch = slice(start, start + batch_size)
            flow = clips.flow[batch].to(device) if clips.flow is not None else None
            predicted = class_scores(model, clips.videos[batch].to(device), flow).argmax(dim=1).cpu()
            correct += int((predicted == clips.labels[batch]).sum())
    model.train(was_training)
    return correct / len(clips.labels)


def fit(model: nn.Module, num_samples: int, batch_loss: Callable[[nn.Module, Tensor], Tensor], epochs: int,
        batch_size: int, lr: float, seed: int = 0, progress: bool = True,
        distributed: Optional[Distributed] = None, checkpoint: Optional[str] = None) -> List[float]:
    """Adam on ``batch_loss(model, sample_indices)`` over shuffled batches of ``range(num_samples)``
    (under torchrun: this process's DistributedSampler share). Returns each epoch's mean loss (the
    mean over all processes). Rank 0 draws the progress bar and saves ``checkpoint`` after every epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    sampler = None if distributed is None else DistributedSampler(
        range(num_samples), distributed.world_size, distributed.rank, shuffle=True, seed=seed)
    main_process = distributed is None or distributed.is_main
    samples_per_process = num_samples if sampler is None else len(sampler)
    batches_per_epoch = (samples_per_process + batch_size - 1) // batch_size
    epoch_losses = []
    model.train()
    for epoch in range(epochs):
        if sampler is None:
            order = torch.randperm(num_samples, generator=generator)
        else:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        bar = ProgressBar(batches_per_epoch, f"epoch {epoch + 1}/{epochs}") if progress and main_process else None
        total_loss = torch.zeros(())
        for step in range(batches_per_epoch):
            loss = batch_loss(model, order[step * batch_size:(step + 1) * batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.detach().cpu()
            if bar:
                bar.update(step + 1, f"loss {float(total_loss) / (step + 1):.4f}")
        if distributed is not None:  # gloo reduces CPU tensors, nccl CUDA ones
            total_loss = total_loss.to(next(model.parameters()).device)
            dist.all_reduce(total_loss)
            total_loss = total_loss.cpu() / distributed.world_size
        epoch_losses.append(float(total_loss) / batches_per_epoch)
        if checkpoint and main_process:
            save_checkpoint(checkpoint, unwrap(model), optimizer, epoch + 1)
    return epoch_losses


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, epochs_done: int) -> None:
    """Writes {'model', 'optimizer', 'epoch'} to ``path`` (via a temporary file: never half-written)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epochs_done},
               path + ".tmp")
    os.replace(path + ".tmp", path)


def train_model(model: nn.Module, train_clips: MotionClips, test_clips: MotionClips, epochs: int = 5,
                batch_size: int = 32, lr: float = 3e-3, seed: int = 0, progress: bool = True,
                distributed: Optional[Distributed] = None, checkpoint: Optional[str] = None) -> TrainResult:
    """Trains ``model`` (already on its device, DDP-wrapped under torchrun) with Adam and
    cross-entropy on ``train_clips``; returns its accuracy on the training clips and on the held-out
    ``test_clips``."""
    started = time.perf_counter()
    device = next(model.parameters()).device

    def batch_loss(model: nn.Module, batch: Tensor) -> Tensor:
        flow = train_clips.flow[batch].to(device) if train_clips.flow is not None else None
        scores = class_scores(model, train_clips.videos[batch].to(device), flow)
        return nn.functional.cross_entropy(scores, train_clips.labels[batch].to(device))

    epoch_losses = fit(model, len(train_clips.labels), batch_loss, epochs, batch_size, lr, seed, progress,
                       distributed, checkpoint)
    return TrainResult(accuracy(model, train_clips), accuracy(model, test_clips), epoch_losses,
                       time.perf_counter() - started)


def run(name: str, epochs: int = 5, frames: int = 16, size: int = 32, batch_size: int = 32, seed: int = 0,
        train_clips: int = 512, test_clips: int = 256, lr: float = 3e-3, noise: float = 0.5,
        model_kwargs: Optional[Dict[str, Any]] = None, progress: bool = True, device: str = "cpu",
        distributed: Optional[Distributed] = None, sync_batchnorm: bool = False,
        checkpoint: Optional[str] = None) -> TrainResult:
    """Builds model ``name`` for the clip size (seeded with ``seed``), generates the training and
    held-out clips (different seeds), trains and returns the accuracies."""
    torch.manual_seed(seed)
    model = build(name, **builder_arguments(name, frames, size, model_kwargs))
    flow = takes_flow(model)
    model = prepare_model(model, process_device(device, distributed), distributed, sync_batchnorm)
    train_set = motion_clips(train_clips, frames, size, seed=2 * seed, noise=noise, flow=flow)
    test_set = motion_clips(test_clips, frames, size, seed=2 * seed + 1, noise=noise, flow=flow)
    return train_model(model, train_set, test_set, epochs, batch_size, lr, seed, progress, distributed, checkpoint)


# ------------------------------------------------------------------------------ frame prediction
class ForecastResult(NamedTuple):
    """Mean squared error per predicted frame (index 0 = the first frame after the observed ones) on
    the held-out clips: the model's, the copy-last-frame baseline's and the blank-frame baseline's."""
    model_mse: List[float]
    copy_last_mse: List[float]
    blank_mse: List[float]
    epoch_losses: List[float]
    seconds: float


def forecast_errors(model: nn.Module, videos: Tensor, input_frames: int, batch_size: int = 64):
    """Per-future-frame MSE ``[T - input_frames]`` of ``model``, of repeating the last observed frame
    and of predicting an empty (zero) frame, over ``videos`` ``[N, C, T, H, W]``."""
    model = unwrap(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, videos.shape[2] - input_frames, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(videos), batch_size):
            clip = videos[start:start + batch_size]
            observed, future = clip[:, :, :input_frames], clip[:, :, input_frames:]
            predicted = model(observed.to(device)).cpu()
            for row, guess in enumerate((predicted, observed[:, :, -1:], torch.zeros_like(future))):
                sums[row] += ((guess - future) ** 2).double().sum(dim=(0, 1, 3, 4))
    model.train(was_training)
    per_frame = sums / (videos.numel() / videos.shape[2])
    return per_frame[0].tolist(), per_frame[1].tolist(), per_frame[2].tolist()


def is_predictor(name: str) -> bool:
    """Whether registered model ``name`` predicts frames (its builder takes ``future_frames``)."""
    return "future_frames" in inspect.signature(_BUILDERS[name]).parameters


def predictor_arguments(name: str, frames: int, input_frames: int, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Builder arguments of frame predictor ``name``: ``in_channels=1``, ``future_frames``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    parameters = inspect.signature(_BUILDERS[name]).parameters
    if not is_predictor(name):
        raise ValueError(f"model {name!r} is not a frame predictor (its builder has no future_frames argument); "
                         f"try --model convlstm_forecaster")
    if not 0 < input_frames < frames:
        raise ValueError(f"input_frames must be in 1..frames-1 = 1..{frames - 1}, got {input_frames}")
    kwargs = {"future_frames": frames - input_frames}
    if "in_channels" in parameters:
        kwargs["in_channels"] = 1
    kwargs.update(extra or {})
    return kwargs


def run_predict(name: str = "convlstm_forecaster", epochs: int = 5, frames: int = 10, size: int = 16,
                input_frames: Optional[int] = None, digits: int = 1, batch_size: int = 16, seed: int = 0,
                train_clips: int = 1200, test_clips: int = 128, lr: float = 1e-2,
                model_kwargs: Optional[Dict[str, Any]] = None, progress: bool = True, device: str = "cpu",
                distributed: Optional[Distributed] = None, sync_batchnorm: bool = False,
                checkpoint: Optional[str] = None) -> ForecastResult:
    """Builds frame predictor ``name`` (seeded with ``seed``), trains it with binary cross-entropy
    (targets are 0/1 pixels; Shi et al. 2015 train with cross-entropy too) to predict the last
    ``frames - input_frames`` frames of moving-digits clips from the first ``input_frames``
    (default ``frames // 2``), and measures it on held-out clips."""
    started = time.perf_counter()
    input_frames = frames // 2 if input_frames is None else input_frames
    torch.manual_seed(seed)
    model = build(name, **predictor_arguments(name, frames, input_frames, model_kwargs))
    device = process_device(device, distributed)
    model = prepare_model(model, device, distributed, sync_batchnorm)
    train_set = moving_digits(train_clips, frames, size, digits, seed=2 * seed).videos
    test_set = moving_digits(test_clips, frames, size, digits, seed=2 * seed + 1).videos

    def batch_loss(model: nn.Module, batch: Tensor) -> Tensor:
        clip = train_set[batch].to(device)
        logits = model(clip[:, :, :input_frames], logits=True)
        return nn.functional.binary_cross_entropy_with_logits(logits, clip[:, :, input_frames:])

    epoch_losses = fit(model, train_clips, batch_loss, epochs, batch_size, lr, seed, progress, distributed, checkpoint)
    errors = forecast_errors(model, test_set, input_frames)
    return ForecastResult(*errors, epoch_losses, time.perf_counter() - started)


# ------------------------------------------------------------------------------ command line
def _literal_assignment(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string


#: Defaults that differ between the tasks: (classify, predict).
TASK_DEFAULTS = {"frames": (16, 10), "size": (32, 16), "batch_size": (32, 16), "train_clips": (512, 1200),
                 "test_clips": (256, 128), "lr": (3e-3, 1e-2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("classify", "predict"), default="classify",
                        help="classify: motion clips -> class; predict: moving digits -> future frames")
    parser.add_argument("--model", required=True, help="registered model name (fastvid.models.list_models())")
    parser.add_argument("--epochs", type=_argtypes.positive_int, default=5)
    parser.add_argument("--frames", type=_argtypes.positive_int, default=None,
                        help="frames per clip (default 16; predict: 10)")
    parser.add_argument("--size", type=_argtypes.positive_int, default=None,
                        help="clip height and width in pixels (default 32; predict: 16)")
    parser.add_argument("--batch-size", type=_argtypes.positive_int, default=None,
                        help="per process (default 32; predict: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the initialisation and the batch order")
    parser.add_argument("--train-clips", type=_argtypes.positive_int, default=None, help="default 512; predict: 1200")
    parser.add_argument("--test-clips", type=_argtypes.positive_int, default=None,
                        help="held-out clips (default 256; predict: 128)")
    parser.add_argument("--lr", type=_argtypes.positive_float, default=None,
                        help="Adam learning rate (default 3e-3; predict: 1e-2)")
    parser.add_argument("--noise", type=_argtypes.non_negative_float, default=0.5,
                        help="classify: standard deviation of the background noise")
    parser.add_argument("--input-frames", type=_argtypes.positive_int, default=None,
                        help="predict: observed frames; the rest are predicted (default frames // 2)")
    parser.add_argument("--digits", type=_argtypes.positive_int, default=1, help="predict: moving digits per clip")
    parser.add_argument("--set", dest="model_kwargs", action="append", type=_literal_assignment, default=[],
                        metavar="KEY=VALUE", help="extra builder argument, e.g. --set 'channels=(8, 16)'")
    parser.add_argument("--device", type=_argtypes.device, default="cpu",
                        help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help="save model and optimizer state here after every epoch (rank 0 only)")
    parser.add_argument("--threads", type=_argtypes.positive_int, default=None,
                        help="torch.set_num_threads(N) first (1 is fastest for these small models on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    """What argparse cannot check alone (the model's kind against --task, the clip sizes the data needs),
    as a UsageError before any work."""
    if args.model not in _BUILDERS:
        raise _argtypes.UsageError(f"--model: unknown model {args.model!r}; registered: {', '.join(list_models())}")
    if args.sync_bn and torch.device(args.device).type != "cuda":  # (prepare_model raised it after the data was made)
        raise _argtypes.UsageError("--sync-bn needs --device cuda: torch.nn.SyncBatchNorm synchronises GPU tensors only")
    if not -2 ** 62 <= args.seed < 2 ** 62:  # (the data seeds 2·seed and 2·seed + 1 must fit torch's int64)
        raise _argtypes.UsageError(f"--seed must be in -2**62..2**62-1, got {args.seed}")
    if args.checkpoint is not None:  # (found after the first epoch, as a traceback)
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if os.path.isdir(args.checkpoint) or not os.path.isdir(folder):
            raise _argtypes.UsageError(f"--checkpoint {args.checkpoint}: "
                                       + ("is a folder" if os.path.isdir(args.checkpoint) else f"{folder} is not a folder"))
    frames, size = _task_default(args, "frames"), _task_default(args, "size")
    predictor = is_predictor(args.model)
    derived = ("future_frames", "in_channels") if args.task == "predict" else ("num_classes", "frames", "height", "width")
    for key, _ in args.model_kwargs:
        if key in derived:  # (replaced what the task needs: the loss failed in the first step)
            raise _argtypes.UsageError(f"--set {key}: set by the task ({', '.join(derived)} follow --task, --frames, "
                                       "--size and --input-frames)")
    if args.task == "classify":
        if predictor:
            raise _argtypes.UsageError(f"--model {args.model} predicts frames: add --task predict")
        if frames < 4:
            raise _argtypes.UsageError(f"--frames must be >= 4 for motion clips (two frames per half), got {frames}")
        if size < 4:
            raise _argtypes.UsageError(f"--size must be >= 4 for motion clips, got {size}")
        _check_model_runs(args, frames, size)
        return
    if not predictor:
        raise _argtypes.UsageError(f"--model {args.model} is not a frame predictor (its builder has no future_frames "
                                   "argument); try --model convlstm_forecaster, or --task classify")
    if frames < 2:
        raise _argtypes.UsageError(f"--frames must be >= 2 to predict (one observed, one predicted), got {frames}")
    input_frames = frames // 2 if args.input_frames is None else args.input_frames
    if not 0 < input_frames < frames:
        raise _argtypes.UsageError(f"--input-frames must be in 1..{frames - 1} (--frames - 1), got {input_frames}")
    _check_model_runs(args, frames, size, input_frames)


def _check_model_runs(args: argparse.Namespace, frames: int, size: int, input_frames: Optional[int] = None) -> None:
    """Builds the model for these sizes and runs it on one clip of the task's data (eval, no grad; the random
    streams left as they were), so that a size, clip length or --set it cannot take is a usage error before
    the data and the epochs (it failed inside the first training step, or making the data)."""
    name, extra = args.model, dict(args.model_kwargs)
    with torch.random.fork_rng(), torch.no_grad():
        try:
            if input_frames is not None:
                model = build(name, **predictor_arguments(name, frames, input_frames, extra)).eval()
                clip = moving_digits(1, frames, size, args.digits, seed=0).videos
                model(clip[:, :, :input_frames], logits=True)
            else:
                model = build(name, **builder_arguments(name, frames, size, extra)).eval()
                clip = motion_clips(1, frames, size, seed=0, noise=args.noise, flow=takes_flow(model))
                class_scores(model, clip.videos, clip.flow)
        except (ValueError, TypeError, RuntimeError) as error:
            settings = "".join(f" --set {key}={value!r}" for key, value in args.model_kwargs)
            raise _argtypes.UsageError(f"--model {name} cannot run clips of --frames {frames} --size {size}{settings}: "
                                       f"{error}") from error


def _task_default(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    return TASK_DEFAULTS[name][args.task == "predict"] if value is None else value


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    frames, size, batch_size, train_clips, test_clips, lr = (_task_default(args, name) for name in TASK_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_distributed(args.device)
    try:
        main_process = distributed is None or distributed.is_main
        if distributed is not None and main_process:
            print(f"distributed: world size {distributed.world_size}, backend {distributed.backend}", flush=True)
        common = dict(epochs=args.epochs, frames=frames, size=size, batch_size=batch_size, seed=args.seed,
                      train_clips=train_clips, test_clips=test_clips, lr=lr,
                      model_kwargs=dict(args.model_kwargs), progress=not args.quiet, device=args.device,
                      distributed=distributed, sync_batchnorm=args.sync_bn, checkpoint=args.checkpoint)
        if args.task == "predict":
            result = run_predict(args.model, input_frames=args.input_frames, digits=args.digits, **common)
            if main_process:
                print(_forecast_report(args.model, result))
        else:
            result = run(args.model, noise=args.noise, **common)
            if main_process:
                print(f"model {args.model}: train accuracy {result.train_accuracy:.3f}, held-out accuracy "
                      f"{result.test_accuracy:.3f} (chance {1 / NUM_CLASSES:.3f}), {result.seconds:.1f} s")
    finally:
        if distributed is not None:
            dist.destroy_process_group()
    return 0


def _forecast_report(name: str, result: ForecastResult) -> str:
    def mean(values: List[float]) -> float:
        return sum(values) / len(values)

    width = max(len(name), len("copy-last frame"))
    lines = [f"model {name}: per-frame MSE on held-out clips (future frames 1..{len(result.model_mse)})"]
    for label, values in ((name, result.model_mse), ("copy-last frame", result.copy_last_mse),
                          ("blank frame", result.blank_mse)):
        lines.append(f"  {label.ljust(width)}  " + " ".join(f"{v:.4f}" for v in values)
                     + f"  mean {mean(values):.4f}")
    lines.append(f"model / copy-last MSE = {mean(result.model_mse) / mean(result.copy_last_mse):.3f}, "
                 f"model / blank MSE = {mean(result.model_mse) / mean(result.blank_mse):.3f}, {result.seconds:.1f} s")
    return "\n".join(lines)


__all__ = ["TrainResult", "ProgressBar", "builder_arguments", "takes_flow", "class_scores", "Distributed",
           "init_distributed", "prepare_model", "accuracy", "fit", "save_checkpoint", "train_model", "run",
           "ForecastResult", "forecast_errors", "is_predictor", "predictor_arguments", "run_predict", "TASK_DEFAULTS",
           "add_arguments", "check_arguments", "main"]
