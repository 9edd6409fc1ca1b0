"""Transformer pruning of wav2vec 2.0-family speech encoders (``Wav2Vec2EncoderLayer``: wav2vec 2.0, HuBERT,
Data2Vec-audio; post-LN in the base models, pre-LN in the ``StableLayerNorm`` layers of the large ones), calibrated on
raw audio whose attention mask covers samples, not the frames the blocks see. Tiny randomly initialised models (no
download).

Oracles: the unpruned model with the removed units' consumer columns zeroed (no refit); numpy.linalg.lstsq on the
consumers' inputs hooked in the model's forward, on the real frames only (their number per clip from the model's own
feature-encoder length formula), rows weighted through the LayerNorm after the sum (post-LN); the saved and
reloaded model's outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_helpers import hooked_rows, scale_matrices, zeroed_ffn, zeroed_heads
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, HEAD_DIM = 16, 4, 24, 2, 4
SAMPLES = (800, 500, 300)  # per clip of a batch; 48, 30 and 17 frames


def build(cls: str = "Wav2Vec2", stable: bool = False, **extra) -> nn.Module:
    cfg = getattr(transformers, cls + "Config")(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
        conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, do_stable_layer_norm=stable, feat_extract_norm="layer", **extra)
    torch.manual_seed(0)
    model = scale_matrices(getattr(transformers, cls + "Model")(cfg), 2.0)
    with torch.no_grad():  # LayerNorms away from their initial 1 / 0, so that the weighting visibly matters
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def clips(n_batches: int = 3, masked: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        x = torch.randn(len(SAMPLES), SAMPLES[0], generator=g)
        mask = (torch.arange(SAMPLES[0]).view(1, -1) < torch.tensor(SAMPLES).view(-1, 1)).long()
        out.append({"input_values": x * mask, "attention_mask": mask} if masked else {"input_values": x})
    return out


def frames(model: nn.Module, batch: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The real frames' rows of ``h`` (batch, frames, features), from the model's own feature-encoder lengths."""
    if "attention_mask" not in batch:
        return h.reshape(-1, h.shape[-1])
    lengths = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(1))
    return torch.cat([h[i, :n] for i, n in enumerate(lengths.tolist())])


def states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return frames(model, batch, model(**batch).last_hidden_state)


@pytest.mark.parametrize("stable", [False, True])
def test_blocks_are_found_with_their_norm_order(stable: bool) -> None:
    blocks = find_blocks(build(stable=stable))
    assert [b.kind for b in blocks] == ["hf_wav2vec2"] * LAYERS
    assert all(b._pre_ln() is stable for b in blocks)
    assert all((b.post_norm("ffn") is None) is stable for b in blocks)


