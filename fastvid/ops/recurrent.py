"""ConvLSTM / ConvGRU functional API and the Python side of the custom ops.

For each C++ op (schemas in csrc/ops.cpp) this module registers a fake kernel and, for the cell
ops, the autograd formula (backward = the matching ``*_backward`` op); the sequence ops' autograd
kernels are C++ (csrc/autograd.cpp: no Python between a call's forward and backward). The public
functions pick the backend (fastvid._backend), apply autocast, and for whole sequences pick the strategy.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import _backend
from .._sizes import pair
from ._common import autocast_inputs, check_one_device, double_backward_unsupported, require_tensors
from ..reference import recurrent as ref

__all__ = ["lstm_cell", "gru_cell", "gru_reset_hidden", "convlstm", "convgru", "set_strategy", "STRATEGIES"]

# ------------------------------------------------------------------------------ strategies
STRATEGIES = {"hoisted": 0, "concat": 1, "winograd": 2}
# The strategy used without timing: under torch.use_deterministic_algorithms(True) (a timed choice
# could differ between runs, and the two strategies round differently), while tracing for
# torch.compile a shape eager has not timed, and for a forced choice. 'hoisted' is cuDNN's RNN design.
FIXED_STRATEGY = "hoisted"
CACHE_SIZE = 256  # timed choices kept (least recently used dropped first)
_default_strategy = "auto"
_strategy_cache: "OrderedDict[tuple, int]" = OrderedDict()  # tuning key -> code, least recently used first
_cache_lock = threading.Lock()  # guards _strategy_cache
_timing_lock = threading.Lock()  # one thread times at a time; the others wait for its choice


def _fresh_locks_in_child():
    """A process forked while another thread held a lock (timing a new shape: a DataLoader's fork workers
    starting beside a training thread) would wait on it forever at its first new shape."""
    global _cache_lock, _timing_lock
    _cache_lock, _timing_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_in_child)


def set_strategy(name: str) -> None:
    """'auto' (time the strategies once per step geometry/dtype/device/layout and cache the fastest,
    like ``torch.backends.cudnn.benchmark``), 'hoisted' (input conv over all frames at once, then a
    hidden conv per step), 'concat' (one conv per step over a persistent [x_t, h] buffer) or
    'winograd' (both convs Winograd F(2x2, 3x3), F(4x4, 3x3) for bf16, the gate math per conv strip; CPU,
    3x3 kernel, dilation 1, no lengths: a sequence it cannot run raises a ValueError)."""
    global _default_strategy
    if name != "auto" and name not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto', 'hoisted', 'concat' or 'winograd', got {name!r}")
    with _cache_lock:
        _default_strategy = name
        _strategy_cache.clear()


def _tuning_key(x: Tensor, C: int, kernel, dilation, channels_last: bool, save: bool, *family) -> tuple:
    """What predicts the faster strategy: the per-step geometry (B, C_in, H, W, C, kernel, dilation),
    dtype, device, layout, training (save) and the op family. T enters only as a bucket (1, 2-3, 4-7,
    8+): both strategies do the same work per step (hoisting batches the T input convolutions into
    one), so their ratio moves little with the clip length once a few steps amortise the batching; a
    new T in a known bucket reuses the choice instead of timing ~6 passes inside the user's forward.
    None where a size is symbolic (torch.export): no one eager choice applies to all the sizes it stands
    for, and hashing it would pin it to one. Under torch.compile the sizes are left out (None): dynamo
    hands a symbolic size to Python as an int (the isinstance test is False there), and a key built from
    it pinned every batch and frame size (a recompile per size, then fullgraph's recompile limit)."""
    if any(isinstance(n, torch.SymInt) for n in x.shape):
        return None
    if torch.compiler.is_compiling():
        B = C_in = H = W = T_bucket = None
    else:
        B, T, C_in, H, W = (int(n) for n in x.shape)  # torch.jit.trace hands out sizes as tensors
        T_bucket = min(T, 8).bit_length()
    return (str(x.device), x.dtype, B, C_in, H, W, C, tuple(kernel), tuple(dilation), T_bucket, channels_last,
            save) + family


def _without_sizes(key: tuple) -> tuple:
    """A timed key with its sizes (B, C_in, H, W, T bucket) left out, as _tuning_key makes it under torch.compile."""
    return key[:2] + (None,) * 4 + key[6:9] + (None,) + key[10:]


def winograd_unsupported_reason(x: Tensor, weight_hh: Tensor, dilation, lengths=None) -> Optional[str]:
    """Why the 'winograd' strategy cannot run this sequence (mirror of check_winograd in
    csrc/recurrent/recurrent_winograd_cpu.cpp), or None when it can."""
    if lengths is not None:
        return "it does not take lengths (variable-length batches)"
    if x.device.type != "cpu":
        return "it runs on CPU tensors only"
    if tuple(weight_hh.shape[2:]) != (3, 3):
        return f"it needs a 3x3 kernel, got {weight_hh.shape[2]}x{weight_hh.shape[3]}"
    if tuple(dilation) != (1, 1):
        return f"it needs dilation 1, got {tuple(dilation)}"
    return None


def _keep_saved(tensor: Tensor) -> Tensor:
    return tensor


def _time_strategies(device: str, run, args, candidates=(0, 1)) -> int:
    """The fastest strategy code: each candidate once to warm up, then best of two timed runs of
    ``run(code, args)``, with backward where a tensor of ``args`` requires grad.

    The timed runs take detached copies of the caller's tensors (the same storage), so their backwards
    reach none of the caller's graph: before, a hook on an input or weight fired once per timed
    backward and a retain_grad()'ed input kept the timing's gradient. The timed backwards keep their
    saved tensors as they are (identity saved-tensor hooks, which override the caller's): under
    activation checkpointing (torch.utils.checkpoint, use_reentrant=False) the caller's hooks drop
    them, and unpacking one in a timed backward recomputed the checkpointed forward, whose sequence op
    waited for this timing to finish: a deadlock. (save_on_cpu would likewise time its copies.)"""
    args = tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in args)
    grad_inputs = [t for t in args if isinstance(t, Tensor) and t.requires_grad] if torch.is_grad_enabled() else []

    def once(code):
        if not grad_inputs:
            with torch.no_grad():
                run(code, args)
            return
        with torch.autograd.graph.saved_tensors_hooks(_keep_saved, _keep_saved):
            output = run(code, args)[0]
            torch.autograd.grad(output, grad_inputs, torch.ones_like(output), allow_unused=True)

    timings = {}
    for code in candidates:
        once(code)  # warm-up: oneDNN/cuDNN build their primitives on the first call
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(2):  # best of two: one timing alone flips on noise
            start = time.perf_counter()
            once(code)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)  # the tensors' GPU, not the current one
            best = min(best, time.perf_counter() - start)
        timings[code] = best
    return min(timings, key=timings.get)


