"""Keras ``ConvLSTM2D`` weights → fastvid ``ConvLSTM`` / ``ConvLSTMCell`` (issue 13, feature 5).

A Keras ``ConvLSTM2D`` layer holds (``layer.get_weights()``)::

    kernel            [kH, kW, C_in, 4C]   input convolution, gates along the last axis in order i, f, c, o
    recurrent_kernel  [kH, kW, C,    4C]   hidden-state convolution, same gate order
    bias              [4C]                 (absent with use_bias=False)

and computes, with ``*`` a channels-last cross-correlation ("same" padding for the recurrent one)::

    i = recurrent_activation(x*W_i + h*U_i + b_i)      f = recurrent_activation(x*W_f + h*U_f + b_f)
    c = f ⊙ c + i ⊙ activation(x*W_c + h*U_c + b_c)    o = recurrent_activation(x*W_o + h*U_o + b_o)
    h = o ⊙ activation(c)

Keras's candidate gate "c" is fastvid's "g", so the gate order i, f, c, o is fastvid's i, f, g, o
(``nn.LSTM``'s) and the arrays map one to one: ``weight_ih = kernel`` transposed to
``[4C, C_in, kH, kW]``, ``weight_hh = recurrent_kernel`` likewise, ``bias_ih = bias``, ``bias_hh = 0``.

What maps and what is refused (ValueError):

* ``activation`` must be ``tanh`` and ``recurrent_activation`` ``sigmoid`` (the Keras 3 default).
  Keras 2's default ``recurrent_activation`` was ``hard_sigmoid`` (clip(0.2·x + 0.5, 0, 1) in Keras 2,
  clip(x/6 + 1/2, 0, 1) in Keras 3): fastvid's fused kernels compute the logistic sigmoid, so such a
  layer is refused rather than silently computing something else. Retrain or fine-tune it with
  sigmoid first.
* ``padding`` must be ``"same"`` (fastvid keeps H×W; "valid" shrinks the input convolution's output)
  with odd kernel sizes (TensorFlow pads even kernels unevenly), ``strides`` 1 and ``dilation_rate``
  1 (Keras dilates only the input convolution, fastvid both).
* ``unit_forget_bias`` only changes Keras's *initialisation* (it adds 1 to the forget slice of the
  bias); a trained bias array already contains whatever it became, and it is copied as is. The flag is
  passed on to the fastvid module, where it likewise only decides what ``reset_parameters()`` does
  (forget bias b_ih + b_hh starting at 1).
* Inputs: Keras's default ``data_format="channels_last"`` feeds ``[B, T, H, W, C]``; fastvid takes
  ``[B, T, C, H, W]``: ``x.permute(0, 1, 4, 2, 3)`` (outputs back with ``permute(0, 1, 3, 4, 2)``).
  The kernel layout does not depend on ``data_format``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._sizes import ntuple
from ._build import module_to_fill
from .recurrent import ConvLSTM, ConvLSTMCell

IntOrPair = Union[int, Sequence[int]]


class KerasConvLSTMWeights(NamedTuple):
    """One layer's arrays in fastvid's layout."""
    weight_ih: Tensor  # [4C, C_in, kH, kW]
    weight_hh: Tensor  # [4C, C, kH, kW]
    bias: Optional[Tensor]  # [4C] or None

    @property
    def hidden_channels(self) -> int:
        return self.weight_hh.shape[1]

    @property
    def in_channels(self) -> int:
        return self.weight_ih.shape[1]

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.weight_ih.shape[2:])


def _nesting_depth(item: Any) -> int:
    """Dimensions of ``item`` along its first elements: a kernel as nested lists (read back from JSON) is 4
    deep, a layer's list of arrays 5."""
    depth = 0
    while isinstance(item, (list, tuple)) and len(item) > 0:
        item, depth = item[0], depth + 1
    return depth + getattr(item, "ndim", 0)


def _as_tensor(array: Any, name: str) -> Tensor:
    if isinstance(array, Tensor):
        if not array.is_floating_point():  # (an integer tensor failed later in Module.to, unnamed)
            raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
        return array.detach()
    if hasattr(array, "numpy"):  # tf.Tensor / tf.Variable / keras Variable
        array = array.numpy()
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _pair(value: IntOrPair, name: str) -> tuple:
    pair = ntuple(value, 2)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return pair


def check_keras_config(padding: str = "same", strides: IntOrPair = 1, dilation_rate: IntOrPair = 1,
                       activation: str = "tanh", recurrent_activation: str = "sigmoid") -> None:
    """Raises a ValueError naming the argument unless the Keras layer's configuration is one fastvid
    computes exactly (see the module docstring)."""
    if str(activation).lower() != "tanh":
        raise ValueError(f"activation={activation!r}: fastvid's ConvLSTM computes tanh; only Keras layers with "
                         f"activation='tanh' convert")
    if str(recurrent_activation).lower() != "sigmoid":
        raise ValueError(f"recurrent_activation={recurrent_activation!r}: fastvid's ConvLSTM gates use the logistic "
                         f"sigmoid; only Keras layers with recurrent_activation='sigmoid' (the Keras 3 default; Keras 2 "
                         f"defaulted to 'hard_sigmoid') convert")
    if str(padding).lower() != "same":
        raise ValueError(f"padding={padding!r}: fastvid's ConvLSTM keeps H x W; only padding='same' converts")
    if _pair(strides, "strides") != (1, 1):
        raise ValueError(f"strides={strides!r}: only strides=1 converts")
    if _pair(dilation_rate, "dilation_rate") != (1, 1):
        raise ValueError(f"dilation_rate={dilation_rate!r}: Keras dilates only the input convolution, fastvid both; "
                         f"only dilation_rate=1 converts")


