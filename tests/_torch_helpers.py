"""Helpers shared by the PyTorch pruning tests (imported by the test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nn_adapters as nna
from nn_adapters._data import call, take
from nn_adapters.budget import ParamModel


def check_gpu_equals_cpu(net: nn.Module, x: torch.Tensor, method: str) -> list[nna.LayerReport]:
    """Prune ``net`` at ``keep=0.5`` in float64 on the CPU and, model and data moved there, on the GPU: the same
    units, and weights and outputs equal to rounding. Returns the GPU run's layer reports."""
    net, x = net.double(), x.double()
    host, rep_host = nna.prune(net, x, keep=0.5, method=method)
    gpu, rep_gpu = nna.prune(copy.deepcopy(net).cuda(), x.cuda(), keep=0.5, method=method)
    assert [r.kept_units for r in rep_gpu.layers] == [r.kept_units for r in rep_host.layers]
    for a, b in zip(host.state_dict().values(), gpu.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(host(x), gpu(x.cuda()).cpu(), rtol=1e-9, atol=1e-11)
    return rep_gpu.layers


def randomise_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm (1-D and 2-D) random running statistics and affine parameters (fixed seed), so that
    removing a channel's BatchNorm entries is observable; returns the model in eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class GlobalPoolNet(nn.Module):
    """Two convolutions (``nn.Conv1d`` or ``nn.Conv2d``, 1 -> 6 -> 8 channels) and a Linear(8, 3) behind a global
    pooling ``head`` written in ``forward()`` (as in many timm-style models)."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], conv: type[nn.Module] = nn.Conv2d) -> None:
        super().__init__()
        self.head = head
        self.c1, self.c2, self.fc = conv(1, 6, 3, padding=1), conv(6, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(F.relu(self.c2(F.relu(self.c1(x))))))


def captured_input(net: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``module`` (its first positional argument, a detached copy) in one forward pass of ``net`` on
    ``x``: the consumer's activations that a refit oracle solves its least squares on."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    try:
        with torch.no_grad():
            call(net, x)
    finally:
        handle.remove()
    return seen[0]


def ragged_token_batches(vocab: int, n_batches: int = 4, b: int = 6, t: int = 10, seed: int = 1,
                         garbage: bool = False) -> list[dict[str, torch.Tensor]]:
    """Ragged token batches for the decoder tests, right-padded and left-padded in turn; padded positions hold id 0
    (``garbage``: random ids drawn from another generator, the real tokens unchanged). Ids start at 3 (0-2 are
    the tiny configs' special tokens)."""
    g = torch.Generator().manual_seed(seed)
    g_pad = torch.Generator().manual_seed(seed + 1000)
    out = []
    for i in range(n_batches):
        ids = torch.randint(3, vocab, (b, t), generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        lengths[0] = t
        pos = torch.arange(t).view(1, -1)
        mask = pos < lengths.view(-1, 1) if i % 2 == 0 else pos >= t - lengths.view(-1, 1)
        pad = torch.randint(3, vocab, (b, t), generator=g_pad) if garbage else torch.zeros_like(ids)
        out.append({"input_ids": torch.where(mask, ids, pad), "attention_mask": mask.long()})
    return out


def scale_matrices(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every weight matrix and expert tensor of ``model`` by ``factor`` in place (larger weights than the
    default init, so that pruning visibly changes the outputs); returns it in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    return model.eval()


def real_token_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states of the real (unpadded) tokens of ``batch``, rows."""
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def run_hooked(models: list[nn.Module], batches: list[dict[str, torch.Tensor]], handles: list) -> None:
    """Run every model on every dict batch (keyword arguments) without gradients, for the hooks whose ``handles``
    are given; the hooks are removed afterwards, also on failure."""
    try:
        with torch.no_grad():
            for b in batches:
                for m in models:
                    m(**b)
    finally:
        for h in handles:
            h.remove()


def hooked_rows(model: nn.Module, batches: list[dict[str, torch.Tensor]], module: nn.Module,
                rows: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]) -> np.ndarray:
    """The first input of ``module`` in the model's forward on each batch, reduced to its real rows by
    ``rows(batch, input)`` (real tokens, real frames...) and stacked, in float64."""
    seen: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    run_hooked([model], batches, [h])
    return torch.cat([rows(b, a) for a, b in zip(seen, batches, strict=True)]).double().numpy()


def assert_reloads_and_generates(pruned: nn.Module, path) -> None:
    """``pruned`` (a causal LM) saved at ``path`` and reloaded gives the same logits, and its greedy generation
    gives the same tokens with and without its key/value (and recurrent-state) cache."""
    from nn_adapters.transformer import load_pruned, save_pruned

    save_pruned(pruned, path)
    again = load_pruned(path)
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, pruned(prompt).logits, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(pruned.generate(prompt, use_cache=True, **kw), pruned.generate(prompt, use_cache=False,
                                                                                           **kw))


def zeroed_heads(model: nn.Module, report, width: int, out_proj: str = "self_attn.o_proj") -> nn.Module:
    """A copy of ``model`` with the output-projection columns of the attention units ``report`` removed set to zero
    (``width`` columns a unit: a key/value group's query heads); what pruning heads without a refit must give."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            if u.stage == "heads":
                gone = sorted(set(range(u.n_units)) - set(u.kept))
                proj = zeroed.get_submodule(u.block).get_submodule(out_proj)
                proj.weight[:, [g * width + j for g in gone for j in range(width)]] = 0.0
    return zeroed


def zeroed_ffn(model: nn.Module, report, down: str) -> nn.Module:
    """A copy of ``model`` with the down-projection columns (``down``: its path inside a block) of the FFN neurons
    ``report`` removed set to zero; what pruning the FFN without a refit must give."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            if u.stage == "ffn":
                gone = sorted(set(range(u.n_units)) - set(u.kept))
                zeroed.get_submodule(u.block).get_submodule(down).weight[:, gone] = 0.0
    return zeroed


def assert_same_greedy_generation(model: nn.Module, reference: nn.Module, prompt: torch.Tensor,
                                  new_tokens: int = 6) -> None:
    """Greedy generation with the key/value cache gives the same tokens from both causal LMs."""
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "use_cache": True, "pad_token_id": 0,
          "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kw), reference.generate(prompt, **kw))


def prune_stack_by_stack(model: nn.Module, source: list[dict[str, torch.Tensor]], targets: list[torch.Tensor],
                         **options) -> tuple[tuple[nn.Module, object], tuple[nn.Module, object]]:
    """The documented manual route for an encoder-decoder model (the oracle of whole-model pruning in seq mode,
    whose statistics all come from the pruned network): prune ``model.encoder`` on the source batches, then
    ``model.decoder`` on the target tokens with the pruned encoder's states (and the source mask); returns
    ``(pruned encoder, report), (pruned decoder, report)``."""
    from nn_adapters.transformer import prune_transformer

    enc = prune_transformer(model.encoder, source, **options)
    dec_batches = []
    with torch.no_grad():
        for src, tgt in zip(source, targets, strict=True):
            dec = {"input_ids": tgt, "attention_mask": torch.ones_like(tgt),
                   "encoder_hidden_states": enc[0](**src).last_hidden_state}
            if "attention_mask" in src:
                dec["encoder_attention_mask"] = src["attention_mask"]
            dec_batches.append(dec)
    return enc, prune_transformer(model.decoder, dec_batches, **options)


def assert_decoder_refit_aims_at_the_original(model: nn.Module, pruned: nn.Module, whole: list[dict], report,
                                               consumer: str, mode: str = "asym") -> tuple[float, float]:
    """Oracle of the decoder's refit in a whole encoder-decoder pruned with ``ridge=0.0, weighting="none",
    residual=False``: every decoder block's FFN consumer (``consumer``, its path in the block) is the least-squares
    fit (with an intercept where it has a bias) of the UNPRUNED model's consumer outputs, whose decoder reads the
    unpruned encoder's states, on the consumer inputs (kept neurons only) of the pruned model (``mode="asym"``) or
    of the unpruned model (``"layer"``), over the decoder's tokens. Returns the largest difference between the
    pruned weights and that fit, and between them and the fit of the manual route's statistics (the unpruned
    decoder on the pruned encoder's states), for the caller to check that the two routes are told apart."""
    hybrid = copy.deepcopy(model)  # the unpruned decoder reading the pruned encoder's states
    hybrid.encoder = pruned.get_encoder()
    decoder_units = [u for u in report.units if u.stage == "ffn" and u.block.startswith("decoder.")]
    assert decoder_units
    err = apart = 0.0
    for unit in decoder_units:
        path = f"{unit.block}.{consumer}"
        mine, theirs = pruned.get_submodule(path), model.get_submodule(path)
        got = mine.weight.detach().double().numpy().T
        if mine.bias is not None:
            got = np.vstack([got, mine.bias.detach().double().numpy()])
        fits = []
        with torch.no_grad():
            for net in (model, hybrid):
                seen = torch.cat([captured_input(net, net.get_submodule(path), b).reshape(-1, theirs.in_features)
                                  for b in whole])
                if mode == "asym":
                    A = torch.cat([captured_input(pruned, mine, b).reshape(-1, mine.in_features) for b in whole])
                else:
                    A = seen[:, unit.kept]
                A = A.double().numpy()
                design = A if mine.bias is None else np.hstack([A, np.ones((len(A), 1))])
                fits.append(np.linalg.lstsq(design, theirs(seen).double().numpy(), rcond=None)[0])
        np.testing.assert_allclose(got, fits[0], atol=2e-4, rtol=1e-3)
        err = max(err, float(np.abs(got - fits[0]).max()))
        apart = max(apart, float(np.abs(got - fits[1]).max()))
    return err, apart


def assert_pruned_like_the_stacks(pruned: nn.Module, report, stacks) -> None:
    """The whole-model result has the units and the weights of the stack-by-stack route (``stacks`` as
    :func:`prune_stack_by_stack` returns them)."""
    (enc, enc_report), (dec, dec_report) = stacks
    by_hand = [(prefix + u.block, u.stage, u.kept) for prefix, r in (("encoder.", enc_report),
                                                                     ("decoder.", dec_report)) for u in r.units]
    assert [(u.block, u.stage, u.kept) for u in report.units] == by_hand
    state = pruned.state_dict()
    for prefix, part in (("encoder.", enc), ("decoder.", dec)):
        for key, value in part.state_dict().items():
            torch.testing.assert_close(state[prefix + key], value, atol=1e-5, rtol=1e-4)
    assert report.n_tokens == enc_report.n_tokens + dec_report.n_tokens


def assert_padding_does_not_matter(clean: tuple[nn.Module, object], garbage: tuple[nn.Module, object]) -> None:
    """Two prunings on the same real tokens, with other token ids at the padded positions: padding was excluded
    (the same count, not zero), and the units kept and the pruned weights are the same."""
    (p0, r0), (p1, r1) = clean, garbage
    assert r0.n_padding_excluded == r1.n_padding_excluded > 0
    assert [u.kept for u in r0.units] == [u.kept for u in r1.units]
    for a, b in zip(p0.state_dict().values(), p1.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def token_rows(batches: list[dict[str, torch.Tensor]], seen: list[torch.Tensor]) -> np.ndarray:
    """The real tokens' rows (float64, ``(n_real, features)``) of activations captured batch by batch, laid out
    ``(batch, tokens, ...)`` or flattened over batch and tokens; padding is where ``attention_mask`` is 0."""
    return torch.cat([t.reshape(*b["input_ids"].shape, -1)[b["attention_mask"].bool()]
                      for b, t in zip(batches, seen, strict=True)]).double().numpy()


def zeroed_at_consumers(net: nn.Module, report: nna.PruneReport, x: torch.Tensor,
                        offsets: dict[str, tuple[int, int]] | None = None) -> torch.Tensor:
    """The original network's output on ``x`` with the units that ``report`` removed zeroed at every consumer's
    input: a channel (dim 1) of a convolution's input, or the block of a channel's flattened positions (or one
    column per neuron) of a Linear's; a unit of several consecutive channels (a group behind a GroupNorm) is zeroed
    whole. What pruning without a refit must give.

    ``offsets`` maps the name of a pair whose producer's output is concatenated with other tensors before the
    consumer to ``(offset, fixed)``: its channels are the consumer's input channels (or blocks) ``offset ...``,
    and ``fixed`` channels of the other operands, never zeroed, lie before and after them."""
    handles = []
    offsets = offsets or {}
    for lr in report.layers:
        mask = torch.zeros(lr.n_units)
        mask[lr.kept_units] = 1.0
        cons = net.get_submodule(lr.pair.split("->")[1])
        width = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
        if lr.pair in offsets:  # one entry per channel of the concatenation, then its columns
            offset, fixed = offsets[lr.pair]
            mask = torch.cat([torch.ones(offset), mask, torch.ones(fixed - offset)])
        mask = mask.repeat_interleave(width // mask.numel())

        def hook(_m: nn.Module, inp: tuple, mask: torch.Tensor = mask, linear: bool = isinstance(cons, nn.Linear)
                 ) -> tuple:
            h = inp[0]
            return (h * (mask if linear else mask.view(-1, *[1] * (h.dim() - 2))).to(h),)

        handles.append(cons.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return call(net, x)
    finally:
        for h in handles:
            h.remove()


def check_budgets_against_built_networks(net: nn.Module, x: torch.Tensor, compressions: tuple[float, ...]) -> None:
    """The closed-form parameter count (``ParamModel``) equals the parameters of the unpruned network and of every
    network pruned to ``compressions`` (uniform and error-curve allocation), and each compression is met."""
    pairs, _ = nna.find_pairs(net, take(x, 2))
    assert ParamModel(net, pairs).total() == sum(p.numel() for p in net.parameters())
    for c in compressions:
        for alloc in ("uniform", "error"):
            pruned, rep = nna.prune(net, x, compression=c, method="layer", allocation=alloc)
            assert rep.params_after == sum(p.numel() for p in pruned.parameters())
            assert rep.compression >= c
            ks = np.array([r.kept for r in rep.layers])
            assert ParamModel(net, pairs, adds_bias=True).count(ks) == rep.params_after


def assert_save_load_round_trip(pruned: nn.Module, base: nn.Module, x: torch.Tensor, path) -> None:
    """``save_pruned`` then ``load_pruned`` onto a fresh ``base`` model gives the pruned model back: the same
    parameter shapes and bit-identical outputs on ``x``."""
    back = nna.load_pruned(nna.save_pruned(pruned, path), base_model=base)
    assert [tuple(p.shape) for p in back.parameters()] == [tuple(p.shape) for p in pruned.parameters()]
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)


def user_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    """Write ``source`` as the module ``name`` in ``tmp_path``, importable (with the tests' own modules, which it
    may import) from the working directory ``tmp_path``: a user's ``module:function`` for the CLI."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.chdir(tmp_path)


def spy_shared_copies(monkeypatch, module: object) -> list[nn.Module]:
    """Make ``module.shared_copy`` record the copies it makes (:func:`nn_adapters._modes.shared_copy`, monkeypatched
    for the test); returns the list they are appended to."""
    from nn_adapters._modes import shared_copy

    copies: list[nn.Module] = []

    def spy(m: nn.Module) -> nn.Module:
        twin = shared_copy(m)
        copies.append(twin)
        return twin

    monkeypatch.setattr(module, "shared_copy", spy)
    return copies


def shrink_routes(monkeypatch) -> list[bool]:
    """Record, for every ``apply_spec`` call of the transformer loader (``load_pruned``), whether the model it
    shrinks holds shape-only (``meta``) parameters."""
    import nn_adapters.transformer as tr

    routes: list[bool] = []
    apply_spec = tr.apply_spec

    def spy(model: nn.Module, spec):
        routes.append(any(p.is_meta for p in model.parameters()))
        return apply_spec(model, spec)

    monkeypatch.setattr(tr, "apply_spec", spy)
    return routes


#: Source of a user module for ``submod prune moemods:build``: a small random Mixtral (2 layers, 8 experts of 24
#: neurons, 2 routed a token) and two batches of token ids, the same in every call.
MIXTRAL_USER_MODULE = (
    "import torch, transformers\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24,\n"
    "                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,\n"
    "                                     num_local_experts=8, num_experts_per_tok=2)\n"
    "    model = transformers.MixtralForCausalLM(cfg).eval()\n"
    "    g = torch.Generator().manual_seed(1)\n"
    "    return model, [{'input_ids': torch.randint(0, 50, (4, 12), generator=g)} for _ in range(2)]\n")
