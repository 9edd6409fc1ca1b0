"""Transformer pruning of FNet (``FNetLayer``): a parameter-free Fourier transform in place of the attention, then
BERT's post-LN FFN. Tiny randomly initialised models (no download).

Oracles: the unpruned model with the removed neurons' down-projection columns zeroed (no refit); numpy.linalg.lstsq
on the down projection's inputs hooked in the model's forward, every position a row (FNet takes no attention mask),
rows weighted by ``1 / (var_t + eps)`` of the sum entering the LayerNorm after the FFN; the saved and reloaded
model's outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_helpers import run_hooked, scale_matrices, zeroed_ffn
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS, VOCAB = 16, 24, 2, 40


def build() -> nn.Module:
    cfg = transformers.FNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  intermediate_size=INTER, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    model = scale_matrices(transformers.FNetModel(cfg), 3.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, VOCAB, (4, 8), generator=g)} for _ in range(3)]


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_blocks_are_found_and_heads_are_refused_with_the_reason() -> None:
    model = build()
    assert [b.kind for b in find_blocks(model)] == ["hf_fnet"] * LAYERS
    with pytest.raises(ValueError, match=r"no block of this model has attention heads.*hf_fnet.*target='ffn'"):
        prune_transformer(model, data(), keep=0.5, target="heads")
    _, report = prune_transformer(model, data(), keep=0.5, target="all")  # "all" prunes what there is
    assert [u.stage for u in report.units] == ["ffn"] * LAYERS


def test_pruning_without_refit_is_the_original_with_the_removed_neurons_zeroed() -> None:
    model, batches = build(), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="magnitude", reweight=False)
    zeroed = zeroed_ffn(model, report, "output.dense")
    for b in batches:
        torch.testing.assert_close(hidden(pruned, b), hidden(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(hidden(pruned, b), hidden(model, b), atol=1e-3)


def test_refit_is_lstsq_on_every_position_weighted_through_the_layernorm() -> None:
    model, batches = build(), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="layernorm")
    assert report.n_tokens == 3 * 4 * 8
    for i, layer in enumerate(model.encoder.layer):
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        h = layer.output.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append((args[0].detach(), args[1].detach())))
        run_hooked([model], batches, [h])
        A = torch.cat([a.reshape(-1, INTER) for a, _ in seen]).double().numpy()
        R = torch.cat([r.reshape(-1, HIDDEN) for _, r in seen]).double().numpy()
        W, bias = layer.output.dense.weight.detach().double().numpy(), layer.output.dense.bias.detach().double().numpy()
        Y = A @ W.T
        w = np.sqrt(1.0 / ((Y + bias + R).var(axis=1) + layer.output.LayerNorm.eps))[:, None]
        kept = report.units[i].kept
        sol = np.linalg.lstsq(np.hstack([A[:, kept], np.ones((len(A), 1))]) * w, Y * w, rcond=None)[0]
        new = pruned.encoder.layer[i].output.dense
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), bias + sol[-1], atol=2e-4, rtol=1e-3)


def test_save_and_reload(tmp_path) -> None:
    model, batches = build(), data()
    pruned, _ = prune_transformer(model, batches, keep={0: 0.5, 1: 0.25}, target="ffn")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    for b in batches:
        torch.testing.assert_close(hidden(back, b), hidden(pruned, b), atol=1e-6, rtol=1e-6)
