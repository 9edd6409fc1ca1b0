"""Transformer pruning of mixture-of-experts FFNs stored as 3D tensors (transformers 5: Mixtral, Qwen3-MoE, OLMoE,
PhiMoE; with a shared expert: Qwen2-MoE, gated by sigmoid(shared_expert_gate(x)), HunYuan-MoE, GLM-4-MoE, EXAONE-MoE,
ERNIE 4.5 MoE): every expert keeps the same number of neurons, each its own ones, and its down projection is
refitted on the tokens routed to it; the shared expert keeps the same fraction of its neurons, refitted on every
token; tiny randomly initialised models (no download).

Oracles: the unpruned model with the removed neurons' down-projection columns zeroed expert by expert (no refit),
numpy.linalg.lstsq on activations computed here from the experts' weights and the routing the model hands its
experts module (read with a hook), weighted by the routing weights (by the shared expert's gate for the shared
expert), the saved and reloaded model's outputs, and greedy generation. Transformers without the 3D expert layout
(4.x keeps a list of expert modules) skip.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_reloads_and_generates,
    ragged_token_batches,
    run_hooked,
    token_rows,
    zeroed_heads,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, INTER, EXPERTS, TOP_K, LAYERS, VOCAB = 16, 4, 2, 24, 4, 2, 2, 40
FAMILIES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe",
            "phimoe": "Phimoe", "hunyuan_v1_moe": "HunYuanMoEV1", "glm4_moe": "Glm4Moe", "exaone_moe": "ExaoneMoe",
            "ernie4_5_moe": "Ernie4_5_Moe", "granitemoe": "GraniteMoe", "granitemoeshared": "GraniteMoeShared",
            "flex_olmo": "FlexOlmo", "minimax_m2": "MiniMaxM2", "minimax": "MiniMax", "qwen3_next": "Qwen3Next",
            "qwen3_5_moe": "Qwen3_5MoeText", "jamba": "Jamba", "cohere2_moe": "Cohere2Moe", "afmoe": "Afmoe",
            "kolibri1": "Kolibri1"}
#: Qwen3-Next and Qwen3.5-MoE: a linear-attention layer (gated DeltaNet, no heads) then a gated-attention layer,
#: each with a mixture and a gated shared expert
SHARED_LINEAR = ("qwen3_next", "qwen3_5_moe")
#: Jamba: a Mamba layer then an attention layer, both with a mixture (no shared expert)
JAMBA = dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
             mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False)
#: the kinds of the layers whose FFN is a mixture in the layout of _HFMoEBlock
MOE_KINDS = ("hf_moe", "hf_minimax", "hf_linear_attn_moe", "hf_jamba_moe", "hf_jamba_mamba_moe", "hf_minimax_lightning",
             "hf_cohere2_moe", "hf_afmoe_moe", "hf_kolibri1")
LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2, linear_num_key_heads=2,
              linear_key_head_dim=4, linear_value_head_dim=4)
#: GraniteMoE scales the mixture's output by residual_multiplier (GraniteMoE-Shared adds a shared_mlp beside the
#: mixture, outside it, gate and up fused: pruned as a shared expert)
GRANITE = {"residual_multiplier": 0.22, "shared_intermediate_size": 8}
#: Shared-expert neurons of the tiny models (Qwen2-MoE: shared_expert_intermediate_size, GraniteMoE-Shared:
#: shared_intermediate_size; the others: one shared expert of moe_intermediate_size, HunYuan's of intermediate_size).
SHARED = {"qwen2_moe": 8, "granitemoeshared": 8, "hunyuan_v1_moe": INTER, "glm4_moe": INTER, "exaone_moe": INTER,
          "ernie4_5_moe": INTER, "qwen3_next": 8, "qwen3_5_moe": 8, "cohere2_moe": INTER, "afmoe": INTER,
          "kolibri1": 8}


def build(name: str, seed: int = 0, lm: bool = False, **extra) -> nn.Module:
    cls = FAMILIES[name]
    if not hasattr(transformers, cls + "Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    cfg = getattr(transformers, cls + "Config")(**{
        **dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, intermediate_size=INTER,
               moe_intermediate_size=INTER, shared_expert_intermediate_size=8, num_local_experts=EXPERTS,
               num_experts=EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1, mlp_only_layers=[],
               max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, n_routed_experts=EXPERTS,
               moe_num_experts=EXPERTS, moe_k=TOP_K, first_k_dense_replace=0, moe_layer_start_index=0,
               n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1, num_dense_layers=0),
        **(GRANITE if name.startswith("granite") else {}), **(LINEAR if name in SHARED_LINEAR else {}),
        **(JAMBA if name == "jamba" else {}), **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls.removesuffix("Text") + "ForCausalLM" if lm else cls + "Model")(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
        for m in model.modules():  # AFMoE initialises its router to zero: every token to the same experts
            if type(m).__name__ == "AfmoeTokenChoiceRouter":
                m.gate.weight.normal_(0.0, 0.3)
    if not any(b.kind in MOE_KINDS for b in find_blocks(model)):
        # transformers 4 keeps lists of expert modules; 5 stores every family here as 3D tensors
        assert int(transformers.__version__.split(".")[0]) < 5, f"{cls}'s mixture is not recognised"
        pytest.skip(f"transformers {transformers.__version__} does not store {cls}'s experts as 3D tensors")
    return model


def experts_of(model: nn.Module) -> list[nn.Module]:
    return [b.experts for b in find_blocks(model) if b.kind in MOE_KINDS]


def shared_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """A shared expert's gate rows, up rows and down projection: gate_proj / up_proj / down_proj, or the two halves
    of a fused input_linear and output_linear (GraniteMoE-Shared's shared_mlp)."""
    if hasattr(mlp, "input_linear"):
        half = mlp.input_linear.out_features // 2
        return mlp.input_linear.weight[:half], mlp.input_linear.weight[half:], mlp.output_linear
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj


def shared_of(model: nn.Module) -> list[nn.Module]:
    """The shared-expert MLPs, block by block."""
    return [b.shared.module for b in find_blocks(model)
            if b.kind in MOE_KINDS and b.shared is not None]


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def routed_calls(model: nn.Module, experts: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    """What the model hands its experts module, batch by batch: (token rows, routed experts, routing weights)."""
    seen: list[tuple] = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.detach() for a in args[:3])))
    run_hooked([model], batches, [handle])
    return seen


