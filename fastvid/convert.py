"""Drop-in replacement of layers, weights kept, both ways.

``fastvid.convert(model)`` walks the module tree and replaces every module that a converter in
``CONVERTERS`` recognises by the fastvid layer computing the same function (``nn.Conv3d`` with
``groups == in_channels`` → ``DepthwiseConv3d``; nonlocal blocks → ``NonLocalBlock``).
``fastvid.convert(model, to="reference")`` goes back: every fastvid layer becomes plain PyTorch
modules with the same parameters (``fastvid/convert_reference.py``), for export and for users
without the compiled extension. Both ways, the hooks registered on a replaced module run on its
replacement (a warning names hooks on its parts, which may not run).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .nn.conv3d import DepthwiseConv3d, is_depthwise_conv3d
from .nn.nonlocal_block import NonLocalBlock, nonlocal_from_module

# (name, replacement(module) -> the module to put in its place, or None where it does not apply),
# tried in order. One call decides and builds: the nonlocal converter's check is the probe itself.
Converter = Tuple[str, Callable[[nn.Module], Optional[nn.Module]]]


def _depthwise(module: nn.Module) -> Optional[nn.Module]:
    return DepthwiseConv3d.from_conv3d(module) if is_depthwise_conv3d(module) else None


CONVERTERS: List[Converter] = [
    ("nonlocal_block", nonlocal_from_module),
    ("depthwise_conv3d", _depthwise),
]

TARGETS = ("fastvid", "reference")


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model), where the tensors a forward pre-hook recomputes each call are copied detached:
    torch.nn.utils.prune (and the hook forms of weight_norm / spectral_norm) keep them as plain non-leaf
    attributes, which deepcopy refuses ("Only Tensors created explicitly by the user ... support the
    deepcopy protocol"); the copy's own hook recomputes them from its copied parameters on its first call.
    Only those: any other non-leaf attribute (a tied view such as weight.t()) would become a frozen copy,
    so it still raises deepcopy's error."""
    memo = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            # prune's methods name their tensor _tensor_name; WeightNorm / SpectralNorm name it name
            name = getattr(hook, "_tensor_name", None) or getattr(hook, "name", None)
            value = vars(module).get(name) if isinstance(name, str) else None
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def convert(model: nn.Module, inplace: bool = False, to: str = "fastvid") -> nn.Module:
    """Returns ``model`` with its layers replaced (outputs equal within float tolerance, parameters
    kept). ``to="fastvid"``: native layers → fastvid layers; ``to="reference"``: fastvid layers →
    plain PyTorch modules. With ``inplace=False`` the model is deep-copied first. Use the return value:
    where ``model`` itself is replaced (a bare ``nn.Conv3d``) it is a new module even with ``inplace=True``."""
    if to not in TARGETS:
        raise ValueError(f"fastvid.convert: to must be one of {TARGETS}, got {to!r}")
    if to == "reference":
        from .convert_reference import TO_REFERENCE as converters
    else:
        converters = CONVERTERS
    if not inplace:
        model = _deepcopy(model)
    # to="reference" must replace every fastvid layer (export needs them all), so a failure raises;
    # to="fastvid" leaves a module it cannot check native, with a warning.
    tolerant = to == "fastvid"
    # Nothing here draws from the global random generator, which the caller's seeded run (data order,
    # dropout masks) should find as it left it: replacements are built without initialisation
    # (nn/_build.py), and the nonlocal probe keeps its own draws to itself (nonlocal_block._probe_matches).
    replacement = _replacement(model, converters, "", tolerant)
    if replacement is not None:
        return replacement
    _convert_children(model, converters, "", tolerant, {})
    return model


