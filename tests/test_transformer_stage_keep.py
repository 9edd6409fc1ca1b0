"""A kept fraction per stage (``keep={"heads": 0.75, "ffn": 0.5}``): tiny randomly initialised BERT and BART
decoder stacks (no download).

Oracles: the calls that prune one stage alone at its fraction (data-free magnitude selection without refit: the
same units, and the same model as those calls composed; layer mode: the same selections, every stage's statistics
read from the original network), the counts ``round(f * n)``, the BART decoder's cross-attention heads (the heads'
fraction unless named).
"""

from __future__ import annotations

import pytest
import torch
from test_transformer_prune import bert_out, tiny_bert, token_batches
from test_transformer_seq2seq import batches as seq2seq_batches
from test_transformer_seq2seq import stack as seq2seq_stack

from nn_adapters.transformer import prune_transformer

pytest.importorskip("transformers")


def kept(report, stage: str) -> dict[str, list[int]]:
    return {u.block: u.kept for u in report.units if u.stage == stage}


def counts(report, stage: str) -> list[int]:
    return [u.n_kept for u in report.units if u.stage == stage]


def test_each_stage_keeps_its_own_fraction_as_if_pruned_alone() -> None:
    """Magnitude without refit: the heads and the neurons kept are those of pruning each stage alone at its
    fraction, and the model is those two calls composed (the same outputs)."""
    model, data = tiny_bert(), token_batches()
    both, report = prune_transformer(model, data, keep={"heads": 0.75, "ffn": 0.5}, target="all", method="magnitude",
                                     reweight=False)
    heads, r_heads = prune_transformer(model, data, keep=0.75, target="heads", method="magnitude", reweight=False)
    composed, r_ffn = prune_transformer(heads, data, keep=0.5, target="ffn", method="magnitude", reweight=False)
    assert kept(report, "heads") == kept(r_heads, "heads") and kept(report, "ffn") == kept(r_ffn, "ffn")
    assert counts(report, "heads") == [3, 3] and counts(report, "ffn") == [12, 12]
    assert report.keep == {"heads": 0.75, "ffn": 0.5} and report.to_dict()["keep"] == {"heads": 0.75, "ffn": 0.5}
    for b in data:
        torch.testing.assert_close(bert_out(both, b), bert_out(composed, b), rtol=1e-5, atol=1e-5)


def test_layer_mode_selects_each_stage_from_the_original_network() -> None:
    """Layer mode reads every stage's statistics from the original network: the units kept per stage are those of
    pruning that stage alone at its fraction, the refit included."""
    model, data = tiny_bert(), token_batches()
    _, report = prune_transformer(model, data, keep={"heads": 0.5, "ffn": 0.25}, target="all", method="layer")
    _, r_heads = prune_transformer(model, data, keep=0.5, target="heads", method="layer")
    _, r_ffn = prune_transformer(model, data, keep=0.25, target="ffn", method="layer")
    assert kept(report, "heads") == kept(r_heads, "heads") and kept(report, "ffn") == kept(r_ffn, "ffn")
    assert counts(report, "heads") == [2, 2] and counts(report, "ffn") == [6, 6]


def test_a_stage_not_named_keeps_every_unit() -> None:
    """keep={"ffn": 0.5} with target="all": every head stays; without refit the model is the FFN-only one."""
    model, data = tiny_bert(), token_batches()
    pruned, report = prune_transformer(model, data, keep={"ffn": 0.5}, target="all", method="magnitude",
                                       reweight=False)
    ffn_only, _ = prune_transformer(model, data, keep=0.5, target="ffn", method="magnitude", reweight=False)
    assert counts(report, "heads") == [4, 4]
    assert [layer.attention.self.num_attention_heads for layer in pruned.encoder.layer] == [4, 4]
    for b in data:
        torch.testing.assert_close(bert_out(pruned, b), bert_out(ffn_only, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("keep", "want"), [({"heads": 0.5}, 2), ({"heads": 0.5, "cross": 0.75}, 3),
                                            ({"ffn": 0.5, "cross": 0.25}, 1)])
def test_cross_attention_heads_follow_the_heads_unless_named(keep: dict[str, float], want: int) -> None:
    model, data = seq2seq_stack("bart_decoder"), seq2seq_batches("bart_decoder")
    _, report = prune_transformer(model, data, keep=keep, target="all", method="magnitude", reweight=False)
    assert counts(report, "cross") == [want, want]
    assert counts(report, "heads") == [round(4 * keep.get("heads", 1.0))] * 2


def test_error_curve_allocation_keeps_each_stages_total() -> None:
    model, data = tiny_bert(), token_batches()
    _, report = prune_transformer(model, data, keep={"heads": 0.75, "ffn": 0.5}, target="all", method="layer",
                                  allocation="error-curve")
    assert sum(counts(report, "heads")) == 6 and sum(counts(report, "ffn")) == 24


@pytest.mark.parametrize(("keep", "target", "match"), [
    ({"heads": 0.5}, "ffn", "stage 'heads', which target='ffn' does not prune: pass target='all'"),
    ({"experts": 0.5}, "all", "target='experts'"),
    ({"heads": 0.5, 0: 0.5}, "all", "mixes stages"),
    ({"heads": 1.5}, "all", r"fraction in \(0, 1\]"),
])
def test_bad_stage_fractions_are_refused(keep: dict, target: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prune_transformer(tiny_bert(), token_batches(), keep=keep, target=target)


@pytest.mark.parametrize(("keep", "want"), [({"ffn": 0.5}, 4), ({"ffn": 0.5, "shared": 0.25}, 2)])
def test_shared_experts_follow_the_ffn_unless_named(keep: dict[str, float], want: int) -> None:
    """Qwen2-MoE's shared expert (8 neurons): the FFN's fraction unless "shared" is named; the routed experts keep
    the FFN's."""
    from _torch_helpers import ragged_token_batches
    from test_transformer_moe import EXPERTS, INTER, VOCAB, build

    _, report = prune_transformer(build("qwen2_moe"), ragged_token_batches(VOCAB), keep=keep, target="ffn",
                                  method="magnitude", reweight=False)
    shared = [u.n_kept for u in report.units if u.expert == "shared"]
    routed = [u.n_kept for u in report.units if isinstance(u.expert, int)]
    assert shared == [want] * len(shared) and shared
    assert routed == [INTER // 2] * len(routed) and len(routed) == EXPERTS * len(shared)