def silu_hidden(gate_up: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """One expert's intermediate activations, written out: silu(x W_gate^T) * (x W_up^T), float64."""
    half = gate_up.shape[0] // 2
    x64, w = x.double(), gate_up.double()
    return (F.silu(x64 @ w[:half].T) * (x64 @ w[half:].T)).numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_without_refit_equals_the_model_with_removed_columns_zeroed(name: str) -> None:
    model = build(name)
    batches = ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="magnitude", reweight=False)
    per_expert = [u for u in report.units if isinstance(u.expert, int)]
    shared = [u for u in report.units if u.expert == "shared"]
    assert len(per_expert) == LAYERS * EXPERTS and all(u.n_kept == INTER // 2 for u in per_expert)
    assert len({tuple(u.kept) for u in per_expert}) > 1  # each expert chooses its own neurons
    n_shared = SHARED.get(name)
    assert [(u.n_units, u.n_kept) for u in shared] == ([] if n_shared is None else [(n_shared, n_shared // 2)] * LAYERS)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for ex, layer in zip(experts_of(zeroed), range(LAYERS), strict=True):
            for u in per_expert[layer * EXPERTS:(layer + 1) * EXPERTS]:
                gone = sorted(set(range(INTER)) - set(u.kept))
                ex.down_proj[u.expert][:, gone] = 0.0
        for mlp, u in zip(shared_of(zeroed), shared, strict=True):
            # magnitude: the largest mean squared norm of gate row, up row and down column
            gate, up, down = shared_weights(mlp)
            score = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.weight.pow(2).sum(0)
            assert u.kept == sorted(torch.argsort(score, descending=True)[:n_shared // 2].tolist())
            down.weight[:, sorted(set(range(n_shared)) - set(u.kept))] = 0.0
    for ex in experts_of(pruned):
        assert tuple(ex.gate_up_proj.shape) == (EXPERTS, INTER, HIDDEN)
        assert tuple(ex.down_proj.shape) == (EXPERTS, HIDDEN, INTER // 2)
    for mlp in shared_of(pruned):
        gate, up, down = shared_weights(mlp)
        assert gate.shape[0] == up.shape[0] == down.in_features == n_shared // 2
    for b in batches:
        mask = b["attention_mask"].bool()
        torch.testing.assert_close(hidden(pruned, b)[mask], hidden(zeroed, b)[mask], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(hidden(pruned, b)[mask], hidden(model, b)[mask], atol=1e-3)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "glm4_moe", "granitemoe"])
def test_keeping_every_neuron_is_exact(name: str) -> None:
    model = build(name)
    batches = ragged_token_batches(VOCAB, n_batches=2)
    pruned, report = prune_transformer(model, batches, keep=1.0, method="asym", ridge=0.0, refit_prior="zero")
    for b in batches:
        mask = b["attention_mask"].bool()
        torch.testing.assert_close(hidden(pruned, b)[mask], hidden(model, b)[mask], atol=1e-4, rtol=1e-4)
    assert report.params_after == report.params_before


def test_layer_refit_is_routing_weighted_lstsq_per_expert() -> None:
    model = build("mixtral")
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="layer", ridge=0.0)
    for layer, (ex_o, ex_p) in enumerate(zip(experts_of(model), experts_of(pruned), strict=True)):
        calls = routed_calls(model, ex_o, batches)
        for e in range(EXPERTS):
            rows, targets, weights = [], [], []
            for (x, idx, w), b in zip(calls, batches, strict=True):
                real = b["attention_mask"].bool().reshape(-1)
                tok, slot = ((idx == e) & real[:, None]).nonzero(as_tuple=True)
                h = silu_hidden(ex_o.gate_up_proj[e].detach(), x[tok])
                rows.append(h)
                targets.append(h @ ex_o.down_proj[e].detach().double().numpy().T)
                weights.append(w[tok, slot].double().abs().numpy())
            a, y, sw = np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)
            unit = next(u for u in report.units if u.expert == e and u.block.endswith(f".{layer}"))
            want = np.linalg.lstsq(a[:, unit.kept] * sw[:, None], y * sw[:, None], rcond=None)[0].T
            np.testing.assert_allclose(ex_p.down_proj[e].detach().double().numpy(), want, rtol=1e-3, atol=1e-3)
            assert unit.relative_error == pytest.approx(
                np.sum(((a[:, unit.kept] @ want.T - y) * sw[:, None]) ** 2) / np.sum((y * sw[:, None]) ** 2),
                rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("name", ["mixtral", "cohere2_moe", "afmoe"])
def test_asym_targets_are_the_original_experts_on_the_original_inputs(name: str) -> None:
    """(Cohere2-MoE: attention and mixture in parallel, its shared expert averaged with the experts' sum; AFMoE:
    norms before and after the mixture, sigmoid routing.)"""
    model = build(name)
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="asym", ridge=0.0)
    # the last block: inputs and routing of the pruned network (its first block pruned), targets of the original
    ex_o, ex_p = experts_of(model)[-1], experts_of(pruned)[-1]
    orig, mine = routed_calls(model, ex_o, batches), routed_calls(pruned, ex_p, batches)
    for e in range(EXPERTS):
        rows, targets, weights = [], [], []
        for (x_o, _, _), (x_p, idx, w), b in zip(orig, mine, batches, strict=True):
            real = b["attention_mask"].bool().reshape(-1)
            tok, slot = ((idx == e) & real[:, None]).nonzero(as_tuple=True)
            rows.append(silu_hidden(ex_o.gate_up_proj[e].detach(), x_p[tok]))
            targets.append(silu_hidden(ex_o.gate_up_proj[e].detach(), x_o[tok])
                           @ ex_o.down_proj[e].detach().double().numpy().T)
            weights.append(w[tok, slot].double().abs().numpy())
        a, y, sw = np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)
        unit = next(u for u in report.units if u.expert == e and u.block.endswith(f".{LAYERS - 1}"))
        want = np.linalg.lstsq(a[:, unit.kept] * sw[:, None], y * sw[:, None], rcond=None)[0].T
        np.testing.assert_allclose(ex_p.down_proj[e].detach().double().numpy(), want, rtol=1e-3, atol=1e-3)
    # the premise: the first block's pruning changed what the last block's experts see
    assert not torch.allclose(orig[0][0], mine[0][0], atol=1e-3)


def test_kept_neurons_follow_the_grouped_mm_alignment() -> None:
    """transformers runs experts with grouped_mm by default, whose kernel needs 16-byte aligned strides: 30% of 24
    neurons (7) is rounded up to 8 in float32; the eager loop takes 7."""
    batches = ragged_token_batches(VOCAB, n_batches=2)
    model = build("mixtral")
    assert getattr(experts_of(model)[0].config, "_experts_implementation", None) not in (None, "eager")
    pruned, report = prune_transformer(model, batches, keep=0.3)
    assert {u.n_kept for u in report.units} == {8}
    hidden(pruned, batches[0])  # runs with grouped_mm
    eager = build("mixtral", experts_implementation="eager")
    assert experts_of(eager)[0].config._experts_implementation == "eager"
    pruned, report = prune_transformer(eager, batches, keep=0.3)
    assert {u.n_kept for u in report.units} == {7}
    hidden(pruned, batches[0])


def test_an_expert_no_token_reaches_keeps_its_largest_neurons_and_weights() -> None:
    model = build("mixtral")
    one = [{"input_ids": torch.tensor([[5, 9]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}]
    pruned, report = prune_transformer(model, one, keep=0.5)
    idle = [u for u in report.units if u.relative_error is None]
    assert idle  # 2 tokens, 2 experts each: at most 4 (token, expert) pairs per layer over 4 experts... some idle
    by_block = {b.name: b for b in find_blocks(model)}
    for u in idle:
        ex = by_block[u.block].experts
        gate_up, down = ex.gate_up_proj[u.expert].detach(), ex.down_proj[u.expert].detach()
        score = gate_up[:INTER].pow(2).sum(1) + gate_up[INTER:].pow(2).sum(1) + down.pow(2).sum(0)
        assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
        mine = {b.name: b for b in find_blocks(pruned)}[u.block].experts.down_proj[u.expert]
        torch.testing.assert_close(mine, down[:, u.kept])


@pytest.mark.parametrize(("name", "kind"), [("mixtral", "hf_moe"), ("cohere2_moe", "hf_cohere2_moe"),
                                          ("afmoe", "hf_afmoe_moe")])
def test_save_reload_and_generation(tmp_path, name: str, kind: str) -> None:
    model = build(name, lm=True)
    batches = ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all")
    assert report.spec["blocks"][0]["kind"] == kind and report.spec["blocks"][0]["experts"] == EXPERTS
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, pruned(prompt).logits, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        with_cache = pruned.generate(prompt, **kw)
        without = pruned.generate(prompt, **{**kw, "use_cache": False})
    assert torch.equal(with_cache, without) and with_cache.shape[1] == prompt.shape[1] + 5


def test_experts_computing_something_else_are_refused() -> None:
    """Experts that scale their sum (as if the routing weights were applied twice): the pruner's per-expert
    targets would be wrong, so the model is refused on the first batch."""
    model = build("mixtral")
    for ex in experts_of(model):
        base = type(ex)

        class Scaled(base):  # type: ignore[misc, valid-type]
            def forward(self, hidden_states, top_k_index, top_k_weights):
                return 2.0 * super().forward(hidden_states, top_k_index, top_k_weights)

        ex.__class__ = Scaled
    with pytest.raises(ValueError, match="routing-weighted sum"):
        prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5)


def forward_selection_errors(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``errors[m]``: the least-squares residual of ``y`` on the ``m`` columns of ``a`` that forward selection picks
    (each step the column whose addition leaves the smallest residual, one lstsq per candidate; ties to the lower
    column)."""
    def residual(cols: list[int]) -> float:
        m = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
        return float(((y - a[:, cols] @ m) ** 2).sum())

    chosen: list[int] = []
    errors = [float((y ** 2).sum())]
    for _ in range(a.shape[1]):
        res = {j: residual([*chosen, j]) for j in range(a.shape[1]) if j not in chosen}
        chosen.append(min(res, key=lambda j: (res[j], j)))
        errors.append(res[chosen[-1]])
    return np.array(errors)


@pytest.mark.parametrize(("implementation", "step"), [(None, 4), ("eager", 1)])
def test_error_curve_allocation_of_the_experts_neurons(monkeypatch, implementation: str | None, step: int) -> None:
    """allocation="error-curve" on Mixtral's experts: a mixture's curve is the sum over its experts of forward
    selection's error on the expert's routing-weighted rows (written out with lstsq) at every number of neurons an
    expert keeps, in steps of 4 neurons where grouped_mm needs them aligned (float32: 16 bytes), else of 1; the
    layers keep the counts that marginal allocation gives for those curves (the same total as uniform), every
    expert of a layer as many."""
    import nn_adapters.transformer as tr

    extra = {} if implementation is None else {"experts_implementation": implementation}
    model, batches = build("mixtral", **extra), ragged_token_batches(VOCAB, n_batches=6)
    with torch.no_grad():  # the second layer's experts' errors 16x larger: it should get more neurons
        experts_of(model)[1].down_proj.mul_(4.0)
    seen = []
    allocate = tr.allocate_units
    monkeypatch.setattr(tr, "allocate_units", lambda c, total, floors: seen.append(c) or allocate(c, total, floors))
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       allocation="error-curve", min_keep=0.25)
    want = []
    for ex in experts_of(model):
        calls = routed_calls(model, ex, batches)
        curve = np.zeros(INTER + 1)
        for e in range(EXPERTS):
            rows, targets = [], []
            for (x, idx, w), b in zip(calls, batches, strict=True):
                real = b["attention_mask"].bool().reshape(-1)
                tok, slot = ((idx == e) & real[:, None]).nonzero(as_tuple=True)
                h = silu_hidden(ex.gate_up_proj[e].detach(), x[tok])
                sw = w[tok, slot].double().abs().numpy()[:, None]
                rows.append(h * sw)
                targets.append(h @ ex.down_proj[e].detach().double().numpy().T * sw)
            curve += forward_selection_errors(np.concatenate(rows), np.concatenate(targets))
        want.append(curve[::step])
    assert len(seen) == 1
    np.testing.assert_allclose(np.array(seen[0]), np.array(want), rtol=1e-5, atol=1e-8 * float(np.max(want)))
    counts = step * allocate(want, LAYERS * INTER // 2 // step, [math.ceil(math.ceil(0.25 * INTER) / step)] * LAYERS)
    kept = [[u.n_kept for u in report.units if u.stage == "ffn" and u.block.endswith(f".{i}")] for i in range(LAYERS)]
    assert kept == [[int(c)] * EXPERTS for c in counts] and counts[1] > counts[0]
    assert [int(ex.down_proj.shape[-1]) for ex in experts_of(pruned)] == [int(c) for c in counts]


def test_error_curve_allocation_trades_like_for_like(monkeypatch) -> None:
    """GLM-4-MoE with a dense first layer, then two mixtures with a shared expert: the dense layer's neurons, the
    experts' neurons (one in every expert) and the shared experts' neurons are allocated among their own kind,
    each kind keeping its uniform total."""
    import nn_adapters.transformer as tr

    model, batches = build("glm4_moe", first_k_dense_replace=1, num_hidden_layers=3), ragged_token_batches(VOCAB, 4)
    groups = []
    allocate = tr.allocate_units
    monkeypatch.setattr(tr, "allocate_units",
                        lambda c, total, floors: groups.append(len(c)) or allocate(c, total, floors))
    _, uniform = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer")
    _, curve = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", allocation="error-curve",
                                 min_keep=0.25)
    assert sorted(groups) == [1, 2, 2]  # the dense layer alone, the experts, the shared experts

    def kept(report, shared: bool) -> list[int]:
        """Per layer: the shared expert's count, or the dense FFN's or first expert's (every expert keeps as many)."""
        return [u.n_kept for u in report.units if u.expert == "shared" if shared] or [
            u.n_kept for u in report.units if u.expert in (None, 0)]

    for shared in (False, True):
        assert sum(kept(curve, shared)) == sum(kept(uniform, shared))
    assert kept(curve, False)[0] == kept(uniform, False)[0]  # the dense layer: alone of its kind


def shared_calls(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The token rows each block's mixture module receives (the shared expert's input), block by block, batch by
    batch."""
    blocks = [b for b in find_blocks(model) if b.kind == "hf_moe"]
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [b.module.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].detach().reshape(-1, HIDDEN))) for i, b in enumerate(blocks)]
    run_hooked([model], batches, handles)
    return seen


def shared_rows(mlp: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The shared expert's intermediate activations, written out: silu(x W_gate^T) * (x W_up^T), float64."""
    x64 = x.double()
    gate, up, _ = shared_weights(mlp)
    return (F.silu(x64 @ gate.detach().double().T) * (x64 @ up.detach().double().T)).numpy()


@pytest.mark.parametrize("mode", ["layer", "asym"])
def test_shared_expert_refit_is_lstsq_weighted_by_its_gate(mode: str) -> None:
    """Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared_expert(x) to the experts' sum: the shared expert's
    down projection is the least-squares fit on every real token, rows weighted by that gate; its inputs and gate
    from the original network (layer) or the pruned one (asym, targets: the original shared expert on the original
    input)."""
    model = build("qwen2_moe")
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, method=mode, ridge=0.0)
    layer = LAYERS - 1
    mlp_o, mlp_p = shared_of(model)[layer], shared_of(pruned)[layer]
    gate_w = find_blocks(model)[layer].module.mlp.shared_expert_gate.weight.detach().double()
    orig = shared_calls(model, batches)[layer]
    mine = orig if mode == "layer" else shared_calls(pruned, batches)[layer]
    rows, targets, weights = [], [], []
    for x_o, x_p, b in zip(orig, mine, batches, strict=True):
        real = b["attention_mask"].bool().reshape(-1)
        rows.append(shared_rows(mlp_o, x_p[real]))
        targets.append(shared_rows(mlp_o, x_o[real]) @ mlp_o.down_proj.weight.detach().double().numpy().T)
        weights.append(torch.sigmoid(x_p[real].double() @ gate_w.T).reshape(-1).numpy())
    a, y, sw = np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)
    unit = next(u for u in report.units if u.expert == "shared" and u.block.endswith(f".{layer}"))
    assert unit.n_kept == 4 and mlp_p.down_proj.in_features == 4
    want = np.linalg.lstsq(a[:, unit.kept] * sw[:, None], y * sw[:, None], rcond=None)[0].T
    np.testing.assert_allclose(mlp_p.down_proj.weight.detach().double().numpy(), want, rtol=1e-3, atol=1e-3)
    for p, o in ((mlp_p.gate_proj, mlp_o.gate_proj), (mlp_p.up_proj, mlp_o.up_proj)):
        torch.testing.assert_close(p.weight, o.weight[unit.kept])
    assert unit.relative_error == pytest.approx(
        np.sum(((a[:, unit.kept] @ want.T - y) * sw[:, None]) ** 2) / np.sum((y * sw[:, None]) ** 2),
        rel=1e-4, abs=1e-8)
    # greedy forward selection on the same weighted rows: the first kept neuron explains the most
    first = int(np.argmax([np.sum(((a[:, j] * sw) @ (y * sw[:, None])) ** 2) / np.sum((a[:, j] * sw) ** 2)
                           for j in range(a.shape[1])]))
    assert first in unit.kept
    if mode == "asym":  # the premise: the first block's pruning changed what the last block's shared expert sees
        assert not torch.allclose(orig[0], mine[0], atol=1e-3)


def test_mixture_not_returning_experts_plus_shared_is_refused() -> None:
    """A mixture module that averages the experts' and the shared expert's outputs (as Cohere2-MoE can): the
    shared expert's targets would be wrong, so the model is refused on the first batch."""
    model = build("glm4_moe")
    for blk in find_blocks(model):
        base = type(blk.module.mlp)

        class Averaged(base):  # type: ignore[misc, valid-type]
            def forward(self, hidden_states):
                return 0.5 * super().forward(hidden_states)

        blk.module.mlp.__class__ = Averaged
    with pytest.raises(ValueError, match="plus its shared expert's"):
        prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5)


def test_shared_expert_of_another_layout_is_refused() -> None:
    model = build("glm4_moe")
    for blk in find_blocks(model):
        old = blk.module.mlp.shared_experts
        blk.module.mlp.shared_experts = nn.Sequential(nn.Linear(HIDDEN, INTER), nn.SiLU(), old.down_proj)
    with pytest.raises(ValueError, match="not a gated FFN of gate_proj, up_proj and down_proj"):
        prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5)
    prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5, target="heads")


