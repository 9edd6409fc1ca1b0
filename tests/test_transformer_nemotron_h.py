"""Transformer pruning of NemotronH (Nemotron-H, Nemotron Nano 2 and 3; transformers 5), a hybrid stack of one
mixer per layer, ``x + mixer(norm(x))``: Mamba-2 layers (not recognised: run as they are between the blocks the
pruner prunes), attention layers (heads only), FFN layers (a plain ReLU^2 FFN, neurons only) and mixture-of-experts
layers (plain experts stored as 3D tensors and a plain shared expert); tiny randomly initialised models.

Oracles: the unpruned model with the removed units' consumer columns set to zero (no refit); numpy.linalg.lstsq on
consumer inputs and targets captured with hooks in full forwards of the pruned and unpruned models, which run the
Mamba layers as the model does (the refit of every mode), with the experts' activations written out here from their
weights and the routing the model hands them; the saved and reloaded model, and greedy generation with and without
the cache (the Mamba layers keep their own states there).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import assert_reloads_and_generates, captured_input, ragged_token_batches, run_hooked
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no NemotronH", allow_module_level=True)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 16, 4, 2, 4, 24, 40
GROUP = HEADS // KV_HEADS
EXPERTS, TOP_K, EXPERT_INTER, SHARED_INTER = 4, 2, 8, 12
#: a Mamba layer before the first block (never run by the pruner) and one between two blocks (run as it is)
TYPES = ("mamba", "attention", "mlp", "mamba", "moe", "mlp")
DENSE = ("mamba", "attention", "mlp", "mamba", "attention", "mlp")
KINDS = {"attention": "hf_nemotron_h_attn", "mlp": "hf_nemotron_h_mlp", "moe": "hf_nemotron_h_moe"}


def build(types: tuple[str, ...] = TYPES, lm: bool = False, **extra) -> nn.Module:
    cfg = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, layers_block_type=list(types), num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTER, mamba_num_heads=4,
        mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=8, n_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_INTER,
        moe_shared_expert_intermediate_size=SHARED_INTER, n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = (transformers.NemotronHForCausalLM if lm else transformers.NemotronHModel)(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


def layers(model: nn.Module) -> nn.ModuleList:
    return (model.model if hasattr(model, "model") else model).layers


def states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def relu2(x: torch.Tensor) -> np.ndarray:
    """NemotronH's activation, written out: relu(x)^2, float64."""
    return torch.relu(x.double()).pow(2).numpy()


def head_columns(groups: list[int]) -> list[int]:
    """The output-projection columns of the query heads of key/value groups ``groups``."""
    return [(g * GROUP + j) * HEAD_DIM + i for g in groups for j in range(GROUP) for i in range(HEAD_DIM)]


def test_layers_are_found_and_the_mamba_layers_reported() -> None:
    model = build()
    assert [(b.name, b.kind) for b in find_blocks(model)] == [
        (f"layers.{i}", KINDS[t]) for i, t in enumerate(TYPES) if t != "mamba"]
    with pytest.warns(UserWarning, match=r"2 of the 6 layers .* left whole: layers\.0, layers\.3 \(NemotronHBlock\)"):
        _, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [name for name, _ in report.skipped] == ["layers.0", "layers.3"]
    assert {(u.block, u.stage) for u in report.units} == {
        ("layers.1", "heads"), ("layers.2", "ffn"), ("layers.4", "ffn"), ("layers.5", "ffn")}
    # one forward of each block and of the Mamba layer between them per batch, a few more for the first batch's
    # checks: O(layers), not a forward of the whole model per block
    assert report.block_forwards < 4 * len(TYPES) * 4


