"""Keras interop (issue 13, feature 5): ConvLSTM(Cell).from_keras_weights against the Keras ConvLSTM2D
equations written here in numpy (channels-last cross-correlation with 'same' padding, gates split
i, f, c, o along the kernel's last axis), independent of fastvid and of torch's conv."""
import numpy as np
import pytest
import torch

from fastvid.nn import ConvLSTM, ConvLSTMCell


def keras_conv_same(x, kernel):
    """Keras/TensorFlow conv2d, stride 1, padding 'same', odd kernel, channels last:
    x [B, H, W, C_in], kernel [kH, kW, C_in, C_out] -> [B, H, W, C_out] (cross-correlation)."""
    kH, kW = kernel.shape[:2]
    B, H, W, _ = x.shape
    padded = np.pad(x, ((0, 0), ((kH - 1) // 2,) * 2, ((kW - 1) // 2,) * 2, (0, 0)))
    out = np.zeros((B, H, W, kernel.shape[3]))
    for dy in range(kH):
        for dx in range(kW):
            out += padded[:, dy:dy + H, dx:dx + W, :] @ kernel[dy, dx]
    return out


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def keras_convlstm2d_step(x, h, c, kernel, recurrent_kernel, bias):
    """One step of keras.layers.ConvLSTM2D (activation tanh, recurrent_activation sigmoid)."""
    kernels = np.split(kernel, 4, axis=3)  # i, f, c, o
    recurrent = np.split(recurrent_kernel, 4, axis=3)
    biases = np.split(bias, 4) if bias is not None else [0.0] * 4
    pre = [keras_conv_same(x, k) + b + keras_conv_same(h, u) for k, u, b in zip(kernels, recurrent, biases)]
    i, f, o = sigmoid(pre[0]), sigmoid(pre[1]), sigmoid(pre[3])
    c = f * c + i * np.tanh(pre[2])
    return o * np.tanh(c), c


def keras_convlstm2d(x, kernel, recurrent_kernel, bias=None):
    """ConvLSTM2D(return_sequences=True, return_state=True) on x [B, T, H, W, C_in], zero initial state."""
    B, T, H, W, _ = x.shape
    C = recurrent_kernel.shape[2]
    h, c = np.zeros((B, H, W, C)), np.zeros((B, H, W, C))
    outputs = []
    for t in range(T):
        h, c = keras_convlstm2d_step(x[:, t], h, c, kernel, recurrent_kernel, bias)
        outputs.append(h)
    return np.stack(outputs, axis=1), h, c


def keras_layer_weights(rng, c_in, filters, kernel_size, use_bias=True, scale=0.4):
    """Random arrays shaped like a Keras ConvLSTM2D layer's get_weights()."""
    kH, kW = kernel_size
    weights = [scale * rng.standard_normal((kH, kW, c_in, 4 * filters)),
               scale * rng.standard_normal((kH, kW, filters, 4 * filters))]
    if use_bias:
        weights.append(scale * rng.standard_normal(4 * filters))
    return weights


def channels_first(array):
    """[B, (T,) H, W, C] numpy -> [B, (T,) C, H, W] torch."""
    t = torch.from_numpy(array)
    return t.movedim(-1, -3)


TOLERANCE = dict(rtol=1e-10, atol=1e-12)  # float64 throughout; only summation order differs


@pytest.mark.parametrize("use_bias", [True, False])
def test_cell_matches_keras_equations(use_bias):
    rng = np.random.default_rng(0)
    B, H, W, C_in, C = 2, 6, 5, 3, 4
    weights = keras_layer_weights(rng, C_in, C, (3, 5), use_bias)  # non-square: catches a kH/kW swap
    cell = ConvLSTMCell.from_keras_weights(*weights)
    assert cell.weight_ih.dtype == torch.float64 and cell.kernel_size == (3, 5)
    h, c = rng.standard_normal((B, H, W, C)), rng.standard_normal((B, H, W, C))
    state = (channels_first(h), channels_first(c))
    for _ in range(3):
        x = rng.standard_normal((B, H, W, C_in))
        h, c = keras_convlstm2d_step(x, h, c, weights[0], weights[1], weights[2] if use_bias else None)
        with torch.no_grad():
            state = cell(channels_first(x), state)
        torch.testing.assert_close(state[0], channels_first(h), **TOLERANCE)
        torch.testing.assert_close(state[1], channels_first(c), **TOLERANCE)


def test_stacked_layers_match_keras_equations():
    """Two stacked ConvLSTM2D layers (return_sequences=True) of different widths and kernels."""
    rng = np.random.default_rng(1)
    B, T, H, W, C_in = 2, 4, 5, 6, 3
    layers = [keras_layer_weights(rng, C_in, 4, (3, 3)), keras_layer_weights(rng, 4, 2, (5, 1))]
    module = ConvLSTM.from_keras_weights(layers)
    assert module.num_layers == 2 and module.hidden_channels == [4, 2]
    x = rng.standard_normal((B, T, H, W, C_in))
    sequence1, _, _ = keras_convlstm2d(x, *layers[0])
    sequence2, h2, c2 = keras_convlstm2d(sequence1, *layers[1])
    with torch.no_grad():
        output, (h_n, c_n) = module(channels_first(x))
    torch.testing.assert_close(output, channels_first(sequence2), **TOLERANCE)
    # layers of different widths: per-layer state lists, the last layer's state is Keras's return_state
    torch.testing.assert_close(h_n[1], channels_first(h2), **TOLERANCE)
    torch.testing.assert_close(c_n[1], channels_first(c2), **TOLERANCE)


def test_single_layer_list_and_float32_and_time_first():
    rng = np.random.default_rng(2)
    weights = [w.astype(np.float32) for w in keras_layer_weights(rng, 2, 3, (3, 3))]
    module = ConvLSTM.from_keras_weights(weights, batch_first=False)
    assert module.weight_ih_l0.dtype == torch.float32 and not module.batch_first
    x = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)  # Keras [B, T, H, W, C]
    expected, _, _ = keras_convlstm2d(x.astype(np.float64), *[w.astype(np.float64) for w in weights])
    with torch.no_grad():
        output, _ = module(channels_first(x).transpose(0, 1))
    # float32 parameters and inputs vs a float64 evaluation: a few float32 ulps of values of order 1
    torch.testing.assert_close(output.transpose(0, 1).double(), channels_first(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit_forget_bias", [True, False])
def test_unit_forget_bias_only_affects_reset_parameters(unit_forget_bias):
    rng = np.random.default_rng(3)
    weights = keras_layer_weights(rng, 2, 3, (3, 3))
    module = ConvLSTM.from_keras_weights(weights, unit_forget_bias=unit_forget_bias)
    cell = ConvLSTMCell.from_keras_weights(*weights, unit_forget_bias=unit_forget_bias)
    for bias_ih, bias_hh in ((module.bias_ih_l0, module.bias_hh_l0), (cell.bias_ih, cell.bias_hh)):
        torch.testing.assert_close(bias_ih.detach(), torch.from_numpy(weights[2]), rtol=0, atol=0)  # copied as is
        assert not bias_hh.any()
    module.reset_parameters()
    forget = (module.bias_ih_l0 + module.bias_hh_l0)[3:6]
    if unit_forget_bias:
        assert torch.equal(forget, torch.ones(3, dtype=forget.dtype))
    else:
        assert not torch.equal(forget, torch.ones(3, dtype=forget.dtype))


@pytest.mark.parametrize("config,match", [
    (dict(recurrent_activation="hard_sigmoid"), "recurrent_activation='hard_sigmoid'.*Keras 2"),
    (dict(activation="relu"), "activation='relu'"),
    (dict(padding="valid"), "padding='valid'"),
    (dict(strides=2), "strides=2"),
    (dict(dilation_rate=(2, 1)), "dilation_rate"),
])
def test_unsupported_keras_configurations_are_refused(config, match):
    weights = keras_layer_weights(np.random.default_rng(4), 2, 3, (3, 3))
    with pytest.raises(ValueError, match=match):
        ConvLSTMCell.from_keras_weights(*weights, **config)
    with pytest.raises(ValueError, match=match):
        ConvLSTM.from_keras_weights([weights], **config)


def test_bad_arrays_are_refused():
    rng = np.random.default_rng(5)
    kernel, recurrent, bias = keras_layer_weights(rng, 2, 3, (3, 3))
    with pytest.raises(ValueError, match="kernel must be"):
        ConvLSTMCell.from_keras_weights(kernel[..., :-1], recurrent, bias)
    with pytest.raises(ValueError, match="recurrent_kernel must be"):
        ConvLSTMCell.from_keras_weights(kernel, recurrent[:, :, :2], bias)
    with pytest.raises(ValueError, match="bias must be"):
        ConvLSTMCell.from_keras_weights(kernel, recurrent, bias[:-1])
    even = keras_layer_weights(rng, 2, 3, (2, 3))
    with pytest.raises(ValueError, match="even"):
        ConvLSTMCell.from_keras_weights(*even)
    other = keras_layer_weights(rng, 5, 3, (3, 3))  # reads 5 channels, the layer below has 3 filters
    with pytest.raises(ValueError, match=r"layers\[1\] reads 5 channels"):
        ConvLSTM.from_keras_weights([[kernel, recurrent, bias], other])


def test_one_layer_as_nested_lists_and_integer_tensors():
    """One layer's arrays as nested Python lists (as read back from JSON) were taken for a stack of layers and
    refused with a misleading kernel shape; integer torch tensors skipped the floating-point check and failed
    later in Module.to without naming the argument."""
    rng = np.random.default_rng(3)
    weights = keras_layer_weights(rng, 2, 3, (3, 3))
    from_arrays = ConvLSTM.from_keras_weights(weights)
    from_lists = ConvLSTM.from_keras_weights([w.tolist() for w in weights])
    for (name, a), (_, b) in zip(from_arrays.named_parameters(), from_lists.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"kernel must be a floating-point array, got dtype torch.int64"):
        ConvLSTM.from_keras_weights([torch.from_numpy(w).long() for w in weights])


def test_imports_leave_the_global_random_state_alone():
    """The modules are built and then overwritten: the initialisation they replace must not move the global
    generator (a seeded script would otherwise draw different numbers after an import)."""
    rng = np.random.default_rng(0)
    weights = keras_layer_weights(rng, 3, 4, (3, 3), True)
    before = torch.get_rng_state()
    ConvLSTMCell.from_keras_weights(*weights)
    ConvLSTM.from_keras_weights([list(weights)])
    assert torch.equal(torch.get_rng_state(), before)