@pytest.mark.parametrize("name", ["olmoe", "flex_olmo", "minimax_m2"])
def test_heads_under_one_query_key_norm_over_every_head_are_refused(name: str) -> None:
    """OLMoE, FlexOlmo and MiniMax-M2 normalise the queries (keys) of all heads together, one RMS over the whole
    projection: removing a head would change every other head's attention, so their heads are refused with that
    reason, before any statistics (their experts are pruned)."""
    model = build(name)
    attention = find_blocks(model)[0].module.self_attn
    assert attention.q_norm.weight.numel() == HEADS * (HIDDEN // HEADS)  # the layout this test is about
    for method, reweight in (("asym", True), ("magnitude", False)):
        with pytest.raises(ValueError, match=r"normalise the queries and keys over all heads together \(16 "
                                             r"features, not one head's 4\).*target='ffn'"):
            prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5, target="heads",
                              method=method, reweight=reweight)
    prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5, target="ffn")


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe"])
def test_linear_attention_layers_and_gated_attention_heads(tmp_path, name: str) -> None:
    """Qwen3-Next / Qwen3.5-MoE: the linear-attention layer's experts are pruned like the attention layer's; only
    the attention layer loses heads, whose query projection yields each head's queries then its output gates
    (``2 head_dim`` rows a head). Oracle: removing key/value groups without refit equals zeroing their query heads'
    columns of ``o_proj`` in the unpruned model; the pruned model reloads and generates with its caches."""
    model = build(name, lm=True)
    assert [b.kind for b in find_blocks(model)] == ["hf_linear_attn_moe", "hf_moe"]
    batches = ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude", reweight=False)
    (unit,) = report.units
    assert unit.block == "model.layers.1" and unit.n_units == KV_HEADS and unit.n_kept == 1
    group, head_dim = HEADS // KV_HEADS, HIDDEN // HEADS
    attention = pruned.model.layers[1].self_attn
    assert attention.q_proj.out_features == 2 * attention.o_proj.in_features == 2 * group * head_dim
    zeroed = copy.deepcopy(model)
    gone = sorted(set(range(KV_HEADS)) - set(unit.kept))
    with torch.no_grad():
        zeroed.model.layers[1].self_attn.o_proj.weight[:, [g * group * head_dim + i for g in gone
                                                           for i in range(group * head_dim)]] = 0.0
        for b in batches:
            mask = b["attention_mask"].bool()
            got, want = pruned(**b).logits[mask], zeroed(**b).logits[mask]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(got, model(**b).logits[mask], atol=1e-3)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all")
    assert [(u.block, u.stage) for u in report.units if u.stage == "heads"] == [("model.layers.1", "heads")]
    assert sum(u.stage == "ffn" for u in report.units) == 2 * (EXPERTS + 1)  # every expert and the shared one
    assert_reloads_and_generates(pruned, tmp_path / "m")


