"""Transformer pruning of Aria's text decoder (``AriaTextDecoderLayer``, transformers 5): Llama attention and a
mixture of experts stored transposed (``gate_up_proj`` (E, H, 2I): the gate columns, then the up columns;
``down_proj`` (E, I, H)), the routing weights on the experts' outputs, plus shared experts (one gated FFN) added to
their sum. Tiny randomly initialised models (no download).

Oracles: the unpruned model with the removed units' consumer rows / columns zeroed (no refit), with the magnitude
scores written out from the transposed tensors; numpy.linalg.lstsq on activations written out here from the experts'
weights, on the tokens the router sends to each expert, rows weighted by the routing weights (read with hooks); the
saved and reloaded model's outputs; greedy generation with and without the cache.
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
if not hasattr(transformers, "AriaTextConfig") or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: no Aria experts stored as 3D tensors",
                allow_module_level=True)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, EXPERTS, VOCAB = 16, 4, 2, 4, 24, 4, 40
GROUP = HEADS // KV_HEADS
SHARED = 2 * INTER  # two shared experts: one gated FFN twice as wide


def build(lm: bool = False, **extra) -> nn.Module:
    cfg = transformers.AriaTextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, moe_num_experts=EXPERTS, moe_topk=2,
        moe_num_shared_experts=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **extra)
    torch.manual_seed(0)
    model = (transformers.AriaTextForCausalLM if lm else transformers.AriaTextModel)(cfg).eval()
    return scale_matrices(model, 5.0)  # larger weights: pruning visibly changes the outputs


def layers(model: nn.Module) -> nn.ModuleList:
    return (model.model if hasattr(model, "model") else model).layers


def expert_rows(gate_up: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """One expert's intermediate activations, written out from its transposed (H, 2I) tensor: silu(x G) * (x U)."""
    x64, w = x.double(), gate_up.detach().double()
    return (F.silu(x64 @ w[:, :INTER]) * (x64 @ w[:, INTER:])).numpy()


def routed(model: nn.Module, experts: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    """What the model hands its experts module, batch by batch: (token rows, routed experts, routing weights)."""
    seen: list[tuple] = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.detach() for a in args[:3])))
    run_hooked([model], batches, [handle])
    return seen


def test_blocks_are_found() -> None:
    assert [b.kind for b in find_blocks(build())] == ["hf_aria_moe"] * 2


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            layer = zeroed.get_submodule(u.block)
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "heads":
                cols = [(g * GROUP + j) * HEAD_DIM + i for g in gone for j in range(GROUP) for i in range(HEAD_DIM)]
                layer.self_attn.o_proj.weight[:, cols] = 0.0
            elif u.expert == "shared":
                layer.mlp.shared_experts.down_proj.weight[:, gone] = 0.0
            else:  # down_proj (E, I, H): a neuron is a row; gate_up_proj (E, H, 2I): two columns
                gu, dn = layer.mlp.experts.gate_up_proj[u.expert], layer.mlp.experts.down_proj[u.expert]
                score = gu[:, :INTER].pow(2).sum(0) + gu[:, INTER:].pow(2).sum(0) + dn.pow(2).sum(1)
                assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
                dn[gone, :] = 0.0
    if target != "heads":
        assert {str(u.expert) for u in report.units} == {"0", "1", "2", "3", "shared"} | (
            {"None"} if target == "all" else set())  # None: the heads
        ex = layers(pruned)[0].mlp.experts
        assert tuple(ex.gate_up_proj.shape) == (EXPERTS, HIDDEN, INTER) and ex.intermediate_dim == INTER // 2
        assert tuple(ex.down_proj.shape) == (EXPERTS, INTER // 2, HIDDEN)
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


@pytest.mark.parametrize("mode", ["layer", "asym"])
def test_expert_refit_is_routing_weighted_lstsq_on_its_tokens(mode: str) -> None:
    """Each expert's down projection is the least-squares fit on the real tokens routed to it, rows weighted by
    their routing weights: inputs from the original network (layer) or the pruned one (asym, targets the original
    expert on the original input), in the last layer (whose inputs the first layer's pruning changed)."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method=mode, ridge=0.0)
    ex_o, ex_p = layers(model)[-1].mlp.experts, layers(pruned)[-1].mlp.experts
    orig = routed(model, ex_o, batches)
    mine = orig if mode == "layer" else routed(pruned, ex_p, batches)
    for e in range(EXPERTS):
        rows, targets, weights = [], [], []
        for (x_o, _, _), (x_p, idx, w), b in zip(orig, mine, batches, strict=True):
            real = b["attention_mask"].bool().reshape(-1)
            tok, slot = ((idx == e) & real[:, None]).nonzero(as_tuple=True)
            rows.append(expert_rows(ex_o.gate_up_proj[e], x_p[tok]))
            targets.append(expert_rows(ex_o.gate_up_proj[e], x_o[tok]) @ ex_o.down_proj[e].detach().double().numpy())
            weights.append(w[tok, slot].double().abs().numpy())
        a, y, sw = np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)
        unit = next(u for u in report.units if u.expert == e and u.block.endswith(".1"))
        want = np.linalg.lstsq(a[:, unit.kept] * sw[:, None], y * sw[:, None], rcond=None)[0]
        np.testing.assert_allclose(ex_p.down_proj[e].detach().double().numpy(), want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ex_p.gate_up_proj[e], ex_o.gate_up_proj[e][:, [*unit.kept, *(
            k + INTER for k in unit.kept)]])
    if mode == "asym":  # the premise: the first layer's pruning changed what the last layer's experts see
        assert not torch.allclose(orig[0][0], mine[0][0], atol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert report.spec["blocks"][0]["kind"] == "hf_aria_moe"
    assert report.spec["blocks"][0]["shared_intermediate_size"] == SHARED // 2
    assert_reloads_and_generates(pruned, tmp_path / "m")
