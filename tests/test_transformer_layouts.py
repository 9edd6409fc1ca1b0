"""Transformer pruning on the Hugging Face layouts besides BERT: DistilBERT, DeBERTa (v1 and v3), MPNet, ViT, CLIP
(text and vision towers) and ModernBERT (fused query/key/value, gated FFN fused in ``mlp.Wi``, sliding-window and
global layers), tiny randomly initialised models (no download).

Oracles: the unpruned model with the removed units' columns of the consumer set to zero (pruning without refit
must give exactly its outputs: this checks which rows, columns and head channels go, including MPNet's per-head
position bias), numpy.linalg.lstsq on the down projection's input captured independently with a hook (the
refit), and the saved and reloaded model's outputs.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, VOCAB = 16, 4, 24, 2, 40

# name -> (config, model class, block kind, path of the down projection and of the attention output projection
# inside a block, whether the model reads token ids); a path "a|b" is "a" if the block has it, else "b" (the layouts
# of ViT before transformers 5.9 and DINOv2 before 5.18)
LAYOUTS = {
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                                         n_heads=HEADS, hidden_dim=INTER, max_position_embeddings=32),
                   "DistilBertModel", "hf_distilbert", "ffn.lin2", "attention.out_lin", True),
    # DeBERTa-v3's relative attention: the position terms go through the shared query and key projections
    "deberta_v3": (lambda: transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                        num_attention_heads=HEADS, intermediate_size=INTER,
                                                        relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                        share_att_key=True, position_buckets=8,
                                                        max_relative_positions=16, norm_rel_ebd="layer_norm",
                                                        position_biased_input=False),
                   "DebertaV2Model", "hf_deberta_v2", "output.dense", "attention.output.dense", True),
    # DeBERTa-v2 without share_att_key: the positions go through pos_key_proj / pos_query_proj, one row block per head
    "deberta_v2": (lambda: transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                        num_attention_heads=HEADS, intermediate_size=INTER,
                                                        relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                        share_att_key=False, max_relative_positions=16),
                   "DebertaV2Model", "hf_deberta_v2", "output.dense", "attention.output.dense", True),
    # DeBERTa (v1): query, key and value fused head by head, their biases apart, content-to-position and
    # position-to-content projections of the relative embeddings, float32 LayerNorms of its own
    "deberta": (lambda: transformers.DebertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                   num_attention_heads=HEADS, intermediate_size=INTER,
                                                   relative_attention=True, pos_att_type=["c2p", "p2c"],
                                                   max_relative_positions=16, max_position_embeddings=32),
                "DebertaModel", "hf_deberta", "output.dense", "attention.output.dense", True),
    "mpnet": (lambda: transformers.MPNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                               num_attention_heads=HEADS, intermediate_size=INTER,
                                               max_position_embeddings=40),
              "MPNetModel", "hf_mpnet", "output.dense", "attention.attn.o", True),
    "clip_text": (lambda: transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                      num_attention_heads=HEADS, intermediate_size=INTER,
                                                      max_position_embeddings=32),
                  "CLIPTextModel", "hf_clip", "mlp.fc2", "self_attn.out_proj", True),
    "clip_vision": (lambda: transformers.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                          intermediate_size=INTER),
                    "CLIPVisionModel", "hf_clip", "mlp.fc2", "self_attn.out_proj", False),
    "dinov2": (lambda: transformers.Dinov2Config(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, mlp_ratio=2),
               "Dinov2Model", "hf_dinov2", "mlp.fc2", "attention.o_proj|attention.output.dense", False),
    # DINOv3: DINOv2's layer scales with rotary embeddings, register tokens, the FFN up_proj / down_proj or gated
    "dinov3": (lambda: transformers.DINOv3ViTConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                    intermediate_size=INTER, num_register_tokens=2),
               "DINOv3ViTModel", "hf_dinov3", "mlp.down_proj", "attention.o_proj", False),
    "dinov3_gated": (lambda: transformers.DINOv3ViTConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                          intermediate_size=INTER, use_gated_mlp=True),
                     "DINOv3ViTModel", "hf_dinov3", "mlp.down_proj", "attention.o_proj", False),
    # BEiT: layer scales lambda_1 / lambda_2, a relative position bias table per layer (transformers 5's layout, or
    # the older one of transformers 4)
    "beit": (lambda: transformers.BeitConfig(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, intermediate_size=INTER,
                                             layer_scale_init_value=0.1, use_relative_position_bias=True),
             "BeitModel", "hf_beit", "mlp.fc2|output.dense", "attention.o_proj|attention.output.dense", False),
    # Data2Vec-vision: BEiT's older layout (that of transformers 4's BEiT), the bias table inside the attention
    "data2vec_vision": (lambda: transformers.Data2VecVisionConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                                  intermediate_size=INTER, layer_scale_init_value=0.1,
                                                                  use_relative_position_bias=True),
                        "Data2VecVisionModel", "hf_beit", "output.dense", "attention.output.dense", False),
    # AIMv2: Llama's pre-norm layout under other names (attention.*, ffn.*, rms_norm1/2), gated FFN
    "aimv2": (lambda: transformers.Aimv2VisionConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                     intermediate_size=INTER, mlp_bias=True, qkv_bias=True),
              "Aimv2VisionModel", "hf_aimv2", "ffn.down_proj", "attention.out_proj", False),
    # Pixtral's vision encoder: Llama's pre-norm layout under other names, the batch's images packed in one sequence
    # under a block-diagonal mask
    "pixtral": (lambda: transformers.PixtralVisionConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                         intermediate_size=INTER, head_dim=HIDDEN // HEADS),
                "PixtralVisionModel", "hf_pixtral", "feed_forward.down_proj", "attention.o_proj", False),
    "vit": (lambda: transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                           num_attention_heads=HEADS, intermediate_size=INTER),
            "ViTModel", "hf_vit", "mlp.fc2|output.dense", "attention.o_proj|attention.output.dense", False),
    # a global layer, then a sliding-window one (4 tokens): each is replayed with its own mask
    "modernbert": (lambda: transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                         num_attention_heads=HEADS, intermediate_size=INTER,
                                                         local_attention=4, max_position_embeddings=32,
                                                         mlp_bias=True, attention_bias=True, norm_bias=True,
                                                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                         cls_token_id=1, sep_token_id=2),
                   "ModernBertModel", "hf_modernbert", "mlp.Wo", "attn.Wo", True),
}


# transformers 4: CLIPAttention reshapes its output to the model width (no head pruning), BEiT is not ViT-like
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def target_for(name: str, target: str, model: nn.Module, data: list[dict[str, torch.Tensor]]) -> str | None:
    """``target``, or where the installed transformers' attention of the layout cannot lose heads, the refusal of
    head pruning checked and what remains to prune ("ffn", or ``None`` for ``target="heads"``)."""
    if target == "ffn" or not (name.startswith("clip") and TRANSFORMERS_4):
        return target
    with pytest.raises(ValueError, match=r"reshapes the attention output to the model width.*>= 5\.0"):
        prune_transformer(model, data, keep=0.5, target=target)
    return None if target == "heads" else "ffn"


def build(name: str, seed: int = 0) -> nn.Module:
    if not hasattr(transformers, LAYOUTS[name][1]):
        pytest.skip(f"transformers {transformers.__version__} has no {LAYOUTS[name][1]}")
    torch.manual_seed(seed)
    cfg = LAYOUTS[name][0]()
    model = getattr(transformers, LAYOUTS[name][1])(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
        for name_, p in model.named_parameters():  # layer scales of several sizes (they start at 1)
            if name_.endswith(("lambda1", "lambda_1", "lambda_2")):
                p.copy_(torch.linspace(0.2, 2.0, p.numel())[torch.randperm(p.numel())])
            if name_.endswith(("q_bias", "v_bias", "relative_position_bias_table")):  # (DeBERTa, BEiT) start at 0
                p.normal_()
    return model


def batches(name: str, n_batches: int = 4, b: int = 6, t: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        if not LAYOUTS[name][5]:
            out.append({"pixel_values": torch.randn(b, 3, 16, 16, generator=g)})
            continue
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        lengths = torch.randint(4, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t).view(1, -1) < lengths.view(-1, 1)).long()
        out.append({"input_ids": torch.where(mask.bool(), ids, torch.zeros_like(ids)), "attention_mask": mask})
    return out


def real(batch: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The outputs of the real tokens (all of them for images)."""
    return h[batch["attention_mask"].bool()] if "attention_mask" in batch else h.reshape(-1, h.shape[-1])


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return real(batch, model(**batch).last_hidden_state)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return [b.module for b in find_blocks(model)]


