"""Transformer pruning of RecurrentGemma (Griffin): recurrent layers (an RG-LRU temporal block, no heads) and local
multi-query attention layers, each with a gated GELU FFN ``mlp_block`` (biases); tiny randomly initialised models.

Oracles: the unpruned model with the removed units' consumer columns zeroed (no refit); numpy.linalg.lstsq (with an
intercept for the down projection's bias) on consumer inputs and targets captured with hooks in full forwards of the
pruned and unpruned models, which run the recurrent blocks as the model does; the saved and reloaded model, and
greedy generation with and without the cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import assert_reloads_and_generates, captured_input, ragged_token_batches, scale_matrices
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "RecurrentGemmaConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no RecurrentGemma", allow_module_level=True)

HIDDEN, HEADS, INTER, VOCAB = 16, 4, 24, 40
TYPES = ["recurrent", "attention", "recurrent"]


def build(lm: bool = False) -> nn.Module:
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=len(TYPES), num_attention_heads=HEADS,
        num_key_value_heads=1, intermediate_size=2 * INTER, lru_width=HIDDEN, attention_window_size=8,
        block_types=TYPES, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return scale_matrices((transformers.RecurrentGemmaForCausalLM if lm else transformers.RecurrentGemmaModel)(cfg),
                          3.0)  # larger weights (the conv1d's too): pruning visibly changes the outputs


def layers(model: nn.Module) -> nn.ModuleList:
    return (model.model if hasattr(model, "model") else model).layers


def states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def test_layers_are_found() -> None:
    assert [b.kind for b in find_blocks(build())] == ["hf_recurrent_gemma_rec", "hf_recurrent_gemma",
                                                      "hf_recurrent_gemma_rec"]


def test_without_refit_equals_the_model_with_removed_units_zeroed() -> None:
    """Every layer's FFN loses half its neurons (the attention layer's single key/value group stays: multi-query
    attention has one unit)."""
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all", method="wanda", reweight=False)
    assert [(u.block, u.stage, u.n_kept) for u in report.units] == [
        ("layers.0", "ffn", INTER // 2), ("layers.1", "heads", 1), ("layers.1", "ffn", INTER // 2),
        ("layers.2", "ffn", INTER // 2)]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            if u.stage == "ffn":
                down = zeroed.get_submodule(u.block).mlp_block.down_proj
                down.weight[:, sorted(set(range(u.n_units)) - set(u.kept))] = 0.0
    for b in batches:
        torch.testing.assert_close(states(pruned, b), states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(states(pruned, b), states(model, b), atol=1e-3)


@pytest.mark.parametrize("method", ["asym", "layer"])
def test_refit_is_lstsq_on_what_reaches_the_layer_through_the_recurrent_blocks(method: str) -> None:
    """Every down projection (weights and bias) is the least-squares fit of the unpruned layer's FFN output on the
    unpruned model's inputs, from the kept columns of the mode's inputs (asym: the pruned model's, through its
    recurrent blocks), over the real tokens."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method=method, ridge=0.0,
                                       weighting="none", residual=False)

    def rows(net: nn.Module, lin: nn.Linear) -> np.ndarray:
        return torch.cat([captured_input(net, lin, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()

    for u, orig, mine in zip(report.units, layers(model), layers(pruned), strict=True):
        theirs, new = orig.mlp_block.down_proj, mine.mlp_block.down_proj
        seen = rows(model, theirs)
        y = seen @ theirs.weight.detach().double().numpy().T + theirs.bias.detach().double().numpy()
        a = rows(pruned, new) if method == "asym" else seen[:, u.kept]
        sol = np.linalg.lstsq(np.hstack([a, np.ones((len(a), 1))]), y, rcond=None)[0]
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)
    last = layers(model)[2].mlp_block.down_proj, layers(pruned)[2].mlp_block.down_proj
    # the premise of asym mode: the last layer's FFN sees other inputs in the pruned network
    assert not np.allclose(rows(model, last[0])[:, report.units[2].kept], rows(pruned, last[1]), atol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    pruned, _ = prune_transformer(build(lm=True), ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert_reloads_and_generates(pruned, tmp_path / "m")
