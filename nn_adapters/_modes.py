"""Train/eval modes, module by module: ``model.train(flag)`` sets one flag on every layer, which loses a user's
per-module choices (a BatchNorm frozen in eval mode inside a model in train mode); and the working copy that
pruning modifies instead of the caller's model."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["eval_mode", "copy_modes", "shared_copy", "own_tensors", "weightless_copy", "meta_parameters",
           "tie_groups", "tie_again", "TensorGuard",
           "outside_inference_mode", "unwrap", "wrapper_hint", "FORWARD_HOOK_DICTS", "HOOK_DICTS"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The forward-hook registries of ``torch.nn.Module`` (hooks and their flags are keyed by the same handle id).
FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
#: All its per-module hook registries.
HOOK_DICTS = (*FORWARD_HOOK_DICTS, "_backward_hooks", "_backward_pre_hooks")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, then give every module back its own mode."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was


def outside_inference_mode(fn: _F) -> _F:
    """Run ``fn`` with ``torch.inference_mode`` off (a no-op when it is off already).

    Under inference mode every tensor created is an inference tensor: the pruned model's parameters could then
    never be trained (fine-tuned) afterwards, and the gradient-based baseline could not run. Pruning already works
    without gradients where it needs none (``torch.no_grad``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def copy_modes(src: nn.Module, dst: nn.Module) -> None:
    """Give each module of ``dst`` the mode of the module of ``src`` with the same name (else ``src``'s own)."""
    flags = {name: m.training for name, m in src.named_modules()}
    for name, m in dst.named_modules():
        m.training = flags.get(name, src.training)


def _refuse_masks(model: nn.Module) -> None:
    """Refuse a model that carries :mod:`torch.nn.utils.prune` masks (see :func:`shared_copy`)."""
    for name, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                tensor = getattr(hook, "_tensor_name", "weight")
                raise ValueError(f"module {name or type(model).__name__!r} carries a torch.nn.utils.prune mask on "
                                 f"{tensor!r}; make it permanent first with torch.nn.utils.prune.remove(module, "
                                 f"{tensor!r}) (structured pruning then shrinks the masked weights like any other).")


def _deep_copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)`` in eval mode, or a clear error when it cannot be copied (see
    :func:`shared_copy`)."""
    try:
        return copy.deepcopy(model, memo).eval()
    except RuntimeError as exc:
        raise ValueError(f"could not copy {type(model).__name__} to prune it ({exc}). If it uses "
                         "torch.nn.utils.weight_norm or spectral_norm, remove them first (torch.nn.utils."
                         "remove_weight_norm / remove_spectral_norm); pruning never modifies the model in place."
                         ) from exc


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose modules (and their Python state: configs, hooks) and buffers are its
    own but whose parameters are ``model``'s tensors: the unpruned network, run and hooked as it is, without a second
    copy of its weights, or a model to prune whose blocks get tensors of their own as they shrink (the rest copied
    at the end by :func:`own_tensors`). Its modules may be replaced or given new tensors; its parameters must not be
    written (see :class:`TensorGuard`). Buffers are copied (running statistics, masks, counters: small): a forward
    that updates its own buffers in place (a call counter, a cache) updates the copy's, as on a deep copy.

    Refused with the fix named: masks of :mod:`torch.nn.utils.prune` (their ``weight`` is recomputed from
    ``weight_orig * weight_mask`` by a hook, so shrinking ``weight`` would be undone at the next forward) and the
    old ``torch.nn.utils.weight_norm`` / ``spectral_norm``, whose derived weight refuses ``deepcopy``. The user's
    forward hooks are copied with the model: they run during calibration, as part of the model's function.
    """
    _refuse_masks(model)
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    return _deep_copy(model, memo)


def own_tensors(model_copy: nn.Module, original: nn.Module) -> None:
    """Give ``model_copy`` (made by :func:`shared_copy` of ``original``) copies of the parameters and buffers it
    still shares with ``original``, in place: afterwards the two share no tensor (tensors tied within the copy stay
    tied; a parameter stays a parameter of its class, with its ``requires_grad``)."""
    shared = {id(t) for t in (*original.parameters(), *original.buffers())}
    memo: dict[int, Any] = {}
    for module in model_copy.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and id(t) in shared:
                    if id(t) not in memo:
                        memo[id(t)] = copy.deepcopy(t)
                    store[name] = memo[id(t)]


