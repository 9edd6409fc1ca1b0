"""Transformer pruning of Llama 4 text decoders (transformers 5): dense layers (gated FFN ``feed_forward``) and
mixture-of-experts layers whose router scores multiply the experts' input (``experts(x * s)``, every expert on every
token, the outputs summed as they are) beside an ungated shared expert; heads with the per-head ``qk_norm``. Tiny
randomly initialised models (no download).

Oracles: the unpruned model with the removed units' consumer rows / columns zeroed (no refit); numpy.linalg.lstsq
on activations written out here from the experts' weights, on the scaled inputs of the tokens the router sends to
each expert (read with hooks); the saved and reloaded model's outputs; greedy generation with and without the cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_reloads_and_generates,
    ragged_token_batches,
    real_token_states,
    run_hooked,
    scale_matrices,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, DENSE, EXPERTS, VOCAB = 16, 4, 2, 4, 24, 32, 4, 40
GROUP = HEADS // KV_HEADS


def build(lm: bool = False) -> nn.Module:
    if int(transformers.__version__.split(".")[0]) < 5 or not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__}: Llama 4 experts of another layout")
    cfg = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, intermediate_size_mlp=DENSE,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_local_experts=EXPERTS, num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_chunk_size=16)
    torch.manual_seed(0)
    model = (transformers.Llama4ForCausalLM if lm else transformers.Llama4TextModel)(cfg).eval()
    return scale_matrices(model, 5.0)  # larger weights: pruning visibly changes the outputs


def test_blocks_are_found() -> None:
    assert [b.kind for b in find_blocks(build())] == ["hf_llama4", "hf_llama4_moe"]


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            ff = zeroed.get_submodule(u.block).feed_forward
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "heads":
                cols = [(g * GROUP + j) * HEAD_DIM + i for g in gone for j in range(GROUP) for i in range(HEAD_DIM)]
                zeroed.get_submodule(u.block).self_attn.o_proj.weight[:, cols] = 0.0
            elif u.expert is None:
                ff.down_proj.weight[:, gone] = 0.0
            elif u.expert == "shared":
                ff.shared_expert.down_proj.weight[:, gone] = 0.0
            else:  # experts store down_proj (E, I, H): a neuron is a row
                gu, dn = ff.experts.gate_up_proj[u.expert], ff.experts.down_proj[u.expert]
                score = gu[:, :INTER].pow(2).sum(0) + gu[:, INTER:].pow(2).sum(0) + dn.pow(2).sum(1)
                assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
                dn[gone, :] = 0.0
    if target != "heads":
        assert sorted({str(u.expert) for u in report.units if u.stage == "ffn"}) == ["0", "1", "2", "3", "None",
                                                                                    "shared"]
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


def test_expert_refit_is_lstsq_on_the_scaled_inputs_of_its_tokens() -> None:
    """Layer mode: expert ``e``'s rows are the real tokens the router scores above zero for it, its input ``s * x``
    (unweighted rows: its output enters the sum as it is)."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0)
    ff, ff_p = model.layers[1].feed_forward, pruned.layers[1].feed_forward
    seen: dict[str, list[torch.Tensor]] = {"x": [], "s": []}
    hooks = [ff.register_forward_pre_hook(lambda _m, a: seen["x"].append(a[0].reshape(-1, HIDDEN))),
             ff.router.register_forward_hook(lambda _m, _a, out: seen["s"].append(out[0]))]
    run_hooked([model], batches, hooks)
    for e in range(EXPERTS):
        rows = []
        for x, s, b in zip(seen["x"], seen["s"], batches, strict=True):
            tok = ((s[:, e] > 0) & b["attention_mask"].bool().reshape(-1)).nonzero().reshape(-1)
            z = (x[tok] * s[tok, e:e + 1]).double() @ ff.experts.gate_up_proj[e].detach().double()
            rows.append((F.silu(z[:, :INTER]) * z[:, INTER:]).numpy())
        a = np.concatenate(rows)
        y = a @ ff.experts.down_proj[e].detach().double().numpy()
        unit = next(u for u in report.units if u.expert == e)
        want = np.linalg.lstsq(a[:, unit.kept], y, rcond=None)[0]
        np.testing.assert_allclose(ff_p.experts.down_proj[e].detach().double().numpy(), want, rtol=1e-3,
                                   atol=1e-3)
        torch.testing.assert_close(ff_p.experts.gate_up_proj[e],
                                   ff.experts.gate_up_proj[e][:, unit.kept + [INTER + j for j in unit.kept]])


def test_asym_expert_targets_are_the_original_expert_on_the_original_input() -> None:
    """asym: rows from the pruned network (its inputs and scores, the dense first layer pruned), targets the
    original expert on the original network's input of the same token, scaled by the same score."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="asym", ridge=0.0)
    ff, ff_p = model.layers[1].feed_forward, pruned.layers[1].feed_forward
    seen: dict[str, list[torch.Tensor]] = {"x_o": [], "x_p": [], "s_p": []}
    hooks = [ff.register_forward_pre_hook(lambda _m, a: seen["x_o"].append(a[0].reshape(-1, HIDDEN))),
             ff_p.register_forward_pre_hook(lambda _m, a: seen["x_p"].append(a[0].reshape(-1, HIDDEN))),
             ff_p.router.register_forward_hook(lambda _m, _a, out: seen["s_p"].append(out[0]))]
    run_hooked([model, pruned], batches, hooks)
    gu, dn = ff.experts.gate_up_proj.detach().double(), ff.experts.down_proj.detach().double()

    def act(e: int, x: torch.Tensor) -> np.ndarray:
        z = x.double() @ gu[e]
        return (F.silu(z[:, :INTER]) * z[:, INTER:]).numpy()

    assert not torch.allclose(seen["x_o"][0], seen["x_p"][0], atol=1e-3)  # the first layer's pruning shows
    for e in range(EXPERTS):
        rows, targets = [], []
        for x_o, x_p, s, b in zip(seen["x_o"], seen["x_p"], seen["s_p"], batches, strict=True):
            tok = ((s[:, e] > 0) & b["attention_mask"].bool().reshape(-1)).nonzero().reshape(-1)
            rows.append(act(e, x_p[tok] * s[tok, e:e + 1]))
            targets.append(act(e, x_o[tok] * s[tok, e:e + 1]) @ dn[e].numpy())
        a, y = np.concatenate(rows), np.concatenate(targets)
        unit = next(u for u in report.units if u.expert == e)
        want = np.linalg.lstsq(a[:, unit.kept], y, rcond=None)[0]
        np.testing.assert_allclose(ff_p.experts.down_proj[e].detach().double().numpy(), want, rtol=1e-3,
                                   atol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert_reloads_and_generates(pruned, tmp_path / "m")
    assert report.spec["blocks"][1]["shared_intermediate_size"] == INTER // 2  # the shared expert: INTER wide
