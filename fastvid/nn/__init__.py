"""fastvid layers: drop-in modules built on fastvid.ops."""
from .recurrent import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell  # noqa: F401

__all__ = ["ConvLSTMCell", "ConvLSTM", "ConvGRUCell", "ConvGRU"]