@pytest.mark.parametrize("method", ["asym", "wanda", "random"])
def test_shared_expert_save_reload_and_generation(tmp_path, method: str) -> None:
    model = build("qwen2_moe", lm=True)
    batches = ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.25, method=method, seed=0)
    assert [b["shared_intermediate_size"] for b in report.spec["blocks"]] == [2] * LAYERS
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert [m.down_proj.in_features for m in shared_of(again)] == [2] * LAYERS
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, pruned(prompt).logits, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        assert torch.equal(pruned.generate(prompt, **kw), pruned.generate(prompt, **{**kw, "use_cache": False}))


def test_a_spec_with_a_shared_expert_the_model_lacks_is_refused() -> None:
    from nn_adapters.transformer import apply_spec, make_spec

    spec = make_spec(build("qwen2_moe"))
    assert spec["blocks"][0]["shared_intermediate_size"] == SHARED["qwen2_moe"]
    spec["blocks"][0]["shared_intermediate_size"] = SHARED["qwen2_moe"] + 1
    with pytest.raises(ValueError, match="shared_intermediate_size=9.*shared expert of 8 neurons"):
        apply_spec(build("qwen2_moe"), spec)
    spec["blocks"][0]["shared_intermediate_size"] = 3
    with pytest.raises(ValueError, match="no shared expert"):
        apply_spec(build("mixtral"), {**spec, "blocks": [{**w, "kind": "hf_moe"} for w in spec["blocks"]]})
    fresh = apply_spec(build("qwen2_moe"), spec)
    assert [m.down_proj.in_features for m in shared_of(fresh)] == [3, SHARED["qwen2_moe"]]


