"""Pieces every Triton kernel module shares: load/store helpers, input checks, the launch rule under
the interpreter, and op registration.

Interpreter notes (TRITON_INTERPRET=1, how the kernels run on CPU tensors here):
* ``tl`` casts fp32 -> bf16 by truncation there, so stores round to nearest even by hand;
* ``wrap_triton`` hands back the bare kernel instead of a traceable wrapper, so fake-tensor tracing
  (torch.compile, opcheck) would run the interpreter on fake data: kernels are not launched on
  fake or meta tensors (the op then acts as its own shape function), and the ops are kept opaque
  under functionalization so compiled graphs call them eagerly instead of losing the kernel.
"""
import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

AVAILABLE = triton is not None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


if AVAILABLE:
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    @triton.jit
    def ld(ptr, mask, IS64: tl.constexpr):
        """Masked load widened to the accumulation type (fp64 for fp64 tensors, else fp32)."""
        x = tl.load(ptr, mask=mask, other=0.0)
        if IS64:
            y = x.to(tl.float64)
        else:
            y = x.to(tl.float32)
        return y

    @triton.jit
    def narrow(x, like_ptr, FIX_BF16: tl.constexpr):
        """x (accumulation dtype) converted to the element type of like_ptr; FIX_BF16 rounds bf16 to
        nearest even by hand (the interpreter's cast truncates)."""
        if FIX_BF16:
            if like_ptr.dtype.element_ty == tl.bfloat16:
                x32 = x.to(tl.float32)
                bits = x32.to(tl.uint32, bitcast=True)
                bits = bits + (((bits >> 16) & 1) + 0x7FFF)
                y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                y = tl.where(x32 != x32, x32.to(tl.bfloat16), y)
            else:
                y = x.to(like_ptr.dtype.element_ty)
        else:
            y = x.to(like_ptr.dtype.element_ty)
        return y

    @triton.jit
    def st(ptr, x, mask, FIX_BF16: tl.constexpr):
        """Masked store narrowed to the pointer's dtype (see narrow)."""
        tl.store(ptr, narrow(x, ptr, FIX_BF16), mask=mask)

    # True when @triton.jit produced interpreter functions (TRITON_INTERPRET=1 at triton import).
    INTERPRET = type(ld).__name__ == "InterpretedFunction"
    FIX_BF16 = INTERPRET

    def check_tensor(fn, name, t, rank):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must be {rank}-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(
                f"{fn}: {name} is a CPU tensor; the Triton kernels need GPU tensors, or "
                "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU")

    def should_launch(n, t):
        """Whether to launch a kernel over ``n`` elements of tensors like ``t``: not for empty work,
        meta tensors, or fake tensors under the interpreter (see the module docstring)."""
        if n == 0 or t.device.type == "meta":
            return False
        return not (INTERPRET and is_fake(t))

    def device_guard(t):
        """Context for launching a kernel on ``t``: Triton launches on the current CUDA device and
        its current stream, so make ``t``'s device current (nothing to do for CPU tensors under the
        interpreter). Launchers look it up as ``_common.device_guard`` at call time."""
        if t.device.type == "cuda":
            return torch.cuda.device(t.device)
        return contextlib.nullcontext()

    def no_double_backward(name):
        """Autograd formula of a backward op: differentiating it raises."""
        def backward(ctx, *grads):
            raise RuntimeError(f"fastvid::{name}: double backward (differentiating the backward op) is not "
                               "supported by the Triton kernels")
        return backward

    def _opaque_under_functionalization(mode, op, types, args, kwargs):
        # triton_op decomposes the op into its body under FunctionalTensorMode so the backend sees
        # the wrap_triton HOP; under the interpreter there is no HOP and the kernel would vanish.
        return mode.__torch_dispatch__(op, types, args, kwargs)

    def register_ops(entries):
        """Registers (name, body, autograd backward or None, setup_context or None) entries as
        ``fastvid::<name>`` triton_ops. None as backward: a backward op (no double backward).
        A module may be imported twice (``fastvid.triton_kernels.x`` and ``triton_kernels.x`` from a
        source checkout): an op that exists already is left alone."""
        for name, body, backward, setup in entries:
            if hasattr(torch.ops.fastvid, name):
                continue
            op = torch.library.triton_op(f"fastvid::{name}", body, mutates_args=())
            if INTERPRET:
                op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)
            torch.library.register_autograd(f"fastvid::{name}", backward or no_double_backward(name),
                                            setup_context=setup)
