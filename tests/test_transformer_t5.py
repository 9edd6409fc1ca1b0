"""Pruning of T5-style stacks (``T5Block``): the T5 encoder (ReLU FFN ``wi -> wo``), the gated FFN of T5 v1.1 /
Flan-T5 (``act(wi_0(x)) * wi_1(x) -> wo``), UMT5 (a relative position bias in every block) and a T5 decoder stack
with cross-attention, pruned on its own with the encoder's states in the batches. The first block computes the
relative position bias and hands it to the others, so every block is replayed with its own captured arguments.
Heads (transformers >= 5): the self-attention's and the decoder's cross-attention's, each attention using its kept
heads' channels of the bias and handing the whole bias on. Tiny randomly initialised models (no download).

Oracles: the unpruned stack's outputs (keeping every unit), the unpruned stack with the removed units' columns of
``wo`` (of the heads' output projection ``o``) set to zero, numpy.linalg.lstsq on ``wo``'s (``o``'s) input captured
independently with a hook (the refit), a re-run with other token ids at the padded positions, greedy generation with
and without the cache, and the saved and reloaded model's outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import (
    assert_decoder_refit_aims_at_the_original,
    assert_padding_does_not_matter,
    assert_pruned_like_the_stacks,
    captured_input,
    prune_stack_by_stack,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

D_MODEL, D_FF, HEADS, D_KV, LAYERS, VOCAB = 16, 24, 4, 4, 3, 40
NAMES = ["t5", "t5_gated", "umt5", "t5_decoder"]


def config(name: str) -> transformers.PretrainedConfig:
    kw = dict(vocab_size=VOCAB, d_model=D_MODEL, d_ff=D_FF, num_layers=LAYERS, num_decoder_layers=LAYERS,
              num_heads=HEADS, d_kv=D_KV, relative_attention_num_buckets=8, relative_attention_max_distance=16,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if name == "umt5":
        return transformers.UMT5Config(**kw)
    return transformers.T5Config(**kw, feed_forward_proj="gated-gelu" if name == "t5_gated" else "relu")


def full_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls = {"umt5": "UMT5Model"}.get(name, "T5Model")
    model = getattr(transformers, cls)(config(name)).eval()
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def stack(name: str, seed: int = 0) -> nn.Module:
    full = full_model(name, seed)
    return full.decoder if name == "t5_decoder" else full.encoder


def batches(name: str, n_batches: int = 3, b: int = 5, t: int = 8, seed: int = 1, garbage: bool = False
            ) -> list[dict[str, torch.Tensor]]:
    """Ragged, right-padded token batches (``garbage``: other ids at the padded positions); for the decoder, target
    tokens with the unpruned encoder's states of the ragged source batch."""
    g = torch.Generator().manual_seed(seed)
    g_pad = torch.Generator().manual_seed(seed + 1000)
    encoder = full_model(name).encoder if name == "t5_decoder" else None
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = torch.arange(t).view(1, -1) < lengths.view(-1, 1)
        pad = torch.randint(3, VOCAB, (b, t), generator=g_pad) if garbage else torch.zeros_like(ids)
        batch = {"input_ids": torch.where(mask, ids, pad), "attention_mask": mask.long()}
        if encoder is not None:
            with torch.no_grad():
                states = encoder(**batch).last_hidden_state
            tgt = torch.randint(3, VOCAB, (b, t - 2), generator=g)
            batch = {"input_ids": tgt, "attention_mask": torch.ones_like(tgt), "encoder_hidden_states": states,
                     "encoder_attention_mask": batch["attention_mask"]}
        out.append(batch)
    return out


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def wo(block: nn.Module) -> nn.Linear:
    return block.layer[-1].DenseReluDense.wo


