"""Transformer pruning of MiMo-V2-Flash decoders (transformers 5): attention whose values and output-projection
columns are narrower than its queries and keys (``v_head_dim`` 8 against ``head_dim`` 4 here: each value head is
wider, the layout only needs them to differ), sliding-window layers with twice the key/value heads and a learned
sink logit per query head, a dense first layer then mixtures of experts; tiny randomly initialised models (no
download).

Oracles: the unpruned model with the removed key/value groups' output-projection columns (``v_head_dim`` per query
head) zeroed, no refit; numpy.linalg.lstsq on the output projection's input captured with a hook (the refit); the
saved and reloaded model's outputs; greedy generation with and without the cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import assert_reloads_and_generates, captured_input, ragged_token_batches
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, V_DIM, INTER, LAYERS, VOCAB = 16, 4, 2, 4, 8, 24, 3, 40


def build(lm: bool = False) -> nn.Module:
    if not hasattr(transformers, "MiMoV2FlashConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no MiMo-V2-Flash")
    cfg = transformers.MiMoV2FlashConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, v_head_dim=V_DIM, intermediate_size=INTER,
        moe_intermediate_size=INTER, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        pad_token_id=0)
    torch.manual_seed(0)
    model = (transformers.MiMoV2FlashForCausalLM if lm else transformers.MiMoV2FlashModel)(cfg).eval()
    with torch.no_grad():  # sinks start at zero: make them count; larger weights so that pruning shows
        for p in model.parameters():
            p.normal_(0.0, 0.5) if p.dim() == 1 else p.mul_(4.0)
    return model


def kv_heads(model: nn.Module, layer: int) -> int:
    return int(model.get_submodule(f"layers.{layer}" if hasattr(model, "layers") else f"model.layers.{layer}")
               .self_attn.k_proj.out_features) // HEAD_DIM


def test_layout_is_read_per_layer() -> None:
    model = build()
    blocks = find_blocks(model)
    assert [b.kind for b in blocks] == ["hf_llama"] + ["hf_moe"] * (LAYERS - 1)
    # the sliding-window layers hold twice the key/value heads: smaller groups, more units
    assert [(b.head_units, b.head_unit_width, b.value_dim, b.head_dim) for b in blocks] == [
        (KV_HEADS, HEADS // KV_HEADS * V_DIM, V_DIM, HEAD_DIM)] + [(2 * KV_HEADS, V_DIM, V_DIM, HEAD_DIM)] * 2
    assert [model.layers[i].self_attn.sinks is None for i in range(LAYERS)] == [True, False, False]


def test_heads_without_refit_are_the_original_with_the_removed_groups_zeroed() -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude", reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            i = int(u.block.rpartition(".")[2])
            per_group = HEADS // kv_heads(model, i)
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            cols = [(g * per_group + j) * V_DIM + c for g in gone for j in range(per_group) for c in range(V_DIM)]
            zeroed.layers[i].self_attn.o_proj.weight[:, cols] = 0.0
            attention = pruned.layers[i].self_attn
            kept_heads = [g * per_group + j for g in u.kept for j in range(per_group)]
            assert attention.q_proj.out_features == attention.k_proj.out_features * per_group == len(
                kept_heads) * HEAD_DIM
            assert attention.v_proj.out_features * per_group == attention.o_proj.in_features == len(kept_heads) * V_DIM
            if model.layers[i].self_attn.sinks is not None:  # each kept query head keeps its sink logit
                assert attention.sinks.equal(model.layers[i].self_attn.sinks[kept_heads])
    assert [u.n_kept for u in report.units] == [1, 2, 2]
    for b in batches:
        mask = b["attention_mask"].bool()
        with torch.no_grad():
            got, want = pruned(**b).last_hidden_state[mask], zeroed(**b).last_hidden_state[mask]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(got, model(**b).last_hidden_state[mask], atol=1e-3)


def test_heads_refit_equals_lstsq_on_the_captured_inputs() -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="layer", ridge=0.0,
                                       weighting="none")
    for u in report.units:
        i = int(u.block.rpartition(".")[2])
        o = model.layers[i].self_attn.o_proj
        A = torch.cat([captured_input(model, o, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
        Y = A @ o.weight.detach().double().numpy().T
        width = HEADS // kv_heads(model, i) * V_DIM
        cols = [g * width + c for g in u.kept for c in range(width)]
        want = np.linalg.lstsq(A[:, cols], Y, rcond=None)[0].T
        got = pruned.layers[i].self_attn.o_proj.weight.detach().double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [b["num_heads"] for b in report.spec["blocks"]] == [HEADS // 2, HEADS // 2, HEADS // 2]
    assert_reloads_and_generates(pruned, tmp_path / "m")


@pytest.mark.parametrize("gating", ["per-head", "per-element"])
def test_attention_output_gates_go_with_their_heads(tmp_path, gating: str) -> None:
    """Laguna gates the attention output before o_proj by softplus(g_proj(x)): one row a query head ("per-head")
    or one row an output channel ("per-element"); a removed key/value group takes its query heads' gate rows with
    it. Oracle: no refit equals the unpruned model with the group's o_proj columns zeroed; reload and generation."""
    if not hasattr(transformers, "LagunaConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Laguna")
    cfg = transformers.LagunaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTER, moe_intermediate_size=8,
        shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2, gating=gating,
        num_attention_heads_per_layer=[HEADS, HEADS], mlp_layer_types=["dense", "sparse"], pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LagunaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    gate_rows = HEADS if gating == "per-head" else HEADS * HEAD_DIM
    assert model.model.layers[0].self_attn.g_proj.out_features == gate_rows
    batches = ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude",
                                       reweight=False)
    zeroed = copy.deepcopy(model)
    group = HEADS // KV_HEADS
    with torch.no_grad():
        for u in report.units:
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            cols = [(g * group + j) * HEAD_DIM + i for g in gone for j in range(group) for i in range(HEAD_DIM)]
            zeroed.get_submodule(u.block).self_attn.o_proj.weight[:, cols] = 0.0
    assert [pruned.get_submodule(u.block).self_attn.g_proj.out_features for u in report.units] == [gate_rows // 2] * 2
    for b in batches:
        mask = b["attention_mask"].bool()
        with torch.no_grad():
            torch.testing.assert_close(pruned(**b).logits[mask], zeroed(**b).logits[mask], atol=1e-4, rtol=1e-4)
            assert not torch.allclose(pruned(**b).logits[mask], model(**b).logits[mask], atol=1e-3)
    assert_reloads_and_generates(pruned, tmp_path / "m")