@pytest.mark.parametrize("method", ["asym", "layer", "seq"])
def test_a_mixture_costs_the_block_forwards_of_a_dense_ffn(method: str) -> None:
    """The experts' statistics come from the forwards the pruner runs anyway (the original block's, and the pruned
    network's in seq/asym modes): a mixture of experts takes as many block forwards as a dense decoder of the same
    depth on the same batches (O(L) in all)."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} keeps lists of expert modules")
    sizes = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS + 1, num_attention_heads=HEADS,
                 num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, intermediate_size=INTER,
                 max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dense = transformers.Qwen2Model(transformers.Qwen2Config(**sizes)).eval()
    moe = transformers.Qwen2MoeModel(transformers.Qwen2MoeConfig(
        **sizes, moe_intermediate_size=INTER, shared_expert_intermediate_size=8, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, decoder_sparse_step=1, mlp_only_layers=[])).eval()
    data = ragged_token_batches(VOCAB, n_batches=5)
    for target in ("ffn", "all"):
        want = prune_transformer(dense, data, keep=0.5, method=method, target=target)[1].block_forwards
        got = prune_transformer(moe, data, keep=0.5, method=method, target=target)[1].block_forwards
        assert got == want


@pytest.mark.parametrize("method", ["asym", "layer"])
def test_one_experts_statistics_are_held_at_a_time(monkeypatch, method: str) -> None:
    """A mixture's experts hold as many neurons as several dense FFNs: their Gram matrices are built expert by
    expert, each freed once its selection and refit are done (without an executor), so at most one expert's
    statistics (plus the shared expert's) are alive at any time."""
    import gc
    import weakref

    import nn_adapters.transformer as tr

    alive: set[int] = set()
    peak = [0]

    class Counted(tr._Stats):
        def __init__(self, n_features: int, *args, **kwargs) -> None:
            super().__init__(n_features, *args, **kwargs)
            if n_features == INTER:  # an expert's (the shared expert has 8 neurons, the dense stages other widths)
                alive.add(id(self))
                weakref.finalize(self, alive.discard, id(self))
                gc.collect()
                peak[0] = max(peak[0], len(alive))

    monkeypatch.setattr(tr, "_Stats", Counted)
    _, report = prune_transformer(build("qwen2_moe"), ragged_token_batches(VOCAB), keep=0.5, method=method)
    assert sum(isinstance(u.expert, int) and u.relative_error is not None for u in report.units) > LAYERS
    assert peak[0] == 1


def test_minimax_lightning_attention_layers_prune_their_experts(tmp_path) -> None:
    """MiniMax alternates softmax-attention layers and lightning-attention layers (a linear attention, no heads),
    each with a mixture: both kinds' experts lose neurons (the zeroed-columns oracle of the first test covers the
    weights); the pruned model reloads and generates the same tokens with and without its cache."""
    model = build("minimax", lm=True)
    assert [b.kind for b in find_blocks(model)] == ["hf_minimax", "hf_minimax_lightning"]
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="ffn")
    assert report.skipped == []
    assert {u.block for u in report.units} == {"model.layers.0", "model.layers.1"}
    assert_reloads_and_generates(pruned, tmp_path / "m")


