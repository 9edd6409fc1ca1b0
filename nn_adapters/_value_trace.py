"""Symbolic tracing that also runs the model on the shapes of an example batch, for forwards that branch on shapes.

Plain :mod:`torch.fx` tracing cannot take ``len()`` of a traced value, iterate over one of unknown length or decide
an ``if`` on one: ``if len(t.shape) == 0``, ``if x.ndim == 4``, ``if x.dtype == torch.float16`` all stop it, and
real models (diffusers' ``UNet2DModel``, its attention processors and resamplers) are full of them.
:class:`ValueTracer` records the same graph as fx, but every node also carries its value on one example batch (as
a meta tensor: shape and type, no data), so that such a question can be answered. The answer is only taken where
it cannot depend on the data:

* a decision or a length read from **metadata** (shapes, sizes, ``ndim``, ``dtype``, ``device``, ``len`` of a
  tensor or of a tuple, and arithmetic and comparisons on those) is answered from the example, and a **guard** node
  is added to the graph at that point: running the graph on a batch that would decide otherwise raises a
  ``ValueError`` that names the decision, instead of computing the branch that was not traced;
* a decision on tensor **values** (``if x.max() > 0``, ``if t.item() == 0``), or ``int()`` of one, is refused: the
  graph would hold one branch for every batch; ``int()`` of a size (``int(x.shape[-1])``) is answered and guarded.

``torch.is_tensor`` of a traced input is answered from the example's type (:func:`answering_is_tensor`). The
example runs on meta tensors, on a copy of the model whose parameters and buffers are meta tensors: it costs no
memory and no arithmetic whatever the batch size, and nothing of the model changes (BatchNorm in training mode
included). ``x.device``, ``x.is_cuda`` and ``x.get_device()`` answer the device of the batch, not ``meta``; a tensor
made on it in ``forward()`` is moved to meta. What cannot run on meta tensors (``.item()``) is only refused if a
decision reads it.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

# reads that give metadata of a tensor, not its values: a decision on their result is a decision on shapes/types
_META_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse", "is_quantized",
                              "is_meta", "is_complex"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
                           "get_device", "is_contiguous"})
_META_FUNCTIONS = frozenset({torch.numel, torch.is_floating_point, torch.is_complex})


def metadata_read(node: fx.Node) -> bool:
    """Whether ``node`` reads only metadata of its tensor input (``x.shape``, ``x.size(1)``, ``x.ndim``,
    ``x.dtype``), not its values: such a read is not a use of the values, for pruning as for tracing."""
    if node.op == "call_method":
        return node.target in _META_METHODS
    if node.op == "call_function":
        return node.target in _META_FUNCTIONS or (node.target is getattr and len(node.args) > 1
                                                 and node.args[1] in _META_ATTRIBUTES)
    return False


#: The remedy named when batches decide otherwise than the graph traced on the first one.
SHAPE_REMEDY = ("Give batches of one shape (e.g. DataLoader(..., drop_last=True)), or use method='layer' (with "
                "refit_from='layer' for baselines), which runs the model itself.")


def check_branch(value: Any, expected: bool, where: str) -> None:
    """Guard of a traced ``if``: the graph holds the branch taken when ``bool(value)`` was ``expected``."""
    if bool(value) != expected:
        raise ValueError(f"this batch takes the other branch of a decision that the traced graph fixed on the first "
                         f"batch ({where}: {expected} there, {not expected} here), so the graph cannot compute it. "
                         f"The decision reads shapes or types. {SHAPE_REMEDY}")


def check_length(value: Any, expected: int, where: str) -> None:
    """Guard of a traced ``len()`` or iteration: the graph holds ``expected`` items."""
    if len(value) != expected:
        raise ValueError(f"this batch gives {len(value)} items where the traced graph fixed {expected} on the first "
                         f"batch ({where}), so the graph cannot compute it. {SHAPE_REMEDY}")


def check_size(value: Any, expected: int, where: str) -> None:
    """Guard of a traced size converted to a Python integer: the graph holds ``expected``."""
    if value != expected:
        raise ValueError(f"this batch gives {value} where the traced graph fixed {expected} on the first batch "
                         f"({where}), so the graph cannot compute it. {SHAPE_REMEDY}")


#: The guard functions a traced graph calls where it fixed a decision on the example's shapes.
GUARDS = (check_branch, check_length, check_size)


def _where(node: fx.Node) -> str:
    """The traced expression a decision reads, in the graph's terms (e.g. ``x.ndim == 4``, ``getattr_1[0] >= 64``),
    for the messages."""
    def text(a: Any, depth: int = 0) -> str:
        if not isinstance(a, fx.Node) or depth > 3:
            return repr(a) if not isinstance(a, fx.Node) else a.name
        if a.op == "call_function" and a.target is getattr:
            return f"{text(a.args[0], depth + 1)}.{a.args[1]}"
        if a.op == "call_function" and a.target is operator.getitem:
            return f"{text(a.args[0], depth + 1)}[{text(a.args[1], depth + 1)}]"
        symbols = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">",
                   operator.ge: ">="}
        if a.op == "call_function" and a.target in symbols and len(a.args) == 2:
            return f"{text(a.args[0], depth + 1)} {symbols[a.target]} {text(a.args[1], depth + 1)}"
        if a.op == "call_method":
            return f"{text(a.args[0], depth + 1)}.{a.target}(...)"
        return a.name
    return text(node)


def starred_input(kind: str, target: Any) -> tuple | dict | None:
    """What a traced ``*args`` (``()``) or ``**kwargs`` (``{}``) of ``forward()`` holds, or ``None`` for another
    node. Pruning calls ``model(x)`` or ``model(**batch)`` with the named inputs only, so they receive nothing; as
    real empty containers they behave as such (``kwargs.pop("k", None)``, ``**kwargs``), where a traced input would
    not (fx would also make each one an input of the graph that no batch feeds)."""
    if kind != "placeholder" or not isinstance(target, str) or not target.startswith("*"):
        return None
    return _NoKeywords() if target.startswith("**") else _NoArguments()


class _NoKeywords(dict):
    """An empty ``**kwargs``. A subclass, so that fx's pytree sees one leaf, not a dict to flatten (which would
    switch the traced graph to pytree code generation)."""


class _NoArguments(tuple):
    """An empty ``*args`` (a subclass for the same reason)."""


@contextlib.contextmanager
def answering_is_tensor(tracer: fx.Tracer) -> Iterator[None]:
    """While tracing, ``torch.is_tensor`` of a traced value is answered by a :class:`ValueTracer` and refused by
    other tracers: left alone, it says ``False`` for every traced tensor, and ``if not torch.is_tensor(t)`` (how
    diffusers accepts a number as the timestep) would trace the branch for numbers without a word."""
    original = torch.is_tensor

    def is_tensor(obj: Any) -> bool:
        if isinstance(obj, fx.Proxy):
            if isinstance(tracer, ValueTracer):
                return tracer.holds_tensor(obj)
            raise fx.proxy.TraceError("forward() calls torch.is_tensor() on a traced input, which symbolic tracing "
                                      "cannot answer")
        return original(obj)

    torch.is_tensor = is_tensor
    try:
        yield
    finally:
        torch.is_tensor = original


class _Unknown:
    """The value of a node that could not be evaluated on meta tensors; ``why`` names the node and the error."""

    def __init__(self, why: str) -> None:
        self.why = why


def _on_meta(obj: Any) -> Any:
    """``obj`` with every tensor (in dicts, lists and tuples) replaced by a meta tensor of its shape and dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, Mapping):
        return {k: _on_meta(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_on_meta(v) for v in obj) if type(obj) in (tuple, list) else obj
    return obj


def _first_device(obj: Any) -> torch.device:
    """The device of the first tensor in ``obj`` (a tensor or a dict of them), else the CPU."""
    values = obj.values() if isinstance(obj, Mapping) else [obj]
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _meta_copy(root: nn.Module) -> nn.Module:
    """A copy of ``root`` whose parameters and buffers are meta tensors (no memory, nothing of the model's
    changes): the example runs there, for its shapes and types."""
    memo: dict[int, Any] = {}
    for t in root.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in root.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(root, memo)


class _ValueProxy(fx.Proxy):
    """A proxy whose ``len()``, ``int()`` and attributes are answered from the example value where that is safe."""

    def __getattr__(self, k: str) -> _ValueAttribute:
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.length(self)  # type: ignore[attr-defined]

    def __int__(self) -> int:  # int(x.shape[-1]); not __index__, which torch.ones(x.shape[0]) would take instead
        return self.tracer.integer(self)  # type: ignore[attr-defined]


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    """fx's lazily recorded attribute (``x.shape``, or ``x.view`` before it is called), with the value answers."""


class ValueTracer(fx.Tracer):
    """A :class:`torch.fx.Tracer` that evaluates every node on the shapes of an example batch (see the module's
    docstring).

    Parameters
    ----------
    base : fx.Tracer
        The tracer whose :meth:`is_leaf_module` decides which modules stay whole.
    example : tensor or mapping
        The batch the model is called with: one tensor for ``model(x)``, a dict for ``model(**batch)``.
    """

    def __init__(self, base: fx.Tracer, example: Any) -> None:
        super().__init__()
        self._base = base
        self._device = _first_device(example)  # meta tensors say "meta": device questions get this answer
        self._example = _on_meta(example)
        self._values: dict[fx.Node, Any] = {}
        self._data: dict[fx.Node, bool] = {}  # whether a node's value depends on tensor values, not only metadata
        self._shadow: nn.Module | None = None
        self._placeholders = 0
        self._evaluating = False

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._evaluating:  # a module of the copy, run on the example (fx patches every module call while tracing)
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self._base.is_leaf_module(m, module_qualified_name)

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:  # type: ignore[override]
        self._shadow = _meta_copy(root)
        try:
            with torch.no_grad():
                return super().trace(root, concrete_args)
        finally:
            self._values.clear()
            self._shadow = None

    def holds_tensor(self, obj: fx.Proxy) -> bool:
        """``torch.is_tensor`` of a traced value: whether its value on the example is a tensor."""
        return isinstance(self._known(obj.node, "calls torch.is_tensor() on"), torch.Tensor)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        empty = starred_input(kind, target)
        if empty is not None:
            return empty  # type: ignore[return-value]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if node not in self._values:
            self._evaluating = True
            try:
                self._evaluate(node)
            finally:
                self._evaluating = False
        return proxy

    def _evaluate(self, node: fx.Node) -> None:
        """The node's value on the example (shapes and types only: meta tensors), and whether it depends on tensor
        values (``_data``). An operation that cannot run on meta tensors (``.item()``, a data-dependent shape)
        leaves its node and everything computed from it :class:`_Unknown`: tracing goes on, and only a decision
        that reads such a value is refused."""
        inputs = node.all_input_nodes
        for n in inputs:  # fx adds a buffer read as a tensor constant (get_attr) without a proxy
            if n not in self._values:
                self._evaluate(n)
        data = node.op in ("placeholder", "get_attr", "call_module") or (
            not metadata_read(node) and any(self._data[n] for n in inputs))
        unknown = next((self._values[n] for n in inputs if isinstance(self._values[n], _Unknown)), None)
        if unknown is not None:
            value: Any = unknown
        else:
            args = map_arg(node.args, self._values.__getitem__)
            kwargs = map_arg(node.kwargs, self._values.__getitem__)
            try:
                if node.op == "placeholder":
                    value = self._placeholder_value(node)
                elif node.op == "get_attr":
                    value = _on_meta(self._attribute(node.target))
                elif node.op == "call_module":
                    value = self._shadow.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_function" and node.target is getattr and args[1] in ("device", "is_cuda"):
                    value = self._device if args[1] == "device" else self._device.type == "cuda"
                elif node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method" and node.target == "get_device":
                    value = -1 if self._device.index is None else self._device.index
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:  # output
                    value = None
                value = _on_meta(value)  # a tensor made on the real device (torch.arange(..., device=x.device))
            except Exception as exc:  # noqa: BLE001 - reported if a decision ever needs this value
                value = _Unknown(f"{node.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        self._values[node] = value
        self._data[node] = data or isinstance(value, torch.Tensor)

    def _placeholder_value(self, node: fx.Node) -> Any:
        index = self._placeholders
        self._placeholders += 1
        if isinstance(self._example, Mapping) and node.target in self._example:
            return self._example[node.target]
        if not isinstance(self._example, Mapping) and index == 0:
            return self._example
        return node.args[0] if node.args else None

    def _attribute(self, target: str) -> Any:
        obj: Any = self._shadow
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError:  # a constant fx stored on the traced model itself (``_tensor_constant0``)
            obj = self.root
            for part in target.split("."):
                obj = getattr(obj, part)
        return obj

    def _known(self, node: fx.Node, what: str) -> Any:
        value = self._values[node]
        if isinstance(value, _Unknown):
            raise fx.proxy.TraceError(f"forward() {what} {_where(node)}, computed from {value.why}, which could not "
                                      "be evaluated on the shapes of the first batch")
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        node = obj.node
        if self._data[node]:
            raise fx.proxy.TraceError(
                f"forward() branches on the values of a tensor ({_where(node)}), which differ from batch to batch: "
                "only decisions on shapes, sizes and types can be traced")
        decision = bool(self._known(node, "branches on"))
        self.create_proxy("call_function", check_branch, (obj, decision, _where(node)), {})
        return decision

    def length(self, obj: fx.Proxy) -> int:
        node = obj.node
        value = self._known(node, "takes the length of")
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise TypeError("len() of a 0-d tensor")
            n = value.shape[0]
        elif isinstance(value, tuple | list | torch.Size):  # a length is a shape, even of a list of values
            n = len(value)
        else:
            raise fx.proxy.TraceError(f"forward() takes len() of {type(value).__name__} ({_where(node)})")
        self.create_proxy("call_function", check_length, (obj, n, _where(node)), {})
        return n

    def integer(self, obj: fx.Proxy) -> int:
        node = obj.node
        value = None if self._data[node] else self._known(node, "converts to int")  # values of tensors: refused
        if isinstance(value, bool) or not isinstance(value, int):
            raise fx.proxy.TraceError(f"forward() converts a traced value to int ({_where(node)}); only sizes read "
                                      "from shapes can be")
        self.create_proxy("call_function", check_size, (obj, value, _where(node)), {})
        return value

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        n = self.length(obj)
        return iter([obj[i] for i in range(n)])

    def keys(self, obj: fx.Proxy) -> Any:
        node = obj.node
        value = self._known(node, "unpacks")
        if not isinstance(value, Mapping):
            return super().keys(obj)
        self.create_proxy("call_function", check_length, (obj, len(value), _where(node)), {})
        return list(value.keys())
