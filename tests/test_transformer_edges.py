"""Transformer pruning at the edges a practitioner meets: fully masked attention rows, all-padding sequences, saved
specs that do not fit the model they are loaded into. Tiny randomly initialised models (no download).

Oracles: torch.nn.MultiheadAttention and the unpruned encoder (outputs), the same calibration data without the
added padding (statistics), and the loaded model's own sizes (specs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nn_adapters.transformer import SPEC_FILE, PrunedMultiheadAttention, load_pruned, prune_transformer, save_pruned

D, HEADS, FF, T = 16, 4, 32, 6


def encoder(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


# ----------------------------------------------------------------------------------------------------------------
# attention rows that see no key


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_attention_gives_zeros_where_multihead_attention_does(batch_first: bool) -> None:
    """Without weights (what nn.TransformerEncoderLayer asks for), MultiheadAttention returns the output
    projection's bias for a query that sees no key; an explicit softmax gives NaN there."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first).eval()
    pm = PrunedMultiheadAttention.from_multihead_attention(mha).eval()
    x = torch.randn(3, T, D) if batch_first else torch.randn(T, 3, D)
    kpm = torch.zeros(3, T, dtype=torch.bool)
    kpm[1] = True  # an all-padding sequence
    kpm[2, :2] = True
    causal = nn.Transformer.generate_square_subsequent_mask(T)  # with left padding: padded queries see no key
    want = mha(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=False)[0]
    got, weights = pm(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
    assert weights is None and bool(want.isfinite().all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_left_padded_causal_encoder_loses_heads_like_zeroed_output_columns() -> None:
    """Left padding under a causal mask: the padded positions see no key. Head pruning swaps in the pruned attention
    while it works; it failed with 'non-finite activations' (NaN at the padded positions became NaN keys of the
    next layer). Without refit, the pruned encoder must compute the original one with the removed heads' columns
    of the output projection zeroed (on the slow path: torch's fused fast path itself gives NaN here)."""
    model = encoder()
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    g = torch.Generator().manual_seed(1)

    def batch() -> dict:
        kpm = torch.zeros(4, T, dtype=torch.bool)
        kpm[0, :2] = True
        kpm[1, :1] = True
        return {"src": torch.randn(4, T, D, generator=g), "src_key_padding_mask": kpm, "mask": causal,
                "is_causal": True}

    data = [batch() for _ in range(3)]
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", reweight=False)
    zeroed = copy.deepcopy(model)
    for layer, unit in zip(zeroed.layers, report.units, strict=True):
        gone = [h for h in range(HEADS) if h not in unit.kept]
        with torch.no_grad():
            for h in gone:
                layer.self_attn.out_proj.weight[:, h * (D // HEADS):(h + 1) * (D // HEADS)] = 0.0
    test = batch()
    real = ~test["src_key_padding_mask"]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            want, got = zeroed(**test)[real], pruned(**test)[real]
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    assert bool(want.isfinite().all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# padding never changes the result


def test_an_all_padding_sequence_changes_nothing() -> None:
    """A sequence that is all padding adds no token: the kept units, the cross-validated ridges and every error
    must be those of the same calibration data without it (it used to take a cross-validation fold of its own and
    shift the folds of every later sequence)."""
    model = encoder()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, T, D, generator=g) for _ in range(4)]
    real = torch.zeros(4, T, dtype=torch.bool)
    plain = [{"src": x, "src_key_padding_mask": real} for x in xs]
    padded = [dict(b) for b in plain]
    padded[0] = {"src": torch.cat([xs[0], torch.randn(1, T, D, generator=g)]),  # the fifth sequence: all padding
                 "src_key_padding_mask": torch.cat([real, torch.ones(1, T, dtype=torch.bool)])}
    for target in ("ffn", "heads"):
        _, want = prune_transformer(model, plain, keep=0.5, target=target)
        _, got = prune_transformer(model, padded, keep=0.5, target=target)
        assert got.n_tokens == want.n_tokens and got.n_padding_excluded == T
        for u, v in zip(got.units, want.units, strict=True):
            assert u.kept == v.kept and u.ridge == v.ridge
            assert u.cv_relative_error == pytest.approx(v.cv_relative_error, rel=1e-9)
            assert u.relative_error == pytest.approx(v.relative_error, rel=1e-9)


class _TorchConventionWrapper(nn.Module):
    """A wrapper whose ``forward(x, attention_mask)`` passes the mask on as it is: True marks padding (torch's
    convention for src_key_padding_mask, the opposite of a tokenizer's attention_mask)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(x, src_key_padding_mask=attention_mask)


def test_the_padding_the_blocks_apply_wins_over_the_batch_key_name() -> None:
    """Statistics must come from the tokens the encoder's attention treats as real: the batch's 'attention_mask'
    was read in the tokenizer convention even when the model passes it on as a padding mask (True = padding),
    so only the padding entered the statistics."""
    model = encoder()
    g = torch.Generator().manual_seed(4)
    plain, wrapped = [], []
    for _ in range(3):
        pad = torch.zeros(4, T, dtype=torch.bool)
        pad[:, 4:] = True
        pad[0, 1:] = True
        x = torch.randn(4, T, D, generator=g)
        plain.append({"src": x, "src_key_padding_mask": pad})
        wrapped.append({"x": x, "attention_mask": pad})
    _, want = prune_transformer(model, plain, keep=0.5)
    _, got = prune_transformer(_TorchConventionWrapper(model), wrapped, keep=0.5)
    n_real = sum(int((~b["src_key_padding_mask"]).sum()) for b in plain)
    assert got.n_tokens == want.n_tokens == n_real
    assert [u.kept for u in got.units] == [u.kept for u in want.units]
    assert [u.relative_error for u in got.units] == pytest.approx([u.relative_error for u in want.units], rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# loading a saved pruned model into the wrong model, or from a damaged spec


def tel(norm_first: bool = False, ff: int = FF, d: int = D, heads: int = HEADS) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.fixture
def saved(tmp_path):
    g = torch.Generator().manual_seed(2)
    pruned, _ = prune_transformer(tel(), [torch.randn(4, T, D, generator=g) for _ in range(3)], keep=0.5,
                                  target="all")
    return save_pruned(pruned, tmp_path / "pruned")


def test_loading_into_a_model_with_another_norm_placement_is_refused(saved) -> None:
    """norm_first does not change any weight's shape: the load used to succeed and compute something else."""
    assert isinstance(load_pruned(saved, tel()), nn.TransformerEncoder)
    with pytest.raises(ValueError, match="norm_first=False.*has True.*origin"):
        load_pruned(saved, tel(norm_first=True))


@pytest.mark.parametrize(("model", "match"), [
    (lambda: tel(ff=8), r"intermediate_size=16, the model's block 8.*origin"),  # was an IndexError
    (lambda: tel(d=32, heads=8), r"(?s)saved weights do not fit the model.*size mismatch.*origin"),  # a RuntimeError
])
def test_loading_into_a_model_of_another_size_names_the_mismatch(saved, model, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_pruned(saved, model())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: "{oops", r"submod_pruning\.json is not valid JSON"),
    (lambda s: s.replace('"num_heads": 2', '"num_heads": 9', 1), r"num_heads=9, the model's block 4"),
    (lambda s: s.replace('"intermediate_size": 16', '"intermediate_size": "16"', 1), "damaged pruning spec"),
    (lambda s: s.replace('"version": 1', '"version": 3'), "version 3: this release reads versions 1 to 2"),
    (lambda s: "[]", "not a pruning spec"),
])
def test_damaged_or_foreign_specs_are_refused_with_the_reason(saved, edit, match: str) -> None:
    spec = saved / SPEC_FILE
    spec.write_text(edit(spec.read_text()))
    with pytest.raises(ValueError, match=match):
        load_pruned(saved, tel())


# ----------------------------------------------------------------------------------------------------------------
# calibration data given as one pair instead of a list of batches


def test_one_pair_given_as_the_calibration_data_is_refused_not_read_as_two_batches() -> None:
    """prune(model, (ids, mask)) iterated the pair as two batches and fed the mask to the model as token ids: it
    ran, with the padding counted as tokens (and (inputs, labels) failed inside the model)."""
    model = encoder()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, T, D, generator=g)
    pad = torch.zeros(4, T, dtype=torch.bool)
    pad[1, 3:] = True
    ids = torch.randint(3, 40, (4, T), generator=g)
    for data, what in [((ids, (~pad).long()), r"\(input_ids, attention_mask\)"),
                       ((x, torch.zeros(4, dtype=torch.long)), r"\(inputs, labels\)"),
                       ([x, pad], r"\(features, key padding mask\)")]:
        with pytest.raises(ValueError, match=rf"calibration_data looks like one batch {what}.*list of batches"):
            prune_transformer(model, data, keep=0.5)
    # two batches of inputs, or one pair inside a list, are what they are
    _, two = prune_transformer(model, [x, x[:2]], keep=0.5)
    _, wrapped = prune_transformer(model, [(x, torch.zeros(4, dtype=torch.long))], keep=0.5)
    assert two.n_tokens == 6 * T and wrapped.n_tokens == 4 * T


