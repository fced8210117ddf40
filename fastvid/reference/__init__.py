"""Pure-PyTorch twins of every fastvid kernel: the oracle in tests and the fallback without `_C`."""
from . import attention, attention_lstm, depthwise3d, recurrent  # noqa: F401