def get(module: nn.Module, path: str) -> nn.Module:
    """``module.a.b`` for ``path == "a.b"``; for ``"a.b|c"``, ``module.a.b`` if the module has it, else ``module.c``."""
    first, _, rest = path.partition("|")
    found = module
    for part in first.split("."):
        found = getattr(found, part, None)
    if found is None and rest:
        return get(module, rest)
    if not isinstance(found, nn.Module):
        raise AttributeError(f"{type(module).__name__} has no {path}")
    return found


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_blocks_are_found(name: str) -> None:
    assert [b.kind for b in find_blocks(build(name))] == [LAYOUTS[name][2]] * LAYERS


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_keep_everything_without_refit_is_exact(name: str) -> None:
    model, data = build(name), batches(name)
    target = target_for(name, "all", model, data)
    pruned, report = prune_transformer(model, data, keep=1.0, target=target, method="asym", reweight=False)
    assert report.params_after == report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["heads", "ffn", "all"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(name: str, target: str) -> None:
    """Removing units without refit must equal the unpruned model whose consumer reads zeros from them."""
    model, data = build(name), batches(name)
    target = target_for(name, target, model, data)
    if target is None:
        return
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="magnitude", reweight=False)
    masked = copy.deepcopy(model)
    hd = HIDDEN // HEADS
    for unit in report.units:
        block = blocks_of(masked)[[b.name for b in find_blocks(masked)].index(unit.block)]
        consumer = get(block, LAYOUTS[name][3] if unit.stage == "ffn" else LAYOUTS[name][4])
        size = unit.n_units
        gone = sorted(set(range(size)) - set(unit.kept))
        cols = gone if unit.stage == "ffn" else [h * hd + i for h in gone for i in range(hd)]
        with torch.no_grad():
            consumer.weight[:, cols] = 0.0
    assert len(report.units) == LAYERS * (2 if target == "all" else 1)
    assert all(u.n_kept == u.n_units // 2 and u.n_units == (INTER if name != "dinov2" else 2 * HIDDEN)
               if u.stage == "ffn" else u.n_kept == HEADS // 2 for u in report.units)
    assert report.params_after < report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)  # something was removed


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    model, data = build(name), batches(name)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for i, block in enumerate(blocks_of(model)):
        down = get(block, LAYOUTS[name][3])
        rows: list[torch.Tensor] = []
        hook = down.register_forward_pre_hook(lambda _m, args, rows=rows: rows.append(args[0].detach()))
        try:
            for b in data:
                model(**b)
        finally:
            hook.remove()
        A = torch.cat([real(b, a) for b, a in zip(data, rows, strict=True)]).double().numpy()
        Y = A @ down.weight.detach().double().numpy().T
        kept = report.units[i].kept
        bias = down.bias is not None  # an intercept where the down projection has a bias (Pixtral's has none)
        design = np.hstack([A[:, kept], np.ones((len(A), 1))]) if bias else A[:, kept]
        sol = np.linalg.lstsq(design, Y, rcond=None)[0]
        new = get(blocks_of(pruned)[i], LAYOUTS[name][3])
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:len(kept)].T, atol=2e-4, rtol=1e-3)
        if bias:
            np.testing.assert_allclose(new.bias.detach().double().numpy(), down.bias.detach().double().numpy()
                                       + sol[-1], atol=2e-4, rtol=1e-3)
        else:
            assert new.bias is None


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_save_and_reload(tmp_path, name: str) -> None:
    model, data = build(name), batches(name)
    pruned, _ = prune_transformer(model, data, keep={0: 0.5}, target=target_for(name, "all", model, data),
                                  method="asym")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert type(back) is type(model)
    for b in data:
        torch.testing.assert_close(out(back, b), out(pruned, b), atol=1e-6, rtol=1e-6)