#: MiniMax's DeepNorm-style factors: h' = post_attention_layernorm(a_1 h + b_1 attn(h)), h = input_layernorm(x)
MINIMAX = {"layer_types": ["full_attention"] * LAYERS, "full_attn_alpha_factor": 0.7, "full_attn_beta_factor": 1.3}


def test_minimax_heads_without_refit_are_the_model_with_removed_columns_zeroed(tmp_path) -> None:
    """MiniMax's softmax-attention layers lose key/value groups; the pruned causal LM is the unpruned one with the
    removed heads' o_proj columns zeroed, reloads and generates with and without its cache."""
    model, batches = build("minimax", lm=True, **MINIMAX), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude",
                                       reweight=False)
    zeroed = zeroed_heads(model, report, HEADS // KV_HEADS * (HIDDEN // HEADS))
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(pruned(**b).logits, zeroed(**b).logits, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(pruned(**b).logits, model(**b).logits, atol=1e-3)
    assert_reloads_and_generates(pruned, tmp_path / "m")


def test_minimax_asym_heads_refit_aims_at_the_original_sum_over_the_output_factor() -> None:
    """asym refits the last layer's o_proj toward ``(s_o - a_1 h_p) / b_1``: the unpruned layer's sum entering
    post_attention_layernorm minus the pruned network's residual (its attention input times a_1), over b_1, from
    the kept columns of the pruned network's o_proj input; read with hooks from the final models (ridge 0)."""
    model, batches = build("minimax", **MINIMAX), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="asym", ridge=0.0,
                                       weighting="none")
    last, last_p = model.layers[-1], pruned.layers[-1]
    seen: dict[str, list[torch.Tensor]] = {"s_o": [], "h_o": [], "h_p": [], "a_p": []}
    hooks = [last.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: seen["s_o"].append(a[0])),
             *(attn.register_forward_pre_hook(lambda _m, a, k, key=key: seen[key].append(
                 a[0] if a else k["hidden_states"]), with_kwargs=True)
               for attn, key in ((last.self_attn, "h_o"), (last_p.self_attn, "h_p"))),
             last_p.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen["a_p"].append(a[0]))]
    run_hooked([model, pruned], batches, hooks)
    s_o, h_p, a = (token_rows(batches, seen[k]) for k in ("s_o", "h_p", "a_p"))
    target = (s_o - 0.7 * h_p) / 1.3
    width = HEADS // KV_HEADS * (HIDDEN // HEADS)
    cols = [u * width + j for u in report.units[-1].kept for j in range(width)]
    w_kept = last.self_attn.o_proj.weight.detach().double().numpy().T[cols]
    want = w_kept + np.linalg.lstsq(a, target - a @ w_kept, rcond=None)[0]
    np.testing.assert_allclose(last_p.self_attn.o_proj.weight.detach().double().numpy().T, want, atol=2e-4,
                               rtol=1e-3)
    assert not np.allclose(h_p, token_rows(batches, seen["h_o"]), atol=1e-3)  # the first layer's pruning shows


