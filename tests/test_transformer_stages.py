"""Hierarchical encoders: stacks of blocks linked by layers that change the number of tokens between them (Swin's
patch merging: a quarter of the tokens, twice as wide, for the next stage), tiny randomly initialised models; and
Swin V2's LayerNorms after the FFN's output.

Oracles: the unpruned model with the removed neurons' down-projection columns set to zero (pruning without refit
must give exactly its outputs, stage after stage), numpy.linalg.lstsq on the down projections' inputs hooked in the
models' own forwards (layer mode: the unpruned model's; asym mode: the pruned model's, aimed at the unpruned
model's outputs; Swin V2: weighted least squares written from the first-order change of a LayerNorm's output),
the saved and reloaded model's outputs, and hand-built two-stage models of torch encoder layers
whose stage boundary is a module, a functional reshape or a mask the merged tokens cannot inherit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned
from tests._torch_helpers import captured_input, zeroed_ffn, zeroed_heads

transformers = pytest.importorskip("transformers")

# three stages of 16x16, 8x8 and 4x4 tokens (windows of 4x4, shifted in the first stage's second layer); widths 8, 16,
# 32; heads of width 4, 8, 8
SWIN = dict(image_size=32, patch_size=2, embed_dim=8, depths=[2, 1, 1], num_heads=[2, 2, 4], window_size=4)

# name -> (model class, config class, config, path of the FFN's down projection in a block ("a|b": "a" if the block
# has it, else "b"), input name)
MODELS = {
    "swin": ("SwinModel", "SwinConfig", SWIN, "mlp.fc2|output.dense", "pixel_values"),
    "donut_swin": ("DonutSwinModel", "DonutSwinConfig", SWIN, "output.dense", "pixel_values"),
    # a grid of 6x6 tokens, padded to windows of 4x4 inside the first stage's layers, then 3x3
    "maskformer_swin": ("MaskFormerSwinModel", "MaskFormerSwinConfig",
                        dict(SWIN, image_size=24, patch_size=4, depths=[2, 2], num_heads=[1, 2]), "output.dense",
                        "pixel_values"),
    # Swin V2: LayerNorms after the attention's and the FFN's outputs ("res-post-norm")
    "swinv2": ("Swinv2Model", "Swinv2Config", SWIN, "output.dense", "pixel_values"),
    # CLAP's audio encoder (HTS-AT): Swin stages over a mel spectrogram
    "clap_audio": ("ClapAudioModel", "ClapAudioConfig",
                   dict(depths=[1, 1], num_attention_heads=[2, 4], hidden_size=32, patch_embeds_hidden_size=16,
                        spec_size=64, window_size=4, num_mel_bins=16, patch_stride=[4, 4]),
                   "output.dense", "input_features"),
}


def build(name: str) -> nn.Module:
    model_cls, config_cls, config = MODELS[name][:3]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} exports no {model_cls}")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()


def random_norms(model: nn.Module) -> nn.Module:
    """LayerNorms with gains and biases of their own (a fresh one has ones and zeros), and Swin V2's attention
    logit scales different per head (a fresh one has ``log(10)`` everywhere)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
            if isinstance(getattr(m, "logit_scale", None), nn.Parameter):
                m.logit_scale.uniform_(0.5, 3.0)
    return model