def test_mpnet_keeps_the_position_bias_of_its_heads() -> None:
    """Only blocks that lose heads carry kept_heads and the hook; pruning twice composes the head indices."""
    model, data = build("mpnet"), batches("mpnet")
    once, rep = prune_transformer(model, data, keep={0: 0.75}, target="heads", method="magnitude", reweight=False)
    attn = [blk.attention.attn for blk in blocks_of(once)]
    assert attn[0].kept_heads.tolist() == rep.units[0].kept and len(attn[0]._forward_pre_hooks) == 1
    assert not hasattr(attn[1], "kept_heads") and not attn[1]._forward_pre_hooks
    twice, rep2 = prune_transformer(once, data, keep={0: 2 / 3}, target="heads", method="magnitude", reweight=False)
    first = blocks_of(twice)[0].attention.attn
    assert first.kept_heads.tolist() == [rep.units[0].kept[i] for i in rep2.units[0].kept]
    assert len(first._forward_pre_hooks) == 1
    masked = copy.deepcopy(model)
    gone = sorted(set(range(HEADS)) - set(first.kept_heads.tolist()))
    hd = HIDDEN // HEADS
    with torch.no_grad():
        blocks_of(masked)[0].attention.attn.o.weight[:, [h * hd + i for h in gone for i in range(hd)]] = 0.0
    for b in data:
        torch.testing.assert_close(out(twice, b), out(masked, b), atol=1e-5, rtol=1e-5)