def test_shared_mlp_beside_the_mixture_is_refitted_as_a_fused_shared_expert() -> None:
    """GraniteMoE-Shared adds shared_mlp(x) (gate and up fused in input_linear) to the mixture module's output,
    outside it: asym refits its output_linear by least squares on every real token of the unpruned model's output
    (written out from the two halves of input_linear) on the pruned model's input, read by a hook on shared_mlp."""
    model = build("granitemoeshared")
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="asym", ridge=0.0)
    layer = LAYERS - 1
    mlp_o, mlp_p = shared_of(model)[layer], shared_of(pruned)[layer]
    seen: dict[str, list[torch.Tensor]] = {"o": [], "p": []}
    handles = [m.register_forward_pre_hook(lambda _m, args, k=k: seen[k].append(args[0].detach().reshape(-1, HIDDEN)))
               for k, m in (("o", mlp_o), ("p", mlp_p))]
    run_hooked([model, pruned], batches, handles)
    rows, targets = [], []
    for x_o, x_p, b in zip(seen["o"], seen["p"], batches, strict=True):
        real = b["attention_mask"].bool().reshape(-1)
        rows.append(shared_rows(mlp_o, x_p[real]))
        targets.append(shared_rows(mlp_o, x_o[real]) @ mlp_o.output_linear.weight.detach().double().numpy().T)
    a, y = np.concatenate(rows), np.concatenate(targets)
    unit = next(u for u in report.units if u.expert == "shared" and u.block.endswith(f".{layer}"))
    assert unit.n_kept == SHARED["granitemoeshared"] // 2 == mlp_p.output_linear.in_features
    want = np.linalg.lstsq(a[:, unit.kept], y, rcond=None)[0].T
    np.testing.assert_allclose(mlp_p.output_linear.weight.detach().double().numpy(), want, rtol=1e-3, atol=1e-3)
    half = mlp_o.input_linear.out_features // 2
    torch.testing.assert_close(mlp_p.input_linear.weight, mlp_o.input_linear.weight[unit.kept + [half + j for j in
                                                                                                  unit.kept]])
    assert not torch.allclose(seen["o"][0], seen["p"][0], atol=1e-3)  # the premise: asym's inputs differ


