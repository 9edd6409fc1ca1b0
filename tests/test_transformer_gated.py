"""Transformer pruning of Llama-style decoder layers with a gated FFN (``down(act(gate(x)) * up(x))``) and
grouped-query attention: Llama, Mistral, Qwen2 and Qwen3, and the layouts that fuse gate and up in one
``gate_up_proj`` (Phi-3, which fuses query, key and value in ``qkv_proj`` too, and GLM), Granite (a residual
multiplier), and the decoders with Llama's attention and a plain FFN ``down(act(up(x)))`` (Nemotron, Arcee, Jais 2,
Apertus, NanoChat); tiny randomly initialised models (no download).

Oracles: the unpruned model's outputs (keeping every unit), the unpruned model with the removed units' columns
of the down projection (FFN) or of ``o_proj`` (the query heads of the removed key/value groups) set to zero,
numpy.linalg.lstsq on the down projection's input captured independently with a hook (the refit), a re-run with
other token ids at the padded positions, and the saved and reloaded model's outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _torch_helpers import (
    assert_padding_does_not_matter,
    assert_same_greedy_generation,
    captured_input,
    ragged_token_batches,
    run_hooked,
    token_rows,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, VOCAB = 16, 4, 2, 24, 2, 40
HEAD_DIM = HIDDEN // HEADS
GROUP = HEADS // KV_HEADS  # query heads per key/value head

# transformers 4 before the attention refactor of 4.48 reshapes the attention output to the model width
LEGACY_ATTENTION = int(transformers.__version__.split(".")[0]) < 5 and tuple(
    int(v) for v in transformers.__version__.split(".")[:2]) < (4, 48)

# qwen2_sliding: a sliding-window layer, then a full-attention one (each called with its own mask)
PLAIN_FFN = ["nemotron", "arcee", "jais2", "apertus", "nanochat"]
# hunyuan: HunYuan's dense decoder, whose attention normalises each head's queries and keys under other names than
# Qwen3's (query_layernorm, key_layernorm: head_dim wide, shared by the heads); vaultgemma: Gemma's parts with
# the norm before the FFN named pre_feedforward_layernorm and no norms after the sublayers
FAMILIES = ["llama", "llama_mha", "llama_bias", "mistral", "qwen2", "qwen2_sliding", "qwen3", "phi3", "glm", "granite",
            "hunyuan", "vaultgemma", *PLAIN_FFN]
CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3", "glm": "Glm",
           "granite": "Granite", "nemotron": "Nemotron", "arcee": "Arcee", "jais2": "Jais2", "apertus": "Apertus",
           "nanochat": "NanoChat", "hunyuan": "HunYuanDenseV1", "vaultgemma": "VaultGemma"}
#: Granite 3's multipliers: each sublayer's output is scaled by 0.22 before its residual sum
GRANITE = {"residual_multiplier": 0.22, "attention_multiplier": 0.0625, "embedding_multiplier": 12.0}
KINDS = {"phi3": "hf_phi3", "glm": "hf_glm", "vaultgemma": "hf_vaultgemma",
         **dict.fromkeys(PLAIN_FFN, "hf_llama_plain")}  # the others: hf_llama


def build(name: str, seed: int = 0) -> nn.Module:
    """A tiny decoder of the family (``llama_mha``: one key/value head per query head; ``llama_bias``: biases in
    every projection)."""
    family = name.split("_")[0]
    cls = CLASSES[family]
    if not hasattr(transformers, cls + "Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    extra = {"mlp_bias": True, "attention_bias": True} if name == "llama_bias" else {}
    if name == "qwen2_sliding":
        extra = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    if family not in ("llama", "mistral", "qwen2", "qwen3"):  # default special tokens outside the tiny vocabulary
        extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **(GRANITE if family == "granite" else {})}
    if name == "llama_bias" and "mlp_bias" not in transformers.LlamaConfig().to_dict():
        pytest.skip(f"transformers {transformers.__version__}: LlamaConfig has no mlp_bias")
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS if name == "llama_mha" else KV_HEADS, intermediate_size=INTER,
        max_position_embeddings=32, head_dim=HEAD_DIM, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls + "Model")(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
            elif name == "llama_bias" and p.dim() == 1:
                p.normal_()
    return model


def batches(n_batches: int = 4, b: int = 6, t: int = 10, seed: int = 1, garbage: bool = False
            ) -> list[dict[str, torch.Tensor]]:
    return ragged_token_batches(VOCAB, n_batches, b, t, seed, garbage)


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def layers(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)


def down_proj(layer: nn.Module) -> nn.Linear:
    """The FFN's down projection (NanoChat's is ``mlp.fc2``)."""
    return getattr(layer.mlp, "down_proj", None) or layer.mlp.fc2


def can_prune_heads(target: str, model: nn.Module, data: list[dict[str, torch.Tensor]]) -> str | None:
    """``target``, or where the installed transformers' attention cannot lose heads, the refusal of head pruning
    checked and what remains to prune ("ffn", or ``None`` for ``target="heads"``)."""
    if target == "ffn" or not LEGACY_ATTENTION:
        return target
    with pytest.raises(ValueError, match=r"reshapes the attention output to the model width.*target='ffn'.*"
                                         r">= 4\.48"):
        prune_transformer(model, data, keep=0.5, target=target)
    return None if target == "heads" else "ffn"


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_are_found(name: str) -> None:
    assert [b.kind for b in find_blocks(build(name))] == [KINDS.get(name, "hf_llama")] * LAYERS


@pytest.mark.parametrize("method", ["asym", "seq", "layer", "magnitude", "wanda", "random"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2_sliding", "phi3"])
def test_keep_everything_without_refit_is_exact(name: str, method: str) -> None:
    """Every pruned block is replayed with its captured keyword arguments (rotary embeddings, causal mask,
    position ids; a sliding-window layer with its own mask): keeping every unit must give the model's outputs,
    padded batches included."""
    model, data = build(name), batches()
    target = can_prune_heads("all", model, data)
    pruned, report = prune_transformer(model, data, keep=1.0, target=target, method=method, reweight=False)
    assert report.params_after == report.params_before
    assert report.n_padding_excluded > 0 or method in ("magnitude", "random")  # those two read no statistics
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
@pytest.mark.parametrize("name", FAMILIES)
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(name: str, target: str) -> None:
    model, data = build(name), batches()
    target = can_prune_heads(target, model, data)
    if target is None:
        return
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="magnitude", reweight=False)
    masked = copy.deepcopy(model)
    group = HEADS // model.config.num_key_value_heads
    for unit in report.units:
        layer = layers(masked)[int(unit.block.rpartition(".")[2])]
        gone = sorted(set(range(unit.n_units)) - set(unit.kept))
        if unit.stage == "ffn":
            assert unit.n_units == INTER
            consumer, cols = down_proj(layer), gone
        else:  # a unit is a key/value group: its query heads' columns of o_proj
            assert unit.n_units == model.config.num_key_value_heads
            heads = [g * group + j for g in gone for j in range(group)]
            consumer, cols = layer.self_attn.o_proj, [h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)]
        with torch.no_grad():
            consumer.weight[:, cols] = 0.0
    assert len(report.units) == LAYERS * (2 if target == "all" else 1)
    assert all(u.n_kept == u.n_units // 2 for u in report.units)
    assert report.params_after < report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)  # something was removed


def test_attention_parts_wider_than_a_head_are_refused() -> None:
    """HunYuan's head_dim-wide query/key norms are left as they are when heads go; a part of the model width (or
    holding a weight matrix) under an unknown name may mix the heads, so head pruning is refused."""
    for extra in (nn.LayerNorm(HIDDEN), nn.Linear(HEAD_DIM, HEAD_DIM)):
        model = build("hunyuan")
        for layer in layers(model):
            layer.self_attn.mixer = copy.deepcopy(extra)
        with pytest.raises(ValueError, match=r"parts besides query/key/value \(mixer\)"):
            prune_transformer(model, batches(n_batches=1), keep=0.5, target="heads")


def test_magnitude_scores_every_coupled_layer() -> None:
    """The FFN unit with the largest gate row is kept even when its up row and down column are the smallest;
    a unit that is small in all three goes."""
    model, data = build("llama"), batches(n_batches=1)
    mlp = layers(model)[0].mlp
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[:2] = 1e-3
        mlp.down_proj.weight[:, :2] = 1e-3
        mlp.gate_proj.weight[0] = 1e3
    _, report = prune_transformer(model, data, keep={0: 22 / 24}, target="ffn", method="magnitude", reweight=False)
    assert 0 in report.units[0].kept and 1 not in report.units[0].kept


@pytest.mark.parametrize("name", ["llama", "llama_bias", "qwen2", "qwen2_sliding", "phi3", "glm", "granite",
                                  "vaultgemma", *PLAIN_FFN])
def test_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    model, data = build(name), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    for i, layer in enumerate(layers(model)):
        down = down_proj(layer)
        A = torch.cat([captured_input(model, down, b)[b["attention_mask"].bool()] for b in data]).double().numpy()
        Y = A @ down.weight.detach().double().numpy().T
        kept = report.units[i].kept
        has_bias = down.bias is not None
        design = np.hstack([A[:, kept], np.ones((len(A), 1))]) if has_bias else A[:, kept]
        sol = np.linalg.lstsq(design, Y, rcond=None)[0]
        new = down_proj(layers(pruned)[i])
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:len(kept)].T, atol=2e-4, rtol=1e-3)
        assert (new.bias is None) == (not has_bias)
        if has_bias:
            np.testing.assert_allclose(new.bias.detach().double().numpy(), down.bias.detach().double().numpy()
                                       + sol[-1], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("target", ["ffn", "all"])
def test_padding_tokens_do_not_change_the_statistics(target: str) -> None:
    model = build("llama")
    target = can_prune_heads(target, model, batches())
    runs = [prune_transformer(model, batches(garbage=g), keep=0.5, target=target, method="asym") for g in (0, 1)]
    assert_padding_does_not_matter(*runs)


def test_batches_without_a_mask_are_read_from_the_causal_mask() -> None:
    """Eager attention hands the layers a 4-D causal mask: without an attention_mask in the batches, the
    tokens are those the causal mask lets the last query see (all of them here)."""
    model = build("llama")
    model.config._attn_implementation = "eager"
    ids = batches(n_batches=1, garbage=True)[0]["input_ids"]
    _, with_mask = prune_transformer(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], keep=0.5)
    _, without = prune_transformer(model, [ids], keep=0.5)
    assert without.n_tokens == ids.numel() and without.n_padding_excluded == 0
    assert [u.kept for u in without.units] == [u.kept for u in with_mask.units]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_batches_without_a_mask_are_all_real_tokens(attn: str) -> None:
    """A sliding window shorter than the sequences gives the layers a banded causal mask: unpadded id batches
    without an attention_mask prune as the same batches with an all-ones mask do."""
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTER,
                                     head_dim=HIDDEN // HEADS, sliding_window=3, max_position_embeddings=32)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.MistralModel(cfg).eval()
    ids = [torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    _, without = prune_transformer(model, ids, keep=0.5)
    _, with_mask = prune_transformer(model, [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids],
                                     keep=0.5)
    assert without.n_tokens == 64 and without.n_padding_excluded == 0
    assert [u.kept for u in without.units] == [u.kept for u in with_mask.units]


def test_causal_band_masks_give_the_real_tokens() -> None:
    """Masks built here from the definition (left or right padding, causal or sliding window, or block-diagonal
    segments): the real tokens are read back; a mask that is none of these is not read."""
    from nn_adapters.transformer import _causal_band_tokens

    t = 7
    q, k = torch.arange(t).view(t, 1), torch.arange(t).view(1, t)
    for window in (t, 3, 1):
        for real in ([1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]):
            r = torch.tensor(real, dtype=torch.bool)
            mask = (k <= q) & (k > q - window) & r.view(1, t) & r.view(t, 1)
            got = _causal_band_tokens(mask.view(1, 1, t, t).expand(2, 3, t, t))
            assert got is not None and got.tolist() == [r.tolist()] * 2
    bidirectional = torch.ones(1, 1, t, t, dtype=torch.bool)
    bidirectional[..., 2] = False  # a key hidden from every query, future keys seen: not causal
    assert _causal_band_tokens(bidirectional) is None
    holes = torch.ones(t, t, dtype=torch.bool).tril()
    holes[5, 2] = False  # a real query that skips a real key inside its window
    assert _causal_band_tokens(holes.view(1, 1, t, t)) is None
    # a block-diagonal mask (segments packed in one sequence, each token seeing its own segment), padding after them
    segment = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    for real in ([1] * 7, [1, 1, 1, 1, 1, 0, 0]):
        r = torch.tensor(real, dtype=torch.bool)
        mask = (segment.view(t, 1) == segment.view(1, t)) & r.view(1, t) & r.view(t, 1)
        got = _causal_band_tokens(mask.view(1, 1, t, t))
        assert got is not None and got.tolist() == [r.tolist()]
    skipped = (segment.view(t, 1) == segment.view(1, t)).clone()
    skipped[3, 4] = False  # a query that skips a key inside its own segment's run
    assert _causal_band_tokens(skipped.view(1, 1, t, t)) is None


def test_bf16_llama_is_not_refused_by_rounding() -> None:
    """In bfloat16 the unit-removal check's two computations differ by rounding alone (about 2e-4 here, above the
    1e-4 relative tolerance): the check runs in float32, and the pruned model is the zeroed-units original."""
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=768)
    model = transformers.LlamaModel(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(2))
    pruned, report = prune_transformer(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                                       keep=0.5, target="ffn", method="magnitude", reweight=False)
    assert [u.n_kept for u in report.units] == [384, 384]
    assert next(pruned.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3"])
def test_save_and_reload(tmp_path, name: str) -> None:
    model, data = build(name), batches()
    pruned, report = prune_transformer(model, data, keep={0: 0.5}, target=can_prune_heads("all", model, data),
                                       method="asym")
    blocks = report.spec["blocks"]
    assert [b["intermediate_size"] for b in blocks] == [INTER // 2, INTER]
    if not LEGACY_ATTENTION:
        assert [(b["num_heads"], b["num_key_value_heads"]) for b in blocks] == [(HEADS // 2, 1), (HEADS, 2)]
        assert layers(pruned)[0].self_attn.o_proj.in_features == HEADS // 2 * HEAD_DIM
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert type(back) is type(model)
    for b in data:
        torch.testing.assert_close(out(back, b), out(pruned, b), atol=1e-6, rtol=1e-6)


def test_causal_lm_with_tied_embeddings_saves_and_reloads(tmp_path) -> None:
    """The lm_head tied to the embeddings is saved once, as the embeddings: the reloaded model ties it again."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTER,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    model, data = transformers.LlamaForCausalLM(cfg).eval(), batches()
    pruned, _ = prune_transformer(model, data, keep=0.5, target="ffn")
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        for b in data:
            torch.testing.assert_close(back(**b).logits, pruned(**b).logits, atol=1e-6, rtol=1e-6)