class _ScaledMLP(nn.Module):
    """A ViT MLP with a layer scale after fc2 (as in DINOv2 / CaiT): the ViT layout, not its computation."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = mlp.fc1, mlp.fc2, nn.GELU()
        self.scale = nn.Parameter(torch.full((HIDDEN,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.act(self.fc1(x)))


class _ScaledOutput(nn.Module):
    """ViT's FFN output module before transformers 5.9 (``dense(h) + x``) with a layer scale on ``dense``."""

    def __init__(self, out: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout = out.dense, out.dropout
        self.scale = nn.Parameter(torch.full((HIDDEN,), 0.5))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.dense(h) + x


class _GatedOutput(nn.Module):
    """A BERT output whose residual sum is gated: BertOutput's parts, not its computation."""

    def __init__(self, out: nn.Module) -> None:
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = out.dense, out.LayerNorm, out.dropout

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(0.5 * self.dense(h) + x)


@pytest.mark.parametrize("target", ["ffn", "heads"])
def test_look_alike_layers_that_compute_otherwise_are_refused(target: str) -> None:
    vit, vit_data = build("vit"), batches("vit")
    if hasattr(blocks_of(vit)[1], "mlp"):
        blocks_of(vit)[1].mlp = _ScaledMLP(blocks_of(vit)[1].mlp)
    else:  # the layout before transformers 5.9
        blocks_of(vit)[1].output = _ScaledOutput(blocks_of(vit)[1].output)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTER, max_position_embeddings=32)).eval()
    bert.encoder.layer[0].output = _GatedOutput(bert.encoder.layer[0].output)
    for model, data, where in ((vit, vit_data, "the block output"),
                               (bert, batches("mpnet"), "the input of the LayerNorm after it")):
        if target == "heads":  # the attention is plain: heads are fine
            prune_transformer(model, data, keep=0.5, target="heads")
            continue
        with pytest.raises(ValueError, match=f"does not compute like one: its down projection's output plus the "
                                             f"residual is not {where}"):
            prune_transformer(model, data, keep=0.5, target="ffn")
    if target == "heads":  # an attention whose output is scaled before the residual sum
        vit = build("vit")
        attention = blocks_of(vit)[0].attention
        plain = type(attention)

        class Scaled(plain):
            def forward(self, *args, **kwargs):
                out = plain.forward(self, *args, **kwargs)  # a tensor or a tuple, by transformers version
                return 0.5 * out if isinstance(out, torch.Tensor) else (0.5 * out[0], *out[1:])

        attention.__class__ = Scaled
        with pytest.raises(ValueError, match="attention output projection's output plus the residual is not the "
                                             "residual stream entering the FFN"):
            prune_transformer(vit, vit_data, keep=0.5, target="heads")


@pytest.mark.parametrize("target", ["ffn", "heads"])
def test_mobilebert_whose_sublayers_leave_the_residual_width_is_refused(target: str) -> None:
    """MobileBERT has BERT's part names, but its attention output and FFN write into a bottleneck narrower than the
    residual stream, so a consumer's output cannot even be added to the residual it is recognised by: a ValueError
    naming the layout, not an error from inside the shape arithmetic."""
    torch.manual_seed(0)
    model = transformers.MobileBertModel(transformers.MobileBertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, embedding_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=32)).eval()
    consumer = "down projection" if target == "ffn" else "attention output projection"
    with pytest.raises(ValueError, match=f"MobileBertLayer.*does not compute like one: its {consumer}'s output"):
        prune_transformer(model, batches("mpnet"), keep=0.5, target=target)


def test_mpnet_calibrated_on_token_ids_alone() -> None:
    # The per-head position bias the encoder passes to every layer is (batch, heads, tokens, tokens), the shape of
    # an attention mask: it was read as one, and every token counted as padding.
    model = build("mpnet")
    ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    for batch in (ids, {"input_ids": ids}):
        _, report = prune_transformer(model, [batch], keep=0.5, target="all")
        assert report.n_tokens == 32 and report.n_padding_excluded == 0


def _tiny(cls: str, config: str, **kw) -> nn.Module:
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, config)(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER, **kw)).eval()


@pytest.mark.parametrize(("model", "batch", "match"), [
    # GroupViT text: the attention reshapes its output to the model width
    (lambda: _tiny("GroupViTTextModel", "GroupViTTextConfig", vocab_size=VOCAB, max_position_embeddings=32),
     {"input_ids": torch.randint(3, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
     "fails once a head is removed"),
    # MLCD: the output projection reads (tokens, batch, features)
    (lambda: _tiny("MLCDVisionModel", "MLCDVisionConfig", image_size=16, patch_size=4),
     {"pixel_values": torch.randn(4, 3, 16, 16)}, r"does not have the \(batch, tokens\) = \(4, 17\) layout"),
])
def test_look_alike_attentions_are_refused_for_heads(model, batch, match) -> None:
    m = model()
    assert find_blocks(m)  # recognised by their parts...
    for method, reweight in (("magnitude", False), ("asym", True)):  # ...whether or not the pruning needs data
        if match.startswith("does not have") and not reweight:
            continue  # without data nothing reads the activations: magnitude pruning of MLCD's heads is right
        with pytest.raises(ValueError, match=match):
            prune_transformer(m, [batch], keep=0.5, target="heads", method=method, reweight=reweight)


def test_two_towers_are_pruned_one_at_a_time() -> None:
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=INTER),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, intermediate_size=INTER))
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 8)), "pixel_values": torch.randn(2, 3, 16, 16)}
    with pytest.raises(ValueError, match="2 stacks of blocks .*prune_transformer\\(model.text_model"):
        prune_transformer(model, [batch], keep=0.5, target="ffn")
    text, _ = prune_transformer(model.text_model, [{"input_ids": batch["input_ids"]}], keep=0.5, target="ffn")
    vision, _ = prune_transformer(model.vision_model, [{"pixel_values": batch["pixel_values"]}], keep=0.5,
                                  target="ffn")
    model.text_model, model.vision_model = text, vision
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits_per_image).all()


