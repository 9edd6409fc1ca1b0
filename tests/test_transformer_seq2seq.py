"""Transformer pruning of BART-family layers (``self_attn``, ``self_attn_layer_norm``, ``fc1 / fc2``,
``final_layer_norm``): the post-LN BART encoder, the pre-LN mBART and Whisper encoders, the pre-LN XGLM decoder, and
BART and mBART decoder stacks with cross-attention (``encoder_attn``, whose heads are pruned with the self-attention's:
the "cross" stage), pruned on their own with the encoder's states in the batches. Tiny randomly initialised models
(no download).

Oracles: the unpruned stack's outputs (keeping every unit), the unpruned stack with the removed units' columns of
the consumer set to zero, numpy.linalg.lstsq on the down projection's input captured independently with a hook (the
refit), the saved and reloaded model's outputs, and what the Hugging Face sources say of each layer (BART post-LN,
mBART, Whisper and XGLM pre-LN).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import (
    assert_decoder_refit_aims_at_the_original,
    assert_pruned_like_the_stacks,
    captured_input,
    prune_stack_by_stack,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, VOCAB = 16, 4, 24, 2, 40
HEAD_DIM = HIDDEN // HEADS
BART = dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=INTER, decoder_ffn_dim=INTER, vocab_size=VOCAB,
            max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
# name -> whether its layers are pre-LN
STACKS = {"bart_encoder": False, "mbart_encoder": True, "whisper_encoder": True, "xglm": True,
          "bart_decoder": False, "mbart_decoder": True}
NAMES = list(STACKS)


def _scaled(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
            elif p.dim() == 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def full_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name.startswith("whisper"):
        cfg = transformers.WhisperConfig(**BART, num_mel_bins=8, max_source_positions=6, max_target_positions=32)
        return _scaled(transformers.WhisperModel(cfg))
    if name == "xglm":
        return _scaled(transformers.XGLMModel(transformers.XGLMConfig(
            d_model=HIDDEN, num_layers=LAYERS, attention_heads=HEADS, ffn_dim=INTER, vocab_size=VOCAB,
            max_position_embeddings=32, pad_token_id=0)))
    family = name.split("_")[0]
    cls, cfg = {"bart": ("BartModel", "BartConfig"), "mbart": ("MBartModel", "MBartConfig")}[family]
    return _scaled(getattr(transformers, cls)(getattr(transformers, cfg)(**BART)))


def stack(name: str, seed: int = 0) -> nn.Module:
    """The stack of blocks to prune (an encoder or decoder of the full model, or the whole XGLM)."""
    full = full_model(name, seed)
    return full if name == "xglm" else getattr(full, name.split("_")[1])


def batches(name: str, n_batches: int = 3, b: int = 5, t: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Ragged token batches (right-padded), Whisper's features, or a decoder's tokens with the unpruned encoder's
    states of ragged source sentences."""
    g = torch.Generator().manual_seed(seed)
    full = full_model(name) if name.endswith("decoder") else None
    out = []
    for _ in range(n_batches):
        if name.startswith("whisper"):
            out.append({"input_features": torch.randn(b, 8, 12, generator=g)})
            continue
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t).view(1, -1) < lengths.view(-1, 1)).long()
        batch = {"input_ids": torch.where(mask.bool(), ids, torch.zeros_like(ids)), "attention_mask": mask}
        if full is not None:
            with torch.no_grad():
                states = full.encoder(**batch).last_hidden_state
            src = batch
            tgt = torch.randint(3, VOCAB, (b, t - 2), generator=g)
            batch = {"input_ids": tgt, "attention_mask": torch.ones_like(tgt), "encoder_hidden_states": states,
                     "encoder_attention_mask": src["attention_mask"]}
        out.append(batch)
    return out


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    return h[batch["attention_mask"].bool()] if "attention_mask" in batch else h.reshape(-1, h.shape[-1])