def _replacement(module: nn.Module, converters: List[Converter], path: str, tolerant: bool) -> Optional[nn.Module]:
    for name, replace in converters:
        try:
            new = replace(module)
        except Exception as error:
            if not tolerant:
                raise
            warnings.warn(f"fastvid.convert: {path or 'the model'} ({type(module).__name__}) left unconverted: the "
                          f"{name} converter raised {type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)
            return None
        if new is not None:
            lost = _state_not_kept(module, new)
            if lost:
                message = (f"fastvid.convert: {path or 'the model'} ({type(module).__name__}) left unconverted: its "
                           f"{', '.join(lost)} would be lost ({type(new).__name__} has no use for them)")
                if not tolerant:
                    raise ValueError(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                return None
            _keep_source_keys(module, new)
            if isinstance(new, NonLocalBlock):  # it names its parts; a Sequential twin runs them in registration order
                _follow_parameter_order(module, new)
            _take_over_hooks(module, new, path)
            _warn_of_dropped_arguments(module, new, path)
            return new
    return None


class _KeysToSource:
    """State-dict hook of a replacement: its keys renamed to the module it replaced (a hand-written nonlocal
    block's ``W.0.weight``, not NonLocalBlock's ``out.weight``), so checkpoints load both ways between the
    original and the converted model, as DepthwiseConv3d keeps nn.Conv3d's names anyway. The keys pair up
    by the tensors the two share (_keep_source_keys); a key the original lacks keeps its own name.
    (Callable objects, not bound methods: the hooks must pickle and take the attribute PyTorch's register
    functions set.)"""

    def __init__(self, ours_to_source: dict):
        self.ours_to_source = ours_to_source

    def __call__(self, module, state_dict, prefix, local_metadata):
        renamed = {prefix + ours: prefix + source for ours, source in self.ours_to_source.items()}
        if not any(key in renamed for key in state_dict):
            return
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:  # renamed in place: the original's key order (pop and insert moved them last)
            state_dict[renamed.get(key, key)] = value


class _KeysFromSource:
    """Load-state-dict pre-hook: the replaced module's keys (and the replacement's own) load into it."""

    def __init__(self, ours_to_source: dict):
        self.source_to_ours = {source: ours for ours, source in ours_to_source.items()}

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for source, ours in self.source_to_ours.items():
            if prefix + source in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + source)


def _state_not_kept(source: nn.Module, new: nn.Module) -> List[str]:
    """The state-dict entries of ``source`` that ``new`` does not share: a hand-written block with an extra
    parameter (a learned residual gain) whose probe passed at that parameter's initial value."""
    kept = {id(t) for t in new.state_dict(keep_vars=True).values()}
    return [name for name, t in source.state_dict(keep_vars=True).items() if id(t) not in kept]


def _follow_parameter_order(source: nn.Module, new: nn.Module) -> None:
    """Orders ``new``'s submodules so that its parameters() come in ``source``'s order (a hand-written
    nonlocal block registers g before theta and phi, NonLocalBlock theta first): an optimizer, and an
    optimizer state saved from the native model, pair moments with parameters by position."""
    position = {id(p): i for i, p in enumerate(source.parameters())}

    def first(item):
        ranks = [position[id(p)] for p in item[1].parameters() if id(p) in position] if item[1] is not None else []
        return min(ranks, default=len(position))

    items = sorted(new._modules.items(), key=first)  # stable: modules without shared parameters keep their place
    new._modules.clear()
    new._modules.update(items)


def _keep_source_keys(source: nn.Module, block: nn.Module) -> None:
    """Gives ``block`` (sharing tensors with ``source``) ``source``'s state-dict keys where they differ."""
    names = {id(t): name for name, t in source.state_dict(keep_vars=True).items()}
    mapping = {ours: names[id(t)] for ours, t in block.state_dict(keep_vars=True).items()
               if id(t) in names and names[id(t)] != ours}
    if mapping:
        block.register_state_dict_post_hook(_KeysToSource(mapping))
        block.register_load_state_dict_pre_hook(_KeysFromSource(mapping))


def _warn_of_dropped_arguments(old: nn.Module, new: nn.Module, path: str) -> None:
    """A replacement is checked on forward(x) only; forward arguments of the original beyond the input
    that the replacement does not take (AlexHex7's nonlocal port: return_nl_map=False) make calls that
    pass them raise TypeError: a warning names them."""
    taken = inspect.signature(new.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in taken.values()):
        return
    dropped = [p for p in list(inspect.signature(old.forward).parameters.values())[1:]
               if p.name not in taken and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if dropped:
        names = ", ".join(str(p) for p in dropped)
        warnings.warn(f"fastvid.convert: {path or 'the model'} ({type(old).__name__}) became a {type(new).__name__}, "
                      f"whose forward does not take its argument(s) {names}: calls that pass them will raise "
                      "TypeError (the replacement computes forward(x) only)", RuntimeWarning, stacklevel=3)


#: nn.Module's registries of forward and backward hooks.
_HOOK_REGISTRIES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                    "_backward_hooks")


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, registry) for registry in _HOOK_REGISTRIES)


def _take_over_hooks(old: nn.Module, new: nn.Module, path: str) -> None:
    """The replacement runs the hooks registered on the module it replaces (as torch.ao.quantization's
    module swap keeps them): it takes over the registries themselves, so the handles' remove() still
    works. Hooks on the replaced module's submodules may not run (the replacement computes them inside
    its fused op): a warning names them."""
    for registry in _HOOK_REGISTRIES:
        setattr(new, registry, getattr(old, registry))
    new._is_full_backward_hook = old._is_full_backward_hook
    hooked = [f"{path}.{name}" if path else name for name, sub in old.named_modules() if name and _has_hooks(sub)]
    if hooked:
        warnings.warn(f"fastvid.convert: hooks registered on {', '.join(hooked)} may not run: "
                      f"{path or 'the model'} ({type(old).__name__}) became a {type(new).__name__}, which computes "
                      "its parts inside fused ops; register them on the converted model", RuntimeWarning, stacklevel=3)


def _convert_children(module: nn.Module, converters: List[Converter], prefix: str, tolerant: bool,
                      done: Dict[int, Tuple[nn.Module, Optional[nn.Module]]]) -> None:
    """done: id(module) -> (the module, kept alive so that its id stays its own; its replacement, None where
    it was converted in place), for modules reached again: one registered under two names or in two parents
    is converted once and stays one module (named_children() lists a module once per parent, so the second
    name kept the native layer)."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if id(child) in done:
            if done[id(child)][1] is not None:
                setattr(module, name, done[id(child)][1])
            continue
        path = f"{prefix}.{name}" if prefix else name
        replacement = _replacement(child, converters, path, tolerant)
        done[id(child)] = (child, replacement)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _convert_children(child, converters, path, tolerant, done)