def test_head_pruning_without_data_is_refused_with_the_reason() -> None:
    model = build("distilbert")
    for data in (None, []):
        with pytest.raises(ValueError, match="checks each block's head layout on one calibration batch"):
            prune_transformer(model, data, keep=0.5, target="heads", method="magnitude", reweight=False)
        prune_transformer(model, data, keep=0.5, target="ffn", method="magnitude", reweight=False)  # no check


def test_dinov2_asym_refit_aims_at_the_residual_sum_through_the_layer_scale() -> None:
    """Block 1's FFN refit in asym mode: on the pruned network's inputs, the down projection's output times lambda
    plus the pruned residual should give the original sum, i.e. target = y + (r_orig - r_pruned) / lambda."""
    model, data = build("dinov2"), batches("dinov2")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none")
    mixed = copy.deepcopy(model)
    mixed.encoder.layer[0] = copy.deepcopy(pruned.encoder.layer[0])

    def rows(net: nn.Module) -> dict[str, np.ndarray]:
        layer, seen = net.encoder.layer[1], {"a": [], "r": []}
        hooks = [layer.mlp.fc2.register_forward_pre_hook(lambda _m, args: seen["a"].append(args[0])),
                 layer.norm2.register_forward_pre_hook(lambda _m, args: seen["r"].append(args[0]))]
        try:
            for b in data:
                net(**b)
        finally:
            for h in hooks:
                h.remove()
        return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double().numpy() for k, v in seen.items()}

    with torch.no_grad():
        orig, mine = rows(model), rows(mixed)
    down = model.encoder.layer[1].mlp.fc2
    lam = model.encoder.layer[1].layer_scale2.lambda1.detach().double().numpy()
    y = orig["a"] @ down.weight.detach().double().numpy().T + down.bias.detach().double().numpy()
    target = y + (orig["r"] - mine["r"]) / lam
    kept = report.units[1].kept
    design = np.hstack([mine["a"][:, kept], np.ones((len(target), 1))])
    sol = np.linalg.lstsq(design, target, rcond=None)[0]
    new = pruned.encoder.layer[1].mlp.fc2
    np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(new.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dinov2_with_small_layer_scales(dtype: torch.dtype) -> None:
    """Pruning block 0 only: nothing upstream changed, so the residual-corrected asym target equals the plain one
    and residual=True must select and refit as residual=False (the target used to be formed in half precision,
    where (y + r / lambda) - r / lambda loses y, and 1 / lambda overflowed float16)."""
    model = build("dinov2")
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.fill_(1e-3)
            layer.layer_scale2.lambda1.fill_(1e-5)
    model = model.to(dtype)
    data = [{"pixel_values": b["pixel_values"].to(dtype)} for b in batches("dinov2")]
    for target, consumer in (("ffn", LAYOUTS["dinov2"][3]), ("heads", LAYOUTS["dinov2"][4])):
        # one stage: its residual is unchanged
        runs = [prune_transformer(model, data, keep={0: 0.5}, target=target, method="asym", ridge=0.0,
                                  residual=r) for r in (True, False)]
        (p_res, r_res), (p_plain, r_plain) = runs
        assert [u.kept for u in r_res.units] == [u.kept for u in r_plain.units]
        torch.testing.assert_close(get(p_res.encoder.layer[0], consumer).weight,
                                   get(p_plain.encoder.layer[0], consumer).weight)
    prune_transformer(model, data, keep=0.5, target="all", method="asym")  # every block: finite, no overflow


def test_block_forwards_count_the_head_layout_checks_without_data_statistics() -> None:
    for n_layers in (1, 2, 4):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=INTER, batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False).eval()
        _, rep = prune_transformer(model, [torch.randn(3, 5, HIDDEN)], keep=0.5, target="heads", method="magnitude",
                                   reweight=False)
        assert rep.block_forwards == 3 * n_layers  # the chain's full forward and two per block for the check


