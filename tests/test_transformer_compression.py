"""``prune_transformer(..., compression=c)``: the largest fraction kept in every block and stage that brings the
model's parameters to at most ``1 / c`` of what they were, then the slack that a coarse stage's last step leaves
filled: each stage keeps a fraction of its own, the most parameters that still reach ``c`` (an exact search).

Oracle: the pruned models themselves. Every fraction at which some stage's kept count changes is a jump of
``round(f n)``, at ``(k + 1/2) / n``; one fraction inside each interval between jumps is pruned (random units, no
refit: the same sizes as any method) and its parameters counted. The largest uniform fraction whose ratio reaches
``c`` gives a floor for every count; the answer must reach ``c``, keep at least that floor everywhere, and no stage
may keep one more step (its fraction moved to the next interval where one of its counts changes, the others as
they are) and still reach ``c``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _torch_helpers import ragged_token_batches
from hypothesis import given, settings
from hypothesis import strategies as st

import nn_adapters as nna
from nn_adapters.budget import UnreachableCompressionError
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")

VOCAB = 40


def llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def qwen2_moe() -> torch.nn.Module:  # 4 experts of 24 neurons (grouped_mm: kept in multiples of 4), a shared expert
    cfg = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                      moe_intermediate_size=24, shared_expert_intermediate_size=12,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def bart() -> torch.nn.Module:  # an encoder and a decoder whose layers have cross-attention heads
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=20,
                                  decoder_ffn_dim=20, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    return transformers.BartModel(cfg).eval()


def batches_for(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    batches = ragged_token_batches(VOCAB, 2)
    if isinstance(model, transformers.BartModel):
        batches = [{**b, "decoder_input_ids": b["input_ids"][:, :5]} for b in batches]
    return batches


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sizes(report) -> list[tuple[str, str, object, int]]:
    return [(u.block, u.stage, u.expert, u.n_kept) for u in report.units]


def jumps(units) -> list[float]:
    """0, 1 and every fraction at which one of ``units``' kept counts ``round(f n)`` changes, sorted."""
    return sorted({0.0, 1.0} | {(k + 0.5) / u.n_units for u in units for k in range(u.n_units)})


def uniform_sizes(model: torch.nn.Module, batches, compression: float, **options) -> tuple[list[tuple], float]:
    """The kept counts of the largest fraction kept in every stage whose pruned model's parameters reach
    ``compression`` (see the module docstring), and the compression they give."""
    whole = prune_transformer(model, batches, keep=1.0, method="random", reweight=False, **options)[1]
    points = jumps(whole.units)
    before = n_params(model)
    for lo, hi in zip(reversed(points[:-1]), reversed(points[1:]), strict=True):  # from the largest fraction down
        pruned, report = prune_transformer(model, batches, keep=0.5 * (lo + hi), method="random", reweight=False,
                                           **options)
        if before / n_params(pruned) >= compression:
            return sizes(report), before / n_params(pruned)
    raise AssertionError("no fraction reaches the compression")


def stage_key(unit) -> str:
    """The name of ``keep={stage: fraction}`` that sets ``unit``'s count."""
    return "shared" if unit.expert == "shared" else unit.stage


