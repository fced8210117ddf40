"""Functional API: every fastvid op, dispatched to the backend chosen by fastvid._backend."""
from .attention import concatenation_attention, dot_product_attention, nonlocal_attention  # noqa: F401
from .depthwise3d import depthwise_conv3d  # noqa: F401
from .recurrent import (  # noqa: F401
    STRATEGIES, chosen_strategies, convgru, convlstm, gru_cell, gru_reset_hidden, lstm_cell, set_strategy,
)
from .recurrent_norm import convgru_ln, convlstm_ln  # noqa: F401

# Each public op starts as torch.nn.functional's do: arguments that override PyTorch functions (a tensor
# subclass with __torch_function__, a TorchFunctionMode, torch.fx's Proxy) get the call as one call of the
# op. So under torch.fx symbolic tracing a call is recorded as one call_function node, run eagerly by the
# traced module, however the op was imported (the ops check shapes and pick a backend in Python, which a
# symbolic value cannot answer).