def test_clip_heads_are_refused_where_the_attention_reshapes_to_the_model_width(monkeypatch, tmp_path) -> None:
    """CLIPAttention before transformers 5.0 reshapes its output to the model width, which fewer heads cannot fill:
    head pruning names the version to upgrade to (FFN pruning works), and the layout check refuses it too."""
    from nn_adapters import _transformer_blocks
    from nn_adapters._transformer_blocks import _HFCLIPBlock

    model, data = build("clip_text"), batches("clip_text")
    pruned_heads = None
    if not TRANSFORMERS_4:
        pruned_heads, _ = prune_transformer(model, data, keep={0: 0.5}, target="heads")
        save_pruned(pruned_heads, tmp_path / "m")
    monkeypatch.setattr(_transformer_blocks, "_transformers_version", lambda: "4.57.6")
    with pytest.raises(ValueError, match=r"CLIPAttention in transformers 4\.57\.6 reshapes the attention output to the "
                                         r"model width.*Upgrade transformers to >= 5\.0.*target='ffn'"):
        prune_transformer(model, data, keep=0.5, target="all")
    if pruned_heads is not None:  # a checkpoint with fewer heads would not run there either
        with pytest.raises(ValueError, match="reshapes the attention output to the model width"):
            load_pruned(tmp_path / "m")
    _, report = prune_transformer(model, data, keep=0.5, target="ffn")
    assert [u.n_kept for u in report.units] == [INTER // 2] * LAYERS
    monkeypatch.undo()
    monkeypatch.setattr(_HFCLIPBlock, "WIDTH_FREE_SINCE", {})  # without the version table, the layout check...
    if TRANSFORMERS_4:
        with pytest.raises(ValueError, match="fails once a head is removed"):  # ...refuses the old attention
            prune_transformer(model, data, keep=0.5, target="heads")
    else:
        prune_transformer(model, data, keep=0.5, target="heads")


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_dinov2_baselines_score_the_weights_times_the_layer_scale(method: str) -> None:
    """DINOv2's layer scale multiplies the FFN output channel by channel: magnitude and Wanda-style scores read the
    down projection's weights as they reach the residual stream, lambda_i * W_ij. Oracle: the scores computed
    here from the parameters (and, for Wanda, from fc2 inputs captured with a hook)."""
    model, data = build("dinov2"), batches("dinov2")
    layer = blocks_of(model)[0]
    with torch.no_grad():  # very unequal scales, so that raw and scaled weights rank the units differently
        spread = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
        layer.layer_scale2.lambda1.copy_(torch.exp(3.0 * spread))
    up, down = get(layer, "mlp.fc1|intermediate.dense"), get(layer, LAYOUTS["dinov2"][3])
    lam = layer.layer_scale2.lambda1.detach().double().view(-1, 1)
    w, w_scaled = down.weight.detach().double(), down.weight.detach().double() * lam
    if method == "magnitude":
        producer = up.weight.detach().double().pow(2).sum(1) + up.bias.detach().double().pow(2)
        scores, raw = ((producer + m.pow(2).sum(0)) / 2 for m in (w_scaled, w))
    else:
        seen = []
        hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for b in data:
                model(**b)
        hook.remove()
        norms = torch.cat(seen).double().pow(2).sum(0).sqrt()
        scores, raw = (m.abs().sum(0) * norms for m in (w_scaled, w))
    n = scores.numel()
    want = sorted(torch.argsort(scores, descending=True)[: n // 2].tolist())
    assert want != sorted(torch.argsort(raw, descending=True)[: n // 2].tolist())  # the scale matters here
    _, report = prune_transformer(model, data, keep={0: 0.5}, target="ffn", method=method, reweight=False)
    assert sorted(report.units[0].kept) == want


def test_beit_with_a_relative_position_bias_shared_by_all_layers_refuses_heads() -> None:
    """The model builds one bias of every head for all layers (use_shared_relative_position_bias): one layer cannot
    lose heads, which the first-batch head check finds; the FFN is pruned (either layout of BEiT)."""
    torch.manual_seed(0)
    model = transformers.BeitModel(transformers.BeitConfig(
        image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTER, use_shared_relative_position_bias=True)).eval()
    with torch.no_grad():
        shared = getattr(model, "shared_position_bias", None) or model.encoder.relative_position_bias  # 5 / 4
        shared.relative_position_bias_table.normal_()
    data = batches("beit")
    with pytest.raises(ValueError, match=r"fails once a head is removed.*target='ffn'"):
        prune_transformer(model, data, keep=0.5, target="heads")
    _, report = prune_transformer(model, data, keep=0.5, target="ffn")
    assert [u.n_kept for u in report.units] == [INTER // 2] * LAYERS


def test_siglip2_patch_padding_is_read_from_the_blocks_mask() -> None:
    """SigLIP 2 (NaFlex) takes images as patch sequences padded to a common length, with ``pixel_attention_mask``
    marking the real patches (a name the pruner does not read): the padded patches are left out of the statistics
    through the mask the model hands its blocks, and pruning without refit is the model with the removed columns
    zeroed, on the real patches."""
    if not hasattr(transformers, "Siglip2VisionModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Siglip2VisionModel")
    torch.manual_seed(0)
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
        num_patches=16, patch_size=4)).eval()
    g = torch.Generator().manual_seed(1)
    real = torch.tensor([16, 12, 9])
    data = [{"pixel_values": torch.randn(3, 16, 48, generator=g),
             "pixel_attention_mask": (torch.arange(16).view(1, -1) < real.view(-1, 1)).long(),
             "spatial_shapes": torch.tensor([[4, 4], [3, 4], [3, 3]])} for _ in range(2)]
    _, report = prune_transformer(model, data, keep=0.5, target="all")
    assert (report.n_tokens, report.n_padding_excluded) == (2 * 37, 2 * (48 - 37))
    for target, path in (("ffn", "mlp.fc2"), ("heads", "self_attn.out_proj")):
        pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="magnitude", reweight=False)
        zeroed = copy.deepcopy(model)
        hd = HIDDEN // HEADS
        for u in report.units:
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            cols = gone if target == "ffn" else [h * hd + i for h in gone for i in range(hd)]
            with torch.no_grad():
                zeroed.get_submodule(u.block).get_submodule(path).weight[:, cols] = 0.0
        for b in data:
            mask = b["pixel_attention_mask"].bool()
            with torch.no_grad():
                got, want = pruned(**b).last_hidden_state[mask], zeroed(**b).last_hidden_state[mask]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_blocks_that_take_their_tokens_first_are_refused_with_the_reason() -> None:
    """FSMT's layers have BART's parts but take (tokens, batch, features): the batch's (batch, tokens) mask cannot
    be laid on them, which the refusal says (rather than a shape mismatch without a reason)."""
    torch.manual_seed(0)
    model = transformers.FSMTModel(transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTER,
        decoder_ffn_dim=INTER, max_position_embeddings=32, pad_token_id=0)).eval()
    data = [dict(b, decoder_input_ids=b["input_ids"][:, :6]) for b in batches("mpnet", n_batches=2)]
    with pytest.raises(ValueError, match=r"\(tokens, batch, features\), \(10, 6, 16\).*is not supported"):
        prune_transformer(model, data, keep=0.5, target="ffn")


def test_deberta_refit_weighs_tokens_through_its_own_layernorm() -> None:
    """DeBERTa's LayerNorm after the FFN's sum is a module of its own (DebertaLayerNorm, ``variance_epsilon``): the
    LayerNorm weighting must read it like nn.LayerNorm, i.e. the refit is least squares with token ``t`` weighted by
    ``1 / (var_t(sum) + eps)``, written out here from activations hooked in the model's forward."""
    model, data = build("deberta"), batches("deberta")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="layernorm")
    for i, block in enumerate(blocks_of(model)):
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = block.output.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append((args[0].detach(), args[1].detach())))
        try:
            for b in data:
                model(**b)
        finally:
            hook.remove()
        A = torch.cat([real(b, a) for b, (a, _) in zip(data, seen, strict=True)]).double().numpy()
        R = torch.cat([real(b, r) for b, (_, r) in zip(data, seen, strict=True)]).double().numpy()
        W, bias = block.output.dense.weight.detach().double().numpy(), block.output.dense.bias.detach().double().numpy()
        Y = A @ W.T
        w = 1.0 / ((Y + bias + R).var(axis=1) + block.output.LayerNorm.variance_epsilon)
        kept = report.units[i].kept
        design = np.hstack([A[:, kept], np.ones((len(A), 1))]) * np.sqrt(w)[:, None]
        sol = np.linalg.lstsq(design, Y * np.sqrt(w)[:, None], rcond=None)[0]
        new = blocks_of(pruned)[i].output.dense
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), bias + sol[-1], atol=2e-4, rtol=1e-3)