@pytest.mark.parametrize(("build", "options"), [
    (llama, {"target": "ffn"}),
    (llama, {"target": "all"}),  # key/value groups and neurons
    (llama, {"target": "all", "head_unit": "query"}),  # query heads, 2 a step (one in each group)
    (qwen2_moe, {"target": "ffn"}),  # a neuron of every expert (4 at a time) and the shared expert's neurons
    (qwen2_moe, {"target": "experts"}),
    (bart, {"target": "all"}),  # both stacks, the decoder's cross-attention heads too
])
@pytest.mark.parametrize("compression", [1.05, 1.2, 1.3])
def test_compression_reaches_it_and_no_stage_can_keep_more(build, options: dict, compression: float) -> None:
    model = build()
    batches = batches_for(model)
    before = n_params(model)
    pruned, report = prune_transformer(model, batches, compression=compression, **options)
    assert before / n_params(pruned) >= compression
    assert report.compression == pytest.approx(before / n_params(pruned))
    floor = uniform_sizes(model, batches, compression, **options)[0]
    assert [s[:3] for s in sizes(report)] == [s[:3] for s in floor]
    assert all(got[3] >= least[3] for got, least in zip(sizes(report), floor, strict=True))
    keys = sorted({stage_key(u) for u in report.units})
    fractions = dict(report.keep) if isinstance(report.keep, dict) else dict.fromkeys(keys, report.keep)
    assert sizes(prune_transformer(model, batches, keep=fractions, method="random", reweight=False,
                                   **options)[1]) == sizes(report)
    for key in keys:  # one more step of this stage, the others as they are: too many parameters
        units = [u for u in report.units if stage_key(u) == key]
        points = [p for p in jumps(units) if p > fractions[key]]
        for lo, hi in zip(points[:-1], points[1:], strict=False):
            more, more_report = prune_transformer(model, batches, keep={**fractions, key: 0.5 * (lo + hi)},
                                                  method="random", reweight=False, **options)
            if sizes(more_report) != sizes(report):
                assert before / n_params(more) < compression, key
                break


def test_a_coarse_stage_does_not_overshoot() -> None:
    """Tiny Llama, target="all": at 1.3 one fraction for both stages drops one of the two key/value groups and
    overshoots; the FFN then keeps more neurons, one key/value group still gone, and the ratio comes close."""
    model, batches = llama(), batches_for(llama())
    uniform, uniform_ratio = uniform_sizes(model, batches, 1.3, target="all")
    assert [s[3] for s in uniform[::2]] == [1, 1] and uniform_ratio > 1.4  # one group of two in each layer
    _, report = prune_transformer(model, batches, compression=1.3, target="all", method="random", reweight=False)
    kept = [s[3] for s in sizes(report)]
    assert kept[::2] == [1, 1] and all(k > u[3] for k, u in zip(kept[1::2], uniform[1::2], strict=True))
    # one FFN neuron of a layer holds 3 x 32 parameters: the slack left is less than one
    assert 1.3 <= report.compression and n_params(model) / 1.3 - report.params_after < 96


def test_compression_through_nna_prune_with_the_error_curve_allocation() -> None:
    """nna.prune passes compression= on; allocation="error-curve" keeps the same number of units of each kind, so
    the same parameters where the blocks are alike."""
    model, batches = llama(), batches_for(llama())
    _, uniform = nna.prune(model, batches, compression=1.2, target="all")
    _, curve = nna.prune(model, batches, compression=1.2, target="all", allocation="error-curve")
    assert curve.params_after == uniform.params_after and curve.compression >= 1.2


def test_compression_refusals() -> None:
    model, batches = llama(), batches_for(llama())
    with pytest.raises(ValueError, match="pass keep= .* or compression= .*, not both"):
        prune_transformer(model, batches, keep=0.5, compression=2.0)
    for bad in (1.0, 0.5, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="compression must be a finite number > 1"):
            prune_transformer(model, batches, compression=bad)
    # one key/value group of 2, one neuron of 24 in each layer: the most that pruning the heads alone can give
    most = n_params(model) / n_params(prune_transformer(model, batches, keep=0.01, target="heads",
                                                        method="random", reweight=False)[0])
    shown = math.floor(most * 1000) / 1000  # rounded down: reachable
    with pytest.raises(UnreachableCompressionError, match=f"out of reach .* gives {most:.6g}x; pass compression <= "
                                                          f"{shown:g}, or a target that prunes more") as err:
        prune_transformer(model, batches, compression=most * 1.01, target="heads")
    assert err.value.most == shown
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reached exactly: no warning
        prune_transformer(model, batches, compression=most, target="heads", method="random", reweight=False)


def test_the_fraction_found_is_recorded() -> None:
    model, batches = llama(), batches_for(llama())
    _, report = prune_transformer(model, batches, compression=1.2, target="ffn", method="magnitude",
                                  reweight=False)
    counts = {u.n_kept for u in report.units}
    assert len(counts) == 1 and counts == {round(report.keep * 24) or 1}
    assert np.isclose(report.to_dict()["compression"], report.compression)