def weightless_copy(model: nn.Module, buffers: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose parameters are ``meta`` tensors of the same shapes, dtypes and
    ``requires_grad`` (no memory; tied ones stay tied); its buffers are real copies, or ``meta`` too with
    ``buffers=True``. The loaders of pruned models resize it and then give it the saved tensors
    (``load_state_dict(..., assign=True)`` and :func:`tie_again`), so that loading from the trained original does
    not hold a second copy of its weights; counting the parameters a unit holds needs shapes only
    (``buffers=True``)."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *(model.buffers() if buffers else ())):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Within the block, every parameter a module registers becomes a ``meta`` tensor (its shape, dtype and
    ``requires_grad``; no memory, and initialising it computes nothing); buffers are made as usual. Building a model
    from its configuration inside the block costs its buffers only (rotary frequencies, position ids), which is
    what loading saved weights into it with ``load_state_dict(..., assign=True)`` needs.

    Modules register parameters through ``torch.nn.Module.register_parameter`` (``module.weight = Parameter(...)``
    calls it), which the block replaces for the whole process: modules built by other threads meanwhile get
    ``meta`` parameters too. A real tensor a module allocates for a parameter is dropped as soon as it is
    registered, so the peak is one such tensor. Subclasses of ``Parameter`` (lazy or quantised ones) are left
    real.
    """
    register = nn.Module.register_parameter

    def register_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if type(param) is nn.Parameter and not param.is_meta:  # subclasses (lazy, quantised) are left as they are
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def tie_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The places (module, attribute) of every parameter held in more than one place (tied weights)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((module, name))
    return [group for group in places.values() if len(group) > 1]


def tie_again(groups: list[list[tuple[nn.Module, str]]]) -> None:
    """After ``load_state_dict(assign=True)``, which gives each loaded name a tensor of its own (or leaves a tied name
    that was not saved as it was): every place of a tied group (:func:`tie_groups`, taken before the loading) holds
    one loaded tensor again, the first that is not a ``meta`` tensor."""
    for group in groups:
        loaded = [m._parameters[n] for m, n in group if not m._parameters[n].is_meta]
        if loaded:
            for m, n in group:
                m._parameters[n] = loaded[0]


class TensorGuard:
    """What a model's parameters and buffers are now (storage, dtype, shape, device, and the version counter that
    every in-place write bumps); :meth:`check` raises if one of them has changed since. Pruning reads the caller's
    tensors through :func:`shared_copy`: this is how the tests see that it never writes them."""

    def __init__(self, model: nn.Module) -> None:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        self._seen = {id(t): (name, t, self._state(t)) for name, t in named if t is not None}

    @staticmethod
    def _state(t: torch.Tensor) -> tuple[Any, ...]:
        try:
            version = t._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter (and cannot be written outside it)
            version = None
        return (version, t.data_ptr(), t.dtype, tuple(t.shape), t.device)

    def check(self) -> None:
        """Raise ``RuntimeError`` if a tensor was changed (a bug of this library, or a model that writes its own
        parameters in place when it runs)."""
        for name, t, state in self._seen.values():
            if self._state(t) != state:
                raise RuntimeError(f"internal error: pruning changed the caller's tensor {name!r} in place (the "
                                   "model is not what it was). Pruning reads the caller's parameters without "
                                   "copying them: a forward or hook of the model's own that writes a parameter in "
                                   "place would do this; otherwise please report it, with the model's type")


def _wrapped(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The module inside a runtime wrapper and the attribute that holds it, or ``None`` for any other module.

    Runtime wrappers: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``), ``nn.DataParallel`` and
    ``DistributedDataParallel`` (``module``). They add a prefix to every parameter name and hold no layers of their
    own.
    """
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    if compiled is not None and isinstance(model, getattr(compiled, "OptimizedModule", ())):
        return model._orig_mod, "_orig_mod"
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module, "module"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (any depth);
    ``model`` itself when it is not wrapped.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        The innermost wrapped module (the same object, not a copy).
    """
    while (inner := _wrapped(model)) is not None:
        model = inner[0]
    return model


def wrapper_hint(model: nn.Module) -> str:
    """A sentence telling the user to pass the wrapped model (empty when ``model`` is not a runtime wrapper)."""
    inner = _wrapped(model)
    if inner is None:
        return ""
    kind = "torch.compile's OptimizedModule" if inner[1] == "_orig_mod" else type(model).__name__
    return (f" {kind} is a wrapper: pass the model it wraps, model.{inner[1]} (a {type(inner[0]).__name__}), and "
            "wrap the pruned model again if you need to.")