@pytest.mark.filterwarnings("ignore:.*not recognised")
@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude", reweight=False)
    assert {u.stage for u in report.units} == ({"ffn", "heads"} if target == "all" else {target})
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            mixer = zeroed.get_submodule(u.block).mixer
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "heads":
                mixer.o_proj.weight[:, head_columns(gone)] = 0.0
            elif u.expert == "shared":
                mixer.shared_experts.down_proj.weight[:, gone] = 0.0
                # magnitude: the largest squared norms of the up row plus the down column
                shared = model.get_submodule(u.block).mixer.shared_experts
                score = shared.up_proj.weight.pow(2).sum(1) + shared.down_proj.weight.pow(2).sum(0)
                assert u.kept == sorted(torch.argsort(score, descending=True)[:u.n_kept].tolist())
            elif u.expert is not None:
                mixer.experts.down_proj[u.expert][:, gone] = 0.0
            else:
                mixer.down_proj.weight[:, gone] = 0.0
    if target != "heads":
        moe = layers(pruned)[4].mixer
        assert tuple(moe.experts.up_proj.shape) == (EXPERTS, EXPERT_INTER // 2, HIDDEN)
        assert tuple(moe.experts.down_proj.shape) == (EXPERTS, HIDDEN, EXPERT_INTER // 2)
        assert moe.shared_experts.up_proj.out_features == moe.shared_experts.down_proj.in_features == SHARED_INTER // 2
        assert len({tuple(u.kept) for u in report.units if isinstance(u.expert, int)}) > 1  # each expert its own
    for b in batches:
        torch.testing.assert_close(states(pruned, b), states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(states(pruned, b), states(model, b), atol=1e-3)


def consumer(layer: nn.Module, stage: str) -> nn.Linear:
    return layer.mixer.o_proj if stage == "heads" else layer.mixer.down_proj


@pytest.mark.filterwarnings("ignore:.*not recognised")
@pytest.mark.parametrize("method", ["asym", "seq", "layer"])
def test_refit_is_lstsq_on_what_reaches_the_block_through_the_mamba_layers(method: str) -> None:
    """Every dense consumer (the FFN layers' down projection, the attention layers' output projection) is the least
    squares fit of the mode's targets on the mode's inputs (kept columns), over the real tokens: asym, the pruned
    model's inputs and the unpruned model's outputs; seq, the inputs of the pruned model with this layer restored
    and those inputs through the trained consumer; layer, the unpruned model's inputs and outputs. The Mamba layer
    between the FFN layer 2 and the mixture in layer 4 changes what reaches the later layers."""
    model, batches = build(DENSE), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all", method=method, ridge=0.0,
                                       weighting="none", residual=False)
    assert len(report.units) == 4
    for u in report.units:
        index = int(u.block.split(".")[1])
        theirs, mine = consumer(layers(model)[index], u.stage), consumer(layers(pruned)[index], u.stage)
        cols = head_columns(u.kept) if u.stage == "heads" else u.kept
        restored = copy.deepcopy(pruned)  # the pruned model with this layer as it was: seq mode's inputs
        layers(restored)[index] = copy.deepcopy(layers(model)[index])

        def rows(net: nn.Module, lin: nn.Linear) -> torch.Tensor:
            return torch.cat([captured_input(net, lin, b)[b["attention_mask"].bool()] for b in batches]).double()

        seen = rows(model, theirs)
        w = theirs.weight.detach().double()
        if method == "asym":
            a, y = rows(pruned, mine), seen @ w.T
        elif method == "seq":
            full = rows(restored, consumer(layers(restored)[index], u.stage))
            a, y = full[:, cols], full @ w.T
        else:
            a, y = seen[:, cols], seen @ w.T
        want = np.linalg.lstsq(a.numpy(), y.numpy(), rcond=None)[0].T
        np.testing.assert_allclose(mine.weight.detach().double().numpy(), want, atol=2e-4, rtol=1e-3)
    # the premise of asym mode: the pruned network's inputs of the last FFN differ from the original's
    last = layers(model)[5].mixer.down_proj
    assert not torch.allclose(captured_input(model, last, batches[0])[..., :1],
                              captured_input(pruned, layers(pruned)[5].mixer.down_proj, batches[0])[..., :1],
                              atol=1e-3)


def routed(model: nn.Module, experts: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    """What the model hands its experts module, batch by batch: (token rows, routed experts, routing weights)."""
    seen: list[tuple] = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.detach() for a in args[:3])))
    run_hooked([model], batches, [handle])
    return seen


