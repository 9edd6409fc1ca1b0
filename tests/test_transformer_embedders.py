"""Transformer pruning of the sentence-embedding (and protein) encoders of transformers 5 with Llama-style parts:
GTE v1.5 / mGTE (``GteLayer``) and Nomic Embed (``NomicBertLayer``), post-LN with a gated FFN; Jina Embeddings v3
(post-LN, plain FFN); EmbeddingGemma 2 (Gemma 4's sandwich norms, its per-layer input in a ``ple_block``, a layer
scalar); ESM C (pre-LN, each sublayer's output divided by ``scaling_factor``). Tiny randomly initialised models (no
download).

Oracles: the unpruned model with the removed units' consumer columns zeroed (no refit); numpy.linalg.lstsq on the
consumers' inputs hooked in the model's forward, rows weighted by ``1 / (var_t + eps)`` of the sum entering the
LayerNorm after the sublayer (post-LN), or aimed at the residual sum through ESM C's factor (asym); the saved and
reloaded model's outputs.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _torch_helpers import (
    hooked_rows,
    ragged_token_batches,
    real_token_states,
    scale_matrices,
    zeroed_ffn,
    zeroed_heads,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, VOCAB, HEAD_DIM = 16, 4, 24, 2, 40, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=INTER, max_position_embeddings=64, pad_token_id=0, head_dim=HEAD_DIM)

# name -> (model class name, config overrides, block kind, FFN producers, down projection, post-LN norms after the
# attention's and the FFN's sums or None (pre-LN), whether heads can be pruned)
MODELS = {
    "gte": ("Gte", {}, "hf_gte", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
            ("post_attention_layernorm", "post_mlp_layernorm"), True),
    "nomic": ("NomicBert", {}, "hf_gte", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
              ("post_attention_layernorm", "post_mlp_layernorm"), True),
    "jina_v3": ("JinaEmbeddingsV3", {}, "hf_jina_v3", ("mlp.fc1",), "mlp.fc2",
                ("post_attention_layernorm", "post_mlp_layernorm"), True),
    "embeddinggemma2": ("EmbeddingGemma2Text", {"num_key_value_heads": 2}, "hf_gemma4",
                        ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", None, True),
    "esmc": ("Esmc", {"num_key_value_heads": HEADS, "num_hidden_layers": 9}, "hf_esmc",
             ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", None, False),
}


def build(name: str) -> nn.Module:
    cls = MODELS[name][0]
    if not hasattr(transformers, cls + "Model"):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}Model")
    torch.manual_seed(0)
    model = getattr(transformers, cls + "Model")(getattr(transformers, cls + "Config")(**{**COMMON, **MODELS[name][1]}))
    model = scale_matrices(model, 3.0)
    with torch.no_grad():  # LayerNorms and biases away from their initial 1 / 0, so that each one matters
        for n, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in n or n.endswith("bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def data() -> list[dict[str, torch.Tensor]]:
    return ragged_token_batches(VOCAB, n_batches=4)


def layers(model: nn.Module) -> list[nn.Module]:
    return [b.module for b in find_blocks(model)]


@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_are_found(name: str) -> None:
    model = build(name)
    assert [b.kind for b in find_blocks(model)] == [MODELS[name][2]] * len(model.layers)


@pytest.mark.parametrize("name", list(MODELS))
def test_keep_everything_without_refit_is_exact(name: str) -> None:
    model, batches = build(name), data()
    target = "all" if MODELS[name][6] else "ffn"
    pruned, report = prune_transformer(model, batches, keep=1.0, target=target, reweight=False)
    assert report.params_after == report.params_before
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["ffn", "heads"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(name: str, target: str) -> None:
    model, batches = build(name), data()
    if target == "heads" and not MODELS[name][6]:
        with pytest.raises(ValueError, match=r"over all heads together.*target='ffn'"):
            prune_transformer(model, batches, keep=0.5, target="heads")
        return
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude", reweight=False)
    if target == "heads":
        groups = HEADS // MODELS[name][1].get("num_key_value_heads", HEADS)
        zeroed = zeroed_heads(model, report, groups * HEAD_DIM)
    else:
        zeroed = zeroed_ffn(model, report, MODELS[name][4])
    assert [u.stage for u in report.units] == [target] * len(model.layers)
    assert report.params_after < report.params_before
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


def _captured(model: nn.Module, batches: list[dict[str, torch.Tensor]], module: nn.Module) -> np.ndarray:
    """The real tokens' rows of ``module``'s first input over ``batches``."""
    return hooked_rows(model, batches, module, lambda b, a: a[b["attention_mask"].bool()])


@pytest.mark.parametrize("stage", ["ffn", "heads"])
@pytest.mark.parametrize("name", ["gte", "nomic", "jina_v3"])
def test_post_ln_refit_is_lstsq_weighted_through_the_layernorm_after_the_sum(name: str, stage: str) -> None:
    """Layer mode, no ridge: the consumer (down or output projection) is refitted by least squares on its captured
    inputs, token t weighted by 1 / (var_t + eps) of the sum entering the LayerNorm after the sublayer (the
    post-LN order; a pre-LN reading would weigh nothing, or read the wrong sum); an intercept where the consumer
    has a bias."""
    model, batches = build(name), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target=stage, method="layer", ridge=0.0,
                                       weighting="layernorm")
    path = MODELS[name][4] if stage == "ffn" else "self_attn.o_proj"
    norm_path = MODELS[name][5][1 if stage == "ffn" else 0]
    for i, layer in enumerate(layers(model)):
        consumer, norm = layer.get_submodule(path), layer.get_submodule(norm_path)
        A, total = _captured(model, batches, consumer), _captured(model, batches, norm)
        w = 1.0 / (total.var(axis=1) + norm.eps)
        W = consumer.weight.detach().double().numpy()
        kept = np.array(report.units[i].kept)
        cols = kept if stage == "ffn" else (kept[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).ravel()
        bias = consumer.bias is not None
        design = np.hstack([A[:, cols], np.ones((len(A), 1))]) if bias else A[:, cols]
        sw = np.sqrt(w)[:, None]
        sol = np.linalg.lstsq(design * sw, (A @ W.T) * sw, rcond=None)[0]
        new = layers(pruned)[i].get_submodule(path)
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:len(cols)].T, atol=2e-4, rtol=1e-3)
        if bias:
            np.testing.assert_allclose(new.bias.detach().double().numpy(),
                                       consumer.bias.detach().double().numpy() + sol[-1], atol=2e-4, rtol=1e-3)
        else:
            assert new.bias is None


def test_esmc_asym_refit_aims_at_the_residual_sum_through_its_scaling_factor() -> None:
    """ESM C adds ``down(h) / d`` to the residual (d = sqrt(L / 36) = 0.5 here). In asym mode the refit of the second
    layer (no ridge, no weighting; no bias) must restore the original's sum from the pruned network's residual:
    ``A_p M^T / d + r_p = A_o W^T / d + r_o``, i.e. least squares toward ``A_o W^T + d (r_o - r_p)``, written out
    here from activations hooked in the original model and in the pruned one up to that layer."""
    model, batches = build("esmc"), data()
    d = model.layers[0].scaling_factor
    assert d == pytest.approx(math.sqrt(9 / 36))
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none")
    layer, new_layer = model.layers[1], pruned.layers[1]
    # block 1 of the pruned network reads the pruned block 0's output; its target is the original block 1's sum
    A_o = _captured(model, batches, layer.mlp.down_proj)
    r_o = _captured(model, batches, layer.post_attention_layernorm)
    A_p_full = _captured(_with_original_layer(pruned, model, 1), batches, layer.mlp.down_proj)
    r_p = _captured(_with_original_layer(pruned, model, 1), batches, layer.post_attention_layernorm)
    W = layer.mlp.down_proj.weight.detach().double().numpy()
    y = A_o @ W.T + d * (r_o - r_p)  # (A_o W^T / d + r_o - r_p) * d: the consumer output that restores the sum
    kept = report.units[1].kept
    sol = np.linalg.lstsq(A_p_full[:, kept], y, rcond=None)[0]
    np.testing.assert_allclose(new_layer.mlp.down_proj.weight.detach().double().numpy(), sol.T, atol=5e-4, rtol=1e-3)


def _with_original_layer(pruned: nn.Module, model: nn.Module, i: int) -> nn.Module:
    """A copy of ``pruned`` whose layer ``i`` is the original model's (what feeds that layer in the pruned
    network, hooked on the original layer's modules)."""
    mixed = copy.deepcopy(pruned)
    mixed.layers[i] = model.layers[i]
    return mixed


@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_reload(tmp_path, name: str) -> None:
    model, batches = build(name), data()
    pruned, _ = prune_transformer(model, batches, keep={0: 0.5}, target="all" if MODELS[name][6] else "ffn")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert type(back) is type(model)
    for b in batches:
        torch.testing.assert_close(real_token_states(back, b), real_token_states(pruned, b), atol=1e-6, rtol=1e-6)