def zeroed_original(model: nn.Module, report) -> nn.Module:
    masked = copy.deepcopy(model)
    for unit in report.units:
        layer = masked.get_submodule(unit.block)
        gone = sorted(set(range(unit.n_units)) - set(unit.kept))
        cols = gone if unit.stage == "ffn" else [h * HEAD_DIM + i for h in gone for i in range(HEAD_DIM)]
        path = {"ffn": "fc2", "heads": "self_attn.out_proj", "cross": "encoder_attn.out_proj"}[unit.stage]
        with torch.no_grad():
            layer.get_submodule(path).weight[:, cols] = 0.0
    return masked


def n_stages(name: str, target: str) -> int:
    """Stages per layer: the FFN and/or the self-attention's heads, and a decoder's cross-attention heads."""
    return (2 if target == "all" else 1) + (name.endswith("decoder") and target != "ffn")


@pytest.mark.parametrize("name", NAMES)
def test_blocks_are_found_with_their_norm_order(name: str) -> None:
    blocks = find_blocks(stack(name))
    assert [b.kind for b in blocks] == ["hf_bart"] * LAYERS
    for b in blocks:
        assert b.post_norm("ffn") is (None if STACKS[name] else b.module.final_layer_norm)
        assert b.post_norm("heads") is (None if STACKS[name] else b.module.self_attn_layer_norm)


@pytest.mark.parametrize("method", ["asym", "layer", "magnitude"])
@pytest.mark.parametrize("name", NAMES)
def test_keep_everything_without_refit_is_exact(name: str, method: str) -> None:
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=1.0, target="all", method=method, reweight=False)
    assert report.params_after == report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
@pytest.mark.parametrize("name", NAMES)
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(name: str, target: str) -> None:
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="magnitude", reweight=False)
    masked = zeroed_original(model, report)
    assert len(report.units) == LAYERS * n_stages(name, target)
    assert all(u.n_units == (INTER if u.stage == "ffn" else HEADS) and u.n_kept == u.n_units // 2
               for u in report.units)
    if name.endswith("decoder") and target != "ffn":
        for layer in (b.module for b in find_blocks(pruned)):
            attn = layer.encoder_attn
            assert attn.num_heads == HEADS // 2
            assert all(p.out_features == HIDDEN // 2 for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)  # something was removed


@pytest.mark.parametrize("name", NAMES)
def test_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    layers = [b.module for b in find_blocks(model)]
    for i, layer in enumerate(layers):
        rows = [captured_input(model, layer.fc2, b) for b in data]
        A = torch.cat([a[b["attention_mask"].bool()] if "attention_mask" in b else a.reshape(-1, a.shape[-1])
                       for b, a in zip(data, rows, strict=True)]).double().numpy()
        w = layer.fc2.weight.detach().double().numpy().T
        kept = report.units[i].kept
        design = np.hstack([A[:, kept], np.ones((len(A), 1))])
        sol = np.linalg.lstsq(design, A @ w - A[:, kept] @ w[kept], rcond=None)[0]
        new = pruned.get_submodule(report.units[i].block).fc2
        np.testing.assert_allclose(new.weight.detach().double().numpy().T, w[kept] + sol[:-1], atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(),
                                   layer.fc2.bias.detach().double().numpy() + sol[-1], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["bart_decoder", "mbart_decoder"])
def test_cross_attention_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    """Layer mode: the cross-attention's output projection is refitted by least squares (with its bias) on its
    own input, the heads' outputs over the encoder's states, captured with a hook on the unpruned stack."""
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="layer", ridge=0.0,
                                       weighting="none")
    for layer in (b.module for b in find_blocks(model)):
        name_ = next(n for n, m in model.named_modules() if m is layer)
        o = layer.encoder_attn.out_proj
        A = torch.cat([captured_input(model, o, b)[b["attention_mask"].bool()] for b in data]).double().numpy()
        Y = A @ o.weight.detach().double().numpy().T + o.bias.detach().double().numpy()
        unit = next(u for u in report.units if u.block == name_ and u.stage == "cross")
        cols = [h * HEAD_DIM + i for h in unit.kept for i in range(HEAD_DIM)]
        sol = np.linalg.lstsq(np.hstack([A[:, cols], np.ones((len(A), 1))]), Y, rcond=None)[0]
        new = pruned.get_submodule(name_).encoder_attn.out_proj
        np.testing.assert_allclose(new.weight.detach().double().numpy().T, sol[:-1], atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)
        assert unit.relative_error == pytest.approx(
            np.sum((np.hstack([A[:, cols], np.ones((len(A), 1))]) @ sol - Y) ** 2)
            / np.sum((Y - Y.mean(0)) ** 2), rel=1e-3, abs=1e-9)