def test_a_shared_mlp_that_reads_another_input_than_the_experts_is_refused() -> None:
    model = build("granitemoeshared")
    for mlp in shared_of(model):
        mlp.register_forward_pre_hook(lambda _m, args: (args[0] * 1.5,))
    with pytest.raises(ValueError, match=r"shared expert .*shared_mlp' beside the mixture module does not read "
                                         r"\(once\) the input the experts read"):
        prune_transformer(model, ragged_token_batches(VOCAB, n_batches=1), keep=0.5, target="ffn")


@pytest.mark.parametrize("strategy", ["average", "sum"])
def test_cohere2_moe_without_a_shared_expert_returns_the_experts_sum_whatever_the_strategy(strategy: str) -> None:
    """Cohere2-MoE's mixture averages its experts' sum with a shared expert's output only where it has one (the
    released configuration has none, with the strategy "average"): pruned without refit, the experts' removed
    columns zeroed in the unpruned model give the same outputs."""
    model = build("cohere2_moe", num_shared_experts=0, shared_expert_combination_strategy=strategy)
    assert find_blocks(model)[0].shared is None
    batches = ragged_token_batches(VOCAB, n_batches=2)
    pruned, report = prune_transformer(model, batches, keep=0.5, method="wanda", reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for ex, layer in zip(experts_of(zeroed), range(LAYERS), strict=True):
            for u in report.units[layer * EXPERTS:(layer + 1) * EXPERTS]:
                ex.down_proj[u.expert][:, sorted(set(range(INTER)) - set(u.kept))] = 0.0
    for b in batches:
        mask = b["attention_mask"].bool()
        torch.testing.assert_close(hidden(pruned, b)[mask], hidden(zeroed, b)[mask], atol=1e-4, rtol=1e-4)


def test_cohere2_moe_parallel_heads_asym_refit_aims_at_the_original_output_minus_the_pruned_residual() -> None:
    """Cohere2-MoE adds attention and mixture in parallel, ``x + attn(norm(x)) + moe(norm(x))``: asym refits the
    last block's o_proj toward the original block output minus what the pruned network adds besides the attention
    (its block input and its mixture's output), read with hooks from the final models (ridge 0, no weighting)."""
    model = build("cohere2_moe")
    batches = ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="asym", ridge=0.0,
                                       weighting="none")
    last, last_p = model.layers[-1], pruned.layers[-1]
    seen: dict[str, list[torch.Tensor]] = {"out_o": [], "x_p": [], "moe_p": [], "a_p": []}
    hooks = [last.register_forward_hook(lambda _m, _a, o: seen["out_o"].append(o[0] if isinstance(o, tuple) else o)),
             last_p.register_forward_pre_hook(lambda _m, a, k: seen["x_p"].append(a[0] if a else k["hidden_states"]),
                                              with_kwargs=True),
             last_p.mlp.register_forward_hook(lambda _m, _a, o: seen["moe_p"].append(o)),
             last_p.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen["a_p"].append(a[0]))]
    run_hooked([model, pruned], batches, hooks)
    target = token_rows(batches, seen["out_o"]) - token_rows(batches, seen["x_p"]) - token_rows(batches, seen["moe_p"])
    a = token_rows(batches, seen["a_p"])
    width = HEADS // KV_HEADS * (HIDDEN // HEADS)  # a unit: one key/value group's query heads
    cols = [u * width + j for u in report.units[-1].kept for j in range(width)]
    w_kept = last.self_attn.o_proj.weight.detach().double().numpy().T[cols]
    want = w_kept + np.linalg.lstsq(a, target - a @ w_kept, rcond=None)[0]
    np.testing.assert_allclose(last_p.self_attn.o_proj.weight.detach().double().numpy().T, want, atol=2e-4,
                               rtol=1e-3)
    assert np.abs(token_rows(batches, seen["x_p"]) - token_rows(batches, seen["out_o"])).max() > 1e-3