@pytest.mark.parametrize("name", NAMES)
def test_blocks_are_found_and_replayed_with_their_own_arguments(name: str) -> None:
    blocks = find_blocks(stack(name))
    assert [b.kind for b in blocks] == ["hf_t5"] * LAYERS
    assert all(b.per_block_context for b in blocks)
    # UMT5's default FFN is gated, as T5 v1.1's
    assert [len(b.producers) for b in blocks] == [2 if name in ("t5_gated", "umt5") else 1] * LAYERS


@pytest.mark.parametrize("method", ["asym", "layer", "wanda", "magnitude"])
@pytest.mark.parametrize("name", NAMES)
def test_keep_everything_without_refit_is_exact(name: str, method: str) -> None:
    """Later blocks get the first block's relative position bias as an argument: replaying them with the first
    block's arguments instead would change their outputs, so this also checks the per-block replay."""
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=1.0, target="ffn", method=method, reweight=False)
    assert report.params_after == report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(name: str) -> None:
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="magnitude", reweight=False)
    masked = copy.deepcopy(model)
    for unit in report.units:
        gone = sorted(set(range(unit.n_units)) - set(unit.kept))
        with torch.no_grad():
            wo(masked.get_submodule(unit.block)).weight[:, gone] = 0.0
    assert [(u.n_units, u.n_kept) for u in report.units] == [(D_FF, D_FF // 2)] * LAYERS
    assert report.params_after < report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)  # something was removed


@pytest.mark.parametrize("name", NAMES)
def test_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    """T5's projections have no bias: least squares without an intercept, toward the trained weights."""
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for unit in report.units:
        d = wo(model.get_submodule(unit.block))
        A32 = torch.cat([captured_input(model, d, b)[b["attention_mask"].bool()] for b in data])
        with torch.no_grad():
            Y = d(A32).double().numpy()
        A = A32.double().numpy()
        w = d.weight.detach().double().numpy().T
        kept = unit.kept
        sol = np.linalg.lstsq(A[:, kept], Y - A[:, kept] @ w[kept], rcond=None)[0]
        new = wo(pruned.get_submodule(unit.block))
        assert new.bias is None
        np.testing.assert_allclose(new.weight.detach().double().numpy().T, w[kept] + sol, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["t5", "t5_gated"])
def test_padding_tokens_do_not_change_the_statistics(name: str) -> None:
    model = stack(name)
    runs = [prune_transformer(model, batches(name, garbage=g), keep=0.5, target="ffn", method="asym") for g in (0, 1)]
    assert_padding_does_not_matter(*runs)


@pytest.mark.parametrize("name", NAMES)
def test_asym_with_refit_beats_magnitude_without_refit(name: str) -> None:
    """On held-out batches (64 calibration sequences: the refit of a random T5 overfits fewer). Greedy selection
    does not beat Wanda-style or magnitude selection with the same refit on these random models; the check is that
    the refit on the right rows and residuals is what Torch-Pruning's baseline lacks."""
    model, data, held_out = stack(name), batches(name, n_batches=8, b=8), batches(name, seed=7)
    errs = {}
    for method, reweight in (("asym", True), ("magnitude", False)):
        pruned, _ = prune_transformer(model, data, keep=0.5, target="ffn", method=method, reweight=reweight)
        errs[method] = sum(float((out(pruned, b) - out(model, b)).pow(2).sum()) for b in held_out)
    assert errs["asym"] < 0.75 * errs["magnitude"], errs


FIVE = int(transformers.__version__.split(".")[0]) >= 5
ATTENTIONS = {"heads": "layer.0.SelfAttention", "cross": "layer.1.EncDecAttention"}


@pytest.mark.skipif(FIVE, reason="T5 heads are pruned with transformers >= 5")
def test_heads_are_refused_before_transformers_5() -> None:
    model, data = stack("t5"), batches("t5")
    with pytest.raises(ValueError, match=r"upgrade transformers to >= 5.*target='ffn'"):
        prune_transformer(model, data, keep=0.5, target="heads")


def zeroed(model: nn.Module, report) -> nn.Module:
    """The unpruned stack with the removed heads' columns of their attention's ``o`` (the removed neurons' of
    ``wo``) set to zero."""
    masked = copy.deepcopy(model)
    for unit in report.units:
        block = masked.get_submodule(unit.block)
        gone = sorted(set(range(unit.n_units)) - set(unit.kept))
        if unit.stage == "ffn":
            consumer, cols = wo(block), gone
        else:
            consumer, cols = block.get_submodule(ATTENTIONS[unit.stage]).o, [
                h * D_KV + i for h in gone for i in range(D_KV)]
        with torch.no_grad():
            consumer.weight[:, cols] = 0.0
    return masked


@pytest.mark.skipif(not FIVE, reason="T5 heads need transformers >= 5")
@pytest.mark.parametrize("target", ["heads", "all"])
@pytest.mark.parametrize("name", NAMES)
def test_heads_without_refit_are_the_original_with_the_removed_heads_zeroed(name: str, target: str) -> None:
    """Every block uses its kept heads' channels of the relative position bias (the first block's computed for all
    of them, handed on whole): zeroing the removed heads' output columns in the unpruned stack is the oracle."""
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="magnitude", reweight=False)
    per_block = {"heads": 1, "all": 2}[target] + (name == "t5_decoder")
    assert len(report.units) == LAYERS * per_block
    assert all(u.n_kept == u.n_units // 2 for u in report.units)
    assert {u.stage for u in report.units} == ({"heads", "cross"} if name == "t5_decoder" else {"heads"}) | (
        {"ffn"} if target == "all" else set())
    masked = zeroed(model, report)
    for b in data:  # float32 sums over other shapes: a little more rounding than the FFN's
        torch.testing.assert_close(out(pruned, b), out(masked, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)
    for block in pruned.block:
        assert block.layer[0].SelfAttention.n_heads == HEADS // 2


@pytest.mark.skipif(not FIVE, reason="T5 heads need transformers >= 5")
@pytest.mark.parametrize("name", ["t5", "t5_decoder"])
def test_heads_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    """Layer mode: each attention's ``o`` (no bias) refitted by least squares on the kept heads' outputs."""
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="layer", ridge=0.0,
                                       weighting="none")
    for unit in report.units:
        o = model.get_submodule(unit.block).get_submodule(ATTENTIONS[unit.stage]).o
        A = torch.cat([captured_input(model, o, b)[b["attention_mask"].bool()] for b in data]).double().numpy()
        Y = A @ o.weight.detach().double().numpy().T
        cols = [h * D_KV + i for h in unit.kept for i in range(D_KV)]
        sol = np.linalg.lstsq(A[:, cols], Y, rcond=None)[0]
        new = pruned.get_submodule(unit.block).get_submodule(ATTENTIONS[unit.stage]).o
        assert new.bias is None
        np.testing.assert_allclose(new.weight.detach().double().numpy().T, sol, atol=2e-4, rtol=1e-3)


@pytest.mark.skipif(not FIVE, reason="T5 heads need transformers >= 5")
@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_pruned_heads_generate_and_reload(tmp_path, name: str) -> None:
    """The whole model with the heads of every attention pruned: greedy generation with the cache (each layer's
    self-attention bias computed for the positions so far, the cross-attention's keys and values cached once) gives
    the tokens it gives without the cache, and the saved and reloaded model the same."""
    torch.manual_seed(0)
    cls = {"umt5": "UMT5ForConditionalGeneration"}.get(name, "T5ForConditionalGeneration")
    model = getattr(transformers, cls)(config(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    source = batches(name)
    g = torch.Generator().manual_seed(3)
    whole = [{**b, "decoder_input_ids": torch.randint(3, VOCAB, (b["input_ids"].shape[0], 6), generator=g)}
             for b in source]
    pruned, report = prune_transformer(model, whole, keep=0.5, target="all", method="asym")
    assert {u.stage for u in report.units} == {"heads", "cross", "ffn"}
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    prompt = {"input_ids": torch.tensor([[3, 7, 11, 5, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    kw = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        with_cache = pruned.generate(**prompt, use_cache=True, **kw)
        assert torch.equal(with_cache, pruned.generate(**prompt, use_cache=False, **kw))
        assert torch.equal(with_cache, back.generate(**prompt, use_cache=True, **kw))
        torch.testing.assert_close(back(**whole[0]).logits, pruned(**whole[0]).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["t5_gated", "umt5"])
def test_save_and_reload(tmp_path, name: str) -> None:
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep={0: 0.5, 2: 0.25}, target="ffn", method="asym")
    assert [b["intermediate_size"] for b in report.spec["blocks"]] == [D_FF // 2, D_FF, D_FF // 4]
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m", stack(name, seed=5))
    for b in data:
        torch.testing.assert_close(out(back, b), out(pruned, b), atol=1e-6, rtol=1e-6)


def test_arguments_that_depend_on_the_hidden_states_are_refused() -> None:
    """A T5 look-alike whose first block hands on a bias that depends on its input (T5's depends only on the
    positions and the mask): replaying the unpruned model's bias in the pruned network would be wrong, so it is
    refused."""
    model, data = stack("t5"), batches("t5")
    first = model.block[0]
    forward = first.forward

    def biased(hidden_states, *args, **kwargs):
        out = forward(hidden_states, *args, **kwargs)
        return (out[0], out[1] + hidden_states.mean(), *out[2:])

    first.forward = biased
    ref = [out(model, b) for b in data]  # the look-alike still runs
    assert all(torch.isfinite(r).all() for r in ref)
    with pytest.raises(ValueError, match="receives arguments that change with the hidden states"):
        prune_transformer(model, data, keep=0.5, target="ffn", method="asym")


def _whole(name: str) -> tuple[nn.Module, list[dict], list[dict], list[torch.Tensor]]:
    """The full model, whole-model batches (ragged sources, decoder tokens), the sources and the decoder tokens."""
    model, source = full_model(name), batches(name)
    g = torch.Generator().manual_seed(3)
    targets = [torch.randint(3, VOCAB, (b["input_ids"].shape[0], 6), generator=g) for b in source]
    return model, [{**b, "decoder_input_ids": t} for b, t in zip(source, targets, strict=True)], source, targets


@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_the_whole_model_is_pruned_stack_by_stack(name: str) -> None:
    """Oracle, in seq mode (every statistic from the pruned network): the encoder pruned on its inputs, then the
    decoder on its tokens with the pruned encoder's states (the documented manual route)."""
    model, whole, source, targets = _whole(name)
    options = dict(keep=0.5, target="ffn", method="seq", weighting="none")
    pruned, report = prune_transformer(model, whole, **options)
    assert_pruned_like_the_stacks(pruned, report, prune_stack_by_stack(model, source, targets, **options))
    assert len(report.units) == 2 * LAYERS and report.params_after < report.params_before


@pytest.mark.parametrize("method", ["asym", "layer"])
@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_the_decoder_targets_come_from_the_unpruned_encoder(name: str, method: str) -> None:
    """The decoder's targets come from the original network (its decoder on the unpruned encoder's states), its
    inputs from the pruned network in asym mode, from the original in layer mode: each decoder ``wo`` is least
    squares (no intercept: T5 has no biases) of the unpruned model's ``wo`` outputs on those inputs."""
    model, whole, _, _ = _whole(name)
    pruned, report = prune_transformer(model, whole, keep=0.5, target="ffn", method=method, ridge=0.0,
                                       weighting="none", residual=False)
    assert wo(pruned.decoder.block[0]).bias is None
    consumer = f"layer.{len(model.decoder.block[0].layer) - 1}.DenseReluDense.wo"
    err, apart = assert_decoder_refit_aims_at_the_original(model, pruned, whole, report, consumer, method)
    assert apart > max(1e-4, 100 * err)