def test_a_decoder_run_without_encoder_states_keeps_its_cross_attention() -> None:
    """Without encoder states the cross-attention is never called: its heads are left as they are (nothing to
    measure them on), the self-attention's are pruned."""
    model = stack("bart_decoder")
    data = [{k: v for k, v in b.items() if not k.startswith("encoder_")} for b in batches("bart_decoder")]
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="asym")
    assert {u.stage for u in report.units} == {"heads"}
    for lo, lp in zip(model.layers, pruned.layers, strict=True):
        assert lp.self_attn.num_heads == HEADS // 2 and lp.encoder_attn.num_heads == HEADS
        torch.testing.assert_close(lp.encoder_attn.out_proj.weight, lo.encoder_attn.out_proj.weight)


@pytest.mark.parametrize("name", ["bart_encoder", "mbart_encoder", "bart_decoder", "mbart_decoder"])
def test_asym_with_refit_beats_magnitude_without_refit(name: str) -> None:
    """Greedy selection with refit reconstructs the unpruned outputs on held-out batches better than the
    Torch-Pruning-style baseline (a wrong residual, norm weighting or row selection would not)."""
    model, data, held_out = stack(name), batches(name), batches(name, seed=7)
    errs = {}
    for method, reweight in (("asym", True), ("magnitude", False)):
        pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method=method, reweight=reweight)
        errs[method] = sum(float((out(pruned, b) - out(model, b)).pow(2).sum()) for b in held_out)
    assert errs["asym"] < 0.5 * errs["magnitude"], errs


