"""Transformer pruning of LFM2, a hybrid of gated short-convolution layers and attention layers (transformers 5): the
FFN (``feed_forward.{w1, w3, w2}``) of every layer, the heads of the attention layers only; tiny randomly
initialised models (no download).

Oracles: the unpruned model with the removed units' columns of ``w2`` (of ``out_proj`` for heads) set to zero, no
refit; numpy.linalg.lstsq on ``w2``'s input captured with a hook (the refit); the saved and reloaded model's outputs;
greedy generation with and without the cache (the convolution layers keep a state of their own in it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import captured_input, ragged_token_batches, real_token_states, scale_matrices
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 16, 4, 2, 24, 40
HEAD_DIM, GROUP = HIDDEN // HEADS, HEADS // KV_HEADS
TYPES = ["conv", "full_attention", "conv", "full_attention"]


def build(lm: bool = False) -> nn.Module:
    if not hasattr(transformers, "Lfm2Config"):
        pytest.skip(f"transformers {transformers.__version__} has no LFM2")
    cfg = transformers.Lfm2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=len(TYPES), num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTER, block_auto_adjust_ff_dim=False,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, layer_types=TYPES)
    torch.manual_seed(0)
    model = (transformers.Lfm2ForCausalLM if lm else transformers.Lfm2Model)(cfg).eval()
    return scale_matrices(model, 5.0)  # larger weights: pruning visibly changes the outputs


def test_blocks_are_found() -> None:
    kinds = [b.kind for b in find_blocks(build())]
    assert kinds == ["hf_lfm2_conv" if t == "conv" else "hf_lfm2" for t in TYPES]


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    heads = {f"layers.{i}" for i, t in enumerate(TYPES) if t != "conv"}
    assert {u.block for u in report.units if u.stage == "heads"} == (heads if target != "ffn" else set())
    assert len([u for u in report.units if u.stage == "ffn"]) == (len(TYPES) if target != "heads" else 0)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            layer = zeroed.get_submodule(u.block)
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "ffn":
                layer.feed_forward.w2.weight[:, gone] = 0.0
            else:  # a key/value group: its query heads' columns of out_proj
                cols = [(g * GROUP + j) * HEAD_DIM + i for g in gone for j in range(GROUP) for i in range(HEAD_DIM)]
                layer.self_attn.out_proj.weight[:, cols] = 0.0
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


def test_ffn_refit_equals_lstsq_on_the_captured_inputs() -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for u in report.units:
        w2 = model.get_submodule(u.block).feed_forward.w2
        a = torch.cat([captured_input(model, w2, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
        y = a @ w2.weight.detach().double().numpy().T
        want = np.linalg.lstsq(a[:, u.kept], y, rcond=None)[0].T
        got = pruned.get_submodule(u.block).feed_forward.w2.weight.detach().double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [b["num_heads"] for b in report.spec["blocks"]] == [0 if t == "conv" else HEADS // 2 for t in TYPES]
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, pruned(prompt).logits, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        with_cache = pruned.generate(prompt, use_cache=True, **kw)
        assert torch.equal(with_cache, pruned.generate(prompt, use_cache=False, **kw))
