"""Tracing forwards that branch on shapes and types (``nn_adapters._value_trace``).

Plain torch.fx stops at ``len(x.shape)``, ``if x.ndim == 4`` or ``if x.dtype == torch.float16``. When it does, the
model is traced again while it runs on the shapes of the first batch: decisions on shapes and types are taken as
there and guarded in the graph, decisions on tensor values are refused. Also here: ``*args``/``**kwargs`` traced
empty, forwards under decorators, caches that ``forward()`` fills while traced, and the even split of data given
in one piece.

Oracles: the same network written without the branches (plain fx traces it), which must give the same pairs, kept
units and weights; the unpruned network (keep everything); the branch that the other batch would take, which the
guard must refuse rather than compute the traced one.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import check_gpu_equals_cpu
from torch import nn

import nn_adapters as nna
from nn_adapters.pairs import trace

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Plain(nn.Module):
    """conv -> BN -> ReLU -> conv -> pool -> linear: the reference, traceable by plain fx."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.bn(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Branchy(Plain):
    """The same computation behind the checks real models make on shapes and types (diffusers' resamplers and
    attention processors): ``len()`` of a shape, ``ndim``, a dtype test, unpacking a shape, iterating over one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.shape) == 3:  # an unbatched image
            x = x[None]
        if x.ndim != 4:
            raise ValueError("expected images")
        if x.dtype == torch.float16:
            x = x.float()
        b, c, height, width = x.shape
        sizes = [s for s in x.shape]  # iterating over a shape (not an unpacking)
        h = F.relu(self.bn(self.c1(x.reshape(b, c, height, width).view(*sizes))))
        if h.shape[1] > 0 and h.ndim == 4:  # reads of the pair's path that are not uses of its values
            h = self.c2(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _pair(cls: type[Plain]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = cls()
    with torch.no_grad():  # a trained-looking BatchNorm
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval(), torch.randn(64, 3, 6, 6)


def test_plain_fx_cannot_trace_the_branches_and_the_example_run_can():
    net, x = _pair(Branchy)
    with pytest.raises(ValueError, match="'len' is not supported"):
        trace(net)
    gm = trace(net, example=x[:2])
    guards = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__.startswith("check_")]
    assert len(guards) >= 6  # len(x.shape) == 3, ndim != 4, dtype, the length iterated, h.shape[1] > 0, h.ndim
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))


@pytest.mark.parametrize("method", ["layer", "seq", "asym", "act_norm"])
def test_the_branchy_network_is_pruned_as_the_plain_one(method):
    plain, x = _pair(Plain)
    branchy, _ = _pair(Branchy)
    assert [p.name for p in nna.find_pairs(branchy, x[:2])[0]] == [p.name for p in nna.find_pairs(plain, x[:2])[0]]
    a, ra = nna.prune(plain, x, keep=0.5, method=method)
    b, rb = nna.prune(branchy, x, keep=0.5, method=method)
    assert [r.kept_units for r in ra.layers] == [r.kept_units for r in rb.layers]
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_keeping_every_unit_reproduces_the_branchy_network(method):
    net, x = _pair(Branchy)
    pruned, _ = nna.prune(net, x, keep=1.0, method=method)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)


def test_tracing_on_the_example_leaves_the_model_as_it_was():
    net, x = _pair(Branchy)
    net.train()  # BatchNorm would update its running statistics if the example ran on the model itself
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trace(net, example=x[:8])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and not hasattr(net, "_tensor_constant0")


class DeviceBranch(Plain):
    """Branches on the device (as code choosing a kernel does): the example runs on meta tensors, so the device
    must be answered from the batch, not as ``meta``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type not in ("cpu", "cuda") or x.is_cuda != (x.device.type == "cuda"):
            raise RuntimeError(f"unexpected device {x.device}")
        scale = torch.ones(x.shape[1], device=x.device)[None, :, None, None]  # made on the batch's device
        if len(x.shape) == 4:  # the plain tracer stops here
            x = x * scale
        return self.body(x)