@pytest.mark.parametrize("name", ["xglm", "mbart_encoder", "whisper_encoder"])
def test_save_and_reload(tmp_path, name: str) -> None:
    model, data = stack(name), batches(name)
    pruned, report = prune_transformer(model, data, keep={0: 0.5}, target="all", method="asym")
    assert [(b["intermediate_size"], b["num_heads"]) for b in report.spec["blocks"]] == [
        (INTER // 2, HEADS // 2), (INTER, HEADS)]
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m", None if name == "xglm" else stack(name, seed=5))
    for b in data:
        torch.testing.assert_close(out(back, b), out(pruned, b), atol=1e-6, rtol=1e-6)


def _whole_and_stack_batches(name: str, model: nn.Module, n_batches: int = 3, seed: int = 1
                             ) -> tuple[list[dict], list[dict], list[torch.Tensor]]:
    """Whole-model batches (source and decoder tokens), the encoder's batches and the decoder's tokens."""
    g = torch.Generator().manual_seed(seed)
    whole, source, targets = [], [], []
    for _ in range(n_batches):
        if name == "whisper":
            src = {"input_features": torch.randn(5, 8, 12, generator=g)}
        else:
            ids = torch.randint(3, VOCAB, (5, 8), generator=g)
            mask = (torch.arange(8).view(1, -1) < torch.randint(3, 9, (5, 1), generator=g)).long()
            src = {"input_ids": torch.where(mask.bool(), ids, torch.zeros_like(ids)), "attention_mask": mask}
        tgt = torch.randint(3, VOCAB, (5, 6), generator=g)
        whole.append({**src, "decoder_input_ids": tgt})
        source.append(src)
        targets.append(tgt)
    return whole, source, targets


@pytest.mark.parametrize("name", ["bart", "mbart", "whisper"])
def test_the_whole_encoder_decoder_is_pruned_stack_by_stack(name: str) -> None:
    """Oracle: the documented manual route, in seq mode (every statistic from the pruned network). The encoder is
    pruned on its inputs, then the decoder on its tokens with the pruned encoder's states (and the source mask):
    same units, same weights, same outputs. The embeddings shared by the encoder, the decoder and the model stay
    shared (counted once)."""
    model = full_model(f"{name}_encoder")
    whole, source, targets = _whole_and_stack_batches(name, model)
    options = dict(keep=0.5, target="all", method="seq", weighting="none")
    pruned, report = prune_transformer(model, whole, **options)
    assert_pruned_like_the_stacks(pruned, report, prune_stack_by_stack(model, source, targets, **options))
    if name != "whisper":
        assert pruned.encoder.embed_tokens.weight is pruned.decoder.embed_tokens.weight
    assert report.params_after == sum(p.numel() for p in pruned.parameters()) < report.params_before
    assert report.n_blocks == 2 * LAYERS


@pytest.mark.parametrize("method", ["asym", "layer"])
@pytest.mark.parametrize("name", ["bart", "mbart", "whisper"])
def test_the_decoder_targets_come_from_the_unpruned_encoder(name: str, method: str) -> None:
    """In a whole encoder-decoder the decoder's targets come from the original network, whose decoder reads the
    unpruned encoder's states; its inputs from the pruned network (its pruned encoder's states) in asym mode,
    from the original in layer mode: every decoder FFN's refit is least squares of the unpruned model's fc2
    outputs on those fc2 inputs. (This tiny Whisper's decoder barely reads its encoder's states: the manual
    route's fit differs from it by about 1e-6 only, too little to tell the two apart.)"""
    model = full_model(f"{name}_encoder")
    whole, _, _ = _whole_and_stack_batches(name, model)
    pruned, report = prune_transformer(model, whole, keep=0.5, target="ffn", method=method, ridge=0.0,
                                       weighting="none", residual=False)
    err, apart = assert_decoder_refit_aims_at_the_original(model, pruned, whole, report, "fc2", method)
    if name != "whisper":
        assert apart > max(1e-4, 100 * err)


def test_the_whole_encoder_decoder_without_refit_is_the_zeroed_original_and_reloads(tmp_path) -> None:
    model = full_model("bart_encoder")
    whole, _, _ = _whole_and_stack_batches("bart", model)
    pruned, report = prune_transformer(model, whole, keep={"encoder.layers.0": 0.5, 3: 0.25}, target="all",
                                       method="magnitude", reweight=False)
    assert [(u.block, u.n_kept) for u in report.units if u.stage == "ffn"] == [
        ("encoder.layers.0", INTER // 2), ("encoder.layers.1", INTER), ("decoder.layers.0", INTER),
        ("decoder.layers.1", INTER // 4)]
    masked = zeroed_original(model, report)
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m", full_model("bart_encoder", seed=5))
    with torch.no_grad():
        for b in whole:
            want = masked(**b).last_hidden_state
            torch.testing.assert_close(pruned(**b).last_hidden_state, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(back(**b).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_the_whole_encoder_decoder_comes_back_in_the_callers_modes() -> None:
    model = full_model("bart_encoder")
    whole, _, _ = _whole_and_stack_batches("bart", model)
    model.train()
    model.decoder.layers[1].eval()
    pruned, _ = prune_transformer(model, whole, keep=0.5, target="ffn")
    assert {n: m.training for n, m in pruned.named_modules()} == {n: m.training for n, m in model.named_modules()}


class _EncodeOnlyWithoutTargets(transformers.BartModel):
    """A BART whose forward runs only the encoder when no decoder tokens are given (as an encoder-decoder
    wrapper for embeddings may)."""

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, **kwargs):
        if decoder_input_ids is None:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               decoder_input_ids=decoder_input_ids, **kwargs)


def test_batches_that_never_reach_the_decoder_are_refused() -> None:
    torch.manual_seed(0)
    model = _EncodeOnlyWithoutTargets(transformers.BartConfig(**BART)).eval()
    whole, source, _ = _whole_and_stack_batches("bart", model)
    prune_transformer(model, whole, keep=0.5, target="ffn")  # with decoder tokens: both stacks
    with pytest.raises(ValueError, match=r"never called its 'decoder' stack.*decoder_input_ids or labels"):
        prune_transformer(model, source, keep=0.5, target="ffn")


class _PostLNReadAsPreLN(transformers.models.bart.modeling_bart.BartEncoderLayer):
    """A post-LN BART layer whose forward calls ``final_layer_norm`` before ``fc1`` in dead code: the source
    reading says pre-LN, the computation (its parent's) is post-LN."""

    def forward(self, hidden_states, *args, **kwargs):
        if hidden_states is None:  # never taken
            normed = self.final_layer_norm(hidden_states)
            self.fc1(normed)
        return super().forward(hidden_states, *args, **kwargs)


class _DelegatingLayer(transformers.models.bart.modeling_bart.BartEncoderLayer):
    """A subclass whose forward only delegates to BART's: the norm order is read from the parent's forward."""

    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states, *args, **kwargs)


def _swap_layers(model: nn.Module, cls: type[nn.Module]) -> None:
    for i, layer in enumerate(model.layers):
        swapped = cls(model.config)
        swapped.load_state_dict(layer.state_dict())
        model.layers[i] = swapped.eval()


def test_a_subclass_that_delegates_is_read_from_its_parent() -> None:
    model, data = stack("bart_encoder"), batches("bart_encoder")
    _swap_layers(model, _DelegatingLayer)
    blocks = find_blocks(model)
    assert len(blocks) == LAYERS and all(b.post_norm("ffn") is b.module.final_layer_norm for b in blocks)
    pruned, _ = prune_transformer(model, data, keep=1.0, target="all", method="asym", reweight=False)
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b), atol=1e-5, rtol=1e-5)


def test_a_misread_norm_order_is_refused_not_used() -> None:
    model, data = stack("bart_encoder"), batches("bart_encoder")
    _swap_layers(model, _PostLNReadAsPreLN)
    blocks = find_blocks(model)
    assert len(blocks) == LAYERS and all(b.post_norm("ffn") is None for b in blocks)  # read as pre-LN
    with pytest.raises(ValueError, match="does not compute like one"):
        prune_transformer(model, data, keep=0.5, target="ffn", method="asym")


@pytest.mark.parametrize("name", ["bart", "whisper"])
def test_generation_with_pruned_cross_attention(tmp_path, name: str) -> None:
    """The pruned model generates: the cross-attention's key/value cache (computed once from the encoder's states by
    the shrunk key and value projections) gives the tokens greedy decoding without a cache gives, and the saved and
    reloaded model the same."""
    torch.manual_seed(0)
    if name == "whisper":
        cfg = transformers.WhisperConfig(**BART, num_mel_bins=8, max_source_positions=6, max_target_positions=32)
        model = _scaled(transformers.WhisperForConditionalGeneration(cfg))
        prompt = {"input_features": torch.randn(2, 8, 12)}
    else:
        model = _scaled(transformers.BartForConditionalGeneration(transformers.BartConfig(**BART)))
        prompt = {"input_ids": torch.tensor([[3, 7, 11, 5, 9], [4, 8, 6, 3, 0]]),
                  "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    whole, _, _ = _whole_and_stack_batches(name, model)
    pruned, report = prune_transformer(model, whole, keep=0.5, target="all", method="asym")
    assert [b["cross_num_heads"] for b in report.spec["blocks"] if "cross_num_heads" in b] == [HEADS // 2] * LAYERS
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    kw = {"max_new_tokens": 5, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        with_cache = pruned.generate(**prompt, use_cache=True, **kw)
        assert torch.equal(with_cache, pruned.generate(**prompt, use_cache=False, **kw))
        assert torch.equal(with_cache, back.generate(**prompt, use_cache=True, **kw))


@pytest.mark.parametrize("name", ["bart_decoder", "mbart_decoder"])
def test_a_cross_attention_whose_output_is_scaled_is_refused(name: str) -> None:
    """A cross-attention whose output is doubled before its residual sum (post-LN: the input of
    encoder_attn_layer_norm; pre-LN: of final_layer_norm): the refit's targets would be wrong, so head pruning is
    refused on the first batch; its FFN can still be pruned."""
    model, data = stack(name), batches(name)
    for layer in model.layers:
        layer.encoder_attn.register_forward_hook(lambda _m, _a, out: (2.0 * out[0], *out[1:]))
    with pytest.raises(ValueError, match="attention output projection's output plus the residual"):
        prune_transformer(model, data, keep=0.5, target="heads", method="asym")
    prune_transformer(model, data, keep=0.5, target="ffn", method="asym")
