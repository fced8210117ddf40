"""Functional API: every fastvid op, dispatched to the backend chosen by fastvid._backend."""
from .attention import concatenation_attention, dot_product_attention, nonlocal_attention  # noqa: F401
from .depthwise3d import depthwise_conv3d  # noqa: F401
from .recurrent import (  # noqa: F401
    STRATEGIES, chosen_strategies, convgru, convlstm, gru_cell, gru_reset_hidden, lstm_cell, set_strategy,
)
from .recurrent_norm import convgru_ln, convlstm_ln  # noqa: F401

import torch.fx as _fx  # noqa: E402

# Under torch.fx symbolic tracing a call written fastvid.ops.<op>(...) is recorded as one call_function
# node, run eagerly by the traced module: the ops check shapes and pick a backend in Python, which a
# symbolic value cannot answer. (fx patches this namespace only: a name imported from it beforehand
# needs its own torch.fx.wrap.)
for _op in ("concatenation_attention", "dot_product_attention", "nonlocal_attention", "depthwise_conv3d", "convgru",
            "convlstm", "gru_cell", "gru_reset_hidden", "lstm_cell", "convgru_ln", "convlstm_ln"):
    _fx.wrap(_op)
del _op
