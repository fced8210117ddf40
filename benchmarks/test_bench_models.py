"""Whole video models: fastvid layers vs the same model on native PyTorch layers, with pytest-benchmark.

For each model (full width, small input) two providers run the same weights on the same input:

* ``fastvid``: the model as ``fastvid.models.build`` makes it, default backend (compiled kernels for
  DepthwiseConv3d, nonlocal attention, ConvLSTM/ConvGRU);
* ``native``: ``fastvid.convert(model, to="reference")`` (every fastvid layer that has a plain-PyTorch
  twin becomes it: ``nn.Conv3d(groups=C)`` for DepthwiseConv3d, ...) run under
  ``fastvid.backend("reference")``, so a layer without a twin yet runs its pure-PyTorch reference op
  (the naive computation: e.g. the N×M affinity matrix for nonlocal attention). ``extra_info`` records
  how many fastvid modules were left for the backend to cover.

Modes: ``forward`` (no_grad) and ``fwd_bwd`` (forward + backward of a fixed upstream gradient, input
requires grad). Models run in eval mode (dropout off, BatchNorm running statistics) so both providers
compute the same function; the nonlocal blocks' output BatchNorm gets γ ≠ 0 (at init a nonlocal
block is the identity). Outputs and gradients (input and every parameter) are checked to agree
before anything is timed; nothing here asserts on time. Each benchmark group is one (model, mode),
so the providers print side by side.

    python -m pytest benchmarks/test_bench_models.py -q --benchmark-min-rounds=3
    python -m pytest benchmarks/test_bench_models.py -q -k "x3d_s and fwd_bwd"
    python -m pytest benchmarks/test_bench_models.py -q --benchmark-disable   # parity checks only

Models beyond the 3D CNNs (the recurrent ones) are included when they are registered.
"""
import dataclasses
import functools
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

import fastvid
from fastvid.bench.cases import assert_within, relative_error, timed_step
from fastvid.models import build, list_models

PROVIDERS = ("native", "fastvid")
MODES = ("forward", "fwd_bwd")
OUTPUT_RTOL, GRAD_RTOL = 1e-4, 1e-3  # relative error ‖a - b‖ / ‖b‖, fp32
GRAD_FLOOR = 1e-3  # see _check_parity


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str
    kwargs: Tuple[Tuple[str, object], ...]  # builder arguments (hashable), besides the input size
    shape: Tuple[int, int, int, int, int]  # input [B, C, T, H, W]

    def build_kwargs(self) -> dict:
        _, _, T, H, W = self.shape  # every builder takes frames/height/width
        return dict(num_classes=10, frames=T, height=H, width=W, **dict(self.kwargs))

    @property
    def label(self) -> str:
        B, C, T, H, W = self.shape
        return f"B={B},T={T},{H}x{W}"


CASES = [
    ModelCase("x3d_s", (), (2, 3, 8, 64, 64)),
    ModelCase("r2plus1d_18", (), (2, 3, 8, 64, 64)),
    ModelCase("nonlocal_i3d_r50", (), (2, 3, 8, 64, 64)),
    # recurrent models (ConvLSTM / ConvGRU / attention ConvLSTM on the frame CNN's maps)
    ModelCase("lrcn", (("recurrent", "convlstm"),), (2, 3, 8, 64, 64)),
    ModelCase("convgru_rcn", (), (2, 3, 8, 64, 64)),
    ModelCase("videolstm", (("attention", "appearance"),), (2, 3, 8, 64, 64)),
]
CASES = [case for case in CASES if case.model in list_models()]


def _logits(out):
    return out[0] if isinstance(out, tuple) else out  # videolstm returns (scores, attention)


class Workload:
    """One provider's model and input; ``__call__`` runs one timed step."""

    def __init__(self, module: nn.Module, x: torch.Tensor, mode: str, backend: str):
        self.module, self.x, self.mode, self.backend = module, x, mode, backend
        self.grad_output = None

    def forward(self) -> torch.Tensor:
        with fastvid.backend(self.backend):
            return _logits(self.module(self.x))

    def zero_grad(self):
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)

    def __call__(self) -> torch.Tensor:
        return timed_step(self, self.forward, self.mode == "forward")


def _fastvid_modules(model: nn.Module) -> int:
    return sum(type(m).__module__.startswith("fastvid.nn") for m in model.modules())


@functools.lru_cache(maxsize=1)  # a case's providers run consecutively: build and check once
def _workloads(case: ModelCase, mode: str) -> Dict[str, Workload]:
    torch.manual_seed(0)
    model = build(case.model, **case.build_kwargs()).eval()
    for module in model.modules():
        if isinstance(module, fastvid.nn.NonLocalBlock):
            nn.init.uniform_(module.norm.weight, 0.5, 1.5)
    native = fastvid.convert(model, to="reference").eval()
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0))
    workloads = {"fastvid": Workload(model, x.clone(), mode, "auto"),
                 "native": Workload(native, x.clone(), mode, "reference")}
    for w in workloads.values():
        w.x.requires_grad_(mode == "fwd_bwd")
    _check_parity(case, workloads)
    return workloads


def _check_parity(case: ModelCase, workloads: Dict[str, Workload]) -> None:
    outs = {name: w() for name, w in workloads.items()}
    name = f"{case.model} ({case.label})"
    assert_within(name, {"output": relative_error(outs["fastvid"], outs["native"])}, OUTPUT_RTOL)
    if workloads["fastvid"].mode == "fwd_bwd":
        fast, native = workloads["fastvid"], workloads["native"]
        params_f, params_n = list(fast.module.parameters()), list(native.module.parameters())
        assert len(params_f) == len(params_n), f"{name}: convert changed the parameter count"
        errors = {"grad_x": relative_error(fast.x.grad, native.x.grad)}
        # Some gradients are zero in exact arithmetic (the φ bias of a softmax nonlocal block: it adds
        # a constant to every logit of a row) and come out as rounding noise: each gradient's error is
        # measured against at least GRAD_FLOOR × the largest parameter-gradient norm of the model.
        scale = max(float(p.grad.norm()) for p in params_n if p.grad is not None)
        for index, (pf, pn) in enumerate(zip(params_f, params_n)):
            if pn.grad is None or pf.grad is None:
                if (pn.grad is None) != (pf.grad is None):
                    errors[f"grad_param{index}{tuple(pn.shape)}"] = float("nan")  # one provider has none
                continue
            diff = float((pf.grad.double() - pn.grad.double()).norm())
            errors[f"grad_param{index}{tuple(pn.shape)}"] = diff / max(float(pn.grad.norm()), GRAD_FLOOR * scale)
        assert_within(name, errors, GRAD_RTOL)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_model(benchmark, case, mode, provider):
    workloads = _workloads(case, mode)
    step = workloads[provider]
    step()  # warm-up: oneDNN primitives, allocator
    benchmark.group = f"{case.model}-{mode}"
    benchmark.extra_info.update(model=case.model, shape=case.label, mode=mode, provider=provider, dtype="fp32",
                                threads=torch.get_num_threads(),
                                fastvid_modules_left=_fastvid_modules(workloads["native"].module))
    benchmark(step)