def batches(name: str, n_batches: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if MODELS[name][4] == "input_features":
        return [{"input_features": torch.randn(3, 1, 64, 16, generator=g)} for _ in range(n_batches)]
    size = 24 if name == "maskformer_swin" else SWIN["image_size"]
    return [{"pixel_values": torch.randn(3, 3, size, size, generator=g)} for _ in range(n_batches)]


def down_path(name: str, block: nn.Module) -> str:
    first, _, other = MODELS[name][3].partition("|")
    try:
        block.get_submodule(first)
        return first
    except AttributeError:
        return other


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return [b.module for b in find_blocks(model)]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_stage_is_pruned_and_without_refit_equals_the_zeroed_model(name: str) -> None:
    """The FFNs of every stage are pruned (the stages after the first calibrated on the tokens the patch merging
    hands on): without refit, the pruned model is the unpruned one with the removed neurons' columns zeroed."""
    model, data = build(name), batches(name)
    blocks = find_blocks(model)
    assert {b.kind for b in blocks} == {"hf_swinv2" if name == "swinv2" else "hf_swin"}
    assert len({b.name.rpartition(".")[0] for b in blocks}) >= 2
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", reweight=False)
    widths = [b.down.in_features for b in blocks]
    assert [u.block for u in report.units] == [b.name for b in blocks]
    assert [(u.n_units, u.n_kept) for u in report.units] == [(w, w // 2) for w in widths]
    zeroed = zeroed_ffn(model, report, down_path(name, blocks_of(model)[0]))
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)
    tokens = int(sum(captured_input(model, blocks_of(model)[0], b).shape[:2].numel() for b in data))
    assert (report.n_tokens, report.n_padding_excluded) == (tokens, 0)  # counted at the first stage


def fitted(layer: nn.Linear) -> np.ndarray:
    w = layer.weight.detach().double().numpy().T
    return w if layer.bias is None else np.vstack([w, layer.bias.detach().double().numpy()])


def lstsq(a: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    a64 = a.double().numpy()
    return np.linalg.lstsq(np.hstack([a64, np.ones((len(a64), 1))]), y.double().numpy(), rcond=None)[0]


@pytest.mark.parametrize("name", ["swin", "donut_swin", "maskformer_swin"])
def test_layer_mode_refit_is_lstsq_on_each_stage_tokens(name: str) -> None:
    """Layer mode: each block's refit is least squares of its down projection's outputs on the kept neurons'
    activations, over every token of its own stage (hooked in the unpruned model's forward)."""
    model, data = build(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for unit, block, new in zip(report.units, blocks_of(model), blocks_of(pruned), strict=True):
        down = block.get_submodule(down_path(name, block))
        with torch.no_grad():
            a = torch.cat([captured_input(model, down, b).reshape(-1, down.in_features) for b in data])
            want = lstsq(a[:, unit.kept], down(a))
        np.testing.assert_allclose(fitted(new.get_submodule(down_path(name, new))), want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_swinv2_refit_is_weighted_through_the_layernorm_after_the_ffn(ridge: float) -> None:
    """Swin V2's FFN output goes through a LayerNorm before the sum: ``x + LN(y)``, ``LN(y) = g * (y - mean(y)) /
    sqrt(var(y) + eps) + b``. To first order an error ``e`` in ``y`` moves the sum by ``g * (e - mean(e)) /
    sqrt(var(y_t) + eps)``, so the layer-mode refit is least squares on token ``t`` weighted by
    ``1 / (var(y_t) + eps)`` (no other weighting asked). Written out here without a ridge: the weighted lstsq of
    the unpruned model's outputs on the kept neurons' activations, whose LayerNorm outputs the pruned layer must
    reproduce (the mean of a token's outputs does not reach the sum). With a ridge toward the trained weights, and
    without: the reported relative error is that of the LayerNorm's first-order change, the centred, ``g``-scaled
    residual of the pruned layer's outputs (the part of the trained weights that only moves a token's mean does not
    count)."""
    model, data = random_norms(build("swinv2")), batches("swinv2")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=ridge,
                                       weighting="none")
    for unit, block, new in zip(report.units, blocks_of(model), blocks_of(pruned), strict=True):
        down, norm = block.output.dense, block.layernorm_after
        with torch.no_grad():
            a = torch.cat([captured_input(model, down, b).reshape(-1, down.in_features) for b in data]).double()
            y = down(a.float()).double()
            w = 1.0 / (y.var(dim=1, unbiased=False) + norm.eps)
            a_k = a[:, unit.kept]
            mine = new.output.dense(a_k.float())
            if ridge == 0.0:
                design = torch.cat([a_k, torch.ones(len(a), 1, dtype=torch.float64)], dim=1) * w.sqrt()[:, None]
                sol = torch.linalg.lstsq(design, y * w.sqrt()[:, None]).solution
                torch.testing.assert_close(norm(mine), norm((a_k @ sol[:-1] + sol[-1]).float()), atol=1e-4,
                                           rtol=1e-4)
            g = norm.weight.double()
            z = (y - y.mean(dim=1, keepdim=True)) * g
            err = (y - mine.double()) * g
            err = err - (err / g).mean(dim=1, keepdim=True) * g  # centred before the gains: g * P(y - mine)
            spread = z - (w[:, None] * z).sum(0) / w.sum()
            rel = float((w[:, None] * err.square()).sum() / (w[:, None] * spread.square()).sum())
        assert unit.relative_error == pytest.approx(rel, rel=1e-3, abs=1e-6)


def test_swinv2_asym_refit_aims_at_the_unpruned_sums() -> None:
    """Asym mode with the residual compensated (the default): the FFN of Swin V2 should give the unpruned model's
    sum ``x + LN(y)`` on the pruned model's residual ``x'``; to first order its output should move by
    ``(x - x') * sqrt(var(y_t) + eps) / g``. Written out: the least squares of that target on the pruned model's
    activations, tokens weighted by ``1 / (var(y_t) + eps)``, whose LayerNorm outputs the pruned layer
    reproduces."""
    model, data = random_norms(build("swinv2")), batches("swinv2")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none")
    for unit, block, new in zip(report.units, blocks_of(model), blocks_of(pruned), strict=True):
        down, norm, mine = block.output.dense, block.layernorm_after, new.output.dense
        with torch.no_grad():
            def rows(net: nn.Module, module: nn.Module) -> torch.Tensor:
                return torch.cat([captured_input(net, module, b).reshape(-1, module.in_features)
                                  for b in data]).double()

            y = down(rows(model, down).float()).double()
            x, x_p = rows(model, block.intermediate.dense), rows(pruned, new.intermediate.dense)
            a = rows(pruned, mine)
            sd = (y.var(dim=1, unbiased=False) + norm.eps).sqrt()
            target = y + (x - x_p) * sd[:, None] / norm.weight.double()
            design = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], dim=1) / sd[:, None]
            sol = torch.linalg.lstsq(design, target / sd[:, None]).solution
            assert float((x - x_p).abs().max()) > 1e-3 or block is blocks_of(model)[0]
            torch.testing.assert_close(norm(mine(a.float())), norm((a @ sol[:-1] + sol[-1]).float()), atol=2e-4,
                                       rtol=1e-4)
            # the reported error: of the centred, g-scaled targets (what reaches the LayerNorm's output)
            g, w = norm.weight.double(), sd.square().reciprocal()
            z = (target - target.mean(dim=1, keepdim=True)) * g
            e = target - mine(a.float()).double()
            e = (e - e.mean(dim=1, keepdim=True)) * g
            spread = z - (w[:, None] * z).sum(0) / w.sum()
            rel = float((w[:, None] * e.square()).sum() / (w[:, None] * spread.square()).sum())
        assert unit.relative_error == pytest.approx(rel, rel=1e-3, abs=1e-6)


def test_asym_refit_reads_each_stage_from_the_pruned_stages_before() -> None:
    """Asym mode: a later stage's refit fits the unpruned model's down-projection outputs on the activations of
    the pruned model, whose earlier stages (and patch merging) are pruned; they differ from the unpruned model's."""
    model, data = build("swin"), batches("swin")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none", residual=False)
    names = [b.name for b in find_blocks(model)]
    apart = 0.0
    for unit, name in zip(report.units, names, strict=True):
        path = f"{name}.{down_path('swin', model.get_submodule(name))}"
        mine, theirs = pruned.get_submodule(path), model.get_submodule(path)
        with torch.no_grad():
            seen = torch.cat([captured_input(model, theirs, b).reshape(-1, theirs.in_features) for b in data])
            a = torch.cat([captured_input(pruned, mine, b).reshape(-1, mine.in_features) for b in data])
            want = lstsq(a, theirs(seen))
            apart = max(apart, float(np.abs(lstsq(seen[:, unit.kept], theirs(seen)) - want).max()))
        np.testing.assert_allclose(fitted(mine), want, atol=2e-4, rtol=1e-3)
    assert apart > 1e-3  # the pruned network's activations are not the unpruned one's


def test_error_curve_allocation_and_a_saved_model(tmp_path) -> None:
    """The error-curve allocation runs the unpruned stages first (their token counts change), then the pruning
    from the first stage again; the total kept is the uniform one. The pruned model saves and reloads."""
    model, data = build("swin"), batches("swin")
    _, uniform = prune_transformer(model, data, keep=0.5, target="ffn")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", allocation="error-curve")
    assert sum(u.n_kept for u in report.units) == sum(u.n_kept for u in uniform.units)
    assert [u.n_kept for u in report.units] != [u.n_kept for u in uniform.units]
    assert report.params_after < report.params_before
    save_pruned(pruned, tmp_path / "swin")
    again = load_pruned(tmp_path / "swin", build("swin"))
    for b in data:
        torch.testing.assert_close(out(again, b), out(pruned, b))


def test_merged_tokens_keep_their_image_cross_validation_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit's ridge is cross-validated over folds of whole images (dealt round-robin: image ``i`` of the
    calibration set in fold ``i mod 5``); every token of a later stage, and every row of its statistics, stays in
    its image's fold."""
    import nn_adapters.transformer as tr

    seen: list[tuple[int, torch.Tensor]] = []
    update = tr._Stats.update

    def spy(self, a, y, w, fold):  # noqa: ANN001, ANN202
        seen.append((a.shape[0], fold.clone()))
        return update(self, a, y, w, fold)

    monkeypatch.setattr(tr._Stats, "update", spy)
    model, data = build("swin"), batches("swin")
    prune_transformer(model, data, keep=0.5, target="ffn", method="layer")
    blocks = blocks_of(model)
    assert len(seen) == len(blocks) * len(data)
    for i, (rows, fold) in enumerate(seen):
        block, b = blocks[i // len(data)], i % len(data)
        tokens = captured_input(model, block, data[b]).shape[1]
        images = torch.arange(3 * b, 3 * b + 3) % tr.CV_FOLDS
        assert rows == 3 * tokens
        assert torch.equal(fold.cpu(), images.repeat_interleave(tokens))


# per model: the attention output projection in a block, the module whose input is the attention's residual sum,
# and the norm between the projection and that sum (Swin V2's) or None
HEAD_PARTS = {"swin": ("attention.o_proj|attention.output.dense", "layernorm_after", None),
              "donut_swin": ("attention.output.dense", "layernorm_after", None),
              "maskformer_swin": ("attention.output.dense", "layernorm_after", None),
              "swinv2": ("attention.output.dense", "intermediate", "layernorm_before")}


def part(block: nn.Module, path: str) -> nn.Module:
    for p in path.split("|"):
        try:
            return block.get_submodule(p)
        except AttributeError:
            continue
    raise AttributeError(path)


def window_calls(model: nn.Module, data: list[dict[str, torch.Tensor]], name: str) -> list[list[dict]]:
    """Per block, per batch: what the model's own forward hands its attention (the window rows), the output
    projection's input, the block's input and arguments, and the input of the module that reads the attention's
    residual sum."""
    out_path, sum_path, _ = HEAD_PARTS[name]
    found = []
    for blk in find_blocks(model):
        block = blk.module
        calls: list[dict] = []
        hooks = [block.register_forward_pre_hook(
                     lambda _m, args, kwargs, calls=calls: calls.append({"x": args[0].detach(), "args": args[1:],
                                                                         "kwargs": kwargs}), with_kwargs=True),
                 part(block, "attention").register_forward_pre_hook(
                     lambda _m, args, calls=calls: calls[-1].update(attn_in=args[0].detach())),
                 part(block, out_path).register_forward_pre_hook(
                     lambda _m, args, calls=calls: calls[-1].update(o_in=args[0].detach())),
                 part(block, sum_path).register_forward_pre_hook(
                     lambda _m, args, calls=calls: calls[-1].update(sum=args[0].detach()))]
        try:
            with torch.no_grad():
                for b in data:
                    model(**b)
        finally:
            for h in hooks:
                h.remove()
        found.append((blk, calls))
    return found


@pytest.mark.parametrize("name", list(HEAD_PARTS))
def test_window_rows_are_put_back_in_token_order(name: str) -> None:
    """The attention's output projection sees the tokens regrouped into (shifted, padded) windows; the adapter puts
    its input rows back in token order. Oracle, from the model's own forward: projected and put back, they are
    the attention's output per token, i.e. the residual sum the layer computes minus the block's input (through the
    LayerNorm after the attention in Swin V2)."""
    model = random_norms(build(name))
    data = batches(name, n_batches=1)
    out_path, _, norm_path = HEAD_PARTS[name]
    for blk, calls in window_calls(model, data, name):
        call = calls[0]
        ctx = {"args": call["args"], "kwargs": call["kwargs"]}
        rows = blk.consumer_rows("heads", call["o_in"], ctx, call["x"])
        assert rows.shape[:2] == call["x"].shape[:2]
        with torch.no_grad():
            y = part(blk.module, out_path)(rows)
            if norm_path is not None:
                y = part(blk.module, norm_path)(y)
        torch.testing.assert_close(call["x"] + y, call["sum"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(HEAD_PARTS))
def test_heads_without_refit_equal_the_zeroed_model(name: str) -> None:
    """Heads pruned in every stage without refit: the model with the removed heads' output-projection columns set
    to zero (each head's position bias goes with it)."""
    model, data = random_norms(build(name)), batches(name)
    blocks = find_blocks(model)
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="asym", reweight=False)
    assert [(u.n_units, u.n_kept) for u in report.units] == [(b.num_heads, max(1, b.num_heads // 2)) for b in blocks]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u, blk in zip(report.units, blocks, strict=True):
            proj = part(zeroed.get_submodule(u.block), HEAD_PARTS[name][0])
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            proj.weight[:, [g * blk.head_dim + j for g in gone for j in range(blk.head_dim)]] = 0.0
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("name", ["swin", "maskformer_swin", "swinv2"])
def test_heads_layer_refit_is_lstsq_on_the_windows_real_rows(name: str) -> None:
    """Layer mode: the output projection's refit is least squares over the window rows of real tokens (the rows
    of padding positions, whose attention input is exactly zero, left out; MaskFormer's 6x6 grid is padded to
    windows of 4x4): the rows' order does not matter to least squares. Through Swin V2's LayerNorm, each row
    weighs ``1 / (var(y) + eps)``."""
    model, data = random_norms(build(name)), batches(name)
    out_path, _, norm_path = HEAD_PARTS[name]
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="layer", ridge=0.0,
                                       weighting="none")
    padded = False
    for unit, (blk, calls) in zip(report.units, window_calls(model, data, name), strict=True):
        proj = part(blk.module, out_path)
        real = torch.cat([c["attn_in"].reshape(-1, c["attn_in"].shape[-1]).abs().sum(1) > 0 for c in calls])
        padded |= not bool(real.all())
        a = torch.cat([c["o_in"].reshape(-1, proj.in_features) for c in calls])[real].double()
        cols = [h * blk.head_dim + j for h in unit.kept for j in range(blk.head_dim)]
        with torch.no_grad():
            y = proj(a.float()).double()
        w = torch.ones(len(a), dtype=torch.float64)
        if norm_path is not None:
            w = 1.0 / (y.var(dim=1, unbiased=False) + part(blk.module, norm_path).eps)
        design = torch.cat([a[:, cols], torch.ones(len(a), 1, dtype=torch.float64)], dim=1) * w.sqrt()[:, None]
        sol = torch.linalg.lstsq(design, y * w.sqrt()[:, None]).solution
        new = part(pruned.get_submodule(unit.block), out_path)
        with torch.no_grad():
            mine, want = new(a[:, cols].float()).double(), a[:, cols] @ sol[:-1] + sol[-1]
        if norm_path is not None:  # the mean of a row does not reach the LayerNorm's output
            mine, want = mine - mine.mean(1, keepdim=True), want - want.mean(1, keepdim=True)
        # the fitted outputs (a head of width 8 reads a LayerNorm of width 8, whose outputs span 7 dimensions: the
        # weights are not unique there, the least-squares outputs are)
        torch.testing.assert_close(mine, want, atol=2e-4, rtol=1e-3)
    assert padded == (name == "maskformer_swin")


@pytest.mark.parametrize("name", ["swin", "donut_swin", "swinv2"])
def test_heads_and_ffn_pruned_model_saves_and_reloads(name: str, tmp_path) -> None:
    """Heads and FFN pruned in every stage: the saved model reloads into the unpruned architecture (position bias
    tables, Swin V2's bias network and logit scales cut to the kept heads) and computes the same outputs."""
    model, data = random_norms(build(name)), batches(name)
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all")
    save_pruned(pruned, tmp_path / name)
    again = load_pruned(tmp_path / name, build(name))
    for b in data:
        torch.testing.assert_close(out(again, b), out(pruned, b))


def test_donut_encoder_decoder_is_pruned_stage_by_stage_then_the_decoder() -> None:
    """Donut (VisionEncoderDecoder: Donut's Swin encoder, an mBART decoder): the encoder's stages, linked through
    their patch merging, then the decoder on the pruned encoder's states, in one call; without refit the logits
    are those of the unpruned model with every removed unit's consumer columns zeroed (FFN and heads of the
    encoder's stages; FFN, self- and cross-attention heads of the decoder)."""
    enc = transformers.DonutSwinConfig(**SWIN)
    dec = transformers.MBartConfig(vocab_size=50, d_model=32, decoder_layers=2, encoder_layers=2,
                                   decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=48,
                                   encoder_ffn_dim=48, max_position_embeddings=64, is_decoder=True,
                                   add_cross_attention=True)
    torch.manual_seed(0)
    model = transformers.VisionEncoderDecoderModel(
        transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g),
             "decoder_input_ids": torch.randint(3, 50, (2, 6), generator=g)} for _ in range(2)]
    pruned, report = prune_transformer(model, data, keep=0.5, target="all", method="asym", reweight=False)
    assert {(u.block.split(".")[0], u.stage) for u in report.units} == {
        ("encoder", "ffn"), ("encoder", "heads"), ("decoder", "ffn"), ("decoder", "heads"), ("decoder", "cross")}
    paths = {("encoder", "ffn"): "output.dense", ("encoder", "heads"): "attention.output.dense",
             ("decoder", "ffn"): "fc2", ("decoder", "heads"): "self_attn.out_proj",
             ("decoder", "cross"): "encoder_attn.out_proj"}
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            proj = zeroed.get_submodule(u.block).get_submodule(paths[u.block.split(".")[0], u.stage])
            width = 1 if u.stage == "ffn" else proj.in_features // u.n_units
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            proj.weight[:, [g * width + j for g in gone for j in range(width)]] = 0.0
    with torch.no_grad():
        for b in data:
            torch.testing.assert_close(pruned(**b).logits, zeroed(**b).logits, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(pruned(**b).logits, model(**b).logits, atol=1e-4)


def test_window_rows_need_the_grid_size() -> None:
    """The windows' token order is read from the grid size the layer is called with; a call without it is refused
    with the reason, not a KeyError."""
    blk = find_blocks(build("swin"))[0]
    with pytest.raises(ValueError, match=r"input_dimensions.*target='ffn'"):
        blk.consumer_rows("heads", torch.zeros(4, 16, 8), {"args": (), "kwargs": {}}, torch.zeros(1, 64, 8))


def test_heads_need_the_models_window_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """The windows' token order is read with the model module's own ``window_partition``: without it, heads are
    refused with the reason (the FFN is still pruned)."""
    import sys

    model, data = build("swin"), batches("swin", n_batches=1)
    monkeypatch.delattr(sys.modules[type(find_blocks(model)[0].module).__module__], "window_partition")
    with pytest.raises(ValueError, match=r"no window_partition function.*target='ffn'"):
        prune_transformer(model, data, keep=0.5, target="heads")


# name -> (model class, config class, config, kind, FFN down projection, attention output projection or None where
# heads are refused): pyramid encoders whose stages hand their tokens on as an image to the next patch embedding
PYRAMIDS = {
    # SegFormer (Mix Transformer): two stages of 2 layers, widths 16 and 32, 1 and 2 heads, keys and values
    # spatially reduced in the first stage, a depthwise convolution in the FFN; 32x32 images
    "segformer": ("SegformerModel", "SegformerConfig",
                  dict(num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
                  "hf_segformer", "mlp.fc2", "attention.o_proj"),
    # PVT v2: the same with BERT-like names; its attention reshapes to the model width (heads refused)
    "pvt_v2": ("PvtV2Model", "PvtV2Config",
               dict(num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                    patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
               "hf_pvt_v2", "mlp.dense2", None),
    # PVT (v1): a plain FFN, a class token added in the last stage
    "pvt": ("PvtModel", "PvtConfig",
            dict(image_size=32, num_encoder_blocks=2, depths=[2, 2], sequence_reduction_ratios=[2, 1],
                 hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2],
                 mlp_ratios=[2, 2]),
            "hf_pvt", "mlp.dense2", "attention.output.dense"),
}


def pyramid(name: str) -> nn.Module:
    model_cls, config_cls, config, kind = PYRAMIDS[name][:4]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} exports no {model_cls}")
    torch.manual_seed(0)
    model = random_norms(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval())
    if {b.kind for b in find_blocks(model)} != {kind}:
        pytest.skip(f"transformers {transformers.__version__}: {model_cls} in another layout")
    return model


def pyramid_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"pixel_values": torch.randn(3, 3, 32, 32, generator=g)} for _ in range(2)]


@pytest.mark.parametrize(("name", "target"), [(n, t) for n in PYRAMIDS for t in ("ffn", "heads")])
def test_pyramid_stages_are_pruned_through_their_patch_embeddings(name: str, target: str) -> None:
    """The stages hand their tokens on as an image to the next stage's patch embedding (a reshape outside any
    module, read as such from the first batch); a Mix-FFN passes each unit through a depthwise convolution, which
    loses the removed units' channels. Without refit: the zeroed model, on every stage's output; with the
    layer-mode refit: lstsq on the down projection's inputs of each stage. PVT v2's heads are refused."""
    model, data = pyramid(name), pyramid_batches()
    down_path, out_path = PYRAMIDS[name][4:]
    if target == "heads" and out_path is None:
        with pytest.raises(ValueError, match=r"reshapes its output to the model width.*target='ffn'"):
            prune_transformer(model, data, keep=0.5, target="heads")
        return
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="asym", reweight=False)
    assert [u.block for u in report.units] == [b.name for b in find_blocks(model)]
    zeroed = (zeroed_ffn(model, report, down_path) if target == "ffn"
              else zeroed_heads(model, report, 16, out_path))
    with torch.no_grad():
        for b in data:
            mine, want = pruned(**b, output_hidden_states=True), zeroed(**b, output_hidden_states=True)
            for got, ref in zip(mine.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(mine.last_hidden_state, model(**b).last_hidden_state, atol=1e-4)
    if target == "ffn":
        pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                           weighting="none")
        for unit in report.units:
            down = model.get_submodule(unit.block).get_submodule(down_path)
            with torch.no_grad():
                a = torch.cat([captured_input(model, down, b).reshape(-1, down.in_features) for b in data])
                want = lstsq(a[:, unit.kept], down(a))
            np.testing.assert_allclose(fitted(pruned.get_submodule(unit.block).get_submodule(down_path)), want,
                                       atol=2e-4, rtol=1e-3)


