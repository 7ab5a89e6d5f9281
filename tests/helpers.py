"""Helpers shared by the test files."""

from __future__ import annotations

from torch import nn

_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def hook_counts(model: nn.Module) -> dict[tuple[str, str], int]:
    """Number of hooks of every kind on every module of ``model`` (and torch's global module hooks)."""
    from torch.nn.modules import module as torch_module

    counts = {}
    for name, module in model.named_modules():
        for attr in _HOOK_ATTRS:
            hooks = getattr(module, attr, None)
            if hooks is not None:
                counts[(name, attr)] = len(hooks)
    for attr in _GLOBAL_HOOKS:
        counts[("<global>", attr)] = len(getattr(torch_module, attr, {}))
    return counts
