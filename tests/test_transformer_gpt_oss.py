"""Transformer pruning of GPT-OSS decoders (transformers 5): experts stored transposed with interleaved gate and up
columns and biases, refitted with their bias; attention heads with a learned sink logit each; tiny randomly
initialised models (no download).

Oracles: the unpruned model with the removed neurons' down-projection rows (the removed heads' output-projection
columns) zeroed, no refit; numpy.linalg.lstsq with an intercept column on activations written out here from the
experts' weights (the clamped SwiGLU of the model card) and the routing the model hands its experts module (read
with a hook), weighted by the routing weights; the saved and reloaded model's outputs; greedy generation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import ragged_token_batches, run_hooked
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, EXPERTS, LAYERS, VOCAB = 16, 4, 2, 4, 24, 4, 2, 40


def build(lm: bool = False, **extra) -> nn.Module:
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__}: GPT-OSS experts of another layout")
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTER, num_local_experts=EXPERTS,
        num_experts_per_tok=2, max_position_embeddings=32, sliding_window=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = (transformers.GptOssForCausalLM if lm else transformers.GptOssModel)(cfg).eval()
    with torch.no_grad():  # the default init leaves biases and sinks at zero: make every part count
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    assert [b.kind for b in find_blocks(model)] == ["hf_gpt_oss"] * LAYERS
    return model


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def swiglu_rows(ex: nn.Module, e: int, x: torch.Tensor) -> np.ndarray:
    """Expert ``e``'s intermediate activations, written out (float64): gate and up are the even and odd columns of
    ``x W + b``; gate clamped above at ``limit``, up to ``[-limit, limit]``; ``(up + 1) * gate * sigmoid(alpha
    gate)``."""
    z = x.double() @ ex.gate_up_proj[e].detach().double() + ex.gate_up_proj_bias[e].detach().double()
    gate, up = z[:, 0::2].clamp(max=ex.limit), z[:, 1::2].clamp(-ex.limit, ex.limit)
    return ((up + 1.0) * gate * torch.sigmoid(ex.alpha * gate)).numpy()


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            layer = zeroed.layers[int(u.block.rpartition(".")[2])]
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "ffn":
                ex = layer.mlp.experts
                # magnitude: squared norms of the neuron's gate column, up column and down row
                score = (ex.gate_up_proj[u.expert][:, 0::2].pow(2).sum(0) + ex.gate_up_proj[u.expert][:, 1::2]
                         .pow(2).sum(0) + ex.down_proj[u.expert].pow(2).sum(1))
                assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
                ex.down_proj[u.expert][gone, :] = 0.0
            else:  # a unit is a key/value group of HEADS // KV_HEADS query heads
                group = HEADS // KV_HEADS
                cols = [(g * group + j) * HEAD_DIM + i for g in gone for j in range(group) for i in range(HEAD_DIM)]
                layer.self_attn.o_proj.weight[:, cols] = 0.0
    for layer in pruned.layers:
        if target != "ffn":
            assert layer.self_attn.sinks.shape == (HEADS // 2,)
        if target != "heads":
            assert layer.mlp.experts.gate_up_proj.shape == (EXPERTS, HIDDEN, INTER)
            assert layer.mlp.experts.down_proj.shape == (EXPERTS, INTER // 2, HIDDEN)
    for b in batches:
        torch.testing.assert_close(hidden(pruned, b), hidden(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(hidden(pruned, b), hidden(model, b), atol=1e-3)


def assert_routing_weighted_refits(model: nn.Module, pruned: nn.Module, report, batches, activations,
                                   columns) -> None:
    """Every expert's down projection is the lstsq fit with an intercept on its activations written out by
    ``activations(experts, e, x)``, on the real tokens the router sends it (read with a hook on the experts module),
    rows weighted by the routing weights; the kept neurons keep the gate and up columns ``columns(kept)``."""
    for layer, (lo, lp) in enumerate(zip(model.layers, pruned.layers, strict=True)):
        ex_o, ex_p = lo.mlp.experts, lp.mlp.experts
        seen: list[tuple] = []
        handle = ex_o.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append(tuple(a.detach() for a in args[:3])))
        run_hooked([model], batches, [handle])
        for e in range(EXPERTS):
            rows, weights = [], []
            for (x, idx, w), b in zip(seen, batches, strict=True):
                tok, slot = ((idx == e) & b["attention_mask"].bool().reshape(-1)[:, None]).nonzero(as_tuple=True)
                rows.append(activations(ex_o, e, x[tok]))
                weights.append(w[tok, slot].double().abs().numpy())
            a, sw = np.concatenate(rows), np.concatenate(weights)
            y = a @ ex_o.down_proj[e].detach().double().numpy() + ex_o.down_proj_bias[e].detach().double().numpy()
            unit = next(u for u in report.units if u.expert == e and u.block.endswith(f".{layer}"))
            design = np.hstack([a[:, unit.kept], np.ones((len(a), 1))]) * sw[:, None]
            sol = np.linalg.lstsq(design, y * sw[:, None], rcond=None)[0]
            np.testing.assert_allclose(ex_p.down_proj[e].detach().double().numpy(), sol[:-1], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(ex_p.down_proj_bias[e].detach().double().numpy(), sol[-1], rtol=1e-3,
                                       atol=1e-3)
            cols = columns(unit.kept)
            torch.testing.assert_close(ex_p.gate_up_proj[e], ex_o.gate_up_proj[e][:, cols])
            torch.testing.assert_close(ex_p.gate_up_proj_bias[e], ex_o.gate_up_proj_bias[e][cols])


def test_layer_refit_is_routing_weighted_lstsq_with_the_bias() -> None:
    model = build()
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="layer", ridge=0.0)
    assert_routing_weighted_refits(model, pruned, report, batches, swiglu_rows,
                                   lambda kept: sorted({2 * j + p for j in kept for p in (0, 1)}))


def test_kept_neurons_follow_the_grouped_mm_alignment() -> None:
    batches = ragged_token_batches(VOCAB, n_batches=2)
    pruned, report = prune_transformer(build(), batches, keep=0.3)
    assert {u.n_kept for u in report.units} == {8}  # 7 rounded up to 4 float32 values (16 bytes)
    hidden(pruned, batches[0])
    pruned, report = prune_transformer(build(experts_implementation="eager"), batches, keep=0.3)
    assert {u.n_kept for u in report.units} == {7}
    hidden(pruned, batches[0])


def test_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [b["kind"] for b in report.spec["blocks"]] == ["hf_gpt_oss"] * LAYERS
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    prompt = torch.tensor([[3, 7, 11, 5, 9, 4]])  # longer than the sliding window
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, pruned(prompt).logits, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        with_cache = pruned.generate(prompt, **kw)
        assert torch.equal(with_cache, pruned.generate(prompt, **{**kw, "use_cache": False}))


# ----------------------------------------------------------------------------------------------------------------
# The OpenAI privacy filter: a bidirectional encoder with GPT-OSS's experts, their gate and up columns concatenated
# (every gate column, then every up column) rather than interleaved, the mixture's output times its experts per token


def build_privacy_filter() -> nn.Module:
    if not hasattr(transformers, "OpenAIPrivacyFilterModel"):
        pytest.skip(f"transformers {transformers.__version__} has no OpenAIPrivacyFilterModel")
    cfg = transformers.OpenAIPrivacyFilterConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTER, num_local_experts=EXPERTS,
        num_experts_per_tok=2, max_position_embeddings=32, sliding_window=4, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.OpenAIPrivacyFilterModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    assert [b.kind for b in find_blocks(model)] == ["hf_gpt_oss"] * LAYERS
    return model


def concatenated_swiglu_rows(ex: nn.Module, e: int, x: torch.Tensor) -> np.ndarray:
    """The privacy filter's expert activations, written out: gate the first half of ``x W + b``, up the second."""
    z = x.double() @ ex.gate_up_proj[e].detach().double() + ex.gate_up_proj_bias[e].detach().double()
    gate, up = z[:, :INTER].clamp(max=ex.limit), z[:, INTER:].clamp(-ex.limit, ex.limit)
    return ((up + 1.0) * gate * torch.sigmoid(ex.alpha * gate)).numpy()


