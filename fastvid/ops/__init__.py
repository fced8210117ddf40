"""Functional API: every fastvid op, dispatched to the backend chosen by fastvid._backend."""
from .attention import concatenation_attention, dot_product_attention, nonlocal_attention  # noqa: F401
from .depthwise3d import depthwise_conv3d  # noqa: F401
from .recurrent import (  # noqa: F401
    STRATEGIES, chosen_strategies, convgru, convlstm, gru_cell, gru_reset_hidden, lstm_cell, set_strategy,
)
from .recurrent_norm import convgru_ln, convlstm_ln  # noqa: F401
