"""SAM's image encoder (``SamVisionModel`` / ``SamModel.vision_encoder``): a ViT on a ``(batch, height, width,
features)`` grid of tokens, most layers attending within windows of it (padded to whole windows); and ViTDet, the
same layer taking its grid channels first. Tiny randomly initialised models (no download).

Oracles: the layer's own sums (the output projection's rows put back in token order, plus the residual, are what
the layer adds), the unpruned model with the removed units' consumer columns set to zero (pruning without refit
must give exactly its outputs), numpy.linalg.lstsq on the consumer's inputs hooked in the model's forward (the
padding positions of the windows, whose attention input is exactly zero, left out), the saved and reloaded model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned
from tests._torch_helpers import run_hooked, zeroed_ffn, zeroed_heads

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS = 32, 4


def build(window: int = 3) -> nn.Module:
    """A 4x4 grid of tokens (64x64 images, patches of 16): layers 0 and 2 attend within windows of ``window`` (3:
    the grid padded to 6x6), layer 1 globally."""
    if not hasattr(transformers, "SamVisionModel"):
        pytest.skip(f"transformers {transformers.__version__} exports no SamVisionModel")
    torch.manual_seed(0)
    cfg = transformers.SamVisionConfig(hidden_size=HIDDEN, output_channels=16, num_hidden_layers=3,
                                       num_attention_heads=HEADS, image_size=64, patch_size=16, mlp_dim=48,
                                       window_size=window, global_attn_indexes=[1])
    model = transformers.SamVisionModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):  # weights of a trained network's scale (fresh ones: ~1e-9 out)
                m.weight.normal_(0.0, 0.2)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)  # relative positions of their own (zeros when fresh)
    return model


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 3, 64, 64, generator=g)} for _ in range(2)]


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last layer's output (before the neck, whose fresh LayerNorms over 16 channels flatten differences)."""
    seen: list[torch.Tensor] = []
    layer = find_blocks(model)[-1].module
    hook = layer.register_forward_hook(
        lambda _m, _a, output: seen.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen[0]


def calls(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> list[tuple[object, list[dict]]]:
    """Per layer, per batch: the layer's input, its attention's input and output projection's input, and the input
    of ``layer_norm2`` (the attention's residual sum), hooked in the model's forward."""
    found = []
    for blk in find_blocks(model):
        seen: list[dict] = []
        layer = blk.module
        hooks = [layer.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append({"x": args[0].detach()})),
                 layer.attn.register_forward_pre_hook(
                     lambda _m, args, kwargs, seen=seen: seen[-1].update(
                         attn_in=(args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True),
                 layer.attn.proj.register_forward_pre_hook(
                     lambda _m, args, seen=seen: seen[-1].update(o_in=args[0].detach())),
                 layer.layer_norm2.register_forward_pre_hook(
                     lambda _m, args, seen=seen: seen[-1].update(sum=args[0].detach()))]
        run_hooked([model], data, hooks)
        found.append((blk, seen))
    return found


def test_layers_found_and_window_rows_put_back_in_token_order() -> None:
    model = build()
    assert [(b.kind, b.module.window_size) for b in find_blocks(model)] == [("hf_sam_vision", 3),
                                                                            ("hf_sam_vision", 0),
                                                                            ("hf_sam_vision", 3)]
    for blk, seen in calls(model, batches()[:1]):
        call = seen[0]
        rows = blk.consumer_rows("heads", call["o_in"], {"args": (), "kwargs": {}}, call["x"])
        rows = rows.reshape(call["x"].shape[0], -1, HIDDEN)  # a global layer's: the grid itself
        with torch.no_grad():
            y = blk.module.attn.proj(rows)
        torch.testing.assert_close(call["x"].flatten(1, 2) + y, call["sum"].flatten(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_zeroed_model(target: str) -> None:
    model, data = build(), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="asym", reweight=False)
    assert report.n_tokens == 2 * 3 * 16
    zeroed = zeroed_heads(zeroed_ffn(model, report, "mlp.lin2"), report, HIDDEN // HEADS, "attn.proj")
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-4)


def test_heads_layer_refit_is_lstsq_on_the_real_rows() -> None:
    """Layer mode: least squares of the output projection's outputs on the kept heads' columns, over the rows of
    real tokens (a windowed layer's padding positions, whose attention input is exactly zero, left out)."""
    model, data = build(), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="layer", ridge=0.0,
                                       weighting="none")
    padded = []
    for unit, (blk, seen) in zip(report.units, calls(model, data), strict=True):
        proj = blk.module.attn.proj
        real = torch.cat([c["attn_in"].reshape(-1, HIDDEN).abs().sum(1) > 0 for c in seen])
        padded.append(not bool(real.all()))
        a = torch.cat([c["o_in"].reshape(-1, HIDDEN) for c in seen])[real].double()
        hd = HIDDEN // HEADS
        cols = [h * hd + j for h in unit.kept for j in range(hd)]
        with torch.no_grad():
            y = proj(a.float()).double()
        design = torch.cat([a[:, cols], torch.ones(len(a), 1, dtype=torch.float64)], dim=1)
        sol = torch.linalg.lstsq(design, y).solution.numpy()
        new = pruned.get_submodule(unit.block).attn.proj
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)
    assert padded == [True, False, True]


def test_pruned_encoder_saves_and_reloads(tmp_path) -> None:
    model, data = build(window=2), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="all")
    assert report.params_after < report.params_before
    save_pruned(pruned, tmp_path / "sam")
    again = load_pruned(tmp_path / "sam", build(window=2))
    for b in data:
        torch.testing.assert_close(out(again, b), out(pruned, b))


def vitdet(residual_blocks: tuple[int, ...] = ()) -> nn.Module:
    """ViTDet (VitMatte's backbone): SAM's layer under other names, its 4x4 grid taken channels first; layer 0
    attends within windows of 3 (padded to 6x6), layer 1 globally."""
    if not hasattr(transformers, "VitDetModel"):
        pytest.skip(f"transformers {transformers.__version__} exports no VitDetModel")
    torch.manual_seed(0)
    cfg = transformers.VitDetConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                    image_size=64, patch_size=16, mlp_ratio=2, window_size=3,
                                    window_block_indices=[0], use_relative_position_embeddings=True,
                                    residual_block_indices=list(residual_blocks))
    model = transformers.VitDetModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, 0.2)
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm"):
                m.weight.uniform_(0.5, 1.5)  # also the residual blocks' last norm (zero when fresh: an identity)
                m.bias.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("target", ["ffn", "heads"])
