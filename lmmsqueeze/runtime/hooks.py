"""The one hook installer: every hook lmmsqueeze puts on a model goes through a :class:`HookSet`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookTimer:
    """Wall time spent inside the pre- and post-hooks of a :class:`HookSet`: what lmmsqueeze adds around
    the model's own modules (scoring, selection, gathers, masks). Model work a hook runs on the model's
    behalf (e.g. the vision tower, called early to reduce its output) is excluded with
    :meth:`model_work`; hooks nested in it count again. Stand-in layers and patched methods are the
    model's work and are not counted. CPU time is exact; on CUDA it is the launch time only."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0  # hooks running now (a hook may call modules that have hooks)
        self._since = 0.0

    def enter(self) -> None:
        if not self._depth:
            self._since = time.perf_counter()
        self._depth += 1

    def leave(self) -> None:
        self._depth -= 1
        if not self._depth:
            self.seconds += time.perf_counter() - self._since

    @contextlib.contextmanager
    def model_work(self) -> Iterator[None]:
        """The model's own computation, run from inside a hook: not counted."""
        depth, self._depth = self._depth, 0
        if depth:
            self.seconds += time.perf_counter() - self._since
        try:
            yield
        finally:
            self._depth = depth
            if depth:
                self._since = time.perf_counter()


class HookSet:
    """Registers forward hooks and pre-hooks on modules (and temporary stand-ins for decoder layers)
    and removes all of them on exit.

    Use as a context manager; hooks are removed even when the body raises::

        with HookSet() as hooks:
            hooks.pre(layer, fn)
            model(...)
    """

    def __init__(self, timer: HookTimer | None = None) -> None:
        self._handles: list[RemovableHandle] = []
        self._swaps: list[tuple[nn.ModuleList, int, nn.Module]] = []
        self._patches: list[tuple[Any, str, bool, Any]] = []
        self.timer = timer

    def pre(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """``fn(module, args, kwargs) -> None | (args, kwargs)`` runs before ``module.forward``."""
        self._handles.append(module.register_forward_pre_hook(self._timed(fn), with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """``fn(module, args, kwargs, output) -> None | output`` runs after ``module.forward``."""
        self._handles.append(module.register_forward_hook(self._timed(fn), with_kwargs=True))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        timer = self.timer
        if timer is None:
            return fn

        def timed(*args: Any) -> Any:
            timer.enter()
            try:
                return fn(*args)
            finally:
                timer.leave()

        return timed

    def swap(self, container: nn.ModuleList, index: int, module: nn.Module) -> None:
        """Put ``module`` at ``container[index]`` (this instance only) until the set is removed."""
        self._swaps.append((container, index, container[index]))
        container[index] = module

    def patch(self, obj: Any, name: str, value: Any) -> None:
        """Set attribute ``name`` of this instance (e.g. wrap a bound method) until the set is removed."""
        had = name in vars(obj)
        self._patches.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def __len__(self) -> int:
        return len(self._handles) + len(self._swaps) + len(self._patches)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._swaps:
            container, index, original = self._swaps.pop()
            container[index] = original
        while self._patches:
            obj, name, had, old = self._patches.pop()
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_hooks(module: nn.Module) -> int:
    """Forward hooks and pre-hooks left on ``module`` and all its submodules (0 after a clean exit)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