# ----------------------------------------------------------------------------------------------------------------
# per-head attention masks (batch * heads, T, T)


def per_head_batches(n: int = 3, b: int = 4, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Additive per-head masks of the original head count (a different bias for every head and sequence), with
    some key padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        kpm = torch.zeros(b, T, dtype=torch.bool)
        kpm[1:, -2:] = True
        out.append({"src": torch.randn(b, T, D, generator=g), "mask": 2.0 * torch.randn(b * HEADS, T, T, generator=g),
                    "src_key_padding_mask": kpm})
    return out


def real_tokens(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Outputs at the real tokens, computed without PyTorch's fused encoder path: in torch 2.13 (CPU) that path
    returns NaN for an unpruned nn.TransformerEncoderLayer given a per-head 3-D float mask."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return model(**batch)[~batch["src_key_padding_mask"]]
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool padding, float mask
def test_per_head_masks_of_the_original_heads_apply_to_the_heads_kept(tmp_path) -> None:
    """A (batch * heads, T, T) attn_mask was refused as soon as a head was removed, headlined 'its attention lays
    out heads differently'. The pruned attention takes its own heads' slices of it, so (without refit) the pruned
    encoder computes what the original does with the removed heads' output projection columns zeroed; so does the
    reloaded one."""
    model, data = encoder(), per_head_batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="magnitude", reweight=False)
    masked = copy.deepcopy(model)
    hd = D // HEADS
    for unit in report.units:
        gone = sorted(set(range(HEADS)) - set(unit.kept))
        assert len(gone) == HEADS // 2
        with torch.no_grad():
            masked.get_submodule(unit.block).self_attn.out_proj.weight[:, [h * hd + i for h in gone
                                                                         for i in range(hd)]] = 0.0
    for b in data:
        torch.testing.assert_close(real_tokens(pruned, b), real_tokens(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(real_tokens(pruned, b), real_tokens(model, b), atol=1e-3)
    back = load_pruned(save_pruned(pruned, tmp_path / "m"), encoder(seed=3))
    for b in data:
        torch.testing.assert_close(real_tokens(back, b), real_tokens(pruned, b), atol=1e-6, rtol=1e-6)
    # a per-head mask for the kept heads themselves still works, and one for neither count says what to pass
    att = pruned.layers[0].self_attn
    x, m = data[0]["src"], data[0]["mask"].unflatten(0, (4, HEADS))
    with torch.no_grad():
        own = att(x, x, x, attn_mask=m[:, att.kept_heads].flatten(0, 1), need_weights=False)[0]
        torch.testing.assert_close(att(x, x, x, attn_mask=m.flatten(0, 1), need_weights=False)[0], own)
    with pytest.raises(ValueError, match=r"\(batch \* 4 original heads, tq, tk\) or \(batch \* 2, tq, tk\).*"
                                         r"2-D \(tq, tk\).*key_padding_mask"):
        att(x, x, x, attn_mask=m[:, :3].flatten(0, 1))


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool padding, float mask
def test_a_save_without_the_kept_heads_loads_and_asks_for_masks_of_its_own_heads(tmp_path) -> None:
    """Saves written before kept_heads was recorded still load; the original heads' masks cannot be mapped there,
    which the error says (instead of a missing-weight refusal)."""
    model, data = encoder(), per_head_batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="heads", method="magnitude", reweight=False)
    path = save_pruned(pruned, tmp_path / "m")
    weights = torch.load(path / "weights.pt", weights_only=True)
    torch.save({k: v for k, v in weights.items() if not k.endswith("kept_heads")}, path / "weights.pt")
    back = load_pruned(path, encoder())
    x = data[0]["src"]
    no_pad = {"src": x, "src_key_padding_mask": torch.zeros(4, T, dtype=torch.bool)}
    torch.testing.assert_close(real_tokens(back, no_pad), real_tokens(pruned, no_pad), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"for 4 heads, and this attention has 2 heads.*\(batch \* 2, tq, tk\)"):
        back.layers[0].self_attn(x, x, x, attn_mask=data[0]["mask"])