def test_vitdet_channels_first_grid_without_refit_equals_the_zeroed_model(target: str) -> None:
    """ViTDet's layers take and hand on their grid channels first: the tokens are read from it in the grid's order
    (the residual of the heads is the layer's input), the windowed layer's rows put back in that order; without
    refit the pruned model is the zeroed one."""
    model, data = vitdet(), batches()
    assert [b.kind for b in find_blocks(model)] == ["hf_vitdet"] * 2
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="asym", reweight=False)
    assert report.n_tokens == 2 * 3 * 16
    zeroed = (zeroed_ffn(model, report, "mlp.fc2") if target == "ffn"
              else zeroed_heads(model, report, HIDDEN // HEADS, "attention.proj"))
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-4)
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="layer", ridge=0.0,
                                       weighting="none")
    for unit in report.units:  # the refit sees the real rows: lstsq on the consumer's inputs (padding left out)
        layer = model.get_submodule(unit.block)
        consumer = layer.mlp.fc2 if target == "ffn" else layer.attention.proj
        seen: list[torch.Tensor] = []
        rows_of: list[torch.Tensor] = []
        hooks = [consumer.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].detach())),
                 layer.attention.register_forward_pre_hook(
                     lambda _m, args, rows_of=rows_of: rows_of.append(args[0].detach()))]
        run_hooked([model], data, hooks)
        real = torch.cat([r.reshape(-1, HIDDEN).abs().sum(1) > 0 for r in rows_of])
        a = torch.cat([s.reshape(-1, consumer.in_features) for s in seen])
        a = (a[real] if target == "heads" else a).double()
        width = 1 if target == "ffn" else HIDDEN // HEADS
        cols = [u * width + j for u in unit.kept for j in range(width)]
        with torch.no_grad():
            y = consumer(a.float()).double()
        design = torch.cat([a[:, cols], torch.ones(len(a), 1, dtype=torch.float64)], dim=1)
        sol = torch.linalg.lstsq(design, y).solution.numpy()
        new = pruned.get_submodule(unit.block).get_submodule("mlp.fc2" if target == "ffn" else "attention.proj")
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)


def test_vitdet_layer_with_a_residual_block_is_refused() -> None:
    """A layer whose output goes through a convolutional residual block after its sums (trained: not an identity)
    does not hand on the sum the refit aims at: the first batch's layout check refuses it."""
    with pytest.raises(ValueError, match="does not compute like one"):
        prune_transformer(vitdet(residual_blocks=(1,)), batches(), keep=0.5, target="ffn")