def test_device_questions_are_answered_from_the_batch_and_examples_cost_no_memory():
    plain, x = _pair(Plain)
    net, _ = _pair(DeviceBranch)
    a, _ = nna.prune(plain, x, keep=0.5, method="asym")
    b, _ = nna.prune(net, x, keep=0.5, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)
    huge = torch.empty(1, 3, 6, 6).expand(10**9, 3, 6, 6)  # 108 GB of activations if computed on
    gm = trace(net, example=huge)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))


class ValueBranch(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # a decision on the data: one branch for some batches, the other for others
            x = -x
        return self.body(x)


class ItemBranch(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().max().item()
        if scale > 1.0:
            x = x / scale
        return self.body(x)


@pytest.mark.parametrize("cls", [ValueBranch, ItemBranch])
def test_a_decision_on_tensor_values_is_refused(cls):
    net, x = _pair(cls)
    with pytest.raises(ValueError, match="branches on the values of a tensor"):
        nna.prune(net, x, keep=0.5, method="asym")


class BatchSizeBranch(Plain):
    """Computes otherwise for large batches (a real model would switch kernels; this one changes the result, so
    that computing the traced branch for the other batches would be visibly wrong)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.c1(x)))
        if h.shape[0] >= 32:
            h = 2 * h
        return self.fc(F.adaptive_avg_pool2d(self.c2(h), 1).flatten(1))


class LargeBatchBranch(Plain):
    """diffusers' Upsample2D: ``if hidden_states.shape[0] >= 64: hidden_states = hidden_states.contiguous()``
    (here a visible change, so that taking the traced branch for another batch would show)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.c1(x)))
        if h.shape[0] >= 64:
            h = 2 * h
        return self.fc(F.adaptive_avg_pool2d(self.c2(h), 1).flatten(1))


def test_data_given_in_one_piece_is_split_into_batches_of_nearly_equal_size():
    """300 samples are split 150 + 150 (batches of at most 256), not 256 + 44: the traced decision on the batch size
    holds for both batches, so data given as one tensor never trips a guard on a threshold."""
    from nn_adapters._data import _even_slices, as_batches

    for n, size in [(1, 256), (256, 256), (257, 256), (300, 256), (1000, 256), (7, 3)]:
        sizes = [s.stop - s.start for s in _even_slices(n, size)]
        assert sum(sizes) == n and len(sizes) == -(-n // size) and max(sizes) - min(sizes) <= 1 and max(sizes) <= size
    torch.manual_seed(0)
    net, x = _pair(LargeBatchBranch)
    x = torch.randn(300, 3, 6, 6)
    assert [len(b[0]) for b in as_batches(x)] == [150, 150]
    pruned, _ = nna.prune(net, x, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cls", "sizes"), [(BatchSizeBranch, (32, 16)), (LargeBatchBranch, (64, 20)),
                                            (BatchSizeBranch, (16, 32, 16))])
def test_batches_of_several_sizes_run_each_through_its_own_graph(cls, sizes):
    """A decision on the batch size (``h.shape[0] >= 32``, diffusers' ``>= 64``) that differs between batches: the
    sequential modes trace one graph per batch size, so every batch takes its own branch, as the model itself does.
    Oracle: for the first pair, asym reads the unpruned network's activations, as layer mode does (which runs the
    model itself); the same units and the same refitted consumer. Computing a batch with the other size's branch
    (what a single graph would do) doubles its rows, and changes both."""
    torch.manual_seed(0)
    net = _pair(cls)[0]
    x = torch.randn(sum(sizes), 3, 6, 6)
    batches = list(x.split(list(sizes)))
    got, rep = nna.prune(net, batches, keep=0.5, method="asym", ridge=1e-3)
    ref, rep_layer = nna.prune(net, batches, keep=0.5, method="layer", ridge=1e-3)
    assert rep.layers[0].pair == "c1->c2"
    assert rep.layers[0].kept_units == rep_layer.layers[0].kept_units
    # c2's rows are also pair 2's producer rows, which the two modes select differently: compare the rows both keep
    rows_got, rows_ref = rep.layers[1].kept_units, rep_layer.layers[1].kept_units
    both = sorted(set(rows_got) & set(rows_ref))
    assert both
    torch.testing.assert_close(got.c2.weight[[rows_got.index(r) for r in both]],
                               ref.c2.weight[[rows_ref.index(r) for r in both]], rtol=1e-6, atol=1e-8)
    pruned, _ = nna.prune(net, batches, keep=1.0, method="asym")
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(pruned(b), net(b), rtol=1e-5, atol=1e-6)