@pytest.mark.parametrize(("build", "target"), [(llama, "all"), (qwen2_moe, "ffn"), (qwen2_moe, "experts"),
                                               (bart, "all")])
def test_the_units_are_counted_on_copies_without_memory(monkeypatch, build, target: str) -> None:
    """The copies that lose one unit hold meta tensors (shapes only): none falls back to a copy of the weights."""
    import nn_adapters.transformer as tr

    devices = []
    cut = tr._cut_one_unit

    def spy(blk, stage, module):
        devices.append(next(module.parameters()).device.type)
        return cut(blk, stage, module)

    monkeypatch.setattr(tr, "_cut_one_unit", spy)
    model = build()
    prune_transformer(model, batches_for(model), compression=1.05, target=target, method="random", reweight=False)
    assert devices and set(devices) == {"meta"}


def fill_oracle(costs, before: int, compression: float) -> tuple[float, float]:
    """Brute force over the kept counts that a fraction can give (the jumps of ``round(f n)`` and one fraction inside
    each interval between them): the parameters removed by the largest uniform fraction that reaches ``compression``,
    and the fewest removed by any fractions, one for each stage, none below that uniform one, that reach it (every
    combination of the stages' candidate fractions, as one array of sums)."""
    from nn_adapters.transformer import _n_keep

    keys = list(dict.fromkeys(s for s, *_ in costs))

    def removed(fractions) -> float:
        return sum(c * (n - _n_keep(fractions[s], n, m)) for s, n, m, c in costs)

    def candidates(stage_keys) -> list[float]:  # from the largest fraction down; the jumps themselves too, where
        # round() breaks ties to even (at f = 1/2, 3 units keep 2 and 5 keep 2)
        points = sorted({0.0, 1.0} | {(k + 0.5) / n for s, n, _, _ in costs if s in stage_keys for k in range(n)})
        middles = [0.5 * (lo + hi) for lo, hi in zip(points[:-1], points[1:], strict=True)]
        return sorted(set(points) | set(middles), reverse=True)

    def reaches(fractions) -> bool:
        return before - removed(fractions) <= before / compression * (1 + 1e-12)

    uniform = next(f for f in candidates(keys) if reaches(dict.fromkeys(keys, f)))
    need = before - before / compression * (1 + 1e-12)
    return removed(dict.fromkeys(keys, uniform)), fewest_oracle(costs, uniform, need)


def fewest_oracle(costs, lo: float, need: float) -> float:
    """The fewest parameters removed, at least ``need``, by fractions (one per stage, none below ``lo``) of
    ``costs``: every combination of the stages' fractions at the jumps of ``round(f n)`` above ``lo`` and between
    them, summed as one array (``inf`` if none removes ``need``)."""
    from nn_adapters.transformer import _n_keep

    per_stage = []
    for s in dict.fromkeys(s for s, *_ in costs):
        points = sorted({lo, 1.0} | {(k + 0.5) / n for s2, n, _, _ in costs if s2 == s for k in range(n)
                                     if lo < (k + 0.5) / n < 1})
        fractions = set(points) | {0.5 * (a + b) for a, b in zip(points[:-1], points[1:], strict=True)}
        per_stage.append(np.array([sum(c * (n - _n_keep(f, n, m)) for s2, n, m, c in costs if s2 == s)
                                   for f in fractions]))
    total = per_stage[0]
    for more in per_stage[1:]:
        total = np.add.outer(total, more)
    total = total.ravel()
    feasible = total[total >= need]
    return float(feasible.min()) if feasible.size else math.inf


unit_costs = st.lists(st.tuples(st.sampled_from(["heads", "ffn", "shared"]), st.integers(1, 12),
                                st.sampled_from([1, 2, 4]), st.integers(1, 40)), min_size=1, max_size=6)


