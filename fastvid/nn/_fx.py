"""torch.fx symbolic tracing of models that contain fastvid modules.

A fastvid module's forward checks shapes and picks its kernel in Python, which a symbolic value (an
``fx.Proxy``) cannot answer ("symbolically traced variables cannot be used as inputs to control flow").
So, as for nn.LSTM or nn.Conv3d, the tracer records each fastvid module as a leaf: one ``call_module``
node that the traced GraphModule runs eagerly. What uses torch.fx on a user's model (symbolic_trace,
torchvision's create_feature_extractor, FX graph-mode quantization) then sees the fastvid layers as
opaque layers. Each module's forward starts with

    if isinstance(x, torch.fx.Proxy):
        return fx_leaf(self, x, ...)

(its own first line, not a shared decorator: torch.compile caches compiled frames per code object, and
one wrapper shared by every module class hit its limit of 8 recompilations at the ninth class).
"""
from __future__ import annotations


def fx_leaf(module, *args, **kwargs):
    """The fx value of ``module(*args, **kwargs)`` as one ``call_module`` node, for a forward whose first
    argument is an fx symbolic value."""
    tracer = args[0].tracer
    path = tracer.path_of_module(module)
    if path == "":  # the module is the root of the trace: a node calling the root would recurse
        raise TypeError(f"torch.fx records fastvid.nn.{type(module).__name__} as a leaf (one call_module node, as it "
                        f"does nn.LSTM): trace a module that contains it, not the layer itself")
    return tracer.create_proxy("call_module", path, args, kwargs)
