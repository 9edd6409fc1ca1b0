"""Transformer pruning of decoders with multi-head latent attention (transformers 5: DeepSeek-V2 and V3, GLM-4.7-Flash
(``Glm4MoeLite``), Mistral 4, MiniCPM3): their FFNs (the first dense layers' gated FFN, the routed and shared experts
of the others) and their heads (a head: its rows of the query projection and of ``kv_b_proj``, its columns of
``o_proj``); tiny randomly initialised models (no download).

Oracles: the unpruned model with the removed units' consumer columns zeroed (no refit), numpy.linalg.lstsq on the
consumer's captured inputs, the saved and reloaded model's outputs, and greedy generation with and without the
key/value cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import captured_input, ragged_token_batches, real_token_states, scale_matrices, zeroed_heads
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, EXPERTS, LAYERS, VOCAB = 16, 4, 24, 4, 3, 40
QK_NOPE, QK_ROPE, V_HEAD = 4, 2, 4
FAMILIES = {"deepseek_v3": "DeepseekV3", "deepseek_v2": "DeepseekV2", "glm4_moe_lite": "Glm4MoeLite",
            "mistral4": "Mistral4", "minicpm3": "MiniCPM3"}
#: Block kinds: the first layer dense (first_k_dense_replace=1), the others mixtures; MiniCPM3 is dense throughout.
KINDS = {"minicpm3": ["hf_mla"] * LAYERS}


def build(name: str, lm: bool = False) -> nn.Module:
    cls = FAMILIES[name]
    if int(transformers.__version__.split(".")[0]) < 5 or not hasattr(transformers, cls + "Config"):
        pytest.skip(f"transformers {transformers.__version__}: no {cls} with experts as 3D tensors")
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, intermediate_size=INTER, moe_intermediate_size=INTER, n_routed_experts=EXPERTS,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=8,
        kv_lora_rank=8, qk_rope_head_dim=QK_ROPE, qk_nope_head_dim=QK_NOPE, v_head_dim=V_HEAD,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, cls + ("ForCausalLM" if lm else "Model"))(cfg).eval()
    return scale_matrices(model, 10.0)  # larger weights: pruning visibly changes the outputs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_blocks_are_found(name: str) -> None:
    kinds = [b.kind for b in find_blocks(build(name))]
    assert kinds == KINDS.get(name, ["hf_mla"] + ["hf_mla_moe"] * (LAYERS - 1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_without_refit_equals_the_model_with_removed_columns_zeroed(name: str) -> None:
    model = build(name)
    batches = ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="magnitude", reweight=False)
    zeroed = copy.deepcopy(model)
    blocks = {b.name: b for b in find_blocks(zeroed)}
    with torch.no_grad():
        for u in report.units:
            blk = blocks[u.block]
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            assert u.n_kept == u.n_units // 2
            if u.expert is None:
                blk.module.mlp.down_proj.weight[:, gone] = 0.0
            elif u.expert == "shared":
                blk.module.mlp.shared_experts.down_proj.weight[:, gone] = 0.0
            else:
                blk.module.mlp.experts.down_proj[u.expert][:, gone] = 0.0
    n_moe = KINDS.get(name, ["hf_mla"] + ["hf_mla_moe"] * (LAYERS - 1)).count("hf_mla_moe")
    assert len(report.units) == (LAYERS - n_moe) + n_moe * (EXPERTS + 1)
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


@pytest.mark.parametrize("name", ["deepseek_v3", "minicpm3"])
def test_dense_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    """The first (dense) layer in layer mode: the down projection refitted by least squares on its captured inputs
    (MiniCPM3 scales each branch by residual_scale before the sum, a factor the same for every token)."""
    model, batches = build(name), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="layer", ridge=0.0, weighting="none")
    down = model.layers[0].mlp.down_proj
    a = torch.cat([captured_input(model, down, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
    y = a @ down.weight.detach().double().numpy().T
    kept = report.units[0].kept
    want = np.linalg.lstsq(a[:, kept], y, rcond=None)[0].T
    np.testing.assert_allclose(pruned.layers[0].mlp.down_proj.weight.detach().double().numpy(), want,
                               atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_heads_without_refit_are_the_model_with_removed_heads_zeroed(name: str) -> None:
    """A removed head takes its query rows and its ``kv_b_proj`` rows (its key and value decompressed from the
    shared latent) with it: the same as zeroing its ``v_head_dim`` columns of ``o_proj``. Magnitude keeps the heads
    with the largest sum of squares over those rows and columns (``o_proj`` as it reaches the residual stream:
    times MiniCPM3's residual_scale)."""
    model, batches = build(name), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude",
                                       reweight=False)
    zeroed = copy.deepcopy(model)
    for u, layer in zip(report.units, zeroed.layers, strict=True):
        sa = layer.self_attn
        q = sa.q_proj if sa.q_proj is not None else sa.q_b_proj
        score = (q.weight.detach().pow(2).view(HEADS, -1).sum(1)
                 + sa.kv_b_proj.weight.detach().pow(2).view(HEADS, -1).sum(1)
                 + (sa.o_proj.weight.detach() * getattr(layer, "residual_scale", 1.0)).pow(2)
                 .view(HIDDEN, HEADS, V_HEAD).sum((0, 2)))
        assert u.kept == sorted(torch.argsort(score, descending=True)[:HEADS // 2].tolist())
        gone = sorted(set(range(HEADS)) - set(u.kept))
        with torch.no_grad():
            sa.o_proj.weight[:, [h * V_HEAD + i for h in gone for i in range(V_HEAD)]] = 0.0
    for layer in pruned.layers:
        sa = layer.self_attn
        q = sa.q_proj if sa.q_proj is not None else sa.q_b_proj
        assert sa.num_heads == HEADS // 2 and q.out_features == HEADS // 2 * (QK_NOPE + QK_ROPE)
        assert sa.kv_b_proj.out_features == HEADS // 2 * (QK_NOPE + V_HEAD)
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


def test_heads_refit_equals_lstsq_on_the_captured_inputs() -> None:
    model, batches = build("deepseek_v3"), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="layer", ridge=0.0,
                                       weighting="none")
    for u, lo, lp in zip(report.units, model.layers, pruned.layers, strict=True):
        o = lo.self_attn.o_proj
        a = torch.cat([captured_input(model, o, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
        y = a @ o.weight.detach().double().numpy().T
        cols = [h * V_HEAD + i for h in u.kept for i in range(V_HEAD)]
        want = np.linalg.lstsq(a[:, cols], y, rcond=None)[0].T
        np.testing.assert_allclose(lp.self_attn.o_proj.weight.detach().double().numpy(), want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["deepseek_v3", "minicpm3"])
def test_keeping_every_neuron_is_exact(name: str) -> None:
    model, batches = build(name), ragged_token_batches(VOCAB, n_batches=2)
    pruned, report = prune_transformer(model, batches, keep=1.0, method="asym", ridge=0.0, refit_prior="zero")
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(model, b), atol=1e-4, rtol=1e-4)
    assert report.params_after == report.params_before


def test_save_reload_and_generation(tmp_path) -> None:
    model = build("deepseek_v3", lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [b["num_heads"] for b in report.spec["blocks"]] == [HEADS // 2] * LAYERS
    assert [b["kind"] for b in report.spec["blocks"]] == ["hf_mla", "hf_mla_moe", "hf_mla_moe"]
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert [b.kind for b in find_blocks(again)] == ["hf_mla", "hf_mla_moe", "hf_mla_moe"]
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, pruned(prompt).logits, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        with_cache = pruned.generate(prompt, **kw)
        assert torch.equal(with_cache, pruned.generate(prompt, **{**kw, "use_cache": False}))
    assert with_cache.shape[1] == prompt.shape[1] + 5


#: Hybrids of gated delta-rule linear attention and latent attention: Kimi Linear (KDA) and Ring-linear
#: (``BailingHybrid``, whose latent attention gates each head's output by sigmoid(g_proj(x)), one row a head)
DELTA = {"kimi_linear": "KimiLinear", "bailing_hybrid": "BailingHybrid"}


def build_delta(name: str, experts: bool, lm: bool = False) -> nn.Module:
    cls = DELTA[name]
    if not hasattr(transformers, cls + "Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, intermediate_size=INTER, moe_intermediate_size=8, num_experts=EXPERTS,
        num_experts_per_token=2, num_expert_group=1, topk_group=1, kv_lora_rank=8, qk_rope_head_dim=QK_ROPE,
        qk_nope_head_dim=QK_NOPE, v_head_dim=V_HEAD, qk_head_dim=QK_NOPE + QK_ROPE, head_dim=V_HEAD,
        linear_head_dim=4, linear_num_heads=4, layer_types=["linear_attention", "full_attention"] * 2,
        mlp_layer_types=["dense"] + ["sparse" if experts else "dense"] * 3, first_k_dense_replace=1,
        layer_group_size=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, cls + ("ForCausalLM" if lm else "Model"))(cfg).eval()
    return scale_matrices(model, 5.0)


@pytest.mark.parametrize("name", list(DELTA))
def test_delta_attention_layers_keep_their_heads_and_the_latent_attention_loses_heads(name: str) -> None:
    """The linear-attention layers (``hf_delta_attn``) have their FFN pruned and no heads; the latent-attention
    layers lose heads (with Ring-linear's output-gate rows). Oracle: no refit equals zeroing the removed heads'
    ``o_proj`` columns and the removed neurons' ``down_proj`` columns of the unpruned model."""
    model, batches = build_delta(name, experts=False), ragged_token_batches(VOCAB)
    assert [b.kind for b in find_blocks(model)] == ["hf_delta_attn", "hf_mla"] * 2
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all", method="magnitude", reweight=False)
    assert report.skipped == []
    assert sorted((u.block, u.stage) for u in report.units) == sorted(
        [(f"layers.{i}", "ffn") for i in range(4)] + [("layers.1", "heads"), ("layers.3", "heads")])
    zeroed = zeroed_heads(model, report, V_HEAD)
    with torch.no_grad():
        for u in (u for u in report.units if u.stage == "ffn"):
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            zeroed.get_submodule(u.block).mlp.down_proj.weight[:, gone] = 0.0
    gate = getattr(pruned.layers[1].self_attn, "g_proj", None)
    assert gate is None or gate.out_features == HEADS // 2
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


@pytest.mark.parametrize("name", list(DELTA))
def test_delta_attention_hybrids_with_experts_reload_and_generate(tmp_path, name: str) -> None:
    from _torch_helpers import assert_reloads_and_generates

    model = build_delta(name, experts=True, lm=True)
    assert [b.kind for b in find_blocks(model)] == ["hf_delta_attn", "hf_mla_moe", "hf_delta_attn_moe",
                                                    "hf_mla_moe"]
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [b["num_heads"] for b in report.spec["blocks"]] == [0, HEADS // 2, 0, HEADS // 2]
    assert_reloads_and_generates(pruned, tmp_path / "m")