class TimestepModel(nn.Module):
    """``forward(x, t)`` with diffusers' handling of the timestep: a number or a 0-d tensor becomes a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.temb = nn.Linear(1, 8)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=x.dtype)
        elif len(t.shape) == 0:
            t = t[None]
        t = t * torch.ones(x.shape[0], dtype=t.dtype)
        return self.c2(F.silu(self.c1(x) + self.temb(t[:, None])[:, :, None, None]))


def test_a_timestep_handled_as_diffusers_does_is_traced_and_pruned_with_its_term():
    torch.manual_seed(0)
    net = TimestepModel().eval()
    xt = {"x": torch.randn(32, 3, 6, 6), "t": torch.rand(32) * 10}
    pairs, _ = nna.find_pairs(net, {k: v[:2] for k, v in xt.items()})
    assert [(p.name, p.conditioning) for p in pairs] == [("c1->c2", ("temb",))]
    pruned, _ = nna.prune(net, xt, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt), net(**xt), rtol=1e-5, atol=1e-6)
        pruned, _ = nna.prune(net, xt, keep=0.5, method="asym")
        assert pruned.temb.out_features == 4
        assert pruned(xt["x"][:1], 3.0).shape == (1, 3, 6, 6)  # the model's own number branch still runs


class Starred(Plain):
    """``forward(x, *args, **kwargs)``, as Hugging Face models take their options: pruning passes neither."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        scale = kwargs.pop("scale", None)
        if scale is not None or args:
            x = x * 2
        return self.body(x)


def test_args_and_kwargs_of_forward_are_traced_as_empty():
    plain, x = _pair(Plain)
    starred, _ = _pair(Starred)
    gm = trace(starred)  # plain fx: *args and **kwargs are real empty containers, not inputs of the graph
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    a, _ = nna.prune(plain, x, keep=0.5, method="asym")
    b, _ = nna.prune(starred, x, keep=0.5, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)


class SamePadding(Plain):
    """TensorFlow-style "same" padding computed from the input size with int(), as Hugging Face MobileNet does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        pad_h, pad_w = max(3 - height % 2, 0) // 2, max(3 - width % 2, 0) // 2
        return self.body(F.pad(x, (pad_w, pad_w, pad_h, pad_h)))


class ValueInt(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(x.abs().sum()) % 2  # a number read from the values
        return self.body(F.pad(x, (k, k, k, k)))


def test_a_size_converted_to_int_is_guarded_and_a_value_converted_to_int_is_refused():
    net, x = _pair(SamePadding)
    pruned, _ = nna.prune(net, x, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)
    gm = trace(net, example=x[:2])
    with pytest.raises(ValueError, match="the traced graph fixed 6"):
        gm(torch.randn(2, 3, 8, 8))  # another image size than the one the padding was computed for
    net, x = _pair(ValueInt)
    with pytest.raises(ValueError, match="converts a traced value to int"):
        nna.prune(net, x, keep=0.5, method="asym")


def _passes_through(forward):
    """A decorator like Hugging Face's ``can_return_tuple``: ``(self, *args, **kwargs)``, same result."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.pop("return_dict", None)
        return forward(self, *args, **kwargs)
    return wrapper