MADE_UP = [("shared", 10, 1, 5.0), ("heads", 5, 1, 9.0), ("shared", 1, 1, 7.0), ("ffn", 7, 4, 38.0)]


@pytest.mark.parametrize(("nodes", "kept"), [
    (None, [("shared", 9), ("heads", 4), ("shared", 1), ("ffn", 4)]),
    (0, [("shared", 7), ("heads", 5), ("shared", 1), ("ffn", 4)]),
])
def test_the_fill_is_exact_where_stage_by_stage_is_not(monkeypatch, nodes: int | None, kept: list) -> None:
    """Made-up costs, 535 parameters to bring to 408 (at least 127 removed). Without the FFN's 3 neurons (it keeps 4
    of 7, a multiple of 4: 114 parameters) the most the others can remove is 9 x 5 + 4 x 9 = 81, so they go; the
    other 13 come cheapest as one shared neuron (5) and one head (9): 128 removed, not three shared neurons (15:
    what raising the stages one at a time gives, in every order) nor two heads (18). With the search stopped at
    once (FILL_NODES = 0) the stage-by-stage fill stands."""
    import nn_adapters.transformer as tr

    if nodes is not None:
        monkeypatch.setattr(tr, "FILL_NODES", nodes)
    fractions = tr._compression_fractions(MADE_UP, 535, 535 / 408, ["ffn"])
    assert [(s, tr._n_keep(fractions[s], n, m)) for s, n, m, _ in MADE_UP] == kept


@settings(max_examples=300, deadline=None)
@given(costs=st.lists(st.tuples(st.sampled_from(["heads", "cross", "ffn", "shared"]), st.integers(1, 12),
                                st.sampled_from([1, 2, 4]), st.integers(1, 40)), min_size=1, max_size=8),
       lo=st.floats(0.0, 1.0), share=st.floats(0.0, 1.0))
def test_the_exact_search_against_brute_force(costs, lo: float, share: float) -> None:
    """:func:`nn_adapters.transformer._fewest_removed` alone (no bound, no stage-by-stage fill to fall back on): the
    fewest parameters removed, at least a share of the most that fractions above ``lo`` can remove."""
    from collections import Counter

    from nn_adapters.transformer import _fewest_removed, _n_keep

    costs = [(s, n, min(m, n), float(c)) for s, n, m, c in costs]
    keys = list(dict.fromkeys(s for s, *_ in costs))
    most = sum(c * (n - _n_keep(lo, n, m)) for _, n, m, c in costs)
    need = share * most
    got = _fewest_removed(Counter(costs), keys, lo, need, math.inf)
    assert got is not None and set(got) == set(keys) and all(f >= lo for f in got.values())
    removed = sum(c * (n - _n_keep(got[s], n, m)) for s, n, m, c in costs)
    assert removed >= need - 1e-9 and removed == pytest.approx(fewest_oracle(costs, lo, need))


@settings(max_examples=200, deadline=None)
@given(costs=unit_costs, extra=st.integers(0, 300), share=st.floats(0.05, 1.0))
def test_the_fractions_against_brute_force(costs, extra: int, share: float) -> None:
    """The fractions found, on made-up costs, against :func:`fill_oracle`."""
    from nn_adapters.transformer import _compression_fractions, _n_keep

    costs = [(s, n, min(m, n), float(c)) for s, n, m, c in costs]
    before = extra + sum(c * n for _, n, _, c in costs)
    keys = list(dict.fromkeys(s for s, *_ in costs))
    least = before - sum(c * (n - _n_keep(0.0, n, m)) for _, n, m, c in costs)
    if least >= before:
        return  # nothing can be removed
    compression = 1 + share * (before / least - 1)
    got = _compression_fractions(costs, before, compression, ["ffn"])
    fractions = got if isinstance(got, dict) else dict.fromkeys(keys, got)
    removed = sum(c * (n - _n_keep(fractions[s], n, m)) for s, n, m, c in costs)
    uniform, best = fill_oracle(costs, before, compression)
    assert removed == pytest.approx(best) and removed <= uniform
    assert before - removed <= before / compression * (1 + 1e-9)
