"""Attention heads of CodeGen: query, key and value fused in ``qkv_proj`` in the layout of its 4-way model
parallelism (block ``p`` of the rows holds the queries, values and keys of heads ``p H/4 .. (p + 1) H/4 - 1``), so
every block must keep as many heads: heads are kept in multiples of 4, selected under a partition matroid.

Oracles: the CodeGen layout written out here from the model's forward (not from the adapter), the original model
with the removed heads' output-projection columns zeroed, forward selection under the quota written out with one
lstsq per candidate on the hooked rows of the output projection, and the head norms of the magnitude baseline
computed from that layout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import (
    assert_reloads_and_generates,
    hooked_rows,
    ragged_token_batches,
    real_token_states,
    zeroed_heads,
)

from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, LAYERS = 40, 32, 16, 2
HEAD_DIM, PARTS = HIDDEN // HEADS, 4
PER = HEADS // PARTS


def build(lm: bool = False) -> torch.nn.Module:
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=24,
                                     n_positions=32, rotary_dim=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = (transformers.CodeGenForCausalLM if lm else transformers.CodeGenModel)(cfg)
    with torch.no_grad():  # larger weights than the default init, so that the heads differ visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.h if hasattr(model, "h") else model.transformer.h)


def head_rows(h: int) -> list[int]:
    """The rows of qkv_proj that head ``h`` owns, read off CodeGen's forward: the projection is viewed as
    (..., 4, 3 * local) and split into query, value, key of width ``local = HIDDEN / 4`` each."""
    local = HIDDEN // PARTS
    p, i = divmod(h, PER)
    return [p * 3 * local + part * local + i * HEAD_DIM + j for part in range(3) for j in range(HEAD_DIM)]


def balanced(kept: list[int], per_part: int) -> bool:
    return np.bincount(np.asarray(kept) // PER, minlength=PARTS).tolist() == [per_part] * PARTS


@pytest.mark.parametrize("method", ["asym", "seq", "layer", "magnitude", "wanda", "random"])
@pytest.mark.parametrize(("keep", "per_part"), [(0.5, 2), (0.75, 3), (0.3, 2), (0.1, 1)])
def test_heads_are_kept_evenly_and_act_as_the_zeroed_original(method: str, keep: float, per_part: int) -> None:
    """Every method keeps as many heads in each model-parallel block (keep * 16 rounded up to a multiple of 4), and,
    without refit, the pruned model computes the original with the removed heads' out_proj columns zeroed; the
    attention's head count and width follow."""
    model, data = build(), ragged_token_batches(VOCAB, 3)
    pruned, report = prune_transformer(model, data, keep=keep, target="heads", method=method, reweight=False)
    heads = [u for u in report.units if u.stage == "heads"]
    assert len(heads) == LAYERS and all(u.n_kept == PARTS * per_part and balanced(u.kept, per_part) for u in heads)
    zeroed = zeroed_heads(model, report, HEAD_DIM, out_proj="attn.out_proj")
    for b in data:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-5, rtol=1e-5)
    for layer in blocks(pruned):
        attn = layer.attn
        assert attn.num_attention_heads * HEAD_DIM == attn.embed_dim == attn.out_proj.in_features
        assert attn.qkv_proj.out_features == 3 * attn.embed_dim


