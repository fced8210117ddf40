"""Streaming (issue 13, feature 2): a ConvLSTM / ConvGRU run chunk by chunk, each call starting from the
state the previous one returned, equals one call on the whole sequence — outputs, final states and the
gradients of the input, the initial state and every parameter (gradients flow through the carried
state). Bidirectional modules are refused by ``stream``: their reverse direction needs the future."""
import pytest
import torch

import fastvid
from fastvid.nn import ConvGRU, ConvLSTM

B, T, C_IN, H, W = 2, 5, 3, 5, 4

MODULES = {
    "lstm-2layers": lambda strategy: ConvLSTM(C_IN, 4, 3, num_layers=2, strategy=strategy),
    # layers of different widths: states travel as per-layer lists
    "lstm-widths-peephole": lambda strategy: ConvLSTM(C_IN, [4, 3], [3, 1], num_layers=2, peephole=True,
                                                      strategy=strategy),
    "gru-2layers": lambda strategy: ConvGRU(C_IN, 4, 3, num_layers=2, strategy=strategy),
    "gru-ballas-stacked": lambda strategy: ConvGRU(C_IN, [3, 4], 3, num_layers=2, reset_after=False,
                                                   input_to_all_layers=True, strategy=strategy),
}
CHUNKINGS = {"2+1+2": [2, 1, 2], "frame-by-frame": [1] * T}
# (case, chunking, backend, strategy): every case on both strategies of the C++ kernels; the Triton
# cells (under the slow interpreter on CPU) on one LSTM and one GRU
GRID = ([(case, chunking, "cpu", strategy) for case in MODULES for chunking in CHUNKINGS
         for strategy in ("hoisted", "concat")]
        + [(case, "2+1+2", "triton", None) for case in ("lstm-2layers", "gru-2layers")])


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def _flatten(state):
    """(h, c) | h, each a stacked tensor or a per-layer list -> list of tensors."""
    flat = []
    for s in (state if isinstance(state, tuple) else (state,)):
        flat.extend(s if isinstance(s, list) else [s])
    return flat


def _initial_state(module, generator):
    """A random non-zero initial state in the module's own format (tensor or per-layer list)."""
    shapes = [(B, c, H, W) for c in module.hidden_channels]
    layers = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    stacked = torch.stack(layers) if len(set(shapes)) == 1 else layers
    if isinstance(module, ConvGRU):
        return stacked
    cells = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    return stacked, (torch.stack(cells) if len(set(shapes)) == 1 else cells)


def _leaves(state):
    """The same state with every tensor a fresh leaf that requires grad."""
    def leaf(s):
        return [t.detach().requires_grad_() for t in s] if isinstance(s, list) else s.detach().requires_grad_()
    return tuple(leaf(s) for s in state) if isinstance(state, tuple) else leaf(state)


def _backward(module, x, state, output, final):
    """Backward of a fixed random weighting of the output and the final state; returns the gradients
    of x, of the initial state's tensors and of every parameter."""
    generator = torch.Generator().manual_seed(7)
    outputs = [output] + _flatten(final)
    weights = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
    module.zero_grad()
    torch.autograd.backward(outputs, weights)
    grads = {"x": x.grad, **{f"state{i}": s.grad for i, s in enumerate(_flatten(state))}}
    grads.update({name: p.grad.clone() for name, p in module.named_parameters()})
    return grads


@pytest.mark.parametrize("case,chunking,backend,strategy", GRID, ids=["-".join(map(str, g)) for g in GRID])
def test_chunk_by_chunk_equals_one_call(case, chunking, backend, strategy):
    if backend == "triton" and fastvid._backend.not_supported_reasons("triton", [torch.zeros(1)]):
        pytest.skip("triton cannot run CPU tensors here: " + "; ".join(
            fastvid._backend.not_supported_reasons("triton", [torch.zeros(1)])))
    torch.manual_seed(0)
    module = _randomize(MODULES[case](strategy)).double()
    generator = torch.Generator().manual_seed(1)
    x_data = torch.randn(B, T, C_IN, H, W, generator=generator, dtype=torch.float64)
    state_data = _initial_state(module, generator)

    with fastvid.backend(backend):
        x, state = x_data.clone().requires_grad_(), _leaves(state_data)
        whole_output, whole_final = module(x, state)
        whole_grads = _backward(module, x, state, whole_output, whole_final)

        x, state = x_data.clone().requires_grad_(), _leaves(state_data)
        carried, outputs = state, []
        for chunk in x.split(CHUNKINGS[chunking], dim=1):
            output, carried = module.stream(chunk, carried)
            outputs.append(output)
        chunked_output = torch.cat(outputs, dim=1)
        chunked_grads = _backward(module, x, state, chunked_output, carried)

    # float64, same kernels, same operation order per step: only summation order differs
    tolerance = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked_output, whole_output, **tolerance)
    for i, (a, b) in enumerate(zip(_flatten(carried), _flatten(whole_final), strict=True)):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"final state {i}: {m}")
    assert set(chunked_grads) == set(whole_grads)
    for name, expected in whole_grads.items():
        assert expected is not None and expected.abs().sum() > 0, f"grad {name} is empty"
        torch.testing.assert_close(chunked_grads[name], expected, **tolerance, msg=lambda m: f"grad {name}: {m}")


def test_streaming_with_time_first_layout():
    """batch_first=False: chunks along dim 0."""
    module = _randomize(ConvLSTM(C_IN, 4, 3, num_layers=2, batch_first=False)).double()
    x = torch.randn(T, B, C_IN, H, W, dtype=torch.float64)
    with torch.no_grad():
        whole_output, (whole_h, whole_c) = module(x)
        state, outputs = None, []
        for frame in x.split(1, dim=0):
            output, state = module.stream(frame, state)
            outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs, dim=0), whole_output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0], whole_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[1], whole_c, rtol=1e-10, atol=1e-12)


def test_the_carried_state_matters():
    """Guards the equality test above against a module that ignores its state: starting the second
    chunk from zeros gives a different output."""
    module = _randomize(ConvGRU(C_IN, 4, 3)).double()
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = module(x)
        _, state = module.stream(x[:, :2])
        continued, _ = module.stream(x[:, 2:], state)
        restarted, _ = module.stream(x[:, 2:])
    torch.testing.assert_close(continued, whole[:, 2:], rtol=1e-10, atol=1e-12)
    assert (restarted - whole[:, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_bidirectional_streaming_is_rejected(cls):
    module = cls(C_IN, 4, 3, bidirectional=True)
    x = torch.randn(B, 2, C_IN, H, W)
    with pytest.raises(ValueError, match="bidirectional module cannot run chunk by chunk"):
        module.stream(x)
    _, state = module(x)  # forward still accepts an initial state, as nn.LSTM does
    with pytest.raises(ValueError, match="reverse direction"):
        module.stream(x, state)
