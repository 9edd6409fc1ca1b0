"""``prune_transformer(..., compression=c)``: the largest fraction kept in every block and stage that brings the
model's parameters to at most ``1 / c`` of what they were.

Oracle: the pruned models themselves. Every fraction at which some stage's kept count changes is a jump of
``round(f n)``, at ``(k + 1/2) / n``; one fraction inside each interval between jumps is pruned (random units, no
refit: the same sizes as any method) and its parameters counted; the largest whose ratio reaches ``c`` must keep the
same counts as ``compression=c``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _torch_helpers import ragged_token_batches

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


def oracle(model: torch.nn.Module, batches, compression: float, **options) -> list[tuple[str, str, object, int]]:
    """The kept counts of the largest fraction whose pruned model's parameters reach ``compression`` (see the
    module docstring)."""
    whole = prune_transformer(model, batches, keep=1.0, method="random", reweight=False, **options)[1]
    jumps = sorted({0.0, 1.0} | {(k + 0.5) / u.n_units for u in whole.units for k in range(u.n_units)})
    before = n_params(model)
    for lo, hi in zip(reversed(jumps[:-1]), reversed(jumps[1:]), strict=True):  # from the largest fraction down
        pruned, report = prune_transformer(model, batches, keep=0.5 * (lo + hi), method="random", reweight=False,
                                           **options)
        if before / n_params(pruned) >= compression:
            return sizes(report)
    raise AssertionError("no fraction reaches the compression")


@pytest.mark.parametrize(("build", "options"), [
    (llama, {"target": "ffn"}),
    (llama, {"target": "all"}),  # key/value groups and neurons
    (llama, {"target": "all", "head_unit": "query"}),  # query heads, 2 a step (one in each group)
    (qwen2_moe, {"target": "ffn"}),  # a neuron of every expert (4 at a time) and the shared expert's neurons
    (qwen2_moe, {"target": "experts"}),
    (bart, {"target": "all"}),  # both stacks, the decoder's cross-attention heads too
])
@pytest.mark.parametrize("compression", [1.05, 1.2])
def test_compression_keeps_the_largest_fraction_that_reaches_it(build, options: dict, compression: float) -> None:
    model = build()
    batches = batches_for(model)
    pruned, report = prune_transformer(model, batches, compression=compression, **options)
    assert n_params(model) / n_params(pruned) >= compression
    assert report.compression == pytest.approx(n_params(model) / n_params(pruned))
    assert sizes(report) == oracle(model, batches, compression, **options)


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