def convert_layer_weights(kernel: Any, recurrent_kernel: Any, bias: Any = None) -> KerasConvLSTMWeights:
    """A Keras ConvLSTM2D layer's arrays → fastvid's ``weight_ih``, ``weight_hh``, ``bias`` (checked)."""
    kernel, recurrent_kernel = _as_tensor(kernel, "kernel"), _as_tensor(recurrent_kernel, "recurrent_kernel")
    if kernel.dim() != 4 or kernel.shape[3] % 4:
        raise ValueError(f"kernel must be [kH, kW, C_in, 4*C] (Keras ConvLSTM2D), got {tuple(kernel.shape)}")
    kH, kW, _, gates = kernel.shape
    C = gates // 4
    if recurrent_kernel.shape != (kH, kW, C, gates):
        raise ValueError(f"recurrent_kernel must be [kH, kW, C, 4*C] = {(kH, kW, C, gates)} for a kernel of shape "
                         f"{tuple(kernel.shape)}, got {tuple(recurrent_kernel.shape)}")
    if kH % 2 == 0 or kW % 2 == 0:
        raise ValueError(f"kernel size {(kH, kW)} is even: TensorFlow pads even kernels unevenly under 'same'; "
                         f"only odd kernel sizes convert")
    if recurrent_kernel.dtype != kernel.dtype:
        raise ValueError(f"kernel and recurrent_kernel dtypes differ: {kernel.dtype} vs {recurrent_kernel.dtype}")
    # [kH, kW, in, 4C] -> [4C, in, kH, kW]; Keras's gate order i, f, c, o is fastvid's i, f, g, o
    weight_ih = kernel.permute(3, 2, 0, 1).contiguous()
    weight_hh = recurrent_kernel.permute(3, 2, 0, 1).contiguous()
    if bias is not None:
        bias = _as_tensor(bias, "bias")
        if bias.shape != (gates,):
            raise ValueError(f"bias must be [4*C] = [{gates}], got {tuple(bias.shape)}")
        bias = bias.to(kernel.dtype)
    return KerasConvLSTMWeights(weight_ih, weight_hh, bias)


def _split_layer(weights: Sequence[Any], name: str) -> KerasConvLSTMWeights:
    if len(weights) not in (2, 3):
        raise ValueError(f"{name} must be a Keras ConvLSTM2D layer's get_weights() list [kernel, recurrent_kernel"
                         f"(, bias)], got {len(weights)} arrays")
    return convert_layer_weights(*weights)


def cell_from_keras(cls, kernel, recurrent_kernel, bias=None, *, unit_forget_bias: bool = True, **config):
    """``ConvLSTMCell.from_keras_weights``: a cell holding one Keras ConvLSTM2D layer's weights."""
    check_keras_config(**config)
    weights = convert_layer_weights(kernel, recurrent_kernel, bias)
    cell = module_to_fill(cls, ConvLSTMCell, weights.in_channels, weights.hidden_channels, weights.kernel_size,
                          bias=weights.bias is not None, unit_forget_bias=unit_forget_bias)
    cell = cell.to(weights.weight_ih.dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(weights.weight_ih)
        cell.weight_hh.copy_(weights.weight_hh)
        if weights.bias is not None:
            cell.bias_ih.copy_(weights.bias)
            cell.bias_hh.zero_()
    return cell


def sequence_from_keras(cls, layers, *, batch_first: bool = True, unit_forget_bias: bool = True, strategy=None,
                        **config):
    """``ConvLSTM.from_keras_weights``: a (multi-layer) ConvLSTM from stacked Keras ConvLSTM2D layers.
    ``layers``: one ``get_weights()`` list per layer, bottom first, or a single layer's list."""
    check_keras_config(**config)
    layers = list(layers)
    if layers and (isinstance(layers[0], (Tensor, np.ndarray)) or hasattr(layers[0], "shape")
                   or _nesting_depth(layers[0]) == 4):
        layers = [layers]  # one layer's [kernel, recurrent_kernel(, bias)]: its first item a 4-D kernel
    if not layers:
        raise ValueError("layers is empty: pass one get_weights() list per Keras ConvLSTM2D layer")
    converted = [_split_layer(weights, f"layers[{k}]") for k, weights in enumerate(layers)]
    for k in range(1, len(converted)):
        if converted[k].in_channels != converted[k - 1].hidden_channels:
            raise ValueError(f"layers[{k}] reads {converted[k].in_channels} channels but layers[{k - 1}] has "
                             f"{converted[k - 1].hidden_channels} filters")
    has_bias = {w.bias is not None for w in converted}
    if len(has_bias) != 1:
        raise ValueError("either every layer has a bias (use_bias=True) or none does")
    dtypes = {w.weight_ih.dtype for w in converted}
    if len(dtypes) != 1:
        raise ValueError(f"the layers' arrays have different dtypes: {sorted(map(str, dtypes))}")
    module = module_to_fill(cls, ConvLSTM, converted[0].in_channels, [w.hidden_channels for w in converted],
                            [w.kernel_size for w in converted], num_layers=len(converted), bias=has_bias.pop(),
                            batch_first=batch_first, unit_forget_bias=unit_forget_bias,
                            strategy=strategy).to(dtypes.pop())
    with torch.no_grad():
        for layer, weights in enumerate(converted):
            getattr(module, f"weight_ih_l{layer}").copy_(weights.weight_ih)
            getattr(module, f"weight_hh_l{layer}").copy_(weights.weight_hh)
            if weights.bias is not None:
                getattr(module, f"bias_ih_l{layer}").copy_(weights.bias)
                getattr(module, f"bias_hh_l{layer}").zero_()
    return module


__all__ = ["KerasConvLSTMWeights", "check_keras_config", "convert_layer_weights", "cell_from_keras",
           "sequence_from_keras"]