def _doubles(forward):
    """A decorator that changes the result: tracing without it would compute something else."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return 2 * forward(self, *args, **kwargs)
    return wrapper


class Decorated(Plain):
    """fx reads the names of the inputs from the undecorated function but calls the decorator's wrapper; with a
    ``**kwargs`` in the undecorated signature it strips the wrapper's own ``*args, **kwargs`` (Hugging Face's
    ConvNeXt in transformers 5 fails that way)."""

    @_passes_through
    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.body(x)


class Doubled(Plain):
    @_doubles
    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.body(x)


def test_a_forward_under_a_decorator_is_traced_without_it_when_that_changes_nothing():
    plain, x = _pair(Plain)
    net, _ = _pair(Decorated)
    with pytest.raises(ValueError, match="could not trace"):
        trace(net)  # plain fx alone
    a, _ = nna.prune(plain, x, keep=0.5, method="asym")
    b, _ = nna.prune(net, x, keep=0.5, method="asym")
    assert type(b) is Decorated  # the class is the model's own again after tracing
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)
    net, _ = _pair(Doubled)
    with pytest.raises(ValueError, match="does not compute what the model computes"):
        nna.prune(net, x, keep=0.5, method="asym")
    assert type(net) is Doubled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [Branchy, SamePadding, Decorated])
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_a_model_traced_on_its_first_batch_prunes_on_a_gpu_as_on_the_cpu(cls, method):
    """In float64, model and batches on the GPU (the example runs there too): the same units as on the CPU, weights
    and outputs equal to rounding."""
    net, x = _pair(cls)
    check_gpu_equals_cpu(net, x, method)


def test_a_batch_key_that_would_go_to_kwargs_is_refused():
    """The traced graph passes ``**kwargs`` empty: a key that only ``**kwargs`` would take must not be dropped."""
    net, x = _pair(Starred)
    with pytest.raises(ValueError, match=r"\['scale'\] are not named inputs .* \*\*kwargs"):
        nna.prune(net, {"x": x, "scale": torch.ones(len(x))}, keep=0.5, method="asym")
    pruned, _ = nna.prune(net, {"x": x}, keep=1.0, method="asym")  # the named input alone is fine
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)


class Cached(Plain):
    """Caches a tensor computed from a parameter in a dict, per device, as Hugging Face's LeViT caches its attention
    biases: while traced, the cache would keep a traced value, which a later trace or the pruned model's own
    forward would then read."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 0.5))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = (2 * self.scale)[None, :, None, None]
        return self.body(x * self.cache[key])


def test_what_forward_caches_while_traced_is_forgotten():
    net, x = _pair(Cached)
    for _ in range(2):  # a second tracing must not read the first one's cache
        pairs, _ = nna.find_pairs(net, x[:2])
        assert [p.name for p in pairs] == ["c1->c2", "c2->fc"]
    assert net.cache == {}
    pruned, _ = nna.prune(net, x, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)


class IsInstance(nn.Module):
    """``isinstance(h, torch.Tensor)`` is False for a traced value: plain fx traces the other branch without an
    error, and the graph would not compute what the model computes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if isinstance(h, torch.Tensor):
            h = h * 2
        return self.b(h)


class Noisy(IsInstance):
    """Draws random numbers in forward(), in eval mode too: its graph cannot be checked against it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x + 1e-3 * torch.randn_like(x))))


def test_a_graph_that_computes_otherwise_than_the_model_is_refused():
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    for method in ("asym", "layer"):
        with pytest.raises(ValueError, match=r"does not compute what the model computes.*torch.is_tensor"):
            nna.prune(IsInstance().eval(), x, keep=0.5, method=method)
    with pytest.raises(ValueError, match="does not compute what the model computes"):
        nna.find_pairs(IsInstance().eval(), x[:2])
    # a model that is random itself is not checked (nothing to compare with), as before
    pruned, _ = nna.prune(Noisy().eval(), x, keep=0.5, method="asym")
    assert pruned.a.out_features == 4


class IsInstanceShaped(IsInstance):
    """Also branches on ``x.ndim`` (plain fx cannot trace it, the value tracer does) and on ``isinstance``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.flatten(0, 1)
        return super().forward(x)


def test_a_graph_traced_on_the_first_batch_is_checked_too():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"traced on the first batch, the graph differs.*torch.is_tensor"):
        nna.prune(IsInstanceShaped().eval(), torch.randn(40, 4), keep=0.5, method="asym")
