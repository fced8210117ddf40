"""fastvid layers: drop-in modules built on fastvid.ops."""
from .conv3d import Conv2Plus1d, DepthwiseConv3d, SeparableConv3d, r2plus1d_mid_channels  # noqa: F401
from .nonlocal_block import NonLocalBlock  # noqa: F401
from .temporal_attention import TemporalAttention  # noqa: F401
from .recurrent import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell  # noqa: F401
from .aggregation import ContextGating, NetVLAD  # noqa: F401
from .attention_lstm import AttentionConvLSTM  # noqa: F401

__all__ = ["ConvLSTMCell", "ConvLSTM", "ConvGRUCell", "ConvGRU", "DepthwiseConv3d", "SeparableConv3d",
           "Conv2Plus1d", "r2plus1d_mid_channels", "NonLocalBlock",
           "AttentionConvLSTM", "NetVLAD", "ContextGating", "TemporalAttention"]