@pytest.mark.parametrize("cls", ["Hubert", "Data2VecAudio", "UniSpeech", "SEW"])
def test_look_alike_speech_encoders_are_found(cls: str) -> None:
    if not hasattr(transformers, cls + "Model"):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}Model")
    model = build(cls)
    assert [b.kind for b in find_blocks(model)] == ["hf_wav2vec2"] * LAYERS
    pruned, report = prune_transformer(model, clips(), keep=0.5, target="all")
    assert report.params_after < report.params_before


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("stable", [False, True])
def test_keep_everything_is_exact_and_only_real_frames_count(stable: bool, masked: bool) -> None:
    model, batches = build(stable=stable), clips(masked=masked)
    pruned, report = prune_transformer(model, batches, keep=1.0, target="all", reweight=False)
    per_batch = [48, 30, 17] if masked else [48, 48, 48]
    assert report.n_tokens == len(batches) * sum(per_batch)
    assert report.n_padding_excluded == (len(batches) * (3 * 48 - 95) if masked else 0)
    for b in batches:
        torch.testing.assert_close(states(pruned, b), states(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["ffn", "heads"])
@pytest.mark.parametrize("stable", [False, True])
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(stable: bool, target: str) -> None:
    model, batches = build(stable=stable), clips()
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude", reweight=False)
    if target == "heads":
        zeroed = zeroed_heads(model, report, HEAD_DIM, out_proj="attention.out_proj")
    else:
        zeroed = zeroed_ffn(model, report, "feed_forward.output_dense")
    assert [u.n_kept for u in report.units] == [INTER // 2 if target == "ffn" else HEADS // 2] * LAYERS
    for b in batches:
        torch.testing.assert_close(states(pruned, b), states(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(states(pruned, b), states(model, b), atol=1e-3)


def _captured(model: nn.Module, batches: list[dict[str, torch.Tensor]], module: nn.Module) -> np.ndarray:
    """The real frames' rows of ``module``'s first input over ``batches``."""
    return hooked_rows(model, batches, module, lambda b, a: frames(model, b, a))


@pytest.mark.parametrize("stage", ["ffn", "heads"])
def test_post_ln_refit_is_lstsq_on_the_real_frames_weighted_through_the_layernorm(stage: str) -> None:
    """Layer mode, no ridge: the consumer is refitted on the real frames only, frame t weighted by 1 / (var_t + eps)
    of the sum entering the LayerNorm after the sublayer (final_layer_norm after the FFN, layer_norm after the
    attention), with an intercept (the consumers have biases)."""
    model, batches = build(), clips()
    pruned, report = prune_transformer(model, batches, keep=0.5, target=stage, method="layer", ridge=0.0,
                                       weighting="layernorm")
    for i, layer in enumerate(model.encoder.layers):
        consumer = layer.feed_forward.output_dense if stage == "ffn" else layer.attention.out_proj
        norm = layer.final_layer_norm if stage == "ffn" else layer.layer_norm
        A, total = _captured(model, batches, consumer), _captured(model, batches, norm)
        w = 1.0 / (total.var(axis=1) + norm.eps)
        W = consumer.weight.detach().double().numpy()
        kept = np.array(report.units[i].kept)
        cols = kept if stage == "ffn" else (kept[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).ravel()
        design = np.hstack([A[:, cols], np.ones((len(A), 1))]) * np.sqrt(w)[:, None]
        sol = np.linalg.lstsq(design, (A @ W.T) * np.sqrt(w)[:, None], rcond=None)[0]
        new = pruned.encoder.layers[i]
        new = new.feed_forward.output_dense if stage == "ffn" else new.attention.out_proj
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(),
                                   consumer.bias.detach().double().numpy() + sol[-1], atol=2e-4, rtol=1e-3)


def test_mms_language_adapters_after_the_ffn_are_run_as_they_are() -> None:
    """MMS (adapter_attn_dim) adds ``h + adapter_layer(h)`` after the FFN's sum: the FFN is pruned, its sum read at
    the adapter's input, and pruning without refit is the model with the removed columns zeroed."""
    model, batches = build(stable=True, adapter_attn_dim=8), clips()
    assert model.encoder.layers[0].adapter_layer is not None
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="magnitude", reweight=False)
    zeroed = zeroed_ffn(model, report, "feed_forward.output_dense")
    for b in batches:
        torch.testing.assert_close(states(pruned, b), states(zeroed, b), atol=1e-5, rtol=1e-5)
    _, report = prune_transformer(model, batches, keep=0.5, target="all")
    assert [u.stage for u in report.units] == ["heads", "ffn"] * LAYERS


def test_a_sample_mask_with_padding_needs_the_blocks_to_receive_a_mask() -> None:
    """With the attention mask switched off inside the model (eager attention fed no mask), the padded frames
    cannot be told apart: a sample-level mask with padding is refused with what to pass; without padding, every
    frame is real."""
    model = build()
    original = transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2Encoder.forward

    def no_mask(self, hidden_states, attention_mask=None, **kwargs):
        return original(self, hidden_states, attention_mask=None, **kwargs)

    model.encoder.forward = no_mask.__get__(model.encoder)
    with pytest.raises(ValueError, match=r"receive no padding mask of their own"):
        prune_transformer(model, clips(), keep=0.5, target="ffn")
    full = [{"input_values": b["input_values"], "attention_mask": torch.ones_like(b["attention_mask"])}
            for b in clips()]
    _, report = prune_transformer(model, full, keep=0.5, target="ffn")
    assert report.n_tokens == 3 * 3 * 48


def test_wavlm_prunes_its_ffn_and_refuses_heads_with_the_reason() -> None:
    model = build("WavLM")
    with pytest.raises(ValueError, match=r"gru_rel_pos_linear, rel_attn_embed.*target='ffn'"):
        prune_transformer(model, clips(), keep=0.5, target="heads")
    pruned, report = prune_transformer(model, clips(), keep=0.5, target="ffn")
    assert [u.n_kept for u in report.units] == [INTER // 2] * LAYERS


@pytest.mark.parametrize("stable", [False, True])
def test_save_and_reload(tmp_path, stable: bool) -> None:
    model, batches = build(stable=stable), clips()
    pruned, _ = prune_transformer(model, batches, keep={0: 0.5}, target="all", method="asym")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    for b in batches:
        torch.testing.assert_close(states(back, b), states(pruned, b), atol=1e-6, rtol=1e-6)
