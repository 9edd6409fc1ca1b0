"""Transformer pruning of models that pad the sequence themselves, so that their blocks see more tokens than the
batch's attention mask covers: Longformer (``LongformerLayer``: BERT's layout, an attention over sliding windows and
global tokens that reshapes its output to the model width, the sequence padded to a multiple of its attention
window) and BigBird's block-sparse attention (padded to a multiple of its block size). Tiny randomly initialised
models (no download).

Oracles: the unpruned model with the removed neurons' down-projection columns (heads' output-projection columns)
zeroed (no refit); numpy.linalg.lstsq on the down projection's inputs hooked in the model's forward, on the real
tokens only (the batch's mask, the positions the model appended left out); the saved and reloaded model's outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_helpers import ragged_token_batches, scale_matrices, zeroed_ffn, zeroed_heads
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, VOCAB, WINDOW = 16, 4, 24, 2, 40, 4


def build() -> nn.Module:
    cfg = transformers.LongformerConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, intermediate_size=INTER, attention_window=WINDOW,
                                        max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    return scale_matrices(transformers.LongformerModel(cfg), 3.0)


def data(global_tokens: bool = False) -> list[dict[str, torch.Tensor]]:
    """Ragged batches of 10 tokens (the model pads them to 12); with ``global_tokens``, the first token of every
    sequence attends globally (Longformer's ``global_attention_mask``)."""
    out = ragged_token_batches(VOCAB, n_batches=4)
    if global_tokens:
        for b in out:
            first = b["attention_mask"].argmax(1)
            g = torch.zeros_like(b["attention_mask"])
            g[torch.arange(len(g)), first] = 1
            b["global_attention_mask"] = g
    return out


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def test_blocks_are_found_and_the_model_pads_past_the_batch_mask() -> None:
    """The premise: the blocks see 12 tokens for the batches' 10."""
    model = build()
    assert [b.kind for b in find_blocks(model)] == ["hf_longformer"] * LAYERS
    seen = []
    h = model.encoder.layer[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        hidden(model, data()[0])
    finally:
        h.remove()
    assert seen == [12]


@pytest.mark.parametrize("global_tokens", [False, True])
def test_pruning_the_ffn_without_refit_is_the_original_with_the_removed_neurons_zeroed(global_tokens: bool) -> None:
    model, batches = build(), data(global_tokens)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="magnitude", reweight=False)
    zeroed = zeroed_ffn(model, report, "output.dense")
    assert [u.n_kept for u in report.units] == [INTER // 2] * LAYERS
    for b in batches:
        torch.testing.assert_close(hidden(pruned, b), hidden(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(hidden(pruned, b), hidden(model, b), atol=1e-3)


def test_ffn_refit_is_lstsq_on_the_real_tokens_only() -> None:
    """Layer mode, no ridge, no weighting: the refit is least squares on the down projection's inputs of the
    batches' real tokens; the positions the model appended (hidden by its own mask) are not rows."""
    model, batches = build(), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    assert report.n_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    for i, layer in enumerate(model.encoder.layer):
        seen: list[torch.Tensor] = []
        h = layer.output.dense.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].detach()))
        try:
            for b in batches:
                hidden(model, b)
        finally:
            h.remove()
        rows = [a[:, : b["attention_mask"].shape[1]][b["attention_mask"].bool()] for a, b in zip(seen, batches,
                                                                                              strict=True)]
        A = torch.cat(rows).double().numpy()
        W, bias = layer.output.dense.weight.detach().double().numpy(), layer.output.dense.bias.detach().double()
        kept = report.units[i].kept
        design = np.hstack([A[:, kept], np.ones((len(A), 1))])
        sol = np.linalg.lstsq(design, A @ W.T, rcond=None)[0]
        new = pruned.encoder.layer[i].output.dense
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), bias.numpy() + sol[-1], atol=2e-4, rtol=1e-3)


def test_heads_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"reshapes its output to the model width.*target='ffn'"):
        prune_transformer(build(), data(), keep=0.5, target="heads")


def test_save_and_reload(tmp_path) -> None:
    model, batches = build(), data(global_tokens=True)
    pruned, _ = prune_transformer(model, batches, keep={0: 0.5, 1: 0.25}, target="ffn", method="asym")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert back.encoder.layer[1].intermediate.dense.out_features == INTER // 4
    for b in batches:
        torch.testing.assert_close(hidden(back, b), hidden(pruned, b), atol=1e-6, rtol=1e-6)


def test_a_block_input_longer_than_the_mask_needs_the_block_to_hide_the_added_tokens() -> None:
    """The batch's mask covers 3 tokens, the block sees 4: the block's own additive mask must agree on the 3 and
    hide the fourth, else the tokens cannot be told apart and the mismatch is refused."""
    from nn_adapters.transformer import _token_mask

    block = find_blocks(build())[0]
    batch, x = {"attention_mask": torch.tensor([[1, 1, 0]])}, torch.zeros(1, 4, HIDDEN)

    def ctx(mask: list[float]) -> dict:
        return {"args": (), "kwargs": {"attention_mask": torch.tensor([mask])}}

    assert _token_mask(batch, block, x, ctx([0.0, 1e4, -1e4, -1e4])).tolist() == [[True, True, False, False]]
    for bad in ([0.0, 0.0, -1e4, 0.0], [0.0, -1e4, -1e4, -1e4], [0.0, 0.0, 0.0, -1e4]):
        with pytest.raises(ValueError, match=r"padding mask of shape \(1, 3\) does not match the block input"):
            _token_mask(batch, block, x, ctx(bad))


def build_bigbird() -> nn.Module:
    cfg = transformers.BigBirdConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=128,
                                     pad_token_id=0, attention_type="block_sparse", block_size=4, num_random_blocks=2)
    torch.manual_seed(0)
    return scale_matrices(transformers.BigBirdModel(cfg), 3.0)


def long_batches() -> list[dict[str, torch.Tensor]]:
    """Clips of 50, 40 and 30 real tokens in batches of 50 (BigBird pads them to 52, a multiple of its block size)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2):
        mask = (torch.arange(50).view(1, -1) < torch.tensor([50, 40, 30]).view(-1, 1)).long()
        out.append({"input_ids": torch.randint(3, VOCAB, (3, 50), generator=g) * mask, "attention_mask": mask})
    return out


@pytest.mark.parametrize("target", ["ffn", "heads"])
def test_bigbird_block_sparse_pads_past_the_mask_and_prunes_like_the_zeroed_model(target: str) -> None:
    model, batches = build_bigbird(), long_batches()
    seen = []
    h = model.encoder.layer[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        hidden(model, batches[0])
    finally:
        h.remove()
    assert seen == [52]  # the premise: the blocks see the padded sequence
    _, report = prune_transformer(model, batches, keep=0.5, target=target)  # reads statistics: counts the tokens
    assert (report.n_tokens, report.n_padding_excluded) == (2 * 120, 2 * (3 * 52 - 120))
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude", reweight=False)
    if target == "ffn":
        zeroed = zeroed_ffn(model, report, "output.dense")
    else:
        zeroed = zeroed_heads(model, report, HIDDEN // HEADS, out_proj="attention.output.dense")
    for b in batches:
        torch.testing.assert_close(hidden(pruned, b), hidden(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(hidden(pruned, b), hidden(model, b), atol=1e-3)