def test_the_kept_rows_are_those_of_the_kept_heads_in_the_fused_layout() -> None:
    """The pruned qkv_proj holds, block by block, the query, value and key rows of its kept heads (the layout of
    the forward with the smaller width), taken from the original projection."""
    model, data = build(), ragged_token_batches(VOCAB, 2)
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="random", reweight=False)
    for layer, new, u in zip(blocks(model), blocks(pruned), [u for u in report.units if u.stage == "heads"],
                             strict=True):
        kept = np.asarray(u.kept)
        want = []
        for p in range(PARTS):
            mine = kept[kept // PER == p]
            for part in range(3):  # query, value, key
                want += [head_rows(h)[part * HEAD_DIM:(part + 1) * HEAD_DIM] for h in mine]
        torch.testing.assert_close(new.attn.qkv_proj.weight, layer.attn.qkv_proj.weight[np.concatenate(want)])


def test_layer_mode_selection_is_forward_selection_under_the_quota() -> None:
    """In layer mode with ridge 0, the heads kept in the first block are those of forward selection under the
    quota of 2 heads a model-parallel block, on the output projection's hooked input rows (real tokens) with the
    unpruned output as target: at each step the head of largest exact gain among the blocks not yet full (one
    lstsq per candidate)."""
    model, data = build(), ragged_token_batches(VOCAB, 4)
    _, report = prune_transformer(model, data, keep=0.5, target="heads", method="layer", reweight=False, ridge=0.0)
    first = blocks(model)[0]
    a = hooked_rows(model, data, first.attn.out_proj, lambda b, x: x[b["attention_mask"].bool()])
    y = a @ first.attn.out_proj.weight.detach().double().numpy().T

    def value(heads: list[int]) -> float:
        if not heads:
            return 0.0
        cols = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])
        m = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
        return float((y ** 2).sum() - ((y - a[:, cols] @ m) ** 2).sum())

    chosen: list[int] = []
    for _ in range(PARTS * 2):
        full = {p for p in range(PARTS) if sum(h // PER == p for h in chosen) >= 2}
        gains = {h: value([*chosen, h]) for h in range(HEADS) if h not in chosen and h // PER not in full}
        chosen.append(max(gains, key=lambda h: (gains[h], -h)))
    assert report.units[0].kept == sorted(chosen)


def test_magnitude_keeps_the_heads_of_largest_norm_in_each_block() -> None:
    """The magnitude baseline's head score, the mean of the squared norms of the head's query, key, value rows and
    output-projection columns (rows found from CodeGen's layout here), ranks the heads within each block."""
    model, data = build(), ragged_token_batches(VOCAB, 2)
    _, report = prune_transformer(model, data, keep=0.5, target="heads", method="magnitude", reweight=False)
    for layer, u in zip(blocks(model), [u for u in report.units if u.stage == "heads"], strict=True):
        qkv, o = layer.attn.qkv_proj.weight.detach().double(), layer.attn.out_proj.weight.detach().double()
        score = np.array([float(qkv[head_rows(h)].pow(2).sum() + o[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].pow(2).sum())
                          for h in range(HEADS)])
        want = sorted(p * PER + i for p in range(PARTS) for i in np.argsort(-score[p * PER:(p + 1) * PER])[:2])
        assert u.kept == want


def test_the_refit_lowers_the_error_and_the_model_reloads_and_generates(tmp_path) -> None:
    """asym with refit is closer to the original on the calibration tokens than without; the pruned causal LM
    saves, reloads from its config (the heads spread evenly over the blocks) and generates with its cache."""
    model, data = build(lm=True), ragged_token_batches(VOCAB, 4)
    base = build()
    base.load_state_dict(model.transformer.state_dict())
    errs = []
    for reweight in (False, True):
        pruned, _ = prune_transformer(base, data, keep=0.5, target="all", method="asym", reweight=reweight)
        errs.append(sum(float((real_token_states(pruned, b) - real_token_states(base, b)).square().sum())
                        for b in data))
    assert errs[1] < errs[0]
    pruned, report = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    assert all(balanced(u.kept, 2) for u in report.units if u.stage == "heads")
    assert_reloads_and_generates(pruned, tmp_path / "lm")
    save_pruned(pruned, tmp_path / "lm2")
    again = load_pruned(tmp_path / "lm2", build(lm=True))
    assert [layer.attn.num_attention_heads for layer in blocks(again)] == [8, 8]


def test_uneven_heads_are_refused() -> None:
    """A head set that is not spread evenly cannot be cut (the forward would split the heads wrongly)."""
    from nn_adapters._transformer_blocks import find_blocks

    blk = find_blocks(copy.deepcopy(build()))[0]
    with pytest.raises(ValueError, match="as many heads in each of its 4 model-parallel blocks"):
        blk.shrink_heads(torch.tensor([0, 1, 2, 3]))


def test_the_error_curve_allocation_keeps_heads_in_steps_of_one_a_block(tmp_path) -> None:
    """allocation="error-curve": the same total as uniform (16 of 32 heads), each layer's count a multiple of 4
    spread evenly over the 4 model-parallel blocks, and the pruned model reloads and generates."""
    model, data = build(lm=True), ragged_token_batches(VOCAB, 3)
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", allocation="error-curve")
    counts = [u.n_kept for u in report.units]
    assert sum(counts) == 2 * HEADS // 2 and all(c % PARTS == 0 and c >= PARTS for c in counts)
    assert all(balanced(u.kept, u.n_kept // PARTS) for u in report.units)
    assert [layer.attn.num_attention_heads for layer in blocks(pruned)] == counts
    assert_reloads_and_generates(pruned, tmp_path / "lm")