def test_deberta_talking_heads_are_refused_for_heads() -> None:
    """DeBERTa's talking heads mix the heads' attention scores (head_logits_proj, head_weights_proj): a head cannot
    go alone, so head pruning is refused with what to do, and the FFN is pruned."""
    torch.manual_seed(0)
    cfg = transformers.DebertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=INTER, talking_head=True)
    model = transformers.DebertaModel(cfg).eval()
    data = batches("deberta")
    with pytest.raises(ValueError, match=r"talking heads.*target='ffn'"):
        prune_transformer(model, data, keep=0.5, target="heads")
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", reweight=False)
    assert [u.n_kept for u in report.units] == [INTER // 2] * LAYERS
    assert report.params_after < report.params_before


def test_modernbert_layers_get_masks_of_their_own() -> None:
    """The premise of the ModernBERT cases above: the sliding-window layer sees other tokens than the global one,
    so a replay of it with the global layer's mask would not give the model's outputs."""
    model = build("modernbert")
    masks = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, k: masks.append(k["attention_mask"]), with_kwargs=True)
               for m in blocks_of(model)]
    try:
        out(model, batches("modernbert")[0])
    finally:
        for h in handles:
            h.remove()
    assert len(masks) == LAYERS and not torch.equal(masks[0], masks[1])