@pytest.mark.filterwarnings("ignore:.*not recognised")
def test_asym_expert_and_shared_expert_refits_read_the_pruned_network_through_a_mamba_layer() -> None:
    """The mixture in layer 4 (after the Mamba layer 3): each expert's down projection is the routing-weighted least
    squares fit of the unpruned expert's outputs on the unpruned model's token rows, on the expert's activations
    relu(x_p W_up^T)^2 (kept neurons) of the pruned model's token rows x_p, over the real tokens routed to it; the
    shared expert's, the same on every real token, unweighted."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none", residual=False)
    moe_o, moe_p = layers(model)[4].mixer, layers(pruned)[4].mixer
    orig, mine = routed(model, moe_o.experts, batches), routed(pruned, moe_p.experts, batches)
    up, down = moe_o.experts.up_proj.detach(), moe_o.experts.down_proj.detach().double().numpy()
    for e in range(EXPERTS):
        a, y, sw = [], [], []
        for (x_o, _, _), (x_p, idx, w), b in zip(orig, mine, batches, strict=True):
            real = b["attention_mask"].bool().reshape(-1)
            tok, slot = ((idx == e) & real[:, None]).nonzero(as_tuple=True)
            a.append(relu2(x_p[tok] @ up[e].T))
            y.append(relu2(x_o[tok] @ up[e].T) @ down[e].T)
            sw.append(w[tok, slot].double().abs().numpy())
        a, y, sw = np.concatenate(a), np.concatenate(y), np.concatenate(sw)[:, None]
        unit = next(u for u in report.units if u.block == "layers.4" and u.expert == e)
        want = np.linalg.lstsq(a[:, unit.kept] * sw, y * sw, rcond=None)[0].T
        np.testing.assert_allclose(moe_p.experts.down_proj[e].detach().double().numpy(), want, rtol=1e-3, atol=1e-3)
    unit = next(u for u in report.units if u.block == "layers.4" and u.expert == "shared")
    x_o = torch.cat([x[b["attention_mask"].bool().reshape(-1)] for (x, _, _), b in zip(orig, batches, strict=True)])
    x_p = torch.cat([x[b["attention_mask"].bool().reshape(-1)] for (x, _, _), b in zip(mine, batches, strict=True)])
    so = moe_o.shared_experts
    a = relu2(x_p @ so.up_proj.weight.detach().T)[:, unit.kept]
    y = relu2(x_o @ so.up_proj.weight.detach().T) @ so.down_proj.weight.detach().double().numpy().T
    want = np.linalg.lstsq(a, y, rcond=None)[0].T
    np.testing.assert_allclose(moe_p.shared_experts.down_proj.weight.detach().double().numpy(), want, rtol=1e-3,
                               atol=1e-3)
    assert not torch.allclose(x_o, x_p, atol=1e-3)  # the premise: the pruned network's rows differ


@pytest.mark.filterwarnings("ignore:.*not recognised")
@pytest.mark.parametrize("types", [TYPES, DENSE])
def test_save_reload_and_generation(tmp_path, types: tuple[str, ...]) -> None:
    pruned, report = prune_transformer(build(types, lm=True), ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert [(b["intermediate_size"], b["num_heads"]) for b in report.spec["blocks"]] == [
        {"attention": (0, HEADS // 2), "mlp": (INTER // 2, 0), "moe": (EXPERT_INTER // 2, 0)}[t]
        for t in types if t != "mamba"]
    assert_reloads_and_generates(pruned, tmp_path / "m")


@pytest.mark.filterwarnings("ignore:.*not recognised")
def test_experts_in_a_latent_space_are_refused_and_the_heads_still_pruned() -> None:
    model, batches = build(moe_latent_size=8), ragged_token_batches(VOCAB, n_batches=2)
    with pytest.raises(ValueError, match=r"'layers\.4': its experts run in a latent space \(fc1_latent_proj, "
                                         r"fc2_latent_proj"):
        prune_transformer(model, batches, keep=0.5, target="ffn")
    _, report = prune_transformer(model, batches, keep=0.5, target="heads")
    assert [u.block for u in report.units] == ["layers.1"]


@pytest.mark.filterwarnings("ignore:.*not recognised")
def test_error_curve_allocation_reads_the_original_layers_through_the_mamba_layers(monkeypatch) -> None:
    """``allocation="error-curve"`` runs the unpruned layers once more for their error curves: every original
    layer's forward, that one and the pruning's, reads the inputs the layer has in the unpruned model (captured here
    with hooks on a forward of the model, which runs the Mamba layer between the two FFN layers itself)."""
    from nn_adapters import transformer

    model, batches = build(DENSE), ragged_token_batches(VOCAB, n_batches=3)
    seen: list[tuple[str, list[torch.Tensor]]] = []
    original_pass = transformer._original_pass

    def spy(oblk, stages, mode, xo, *args, **kwargs):
        seen.append((oblk.name, [x.clone() for x in xo]))
        return original_pass(oblk, stages, mode, xo, *args, **kwargs)

    monkeypatch.setattr(transformer, "_original_pass", spy)
    _, report = prune_transformer(model, batches, keep=0.5, target="ffn", allocation="error-curve")
    assert sum(u.n_kept for u in report.units) == INTER  # the uniform total, split by the curves
    # the curves' forwards of every block (the attention layers' too: they have no FFN but run between the FFN
    # layers), then the pruning's from the first pruned block on (the first attention layer is run unchanged)
    assert [name for name, _ in seen] == ["layers.1", "layers.2", "layers.4", "layers.5", "layers.2", "layers.4",
                                          "layers.5"]
    for name, xo in seen:
        layer = model.get_submodule(name)
        for x, b in zip(xo, batches, strict=True):
            real = b["attention_mask"].bool()
            torch.testing.assert_close(x[real], captured_input(model, layer, b)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*not recognised")
def test_an_attention_layer_whose_output_is_not_the_residual_sum_is_refused() -> None:
    """The attention layers have no FFN: their residual sum ``x + o_proj(...)`` must be the layer's output, checked
    on the first batch (an extra term added to it, by a forward hook here, is another layout)."""
    model, batches = build(DENSE), ragged_token_batches(VOCAB, n_batches=2)
    layers(model)[4].register_forward_hook(lambda _m, _args, out: out + 0.5)
    with pytest.raises(ValueError, match=r"'layers\.4' .* attention output projection's output plus the residual is "
                                         r"not the block output"):
        prune_transformer(model, batches, keep=0.5, target="heads")


@pytest.mark.filterwarnings("ignore:.*not recognised")
def test_keep_by_block_counts_the_blocks_and_refuses_a_mamba_layer() -> None:
    """An index of ``keep`` counts the recognised blocks (layers 1, 2, 4, 5 here), not the Mamba layers between
    them; naming a Mamba layer says that it is not pruned."""
    model, batches = build(DENSE), ragged_token_batches(VOCAB, n_batches=2)
    _, report = prune_transformer(model, batches, keep={2: 0.5}, target="all")
    assert [(u.block, u.n_kept < u.n_units) for u in report.units] == [
        ("layers.1", False), ("layers.2", False), ("layers.4", True), ("layers.5", False)]
    with pytest.raises(ValueError, match=r"keep names 'layers\.3', a layer the adapter does not recognise: it is "
                                         r"run as it is, not pruned"):
        prune_transformer(model, batches, keep={"layers.3": 0.5})