def _pick_strategy(name: Optional[str], key, run, args, winograd_reason: Optional[str] = None) -> int:
    """Strategy code for one sequence call (`key`: _tuning_key's; None: FIXED_STRATEGY, untimed).
    `run(code, args)` runs the op once with that strategy on the tensors `args`; where one requires
    grad (a training call) each candidate is timed forward + backward, else forward only.
    `winograd_reason`: why 'winograd' cannot run this call (None: it can; auto then times it too).
    Thread-safe: one thread times a key, threads needing a choice meanwhile wait for it."""
    name = name or _default_strategy
    if name != "auto":
        if name not in STRATEGIES:
            raise ValueError(f"strategy must be 'auto', 'hoisted', 'concat' or 'winograd', got {name!r}")
        if name == "winograd" and winograd_reason is not None:
            raise ValueError(f"strategy 'winograd' cannot run this sequence: {winograd_reason}; "
                             "use 'hoisted', 'concat' or 'auto'")
        return STRATEGIES[name]
    if torch.are_deterministic_algorithms_enabled() or key is None:
        return STRATEGIES[FIXED_STRATEGY]
    # A call winograd cannot run (e.g. with lengths) gets its own choice, never a cached 'winograd'.
    key = key + (winograd_reason is None,)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        # Cannot time while tracing (torch.jit.trace would record the timed runs into its graph) nor
        # inside a torch.func transform (its timed backward failed under vmap, whose per-sample fallback
        # otherwise runs the op): the choice eager made for this key, if any (read without the lock,
        # which dynamo cannot enter; a dict read is atomic), so eager and compiled agree. Under
        # torch.compile the key has no sizes: eager's choice for this layer geometry where it made one
        # choice for every size it timed, else the fixed rule.
        if key[2] is None:
            choices = {code for timed, code in list(_strategy_cache.items()) if _without_sizes(timed) == key}
            return choices.pop() if len(choices) == 1 else STRATEGIES[FIXED_STRATEGY]
        return _strategy_cache.get(key, STRATEGIES[FIXED_STRATEGY])
    with _cache_lock:
        if key in _strategy_cache:
            _strategy_cache.move_to_end(key)
            return _strategy_cache[key]
    with _timing_lock:
        with _cache_lock:  # timed by another thread while this one waited
            if key in _strategy_cache:
                return _strategy_cache[key]
        candidates = tuple(c for n, c in STRATEGIES.items() if n != "winograd" or winograd_reason is None)
        code = _time_strategies(key[0], run, args, candidates)
        with _cache_lock:
            _strategy_cache[key] = code
            while len(_strategy_cache) > CACHE_SIZE:
                _strategy_cache.popitem(last=False)
    return code


def chosen_strategies() -> dict:
    """The cached auto choices, least recently used first: {tuning key: strategy name}, the key
    being (device ('cpu', 'cuda:1'), dtype, B, C_in, H, W, C, kernel, dilation, T bucket, channels_last,
    training[, family], winograd eligible)."""
    names = {v: k for k, v in STRATEGIES.items()}
    with _cache_lock:
        return {key: names[code] for key, code in _strategy_cache.items()}


# ------------------------------------------------------------------------------ helpers
def _acc(dtype):
    return ref.compute_dtype(dtype)