def test_the_sliding_window_layout_calls_its_layers_with_different_masks() -> None:
    """The premise of the qwen2_sliding cases above: block 0 sees only the last 4 tokens, block 1 all before it,
    so a replay of block 1 with block 0's arguments would not give the model's outputs."""
    model = build("qwen2_sliding")
    if len(set(getattr(model.config, "layer_types", None) or [])) < 2:
        pytest.skip(f"transformers {transformers.__version__} gives every Qwen2 layer the same mask")
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a, k: calls.append(k["attention_mask"]), with_kwargs=True)
               for layer in layers(model)]
    out(model, batches()[0])
    for h in handles:
        h.remove()
    assert not torch.equal(calls[0], calls[1])


class _MixingMLP(nn.Module):
    """A gated MLP that mixes its intermediate features before the down projection: LlamaMLP's parts, not its
    computation."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h - h.mean(-1, keepdim=True))


def test_gated_ffn_that_mixes_its_units_is_refused() -> None:
    model, data = build("llama"), batches(n_batches=1)
    layers(model)[1].mlp = _MixingMLP(layers(model)[1].mlp)
    for method in ("asym", "magnitude"):
        with pytest.raises(ValueError, match="does not act like zeroing column 0 of its down projection"):
            prune_transformer(model, data, keep=0.5, target="ffn", method=method, reweight=False)
    with pytest.raises(ValueError, match="FFN's pruning checks each block's FFN unit layout on one calibration"):
        prune_transformer(model, None, keep=0.5, target="ffn", method="magnitude", reweight=False)


def _simulate_legacy_attention(model: nn.Module) -> None:
    """On transformers >= 4.48, the attention of earlier releases: it keeps ``hidden_size`` and its forward reads
    it (here to reshape its output to it, which the width-free attention already has)."""

    class Legacy(type(layers(model)[0].self_attn)):
        def forward(self, hidden_states, *args, **kwargs):
            out = super().forward(hidden_states, *args, **kwargs)
            return (out[0].reshape(*hidden_states.shape[:-1], self.hidden_size), *out[1:])

    for layer in layers(model):
        layer.self_attn.__class__ = Legacy
        layer.self_attn.hidden_size = HIDDEN


def test_an_attention_that_keeps_a_width_it_never_reads_loses_heads() -> None:
    """EXAONE 4's attention holds hidden_size (and head counts) without its forward reading them: not refused."""
    model, data = build("llama"), batches(n_batches=1)
    if LEGACY_ATTENTION:
        pytest.skip("this transformers' Llama attention reads its width")
    for layer in layers(model):
        layer.self_attn.hidden_size = HIDDEN
    _, report = prune_transformer(model, data, keep=0.5, target="heads")
    assert [u.n_kept for u in report.units] == [KV_HEADS // 2] * LAYERS


def test_attention_with_model_width_head_counts_is_refused(tmp_path) -> None:
    """The attention of transformers before 4.48 keeps num_heads and hidden_size and reshapes to the model
    width: head pruning names the version to upgrade to, FFN pruning still works, and a checkpoint with fewer
    heads is refused on loading."""
    model, data = build("llama"), batches(n_batches=1)
    pruned_heads = None
    if not LEGACY_ATTENTION:
        pruned_heads, _ = prune_transformer(model, data, keep={0: 0.5}, target="heads")
        save_pruned(pruned_heads, tmp_path / "m")
        _simulate_legacy_attention(model)
    # the upgrade advice only where an upgrade helps (here on 5.x the old attention is simulated)
    with pytest.raises(ValueError, match=r"keeps per-module head counts \(.*hidden_size\).*model width.*"
                                         r"target='ffn'"
                                         + (r".*>= 4\.48" if LEGACY_ATTENTION else r" on this model\.$")):
        prune_transformer(model, data, keep=0.5, target="heads")
    _, report = prune_transformer(model, data, keep=0.5, target="ffn")
    assert [u.n_kept for u in report.units] == [INTER // 2] * LAYERS
    if pruned_heads is not None:
        load_pruned(tmp_path / "m")  # fine where the attention is width-free...
        fresh = build("llama")
        _simulate_legacy_attention(fresh)
        with pytest.raises(ValueError, match="reshapes the attention output to the model width"):
            load_pruned(tmp_path / "m", fresh)  # ...refused where it is not


def test_sliced_ffn_of_transformers_4_is_refused() -> None:
    """LlamaMLP of transformers 4 slices the FFN by config.pretraining_tp; transformers 5 ignores it."""
    model, data = build("llama"), batches(n_batches=1)
    model.config.pretraining_tp = 2
    if "pretraining_tp" in type(layers(model)[0].mlp).forward.__code__.co_names:
        with pytest.raises(ValueError, match=r"pretraining_tp=2 slices.*config\.pretraining_tp = 1"):
            prune_transformer(model, data, keep=0.5, target="ffn")
    else:
        prune_transformer(model, data, keep=0.5, target="ffn")


def test_the_callers_model_and_batches_are_untouched() -> None:
    model, data = build("llama"), batches(n_batches=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [{k: v.clone() for k, v in b.items()} for b in data]
    def shapes(m: nn.Module) -> list[tuple[int, int]]:
        return [(layer.mlp.gate_proj.out_features, layer.self_attn.q_proj.out_features) for layer in layers(m)]

    before = shapes(model)
    target = "ffn" if LEGACY_ATTENTION else "all"  # heads are refused on the old attention
    pruned, _ = prune_transformer(model, data, keep=0.5, target=target, method="asym")
    assert shapes(model) == before and shapes(pruned) != before
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for b, kept in zip(data, inputs, strict=True):
        assert all(torch.equal(b[k], kept[k]) for k in kept)


# --- fused gate and up (Phi-3, GLM), fused query/key/value (Phi-3) ---------------------------------------------------

@pytest.mark.parametrize("name", ["phi3", "glm"])
def test_magnitude_scores_both_halves_of_a_fused_gate_up_projection(name: str) -> None:
    """Unit ``i`` of ``gate_up_proj`` is its row ``i`` (gate) and row ``INTER + i`` (up). Units 0 and 1 are tiny
    everywhere except unit 0's gate row and unit 1's up row, unit 2 is tiny everywhere but twice as large as their
    tiny parts: with one unit to remove, unit 2 goes (reading one half only would remove unit 0 or 1)."""
    model, data = build(name), batches(n_batches=1)
    mlp = layers(model)[0].mlp
    with torch.no_grad():
        for start in (0, INTER):
            mlp.gate_up_proj.weight[start:start + 2] = 1e-3
            mlp.gate_up_proj.weight[start + 2] = 2e-3
        mlp.down_proj.weight[:, :2] = 1e-3
        mlp.down_proj.weight[:, 2] = 2e-3
        mlp.gate_up_proj.weight[0] = 1e3
        mlp.gate_up_proj.weight[INTER + 1] = 1e3
    _, report = prune_transformer(model, data, keep={0: (INTER - 1) / INTER}, target="ffn", method="magnitude",
                                  reweight=False)
    assert sorted(set(range(INTER)) - set(report.units[0].kept)) == [2]


def _mix_fused_units(mlp: nn.Module) -> None:
    """Phi-3's MLP computation with its intermediate features mixed before the down projection."""

    class Mixing(type(mlp)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = up * self.activation_fn(gate)
            return self.down_proj(h - h.mean(-1, keepdim=True))

    mlp.__class__ = Mixing


def test_a_fused_gate_up_ffn_that_mixes_its_units_is_refused() -> None:
    model, data = build("phi3"), batches(n_batches=1)
    _mix_fused_units(layers(model)[1].mlp)
    with pytest.raises(ValueError, match="does not act like zeroing column 0 of its down projection"):
        prune_transformer(model, data, keep=0.5, target="ffn", method="magnitude", reweight=False)


def test_phi3_heads_generate_with_the_cache_and_leave_the_shared_config_alone(tmp_path) -> None:
    """Phi-3's attention reads its query width from ``config.num_attention_heads``: a layer that loses key/value
    groups gets a view of the config with its counts, the model's config and the other layer's keep theirs, a
    later change of the model's config (its attention implementation) reaches the view, and the pruned causal LM
    generates (with its key/value cache) the tokens of the original with the removed heads' ``o_proj`` columns
    zeroed, also after a deep copy, and reloads."""
    if LEGACY_ATTENTION:
        pytest.skip("this transformers' Phi-3 attention keeps per-module head counts (heads refused)")
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTER,
                                  max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model, data = transformers.Phi3ForCausalLM(cfg).eval(), batches(n_batches=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    pruned, report = prune_transformer(model, data, keep={0: 0.5}, target="heads", method="magnitude",
                                       reweight=False)
    sa0, sa1 = (layer.self_attn for layer in layers(pruned.model))
    assert (sa0.config.num_attention_heads, sa0.config.num_key_value_heads) == (HEADS // 2, KV_HEADS // 2)
    assert sa0.config is not pruned.config
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert (sa1.config.num_attention_heads, model.config.num_attention_heads) == (HEADS, HEADS)
    pruned.set_attn_implementation("eager")
    assert sa0.config._attn_implementation == "eager" != model.config._attn_implementation
    copied = copy.deepcopy(pruned)
    assert layers(copied.model)[0].self_attn.config.shared is copied.config
    masked = copy.deepcopy(model)
    gone = sorted(set(range(KV_HEADS)) - set(report.units[0].kept))
    width = GROUP * HEAD_DIM
    with torch.no_grad():
        layers(masked.model)[0].self_attn.o_proj.weight[:, [g * width + i for g in gone for i in range(width)]] = 0
    for m in (pruned, copied):
        assert_same_greedy_generation(m, masked, data[0]["input_ids"][:1, :6], new_tokens=8)
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert layers(back.model)[0].self_attn.config.num_attention_heads == HEADS // 2
    with torch.no_grad():
        for b in data:
            torch.testing.assert_close(back(**b).logits, pruned(**b).logits, atol=1e-6, rtol=1e-6)


def test_granite_asym_target_carries_the_drift_back_through_the_residual_multiplier() -> None:
    """Granite adds ``m * mlp(post_attention_layernorm(r))`` to the residual stream ``r`` (``m = 0.22``): asym refits
    the last block's down projection toward ``y_o + (r_o - r_p) / m``, the original FFN output plus the residual
    stream's drift divided by the multiplier (so that the pruned sum ``r_p + m * y`` equals the original ``r_o +
    m * y_o``). ``y_o``, ``r_o``, ``r_p`` and the pruned inputs are read from the final models with hooks."""
    model, data = build("granite"), batches()
    m = GRANITE["residual_multiplier"]
    assert layers(model)[0].residual_multiplier == m  # the premise: the layers read it
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none")
    last, last_p = layers(model)[-1], layers(pruned)[-1]
    seen: dict[str, list[torch.Tensor]] = {"y_o": [], "r_o": [], "r_p": [], "a_p": []}
    hooks = [last.mlp.down_proj.register_forward_hook(lambda _m, _a, o: seen["y_o"].append(o)),
             last.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: seen["r_o"].append(a[0])),
             last_p.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: seen["r_p"].append(a[0])),
             last_p.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen["a_p"].append(a[0]))]
    run_hooked([model, pruned], data, hooks)
    y_o, r_o, r_p, a_p = (token_rows(data, seen[k]) for k in ("y_o", "r_o", "r_p", "a_p"))
    assert np.abs(r_o - r_p).max() > 1e-3  # the first block was pruned: there is a drift to carry back
    w_kept = last.mlp.down_proj.weight.detach().double().numpy().T[report.units[-1].kept]
    sol = np.linalg.lstsq(a_p, y_o + (r_o - r_p) / m - a_p @ w_kept, rcond=None)[0]
    np.testing.assert_allclose(last_p.mlp.down_proj.weight.detach().double().numpy().T, w_kept + sol, atol=2e-4,
                               rtol=1e-3)
