"""The one hook installer: every hook lmmsqueeze puts on a model goes through a :class:`HookSet`."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookSet:
    """Registers forward hooks and pre-hooks on modules (and temporary stand-ins for decoder layers)
    and removes all of them on exit.

    Use as a context manager; hooks are removed even when the body raises::

        with HookSet() as hooks:
            hooks.pre(layer, fn)
            model(...)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._swaps: list[tuple[nn.ModuleList, int, nn.Module]] = []

    def pre(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """``fn(module, args, kwargs) -> None | (args, kwargs)`` runs before ``module.forward``."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """``fn(module, args, kwargs, output) -> None | output`` runs after ``module.forward``."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    def swap(self, container: nn.ModuleList, index: int, module: nn.Module) -> None:
        """Put ``module`` at ``container[index]`` (this instance only) until the set is removed."""
        self._swaps.append((container, index, container[index]))
        container[index] = module

    def __len__(self) -> int:
        return len(self._handles) + len(self._swaps)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._swaps:
            container, index, original = self._swaps.pop()
            container[index] = original

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_hooks(module: nn.Module) -> int:
    """Forward hooks and pre-hooks left on ``module`` and all its submodules (0 after a clean exit)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