def _channels_last(x5: Tensor) -> bool:
    """Frames of [B, T, C, H, W] with channels innermost; mirror of frames_channels_last in C++."""
    return x5.shape[2] > 1 and x5.shape[4] > 1 and x5.stride(2) < x5.stride(4)


def _frames(lead, C, H, W, channels_last, dtype, device):
    """Mirror of empty_frames() in recurrent_ops.cpp, for fake kernels."""
    if not channels_last:
        return torch.empty(*lead, C, H, W, dtype=dtype, device=device)
    n = len(lead)
    perm = list(range(n)) + [n + 2, n, n + 1]
    return torch.empty(*lead, H, W, C, dtype=dtype, device=device).permute(perm)


def _frame(B, C, H, W, channels_last, dtype, device):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(B, C, H, W, dtype=dtype, device=device).contiguous(memory_format=fmt)


RESERVE_ALIGN = 64  # bytes; mirror of kReserveAlign in recurrent_ops.cpp


def reserve_bytes(x_shape, regions) -> int:
    """Size of a sequence op's reserve (mirror of reserve_bytes() in recurrent_ops.cpp): one region per
    (dtype, channels, per_frame) in ``regions`` -- [T, B, channels, H, W] frames, or one [channels]
    vector when not per_frame --, each padded to RESERVE_ALIGN."""
    B, T, _, H, W = x_shape
    total = 0
    for dtype, channels, per_frame in regions:
        nbytes = (T * B * H * W if per_frame else 1) * channels * dtype.itemsize
        total += -(-nbytes // RESERVE_ALIGN) * RESERVE_ALIGN
    return total


def lstm_reserve_regions(dtype, C):
    """The LSTM reserve (recurrent_ops.cpp): activated i, f, o; cell states; the g-gate bias (g is
    recomputed). bf16: i, f, g, o and the cell states, all bf16."""
    if dtype == torch.bfloat16:
        return [(dtype, 4 * C, True), (dtype, C, True)]
    return [(dtype, 3 * C, True), (_acc(dtype), C, True), (dtype, C, False)]


def gru_reserve_regions(dtype, C, reset_after=True):
    """The GRU reserve: r, z, n; reset_after's h_n too for 2-byte dtypes (else it is recomputed)."""
    if reset_after and dtype.itemsize == 2:
        return [(dtype, 3 * C, True), (dtype, C, True)]
    return [(dtype, 3 * C, True)]


def _reserve(x, regions, save):
    """Fake reserve: uint8 [reserve_bytes] with save, empty without."""
    return x.new_empty(reserve_bytes(x.shape, regions) if save else 0, dtype=torch.uint8)


# ------------------------------------------------------------------------------ fake kernels + autograd
if _backend.cpu_kernels():  # the C++ ops exist only when fastvid._C loaded
    ops = torch.ops.fastvid

    # ---- lstm_cell
    @torch.library.register_fake("fastvid::lstm_cell")
    def _(gates_pre, c_prev, peephole):
        check_one_device("lstm_cell", **locals())  # the arguments
        fmt = torch.channels_last if _is_cl4(gates_pre) else torch.contiguous_format
        B, G, H, W = gates_pre.shape
        h = torch.empty(B, G // 4, H, W, dtype=gates_pre.dtype, device=gates_pre.device).contiguous(memory_format=fmt)
        c = torch.empty_like(h, dtype=_acc(gates_pre.dtype))
        return h, c, torch.empty_like(gates_pre, memory_format=fmt)

    @torch.library.register_fake("fastvid::lstm_cell_backward")
    def _(grad_h, grad_c, gates, c_prev, c, peephole):
        check_one_device("lstm_cell_backward", **locals())  # the arguments
        fmt = torch.channels_last if _is_cl4(gates) else torch.contiguous_format
        grad_c_prev = torch.empty(c_prev.shape, dtype=c_prev.dtype, device=gates.device).contiguous(memory_format=fmt)
        return torch.empty_like(gates, memory_format=fmt), grad_c_prev

    def _lstm_cell_setup(ctx, inputs, output):
        gates_pre, c_prev, peephole = inputs
        h, c, gates = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gates, c_prev, c, peephole)
        ctx.c_prev_dtype = c_prev.dtype

    def _lstm_cell_backward(ctx, grad_h, grad_c, grad_gates):
        gates, c_prev, c, peephole = ctx.saved_tensors
        grad_gates_pre, grad_c_prev = ops.lstm_cell_backward(grad_h, grad_c, gates, c_prev, c, peephole)
        grad_peephole = None
        if peephole is not None and ctx.needs_input_grad[2]:
            grad_peephole = _peephole_grad(grad_gates_pre, c_prev, c).to(peephole.dtype)
        return grad_gates_pre, grad_c_prev, grad_peephole

    torch.library.register_autograd("fastvid::lstm_cell", _lstm_cell_backward, setup_context=_lstm_cell_setup)
    torch.library.register_autograd("fastvid::lstm_cell_backward", double_backward_unsupported("lstm_cell_backward"))

    # ---- gru_cell
    @torch.library.register_fake("fastvid::gru_cell")
    def _(x_gates, h_gates, h_prev, reset_after):
        check_one_device("gru_cell", **locals())  # the arguments
        fmt = torch.channels_last if _is_cl4(x_gates) else torch.contiguous_format
        B, G, H, W = x_gates.shape
        h = torch.empty(B, G // 3, H, W, dtype=x_gates.dtype, device=x_gates.device).contiguous(memory_format=fmt)
        cache = torch.empty(B, 4 * (G // 3), H, W, dtype=x_gates.dtype, device=x_gates.device)
        return h, cache.contiguous(memory_format=fmt)

    @torch.library.register_fake("fastvid::gru_cell_backward")
    def _(grad_h, cache, h_prev, reset_after):
        check_one_device("gru_cell_backward", **locals())  # the arguments
        fmt = torch.channels_last if _is_cl4(cache) else torch.contiguous_format
        B, G, H, W = cache.shape
        d = torch.empty(B, 3 * (G // 4), H, W, dtype=cache.dtype, device=cache.device).contiguous(memory_format=fmt)
        return d, torch.empty_like(d), torch.empty_like(h_prev, memory_format=fmt)

    def _gru_cell_setup(ctx, inputs, output):
        x_gates, h_gates, h_prev, reset_after = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], h_prev)
        ctx.reset_after = reset_after

    def _gru_cell_backward(ctx, grad_h, grad_cache):
        cache, h_prev = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(h_prev)
        grad_x, grad_h_gates, grad_h_prev = ops.gru_cell_backward(grad_h, cache, h_prev, ctx.reset_after)
        return grad_x, grad_h_gates, grad_h_prev, None

    torch.library.register_autograd("fastvid::gru_cell", _gru_cell_backward, setup_context=_gru_cell_setup)
    torch.library.register_autograd("fastvid::gru_cell_backward", double_backward_unsupported("gru_cell_backward"))

    # ---- gru_reset_hidden
    @torch.library.register_fake("fastvid::gru_reset_hidden")
    def _(x_r, h_r, h_prev):
        check_one_device("gru_reset_hidden", **locals())  # the arguments
        fmt = torch.channels_last if _is_cl4(x_r) else torch.contiguous_format
        return torch.empty_like(h_prev, memory_format=fmt)

    @torch.library.register_fake("fastvid::gru_reset_hidden_backward")
    def _(grad, x_r, h_r, h_prev):
        check_one_device("gru_reset_hidden_backward", **locals())  # the arguments
        fmt = torch.channels_last if _is_cl4(x_r) else torch.contiguous_format
        return torch.empty_like(h_prev, memory_format=fmt), torch.empty_like(h_prev, memory_format=fmt)

    def _gru_reset_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _gru_reset_backward(ctx, grad):
        x_r, h_r, h_prev = ctx.saved_tensors
        grad_r, grad_h_prev = ops.gru_reset_hidden_backward(grad, x_r, h_r, h_prev)
        return grad_r, grad_r, grad_h_prev

    torch.library.register_autograd("fastvid::gru_reset_hidden", _gru_reset_backward, setup_context=_gru_reset_setup)
    torch.library.register_autograd("fastvid::gru_reset_hidden_backward",
                                    double_backward_unsupported("gru_reset_hidden_backward"))

    # ---- convlstm_sequence (autograd: csrc/autograd.cpp)
    @torch.library.register_fake("fastvid::convlstm_sequence")
    def _(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse, strategy, channels_last,
          save, lengths=None):
        # lengths may stay on the CPU while x is on a GPU
        check_one_device("convlstm_sequence", **{k: v for k, v in locals().items() if k != "lengths"})
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        output = _frames((B, T), C, H, W, cl, dt, dev)
        h_n = _frame(B, C, H, W, cl, dt, dev)
        c_n = _frame(B, C, H, W, cl, _acc(dt), dev)
        reserve = _reserve(x, lstm_reserve_regions(dt, C), save)
        return output, h_n, c_n, reserve

    @torch.library.register_fake("fastvid::convlstm_sequence_backward")
    def _(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, has_bias, h0, c0, peephole, output, reserve,
          padding, dilation, reverse, strategy, channels_last, lengths=None):
        check_one_device("convlstm_sequence_backward", **{k: v for k, v in locals().items() if k != "lengths"})
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        return (_frames((B, T), Cin, H, W, cl, dt, dev), torch.empty_like(weight_ih, memory_format=torch.contiguous_format),
                torch.empty_like(weight_hh, memory_format=torch.contiguous_format),
                x.new_empty(4 * C if has_bias else 0), _frame(B, C, H, W, cl, dt, dev),
                _frame(B, C, H, W, cl, c0.dtype, dev),
                x.new_empty((3, C) if peephole is not None else (0,), dtype=peephole.dtype if peephole is not None else dt))

    # ---- convgru_sequence (autograd: csrc/autograd.cpp)
    @torch.library.register_fake("fastvid::convgru_sequence")
    def _(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after, reverse, strategy,
          channels_last, save, lengths=None):
        check_one_device("convgru_sequence", **{k: v for k, v in locals().items() if k != "lengths"})
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        output = _frames((B, T), C, H, W, cl, dt, dev)
        h_n = _frame(B, C, H, W, cl, dt, dev)
        return output, h_n, _reserve(x, gru_reserve_regions(dt, C, reset_after), save)

    @torch.library.register_fake("fastvid::convgru_sequence_backward")
    def _(grad_output, grad_h_n, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, output, reserve, padding,
          dilation, reset_after, reverse, strategy, channels_last, lengths=None):
        check_one_device("convgru_sequence_backward", **{k: v for k, v in locals().items() if k != "lengths"})
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        return (_frames((B, T), Cin, H, W, cl, dt, dev), torch.empty_like(weight_ih, memory_format=torch.contiguous_format),
                torch.empty_like(weight_hh, memory_format=torch.contiguous_format),
                x.new_empty(3 * C if bias_ih is not None else 0), x.new_empty(3 * C if bias_hh is not None else 0),
                _frame(B, C, H, W, cl, dt, dev))


def _is_cl4(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _peephole_grad(grad_gates_pre: Tensor, c_prev: Tensor, c: Tensor) -> Tensor:
    """[3, C]: Σ d a_i·c_prev, Σ d a_f·c_prev, Σ d a_o·c over batch and pixels."""
    acc = _acc(grad_gates_pre.dtype)
    d_i, d_f, _, d_o = grad_gates_pre.to(acc).chunk(4, dim=1)
    c_prev, c = c_prev.to(acc), c.to(acc)
    return torch.stack([(d_i * c_prev).sum((0, 2, 3)), (d_f * c_prev).sum((0, 2, 3)), (d_o * c).sum((0, 2, 3))])


def _triton():
    from ..triton_kernels import recurrent as tk  # imported lazily: triton import is slow
    return tk


def _triton_convlstm_lengths(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse, lengths):
    """The Triton backend's time loop with ``lengths``: the step mask is applied inside the cell kernel."""
    tk, conv = _triton(), torch.nn.functional.conv2d
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    T = x.shape[1]
    h, c, outputs = h0, c0, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gates_pre = conv(x[:, t], weight_ih, bias, padding=padding, dilation=dilation) + \
            conv(h, weight_hh, padding=padding, dilation=dilation)
        outputs[t], h, c, _ = tk.lstm_cell_masked(gates_pre, c, h, lengths, t, peephole)
    return torch.stack(outputs, dim=1), h, c


def _triton_convgru_lengths(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after, reverse,
                            lengths):
    """As _triton_convlstm_lengths, for ConvGRU. The Ballas reset stage needs no mask: for a masked
    sample it only feeds the masked cell, which ignores it (and passes it no gradient)."""
    tk, conv = _triton(), torch.nn.functional.conv2d
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    C, T = h0.shape[1], x.shape[1]
    h, outputs = h0, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        x_gates = conv(x[:, t], weight_ih, bias_ih, padding=padding, dilation=dilation)
        if reset_after:
            h_gates = conv(h, weight_hh, bias_hh, padding=padding, dilation=dilation)
        else:
            b_rz, b_n = (None, None) if bias_hh is None else (bias_hh[:2 * C], bias_hh[2 * C:])
            h_rz = conv(h, weight_hh[:2 * C], b_rz, padding=padding, dilation=dilation)
            reset_h = tk.gru_reset_hidden(x_gates[:, :C], h_rz[:, :C], h)
            h_gates = torch.cat([h_rz, conv(reset_h, weight_hh[2 * C:], b_n, padding=padding, dilation=dilation)], 1)
        outputs[t], h, _ = tk.gru_cell_masked(x_gates, h_gates, h, lengths, t, reset_after)
    return torch.stack(outputs, dim=1), h


def _triton_conv():
    from ..triton_kernels import recurrent_conv as tc  # imported lazily: triton import is slow
    return tc


# ------------------------------------------------------------------------------ public cell ops
def lstm_cell(gates_pre: Tensor, c_prev: Tensor, peephole: Optional[Tensor] = None):
    """Fused LSTM gates: ``gates_pre`` ``[B, 4C, H, W]`` (i, f, g, o) and ``c_prev`` → ``(h, c)``.
    ``c`` is fp32 for bf16/fp16 inputs. ``peephole``: optional ``[3, C]`` (w_ci, w_cf, w_co)."""
    if has_torch_function_variadic(gates_pre, c_prev, peephole):
        return handle_torch_function(lstm_cell, (gates_pre, c_prev, peephole), gates_pre, c_prev, peephole)
    require_tensors("lstm_cell", gates_pre=gates_pre, c_prev=c_prev)
    _check_cell_state_dtype("lstm_cell", "c_prev", c_prev, "gates_pre", gates_pre)
    which = _backend.resolve(dict(gates_pre=gates_pre, c_prev=c_prev, peephole=peephole))
    if which in ("cpu", "cuda"):
        h, c, _ = torch.ops.fastvid.lstm_cell(gates_pre, c_prev, peephole)
    elif which == "triton":
        h, c, _ = _triton().lstm_cell(gates_pre, c_prev, peephole)
    else:
        h, c, _ = ref.lstm_cell(gates_pre, c_prev, peephole)
    return h, c


def _check_one_dtype(name: str, **tensors) -> None:
    """The GRU cell ops take their operands in one dtype on every backend (the reference computed a mix in
    h_prev's, where the C++ and Triton kernels refuse it)."""
    (first_name, first), *others = tensors.items()
    for arg, t in others:
        if isinstance(t, Tensor) and isinstance(first, Tensor) and t.dtype != first.dtype:
            raise TypeError(f"fastvid.{name}: {arg} has dtype {t.dtype} but {first_name} has dtype {first.dtype}")


def gru_cell(x_gates: Tensor, h_gates: Tensor, h_prev: Tensor, reset_after: bool = True) -> Tensor:
    """Fused GRU gates (r, z, n): ``x_gates``, ``h_gates`` ``[B, 3C, H, W]`` and ``h_prev`` → ``h``.
    With ``reset_after=False`` the n slot of ``h_gates`` must hold U*(r⊙h_prev) (see gru_reset_hidden).
    Under autocast all three run in the autocast dtype, as ATen's gru_cell does under CUDA autocast and
    as convgru casts its h0: a ConvGRUCell's fp32 (default or given) state meets bf16 conv outputs."""
    if has_torch_function_variadic(x_gates, h_gates, h_prev):
        return handle_torch_function(gru_cell, (x_gates, h_gates, h_prev), x_gates, h_gates, h_prev, reset_after)
    require_tensors("gru_cell", x_gates=x_gates, h_gates=h_gates, h_prev=h_prev)
    x_gates, h_gates, h_prev = autocast_inputs(x_gates.device.type, x_gates, h_gates, h_prev)
    _check_one_dtype("gru_cell", x_gates=x_gates, h_gates=h_gates, h_prev=h_prev)
    which = _backend.resolve(dict(x_gates=x_gates, h_gates=h_gates, h_prev=h_prev))
    if which in ("cpu", "cuda"):
        return torch.ops.fastvid.gru_cell(x_gates, h_gates, h_prev, reset_after)[0]
    if which == "triton":
        return _triton().gru_cell(x_gates, h_gates, h_prev, reset_after)[0]
    return ref.gru_cell(x_gates, h_gates, h_prev, reset_after)[0]


def gru_reset_hidden(x_r: Tensor, h_r: Tensor, h_prev: Tensor) -> Tensor:
    """σ(x_r + h_r) ⊙ h_prev, the first stage of the Ballas et al. ConvGRU (autocast: as gru_cell)."""
    if has_torch_function_variadic(x_r, h_r, h_prev):
        return handle_torch_function(gru_reset_hidden, (x_r, h_r, h_prev), x_r, h_r, h_prev)
    require_tensors("gru_reset_hidden", x_r=x_r, h_r=h_r, h_prev=h_prev)
    x_r, h_r, h_prev = autocast_inputs(x_r.device.type, x_r, h_r, h_prev)
    _check_one_dtype("gru_reset_hidden", x_r=x_r, h_r=h_r, h_prev=h_prev)
    which = _backend.resolve(dict(x_r=x_r, h_r=h_r, h_prev=h_prev))
    if which in ("cpu", "cuda"):
        return torch.ops.fastvid.gru_reset_hidden(x_r, h_r, h_prev)
    if which == "triton":
        return _triton().gru_reset_hidden(x_r, h_r, h_prev)
    return ref.gru_reset_hidden(x_r, h_r, h_prev)


# ------------------------------------------------------------------------------ public sequence ops
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _zero_state(x: Tensor, C: int, dtype, broadcast: bool) -> Tensor:
    """The default initial state: zeros [B, C, H, W]. For the C++ ops (broadcast=True) one zero expanded
    with strides 0, which they read without materialising it (initial_state in recurrent_ops.cpp), so
    a training call does not keep B*C*H*W zeros alive for backward."""
    B, _, _, H, W = x.shape
    if broadcast:
        return x.new_zeros((), dtype=dtype).expand(B, C, H, W)
    return x.new_zeros(B, C, H, W, dtype=dtype)


def _sequence_arguments(name, gates, x, weight_ih, weight_hh, h0, padding, dilation, default_h0: bool = True):
    """Checks what every backend needs alike (x's rank and T, the weights' gate rows, 'same' padding, h0's
    shape); returns (C, padding ('same' by default), dilation, h0 (zeros by default; with default_h0=False
    None stays None: the caller makes it with _zero_state once it knows the backend))."""
    if not isinstance(x, Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"fastvid.{name}: x must be [B, T, C_in, H, W], got {shape}")
    if not isinstance(weight_hh, Tensor) or weight_hh.dim() != 4 or weight_hh.shape[0] != gates * weight_hh.shape[1]:
        shape = tuple(weight_hh.shape) if isinstance(weight_hh, Tensor) else type(weight_hh).__name__
        raise ValueError(f"fastvid.{name}: weight_hh must be [{gates}*C, C, kH, kW], got {shape}")
    C = weight_hh.shape[1]
    if not isinstance(weight_ih, Tensor) or weight_ih.dim() != 4 or weight_ih.shape[0] != gates * C:
        shape = tuple(weight_ih.shape) if isinstance(weight_ih, Tensor) else type(weight_ih).__name__
        raise ValueError(f"fastvid.{name}: weight_ih must be [{gates}*C, C_in, kH, kW] with C = {C} (weight_hh's), "
                         f"got {shape}")
    dilation = pair(dilation)
    if len(dilation) != 2 or any(d < 1 for d in dilation):
        raise ValueError(f"fastvid.{name}: dilation must be one int or an (H, W) pair, each >= 1, got {dilation}")
    if x.shape[1] == 0:  # (the C++ ops said so; the Triton loop returned h0, the LN time loops failed in stack)
        raise ValueError(f"fastvid.{name}: x has sequence length T = 0 (shape {tuple(x.shape)})")
    if padding is None:
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight_hh.shape[2:]))
    padding = pair(padding)
    if len(padding) != 2:
        raise ValueError(f"fastvid.{name}: padding must be one int or an (H, W) pair, got {padding}")
    for k, p, d in zip(weight_hh.shape[2:], padding, dilation):  # checked here for every backend
        if p < 0 or 2 * p != d * (k - 1):
            raise ValueError(f"fastvid.{name}: the hidden state must keep its H x W: need an odd kernel and padding = "
                             f"dilation * (k - 1) / 2, got kernel {k}, padding {p}, dilation {d}")
    _check_state_shape(name, "h0", h0, x, C)
    if h0 is None and default_h0:
        h0 = _zero_state(x, C, x.dtype, broadcast=False)
    return C, padding, dilation, h0


def _check_state_shape(name: str, arg: str, state: Optional[Tensor], x: Tensor, C: int) -> None:
    """A given initial state must be [B, C, H, W] with x's B, H, W and the layer's C (checked before any
    backend runs: the Triton and layer-norm paths otherwise failed inside a convolution or named another
    argument)."""
    expected = (x.shape[0], C, x.shape[3], x.shape[4])
    if isinstance(state, Tensor) and tuple(state.shape) != expected:
        raise ValueError(f"fastvid.{name}: {arg} must be [B, C, H, W] = {expected}, got {tuple(state.shape)}")


def _check_cell_state_dtype(name: str, arg: str, c: Optional[Tensor], like_arg: str, like: Tensor) -> None:
    """The cell state in ``like``'s dtype or the accumulation dtype it comes back in (fp32 beside bf16 /
    fp16); another (an fp64 c0 beside fp32 x) was cast to it silently, as nn.LSTM refuses it."""
    if isinstance(c, Tensor) and like.is_floating_point() and c.dtype not in (like.dtype, _acc(like.dtype)):
        allowed = sorted({str(like.dtype), str(_acc(like.dtype))})
        raise TypeError(f"fastvid.{name}: {arg} has dtype {c.dtype} but {like_arg} has dtype {like.dtype}; {arg} "
                        f"must be {' or '.join(allowed)}")


def _sequence_backend(tensors: dict) -> str:
    """The backend of a sequence op. An empty batch runs the reference's per-step formulas, which give
    nn.LSTM's answer (empty outputs and states, zero weight gradients); the kernels take B >= 1."""
    which = _backend.resolve(tensors)
    return "reference" if tensors["x"].shape[0] == 0 else which


def _check_lengths(name, lengths, x):
    """``lengths`` as a ``[B]`` integer tensor (a list/tuple of ints is converted) with values in
    1..T, on the CPU or x's device; None stays None. Checking the values of lengths on a GPU syncs
    the device: CPU lengths (as pack_padded_sequence wants them) cost nothing."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        lengths = torch.as_tensor(lengths)
    if not isinstance(lengths, Tensor):
        raise TypeError(f"fastvid.{name}: lengths must be a [B] integer tensor, got {type(lengths).__name__}")
    B, T = x.shape[0], x.shape[1]
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"fastvid.{name}: lengths must be [B] = [{B}], got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"fastvid.{name}: lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.device.type != "cpu" and lengths.device != x.device:
        raise ValueError(f"fastvid.{name}: lengths is on {lengths.device} but x is on {x.device}; lengths must be "
                         f"on the CPU or x's device")
    if lengths.numel() and not torch.compiler.is_compiling():  # values are data: checked eagerly (and by the C++ op)
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > T:
            raise ValueError(f"fastvid.{name}: lengths must be in 1..T = 1..{T}, got values from {low} to {high}")
    return lengths


def convlstm(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor] = None,
             h0: Optional[Tensor] = None, c0: Optional[Tensor] = None, peephole: Optional[Tensor] = None,
             padding=None, dilation=1, reverse: bool = False, strategy: Optional[str] = None,
             lengths: Optional[Tensor] = None):
    """One ConvLSTM layer, one direction, over ``x`` ``[B, T, C_in, H, W]``.

    ``bias`` is the summed input+hidden bias ``[4C]``; ``padding`` defaults to 'same'.
    ``lengths``: optional ``[B]`` integers in 1..T (CPU or x's device) for padded variable-length
    batches, with ``pack_padded_sequence`` semantics: sample b runs steps t < lengths[b] only, its
    output is 0 after them, and in reverse it starts at its last valid step (fastvid/reference/recurrent.py).
    Returns ``(output [B, T, C, H, W], h_n, c_n)``; ``c_n`` is fp32 for bf16/fp16 inputs."""
    if has_torch_function_variadic(x, weight_ih, weight_hh, bias, h0, c0, peephole, lengths):
        return handle_torch_function(
            convlstm, (x, weight_ih, weight_hh, bias, h0, c0, peephole, lengths),
            x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse, strategy, lengths)
    C, padding, dilation, h0 = _sequence_arguments("convlstm", 4, x, weight_ih, weight_hh, h0, padding, dilation,
                                                   default_h0=False)
    lengths = _check_lengths("convlstm", lengths, x)
    _check_state_shape("convlstm", "c0", c0, x, C)
    x, weight_ih, weight_hh, bias, h0 = autocast_inputs(x.device.type, x, weight_ih, weight_hh, bias, h0)
    _check_cell_state_dtype("convlstm", "c0", c0, "x", x)
    which = _sequence_backend(dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias=bias, h0=h0, c0=c0,
                                   peephole=peephole))
    # default states made after autocast, in the dtypes the op takes (a cast would materialise them)
    h0 = _zero_state(x, C, x.dtype, which in ("cpu", "cuda")) if h0 is None else h0
    c0 = _zero_state(x, C, _acc(x.dtype), which in ("cpu", "cuda")) if c0 is None else c0
    if which == "triton" and (lengths is None or not _needs_grad(x, weight_ih, weight_hh, bias, h0, c0, peephole)):
        # the hidden conv and the cell fused, one launch per step (its backward does not take lengths)
        return _triton_conv().convlstm(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse,
                                       lengths=lengths)
    if which == "triton":
        return _triton_convlstm_lengths(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse,
                                        lengths)
    if which == "reference":
        return ref.convlstm_sequence(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse,
                                     lengths=lengths)
    save = _needs_grad(x, weight_ih, weight_hh, bias, h0, c0, peephole)

    channels_last = _channels_last(x)

    def run(code, args):
        return torch.ops.fastvid.convlstm_sequence(*args, padding, dilation, reverse, code, channels_last, save,
                                                   lengths)

    key = _tuning_key(x, C, weight_hh.shape[2:], dilation, channels_last, save)
    args = (x, weight_ih, weight_hh, bias, h0, c0, peephole)
    reason = winograd_unsupported_reason(x, weight_hh, dilation, lengths)
    output, h_n, c_n, *_ = run(_pick_strategy(strategy, key, run, args, reason), args)
    return output, h_n, c_n


def convgru(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor] = None,
            bias_hh: Optional[Tensor] = None, h0: Optional[Tensor] = None, padding=None, dilation=1,
            reset_after: bool = True, reverse: bool = False, strategy: Optional[str] = None,
            lengths: Optional[Tensor] = None):
    """One ConvGRU layer, one direction, over ``x`` ``[B, T, C_in, H, W]``. Returns ``(output, h_n)``.
    ``lengths``: optional ``[B]`` valid lengths, as in convlstm."""
    if has_torch_function_variadic(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths):
        return handle_torch_function(
            convgru, (x, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths),
            x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after, reverse, strategy, lengths)
    C, padding, dilation, h0 = _sequence_arguments("convgru", 3, x, weight_ih, weight_hh, h0, padding, dilation,
                                                   default_h0=False)
    lengths = _check_lengths("convgru", lengths, x)
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0 = autocast_inputs(x.device.type, x, weight_ih, weight_hh, bias_ih,
                                                              bias_hh, h0)
    which = _sequence_backend(dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                                   h0=h0))
    h0 = _zero_state(x, C, x.dtype, which in ("cpu", "cuda")) if h0 is None else h0  # after autocast: see convlstm
    if which == "triton" and (lengths is None or not _needs_grad(x, weight_ih, weight_hh, bias_ih, bias_hh, h0)):
        # the hidden conv and the cell fused: one launch per step (two for reset_after=False)
        return _triton_conv().convgru(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after,
                                      reverse, lengths=lengths)
    if which == "triton":
        return _triton_convgru_lengths(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after,
                                       reverse, lengths)
    if which == "reference":
        return ref.convgru_sequence(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after,
                                    reverse, lengths=lengths)
    save = _needs_grad(x, weight_ih, weight_hh, bias_ih, bias_hh, h0)

    channels_last = _channels_last(x)

    def run(code, args):
        return torch.ops.fastvid.convgru_sequence(*args, padding, dilation, reset_after, reverse, code, channels_last,
                                                  save, lengths)

    key = _tuning_key(x, C, weight_hh.shape[2:], dilation, channels_last, save, "gru", reset_after)
    args = (x, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    reason = winograd_unsupported_reason(x, weight_hh, dilation, lengths)
    output, h_n, *_ = run(_pick_strategy(strategy, key, run, args, reason), args)
    return output, h_n
