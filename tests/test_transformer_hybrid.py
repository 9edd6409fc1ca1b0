"""Transformer pruning of hybrid stacks (transformers 5): LFM2 (gated short-convolution layers and attention layers,
FFN ``feed_forward.{w1, w3, w2}``), LFM3 (LFM2's with a per-head output gate and, optionally, norms on the
sublayers' outputs), Granite 4.0 hybrid (Mamba-2 layers and attention layers, FFN ``shared_mlp`` with gate and up
fused in ``input_linear``, outputs times ``residual_multiplier``), Qwen3.5 (gated-DeltaNet layers and attention
layers with a gated query) and Jamba (Mamba layers and attention layers): the FFN of every layer, the heads of the
attention layers only; tiny randomly initialised models (no download).

Oracles: the unpruned model with the removed units' columns of the down projection (of the output projection for
heads) set to zero, no refit; numpy.linalg.lstsq on the down projection's input captured with a hook (the refit);
the saved and reloaded model's outputs; greedy generation with and without the cache (the convolution and Mamba
layers keep states of their own in it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import (
    assert_reloads_and_generates,
    captured_input,
    ragged_token_batches,
    real_token_states,
    run_hooked,
    scale_matrices,
    token_rows,
    zeroed_heads,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 16, 4, 2, 24, 40
HEAD_DIM, GROUP = HIDDEN // HEADS, HEADS // KV_HEADS
#: name -> (config / model class prefix, layer types, block kinds (operator layer, attention layer), down projection,
#: attention output projection)
FAMILIES = {
    "lfm2": ("Lfm2", ["conv", "full_attention", "conv", "full_attention"], ("hf_lfm2_conv", "hf_lfm2"),
             "feed_forward.w2", "self_attn.out_proj"),
    "granite4": ("GraniteMoeHybrid", ["mamba", "attention", "mamba", "attention"],
                 ("hf_granite_hybrid_mamba", "hf_granite_hybrid"), "shared_mlp.output_linear", "self_attn.o_proj"),
    # LFM3: LFM2's layers with a sigmoid output gate per query head (g_proj) and, by default, RMS norms on the
    # sublayers' outputs (use_sandwich_norm; FAMILIES builds it without, see test_lfm3_sandwich_norms)
    "lfm3": ("Lfm3", ["conv", "full_attention", "conv", "full_attention"], ("hf_lfm3_conv", "hf_lfm3"),
             "feed_forward.w2", "self_attn.o_proj"),
    # Qwen3.5 (dense): gated-DeltaNet layers and attention layers whose query projection also yields each head's
    # output gate (2 head_dim rows a head)
    "qwen3_5": ("Qwen3_5Text", ["linear_attention", "full_attention", "linear_attention", "full_attention"],
                ("hf_linear_attn", "hf_llama"), "mlp.down_proj", "self_attn.o_proj"),
    # Jamba with dense FFNs (its mixtures: test_transformer_moe.py): Mamba layers and attention layers, FFN
    # feed_forward.{gate,up,down}_proj after pre_ff_layernorm
    "jamba": ("Jamba", ["mamba", "attention", "mamba", "attention"], ("hf_jamba_mamba", "hf_jamba"),
              "feed_forward.down_proj", "self_attn.o_proj"),
}


def build(name: str, lm: bool = False, experts: int = 0, sandwich: bool = False) -> nn.Module:
    prefix, types = FAMILIES[name][:2]
    if not hasattr(transformers, prefix + "Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix}")
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=len(types), num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, intermediate_size=INTER, max_position_embeddings=32, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, layer_types=types)
    if name == "lfm2":
        kw.update(block_auto_adjust_ff_dim=False)
    elif name == "lfm3":
        kw.update(head_dim=HEAD_DIM, use_attention_gate=True, use_sandwich_norm=sandwich)
    elif name == "jamba":  # attention in every second layer, from the second; no experts
        del kw["layer_types"]  # a property of its config, read from the period and offset
        kw.update(attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=4, mamba_d_conv=4,
                  mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False)
    elif name == "qwen3_5":
        kw.update(head_dim=HEAD_DIM, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=4,
                  linear_value_head_dim=4)
    else:
        kw.update(shared_intermediate_size=INTER, num_local_experts=experts, num_experts_per_tok=2, mamba_n_heads=4,
                  mamba_d_head=8, mamba_expand=2, mamba_d_state=8, mamba_n_groups=1, residual_multiplier=0.5)
    torch.manual_seed(0)
    model = getattr(transformers, prefix.removesuffix("Text") + "ForCausalLM" if lm else prefix + "Model")(
        getattr(transformers, prefix + "Config")(**kw))
    return scale_matrices(model, 5.0)  # larger weights: pruning visibly changes the outputs


def has_heads(layer_type: str) -> bool:
    """Whether a layer of that type has softmax-attention heads (a linear attention has none)."""
    return layer_type in ("attention", "full_attention")


def attention_layers(name: str) -> set[str]:
    return {f"layers.{i}" for i, t in enumerate(FAMILIES[name][1]) if has_heads(t)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_blocks_are_found(name: str) -> None:
    kinds = [b.kind for b in find_blocks(build(name))]
    operator, attention = FAMILIES[name][2]
    assert kinds == [attention if has_heads(t) else operator for t in FAMILIES[name][1]]


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_without_refit_equals_the_model_with_removed_units_zeroed(name: str, target: str) -> None:
    model, batches = build(name), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    types = FAMILIES[name][1]
    assert {u.block for u in report.units if u.stage == "heads"} == (
        attention_layers(name) if target != "ffn" else set())
    assert len([u for u in report.units if u.stage == "ffn"]) == (len(types) if target != "heads" else 0)
    zeroed = copy.deepcopy(model)
    down, out = FAMILIES[name][3:]
    with torch.no_grad():
        for u in report.units:
            layer = zeroed.get_submodule(u.block)
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "ffn":
                layer.get_submodule(down).weight[:, gone] = 0.0
            else:  # a key/value group: its query heads' columns of the output projection
                cols = [(g * GROUP + j) * HEAD_DIM + i for g in gone for j in range(GROUP) for i in range(HEAD_DIM)]
                layer.get_submodule(out).weight[:, cols] = 0.0
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    """Layer mode, no weighting: least squares on the down projection's input (Granite's multiplier scales every
    output column alike, which least squares does not see)."""
    model, batches = build(name), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    down = FAMILIES[name][3]
    for u in report.units:
        w2 = model.get_submodule(u.block).get_submodule(down)
        a = torch.cat([captured_input(model, w2, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
        y = a @ w2.weight.detach().double().numpy().T
        want = np.linalg.lstsq(a[:, u.kept], y, rcond=None)[0].T
        got = pruned.get_submodule(u.block).get_submodule(down).weight.detach().double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_reload_and_generation(tmp_path, name: str) -> None:
    model = build(name, lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [b["num_heads"] for b in report.spec["blocks"]] == [
        HEADS // 2 if has_heads(t) else 0 for t in FAMILIES[name][1]]
    assert_reloads_and_generates(pruned, tmp_path / "m")


def test_granite_with_experts_prunes_the_experts_and_the_shared_mlp(tmp_path) -> None:
    """Granite 4.0 H with a mixture beside the dense shared_mlp in every layer (Mamba and attention): each expert
    and shared_mlp (gate and up fused in input_linear) lose half of their neurons. Oracles: no refit equals the
    unpruned model with the removed neurons' down columns (output_linear's for shared_mlp) zeroed; reload and
    generation."""
    model, batches = build("granite4", experts=4), ragged_token_batches(VOCAB)
    assert [b.kind for b in find_blocks(model)] == ["hf_granite_hybrid_mamba_moe", "hf_granite_hybrid_moe"] * 2
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all", method="magnitude", reweight=False)
    assert {u.block for u in report.units if u.stage == "heads"} == attention_layers("granite4")
    experts = [u for u in report.units if u.stage == "ffn"]
    assert sorted({str(u.expert) for u in experts}) == ["0", "1", "2", "3", "shared"]
    assert len(experts) == 5 * len(FAMILIES["granite4"][1])
    zeroed = zeroed_heads(model, report, GROUP * HEAD_DIM)
    with torch.no_grad():
        for u in (u for u in report.units if u.stage == "ffn"):
            layer = zeroed.get_submodule(u.block)
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.expert == "shared":
                layer.shared_mlp.output_linear.weight[:, gone] = 0.0
            else:
                layer.block_sparse_moe.experts.down_proj[u.expert][:, gone] = 0.0
    for a, b in zip(pruned.layers, model.layers, strict=True):
        assert a.shared_mlp.output_linear.in_features == b.shared_mlp.output_linear.in_features // 2
        assert a.shared_mlp.input_linear.out_features == b.shared_mlp.input_linear.out_features // 2
        assert a.block_sparse_moe.experts.down_proj.shape[2] == b.block_sparse_moe.experts.down_proj.shape[2] // 2
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)
    lm, _ = prune_transformer(build("granite4", lm=True, experts=4), batches, keep=0.5, target="all")
    assert_reloads_and_generates(lm, tmp_path / "m")


@pytest.mark.parametrize("method", ["magnitude", "asym"])
def test_lfm3_sandwich_norms_and_head_gates(tmp_path, method: str) -> None:
    """LFM3 with its default RMS norms on the sublayers' outputs: without refit, pruning equals zeroing the removed
    units' consumer columns of the unpruned model (each kept query head keeps its row of the output gate g_proj);
    with the asym refit the model runs, reloads and generates with its caches."""
    model, batches = build("lfm3", lm=True, sandwich=True), ragged_token_batches(VOCAB)
    assert [b.kind for b in find_blocks(model)] == ["hf_lfm3_conv", "hf_lfm3"] * 2
    assert all(not isinstance(b.output_norm("ffn"), nn.Identity) and b.output_norm("ffn") is not None
               for b in find_blocks(model))
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all", method=method,
                                       reweight=method == "asym")
    for u in report.units:
        if u.stage == "heads":
            heads = [g * GROUP + j for g in u.kept for j in range(GROUP)]
            gate = pruned.get_submodule(u.block).self_attn.g_proj
            assert gate.weight.equal(model.get_submodule(u.block).self_attn.g_proj.weight[heads])
    if method == "magnitude":
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for u in report.units:
                gone = sorted(set(range(u.n_units)) - set(u.kept))
                layer = zeroed.get_submodule(u.block)
                if u.stage == "ffn":
                    layer.feed_forward.w2.weight[:, gone] = 0.0
                else:
                    cols = [(g * GROUP + j) * HEAD_DIM + i for g in gone for j in range(GROUP) for i in range(HEAD_DIM)]
                    layer.self_attn.o_proj.weight[:, cols] = 0.0
            for b in batches:
                mask = b["attention_mask"].bool()
                torch.testing.assert_close(pruned(**b).logits[mask], zeroed(**b).logits[mask], atol=1e-4, rtol=1e-4)
    assert_reloads_and_generates(pruned, tmp_path / "m")


def build_falcon_h1(lm: bool = False) -> nn.Module:
    if not hasattr(transformers, "FalconH1Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Falcon-H1")
    torch.manual_seed(0)
    cfg = transformers.FalconH1Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTER, max_position_embeddings=32,
        mamba_d_ssm=16, mamba_n_heads=4, mamba_d_head=4, mamba_d_state=8, mamba_chunk_size=8, pad_token_id=0,
        mlp_multipliers=[0.7, 1.3], ssm_out_multiplier=0.5, attention_out_multiplier=0.8)
    return scale_matrices((transformers.FalconH1ForCausalLM if lm else transformers.FalconH1Model)(cfg), 3.0)


def test_falcon_h1_ffn_is_pruned(tmp_path) -> None:
    """Falcon-H1's layers carry Jamba's part names with a Mamba mixer run beside the attention and multipliers on
    every branch: their own kind. The FFN (gate input times gate_multiplier, output times down_multiplier = 1.3
    here) is pruned; oracles: no refit equals zeroing the removed neurons' down columns; the layer-mode refit is
    least squares on the captured down inputs (the multiplier scales every target column alike); reload and
    generation of a model pruned with target="all"."""
    model, batches = build_falcon_h1(), ragged_token_batches(VOCAB)
    assert [b.kind for b in find_blocks(model)] == ["hf_falcon_h1"] * 3
    pruned, report = prune_transformer(model, batches, keep=0.5, method="magnitude", reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            zeroed.get_submodule(u.block).feed_forward.down_proj.weight[:, sorted(set(range(INTER)) - set(u.kept))] = 0
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="layer", ridge=0.0, weighting="none")
    for u in report.units:
        down = model.get_submodule(u.block).feed_forward.down_proj
        a = torch.cat([captured_input(model, down, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
        want = np.linalg.lstsq(a[:, u.kept], a @ down.weight.detach().double().numpy().T, rcond=None)[0].T
        got = pruned.get_submodule(u.block).feed_forward.down_proj.weight.detach().double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    lm, report = prune_transformer(build_falcon_h1(lm=True), batches, keep=0.5, target="all")
    assert {u.stage for u in report.units} == {"heads", "ffn"}
    assert_reloads_and_generates(lm, tmp_path / "m")


def test_falcon_h1_heads_refit_aims_past_the_mamba_branch_beside_them() -> None:
    """Falcon-H1 adds ``m_ssm mamba(h) + m_attn attn(h)`` to the block input before the FFN's norm: the heads'
    residual is that sum minus the attention's output (the block input and the Mamba branch). Without refit the
    pruned model is the unpruned one with the removed key/value groups' o_proj columns zeroed; asym refits the last
    layer's o_proj toward ``o_o + (r_o - r_p) / m_attn`` (``r = s - m_attn o``, ``s`` the input of
    pre_ff_layernorm, ``o`` the o_proj output), read with hooks from the final models (ridge 0)."""
    model, batches = build_falcon_h1(), ragged_token_batches(VOCAB, n_batches=6)
    width = HEADS // KV_HEADS * HEAD_DIM
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude",
                                       reweight=False)
    zeroed = zeroed_heads(model, report, width)
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="asym", ridge=0.0,
                                       weighting="none")
    last, last_p = model.layers[-1], pruned.layers[-1]
    m = float(last.attn_out_multiplier)
    seen: dict[str, list[torch.Tensor]] = {"s_o": [], "o_o": [], "s_p": [], "o_p": [], "a_p": []}
    hooks = [last.pre_ff_layernorm.register_forward_pre_hook(lambda _m, a: seen["s_o"].append(a[0])),
             last.self_attn.o_proj.register_forward_hook(lambda _m, _a, o: seen["o_o"].append(o)),
             last_p.pre_ff_layernorm.register_forward_pre_hook(lambda _m, a: seen["s_p"].append(a[0])),
             last_p.self_attn.o_proj.register_forward_hook(lambda _m, _a, o: seen["o_p"].append(o)),
             last_p.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen["a_p"].append(a[0]))]
    run_hooked([model, pruned], batches, hooks)
    s_o, o_o, s_p, o_p, a = (token_rows(batches, seen[k]) for k in ("s_o", "o_o", "s_p", "o_p", "a_p"))
    r_o, r_p = s_o - m * o_o, s_p - m * o_p
    target = o_o + (r_o - r_p) / m
    cols = [u * width + j for u in report.units[-1].kept for j in range(width)]
    w_kept = last.self_attn.o_proj.weight.detach().double().numpy().T[cols]
    want = w_kept + np.linalg.lstsq(a, target - a @ w_kept, rcond=None)[0]
    np.testing.assert_allclose(last_p.self_attn.o_proj.weight.detach().double().numpy().T, want, atol=2e-4,
                               rtol=1e-3)
    assert np.abs(r_o - r_p).max() > 1e-3  # the first layers' pruning moved the residual, Mamba branch included