def test_privacy_filter_without_refit_equals_the_model_with_removed_neurons_zeroed() -> None:
    model, batches = build_privacy_filter(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="magnitude", reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            ex = zeroed.layers[int(u.block.rpartition(".")[2])].mlp.experts
            gu = ex.gate_up_proj[u.expert]
            score = gu[:, :INTER].pow(2).sum(0) + gu[:, INTER:].pow(2).sum(0) + ex.down_proj[u.expert].pow(2).sum(1)
            assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
            ex.down_proj[u.expert][sorted(set(range(INTER)) - set(u.kept)), :] = 0.0
    for b in batches:
        torch.testing.assert_close(hidden(pruned, b), hidden(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(hidden(pruned, b), hidden(model, b), atol=1e-3)


def test_privacy_filter_layer_refit_is_routing_weighted_lstsq_on_the_concatenated_layout() -> None:
    model = build_privacy_filter()
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0)
    assert_routing_weighted_refits(model, pruned, report, batches, concatenated_swiglu_rows,
                                   lambda kept: list(kept) + [INTER + j for j in kept])


def test_privacy_filter_save_and_reload(tmp_path) -> None:
    model, batches = build_privacy_filter(), ragged_token_batches(VOCAB)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    for b in batches:
        torch.testing.assert_close(hidden(back, b), hidden(pruned, b), atol=1e-5, rtol=1e-5)