class _Mixer(nn.Module):
    """A layer the adapter does not recognise, called like an encoder layer (a stand-in for a hybrid model's
    state-space or linear-attention layer): ``x + tanh(linear(x))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return src + torch.tanh(self.mix(src))


def _encoder_with_a_mixer(at: int) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=INTER, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False).eval()
    encoder.layers[at] = _Mixer(HIDDEN)
    return encoder


def test_unrecognised_layers_after_the_blocks_are_left_whole_and_reported() -> None:
    encoder, x = _encoder_with_a_mixer(2), torch.randn(4, 6, HIDDEN)
    with pytest.warns(UserWarning, match=r"1 of the 3 layers .* not recognised and are left whole: layers\.2 "
                                         r"\(_Mixer\)"):
        pruned, report = prune_transformer(encoder, [x], keep=0.5)
    assert report.skipped == [("layers.2", "_Mixer is not a transformer block the adapter recognises (left whole)")]
    assert [u.block for u in report.units] == ["layers.0", "layers.1"]
    assert pruned.layers[2].mix.weight.equal(encoder.layers[2].mix.weight)
    assert "skipped layers.2: _Mixer" in report.summary()
    assert report.to_dict()["skipped"] == [("layers.2", report.skipped[0][1])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stack whose layers are all recognised says nothing
        assert prune_transformer(nn.TransformerEncoder(
            nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=INTER, batch_first=True, dropout=0.0),
            num_layers=2, enable_nested_tensor=False).eval(), [x], keep=0.5)[1].skipped == []


@pytest.mark.parametrize("method", ["asym", "layer"])
def test_an_unrecognised_layer_between_blocks_is_run_as_it_is(method: str) -> None:
    """The block after an unrecognised layer is pruned on what really reaches it: the refit of its FFN is the least
    squares fit (with an intercept: ``linear2`` has a bias) of the UNPRUNED model's ``linear2`` outputs on the
    ``linear2`` inputs (kept neurons) captured by a hook in a forward of the pruned model (asym) or of the unpruned
    model (layer), both forwards running the mixer between the blocks as the model does."""
    from _torch_helpers import captured_input

    encoder, x = _encoder_with_a_mixer(1), torch.randn(4, 6, HIDDEN)
    with pytest.warns(UserWarning, match=r"not recognised and are left whole: layers\.1 \(_Mixer\)"):
        pruned, report = prune_transformer(encoder, [x[:2], x[2:]], keep=0.5, target="ffn", method=method,
                                           ridge=0.0, weighting="none", residual=False)
    assert [u.block for u in report.units] == ["layers.0", "layers.2"]
    assert report.skipped == [("layers.1", "_Mixer is not a transformer block the adapter recognises (left whole)")]
    assert pruned.layers[1].mix.weight.equal(encoder.layers[1].mix.weight)
    unit = report.units[1]
    mine, theirs = pruned.layers[2].linear2, encoder.layers[2].linear2
    seen = captured_input(encoder, theirs, x).reshape(-1, INTER)
    a = captured_input(pruned, mine, x).reshape(-1, unit.n_kept) if method == "asym" else seen[:, unit.kept]
    with torch.no_grad():
        y = theirs(seen).double().numpy()
    design = np.hstack([a.double().numpy(), np.ones((len(a), 1))])
    want = np.linalg.lstsq(design, y, rcond=None)[0]
    got = np.vstack([mine.weight.detach().double().numpy().T, mine.bias.detach().double().numpy()])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    # the mixer matters: without it, the second block's inputs (and so its fit) would be others
    assert not np.allclose(captured_input(encoder, encoder.layers[1], x).numpy(),
                           captured_input(encoder, encoder.layers[2], x).numpy(), atol=1e-3)


class _NoisyMixer(_Mixer):
    """An unrecognised layer whose output is not a function of its input (noise added at every call)."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return super().forward(src) + 0.1 * torch.randn_like(src)


def test_an_unrecognised_layer_between_blocks_that_does_not_chain_is_named_in_the_refusal() -> None:
    encoder, x = _encoder_with_a_mixer(1), torch.randn(4, 6, HIDDEN)
    encoder.layers[1] = _NoisyMixer(HIDDEN)
    with pytest.warns(UserWarning, match="not recognised"), pytest.raises(
            ValueError, match=r"'layers\.2' does not receive the previous block's output.*The layers between it and "
                              r"the previous block \(layers\.1\) are not recognised and were run as they are"):
        prune_transformer(encoder, [x], keep=0.5)


def test_heads_whose_rows_cannot_be_cut_are_refused_with_the_reason(monkeypatch) -> None:
    """Cutting a head's rows can fail before any forward (projections of other widths than the layout assumes, as
    MiMo-V2-Flash's values were before ``v_head_dim`` was read): the first-batch check says so in a ValueError
    that names the block and the failure, not with the bare IndexError."""
    from nn_adapters import _transformer_blocks

    model = _tiny("BertModel", "BertConfig", vocab_size=VOCAB)
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    prune_transformer(model, [batch], keep=0.5, target="heads")  # the real layout is pruned

    def uncuttable(self, keep, out_weight=None, out_bias=None):
        raise IndexError("index 16 is out of bounds for dimension 0 with size 16")

    monkeypatch.setattr(_transformer_blocks._HFBertBlock, "shrink_heads", uncuttable)
    with pytest.raises(ValueError, match=r"block 'encoder\.layer\.0' \(BertLayer\) has the parts of a hf_bert "
                                         r"block, but it fails once a head is removed \(IndexError: index 16"):
        prune_transformer(model, [batch], keep=0.5, target="heads")