def test_segformer_look_alike_whose_ffn_mixes_its_units_is_refused() -> None:
    """A Mix-FFN whose convolution mixes the intermediate channels (not depthwise) is not SegFormer's: the block is
    read as ViT's, and the first batch's unit-removal check, run because the FFN holds a part with parameters
    between its projections, refuses it instead of pruning it wrongly."""
    model = pyramid("segformer")
    with torch.no_grad():
        for blk in find_blocks(model):
            conv = blk.module.mlp.dwconv.dwconv
            blk.module.mlp.dwconv.dwconv = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1)
    assert {b.kind for b in find_blocks(model)} == {"hf_vit"}
    with pytest.raises(ValueError, match="fails once an FFN unit is removed|an FFN unit"):
        prune_transformer(model, pyramid_batches(), keep=0.5, target="ffn")


def test_segformer_images_of_another_size_are_refused() -> None:
    """The reshape between stages is read on the first batch; a later batch of another image size is refused
    with what to pass."""
    data = pyramid_batches()
    data.append({"pixel_values": torch.randn(2, 3, 48, 48)})
    with pytest.raises(ValueError, match="images of one size"):
        prune_transformer(pyramid("segformer"), data, keep=0.5, target="ffn")


class Merge(nn.Module):
    """Neighbouring tokens concatenated and projected: half the tokens, twice as wide."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return self.proj(x.reshape(b, t // 2, 2 * d))


class TwoStages(nn.Module):
    """Two stacks of torch encoder layers (width 8, then 16); between them a merging module, or (``functional``)
    the same reshape written in the forward, outside any module."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.stage0 = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.merge = Merge(8)
        self.stage1 = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
                                    for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.stage0:
            x = layer(x, src_key_padding_mask=mask)
        b, t, d = x.shape
        x = x.reshape(b, t // 2, 2 * d) if self.functional else self.merge(x)
        for layer in self.stage1:
            x = layer(x)
        return x


def two_stage_batches(mask: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(3):
        batch = {"x": torch.randn(4, 8, 8, generator=g)}
        if mask:
            batch["mask"] = torch.arange(8).view(1, -1) >= torch.tensor([8, 6, 8, 4]).view(-1, 1)
        out.append(batch)
    return out


def test_stages_linked_by_a_module_are_pruned_like_swin() -> None:
    """Any model: the module between two stacks whose output is the next stack's input is run as it is; both
    stages' FFNs are pruned (zeroed-model oracle without refit; lstsq on the stage's tokens in layer mode)."""
    torch.manual_seed(0)
    model, data = TwoStages().eval(), two_stage_batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", reweight=False)
    assert [(u.n_units, u.n_kept) for u in report.units] == [(16, 8), (16, 8), (24, 12), (24, 12)]
    zeroed = zeroed_ffn(model, report, "linear2")
    with torch.no_grad():
        for b in data:
            torch.testing.assert_close(pruned(**b), zeroed(**b), atol=1e-5, rtol=1e-5)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for unit in report.units:
        down = model.get_submodule(unit.block).linear2
        with torch.no_grad():
            a = torch.cat([captured_input(model, down, b).reshape(-1, down.in_features) for b in data])
            want = lstsq(a[:, unit.kept], down(a))
        np.testing.assert_allclose(fitted(pruned.get_submodule(unit.block).linear2), want, atol=2e-4, rtol=1e-3)


def test_padding_cannot_cross_a_merge_and_a_functional_boundary_is_refused() -> None:
    """A padded batch whose token count changes between stages: which merged token is padding is not known, so it
    is refused with what to pass. A boundary computed outside modules is not linked: the stacks do not chain."""
    torch.manual_seed(0)
    model = TwoStages().eval()
    with pytest.raises(ValueError, match=r"receives 4 tokens per sequence, the first block 8.*without padding"):
        prune_transformer(model, two_stage_batches(mask=True), keep=0.5, target="ffn")
    functional = TwoStages(functional=True).eval()
    with pytest.raises(ValueError, match=r"does not receive the previous block's output"):
        prune_transformer(functional, two_stage_batches(), keep=0.5, target="ffn")
    # the caller's model is untouched
    before = copy.deepcopy(model.state_dict())
    prune_transformer(model, two_stage_batches(), keep=0.5, target="ffn")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
