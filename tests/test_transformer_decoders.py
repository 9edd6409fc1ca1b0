"""Transformer pruning of the OPT and GPT-2 decoder layouts: OPT pre-LN (``do_layer_norm_before``, OPT-125m and
larger), OPT post-LN (OPT-350m), OPT without biases, and GPT-2, whose projections are ``Conv1D`` layers with
transposed weights and whose query, key and value share one fused projection. Tiny randomly initialised models
(no download).

Oracles: the unpruned model's outputs (keeping every unit), the unpruned model with the removed units' rows
(``Conv1D``, weight ``(in, out)``) or columns (``nn.Linear``) of the consumer set to zero, the same for greedy
generation with the key/value cache, numpy.linalg.lstsq on the down projection's input captured independently
with a hook (the refit), a re-run with other token ids at the padded positions, the saved and reloaded model's
outputs and, where the installed transformers has it (transformers 4), GPT-2's own ``prune_heads``.
"""

from __future__ import annotations

import copy
import inspect

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

HIDDEN, HEADS, INTER, LAYERS, VOCAB = 16, 4, 24, 2, 40
HEAD_DIM = HIDDEN // HEADS

# name -> (block kind, down projection and attention output projection inside a block, whether they are Conv1D,
# the attention attributes that count its heads (transformers 4 and 5 may hold different ones; those present
# must follow the heads))
LAYOUTS = {
    "opt": ("hf_opt", "fc2", "self_attn.out_proj", False, ("num_heads",)),
    "opt_post": ("hf_opt", "fc2", "self_attn.out_proj", False, ("num_heads",)),
    "opt_nobias": ("hf_opt", "fc2", "self_attn.out_proj", False, ("num_heads",)),
    "gpt2": ("hf_gpt2", "mlp.c_proj", "attn.c_proj", True, ("num_heads",)),
    "gptj": ("hf_gptj", "mlp.fc_out", "attn.out_proj", False, ("num_attention_heads",)),
    # CodeGen: GPT-J's parallel block, query, key and value fused in 4 model-parallel blocks (its 4 heads here are
    # kept in multiples of 4: all of them; tests/test_transformer_codegen.py prunes 16)
    "codegen": ("hf_codegen", "mlp.fc_out", "attn.out_proj", False, ("num_attention_heads",)),
    "neox": ("hf_gpt_neox", "mlp.dense_4h_to_h", "attention.dense", False, ("num_attention_heads",)),
    "neox_seq": ("hf_gpt_neox", "mlp.dense_4h_to_h", "attention.dense", False, ("num_attention_heads",)),
    # GPT-NeoX-Japanese: sequential, no biases but the last layer's dense_bias, returned apart by the attention
    "neoxja": ("hf_gpt_neox_japanese", "mlp.dense_4h_to_h", "attention.dense", False, ("num_attention_heads",)),
    "phi": ("hf_phi", "mlp.fc2", "self_attn.dense", False, ()),
    "cohere": ("hf_cohere", "mlp.down_proj", "self_attn.o_proj", False, ()),
    # Command R+: query and key LayerNorms with weights of their own per head, (heads, head_dim)
    "cohere_qk": ("hf_cohere", "mlp.down_proj", "self_attn.o_proj", False, ()),
    "starcoder2": ("hf_starcoder2", "mlp.c_proj", "self_attn.o_proj", False, ()),
    "gptneo": ("hf_gpt_neo", "mlp.c_proj", "attn.attention.out_proj", False, ("num_heads",)),
    "bloom": ("hf_bloom", "mlp.dense_4h_to_h", "self_attention.dense", False, ("num_heads",)),
    "bloom_post": ("hf_bloom", "mlp.dense_4h_to_h", "self_attention.dense", False, ("num_heads",)),
    "falcon": ("hf_falcon", "mlp.dense_4h_to_h", "self_attention.dense", False, ("num_heads",)),
    "falcon_mqa": ("hf_falcon", "mlp.dense_4h_to_h", "self_attention.dense", False, ("num_heads",)),
    "falcon_seq": ("hf_falcon", "mlp.dense_4h_to_h", "self_attention.dense", False, ("num_heads",)),
    "falcon_rw": ("hf_falcon", "mlp.dense_4h_to_h", "self_attention.dense", False, ("num_heads",)),
    "bigcode": ("hf_gpt_bigcode", "mlp.c_proj", "attn.c_proj", False, ("num_heads",)),
    "bigcode_mha": ("hf_gpt_bigcode", "mlp.c_proj", "attn.c_proj", False, ("num_heads",)),
    "mpt": ("hf_mpt", "ffn.down_proj", "attn.out_proj", False, ("n_heads",)),
    "stablelm": ("hf_stablelm", "mlp.down_proj", "self_attn.o_proj", False, ("num_heads",)),
    "stablelm_par": ("hf_stablelm", "mlp.down_proj", "self_attn.o_proj", False, ("num_heads",)),
    # the ModernBERT decoder (Ettin): a sliding-window and a global layer, ModernBERT's FFN (Wi's two halves)
    "modernbertdec": ("hf_modernbert_decoder", "mlp.Wo", "attn.Wo", False, ("num_heads",)),
    # Persimmon (Fuyu's language model): query, key and value fused head by head, per-head LayerNorms
    "persimmon": ("hf_persimmon", "mlp.dense_4h_to_h", "self_attn.dense", False, ("num_heads",)),
}
#: query heads per attention unit (Falcon's new architecture: a key/value group of two query heads)
GROUP = {"falcon": 2, "cohere_qk": 2}
NAMES = list(LAYOUTS)
# attention and FFN summed in parallel into the block output
PARALLEL = ["gptj", "codegen", "neox", "phi", "cohere", "cohere_qk", "falcon", "falcon_mqa", "stablelm_par"]


def inter(name: str) -> int:
    """FFN width of the tiny model (BLOOM's, Falcon's and MPT's are 4x the model width, GPT-NeoX-Japanese's 2x)."""
    if name == "neoxja":
        return 2 * HIDDEN
    return 4 * HIDDEN if name.startswith(("bloom", "falcon", "mpt")) else INTER
KIND = {name: v[0] for name, v in LAYOUTS.items()}

# transformers 4 before the attention refactor of 4.48: Phi's attention reshapes its output to the model width
LEGACY_ATTENTION = tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (4, 48)
# so does GPTBigCode's without multi-query in older releases
LEGACY_BIGCODE = "reshape(hidden_states.shape)" in inspect.getsource(
    transformers.models.gpt_bigcode.modeling_gpt_bigcode.GPTBigCodeAttention.forward)


def config(name: str) -> transformers.PretrainedConfig:
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                       n_positions=32, bos_token_id=1, eos_token_id=2)
    if name == "gptj":
        return transformers.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                       n_positions=32, rotary_dim=2, bos_token_id=1, eos_token_id=2)
    if name == "neoxja":
        return transformers.GPTNeoXJapaneseConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                  num_attention_heads=HEADS, intermediate_multiple_size=2,
                                                  max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    if name == "codegen":
        return transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                          n_positions=32, rotary_dim=2, bos_token_id=1, eos_token_id=2)
    if name.startswith("neox"):
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS, intermediate_size=INTER,
                                          max_position_embeddings=32, use_parallel_residual=name == "neox",
                                          bos_token_id=1, eos_token_id=2)
    if name in ("cohere", "cohere_qk", "starcoder2"):
        cfg = transformers.Starcoder2Config if name == "starcoder2" else transformers.CohereConfig
        qk = dict(use_qk_norm=True) if name == "cohere_qk" else {}
        return cfg(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=HEADS // GROUP.get(name, 1), intermediate_size=INTER, max_position_embeddings=32,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, **qk)
    if name == "gptneo":  # a global and a local (windowed) attention layer
        return transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                         intermediate_size=INTER, attention_types=[[["global", "local"], 1]],
                                         window_size=4, max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    if name.startswith("falcon"):  # new architecture (key/value groups), multi-query in parallel or in sequence, RW
        layout = {"falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
                  "falcon_mqa": dict(multi_query=True, parallel_attn=True),
                  "falcon_seq": dict(multi_query=True, parallel_attn=False),
                  "falcon_rw": dict(multi_query=False, parallel_attn=False, alibi=True, bias=True)}[name]
        return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, max_position_embeddings=32, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0, **layout)
    if name.startswith("bigcode"):  # StarCoder's multi-query attention, or one key/value head per query head
        return transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                             n_inner=INTER, n_positions=32, multi_query=name == "bigcode",
                                             bos_token_id=1, eos_token_id=2)
    if name.startswith("stablelm"):  # attention and FFN one after the other, or in parallel
        return transformers.StableLmConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                           num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                           intermediate_size=INTER, max_position_embeddings=32,
                                           use_parallel_residual=name == "stablelm_par", bos_token_id=1,
                                           eos_token_id=2)
    if name == "mpt":
        return transformers.MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=32,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name.startswith("bloom"):
        return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                        apply_residual_connection_post_layernorm=name == "bloom_post",
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "persimmon":
        return transformers.PersimmonConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                            num_attention_heads=HEADS, intermediate_size=INTER,
                                            max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2)
    if name == "modernbertdec":
        return transformers.ModernBertDecoderConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=32, layer_types=["sliding_attention", "full_attention"],
            local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    if name == "phi":
        return transformers.PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=32,
                                      bos_token_id=1, eos_token_id=2)
    return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, ffn_dim=INTER, max_position_embeddings=32,
                                  word_embed_proj_dim=HIDDEN, do_layer_norm_before=name != "opt_post",
                                  enable_bias=name != "opt_nobias", pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = {"gpt2": ("GPT2Model", "GPT2LMHeadModel"), "gptj": ("GPTJModel", "GPTJForCausalLM"),
          "codegen": ("CodeGenModel", "CodeGenForCausalLM"),
          "neoxja": ("GPTNeoXJapaneseModel", "GPTNeoXJapaneseForCausalLM"),
          "neox": ("GPTNeoXModel", "GPTNeoXForCausalLM"), "phi": ("PhiModel", "PhiForCausalLM"),
          "opt": ("OPTModel", "OPTForCausalLM"), "cohere": ("CohereModel", "CohereForCausalLM"),
          "starcoder2": ("Starcoder2Model", "Starcoder2ForCausalLM"), "gptneo": ("GPTNeoModel", "GPTNeoForCausalLM"),
          "bloom": ("BloomModel", "BloomForCausalLM"), "falcon": ("FalconModel", "FalconForCausalLM"),
          "bigcode": ("GPTBigCodeModel", "GPTBigCodeForCausalLM"), "mpt": ("MptModel", "MptForCausalLM"),
          "stablelm": ("StableLmModel", "StableLmForCausalLM"),
          "modernbertdec": ("ModernBertDecoderModel", "ModernBertDecoderForCausalLM"),
          "persimmon": ("PersimmonModel", "PersimmonForCausalLM")}


def build(name: str, seed: int = 0, head: bool = False) -> nn.Module:
    """A tiny model of the layout (``head``: the causal LM, else the bare decoder)."""
    torch.manual_seed(seed)
    cls = FAMILY[name.split("_")[0]][int(head)]
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    model = getattr(transformers, cls)(config(name)).eval()
    with torch.no_grad():  # larger weights than the default init, so that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
            elif p.dim() == 1 and name != "opt_nobias":
                p.normal_(0.0, 0.3)
        if name == "cohere_qk":  # distinct rows of the per-head norm weights, so that the kept rows matter
            for layer in (model.layers if hasattr(model, "layers") else model.model.layers):
                for norm in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)):
                    if norm is not None:
                        norm.weight.normal_(1.0, 0.5)
    return model


def heads_target(name: str, target: str, model: nn.Module, data: list[dict[str, torch.Tensor]]) -> str | None:
    """``target``, or where the attention cannot lose heads, the refusal checked and what remains to prune ("ffn",
    or ``None`` for ``target="heads"``): Falcon-RW (ALiBi slopes built by the model for all its heads and folded
    into the mask), Phi, Cohere and StarCoder2 before
    transformers 4.48 and GPTBigCode without multi-query in older releases (their attention reshapes its output to
    the model width; Persimmon's too before 4.48, which the first-batch check finds)."""
    if target == "ffn":
        return target
    if name == "codegen" and target == "heads":  # one head in each of its 4 model-parallel blocks: none can go
        return None
    if name == "falcon_rw" or (name == "bigcode_mha" and LEGACY_BIGCODE) or (name == "persimmon" and
                                                                           LEGACY_ATTENTION):
        match = r"fails once a head is removed.*target='ffn'"
    elif name in ("phi", "cohere", "cohere_qk", "starcoder2") and LEGACY_ATTENTION:
        match = r"reshapes the attention output to the model width.*target='ffn'"
    else:
        return target
    with pytest.raises(ValueError, match=match):
        prune_transformer(model, data, keep=0.5, target=target)
    return None if target == "heads" else "ffn"


def batches(n_batches: int = 4, b: int = 6, t: int = 10, seed: int = 1, garbage: bool = False
            ) -> list[dict[str, torch.Tensor]]:
    return ragged_token_batches(VOCAB, n_batches, b, t, seed, garbage)


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


LAYER_PATHS = {"GPT2Model": "h", "GPT2LMHeadModel": "transformer.h", "GPTJModel": "h", "GPTJForCausalLM":
               "transformer.h", "CodeGenModel": "h", "CodeGenForCausalLM": "transformer.h", "GPTNeoXModel": "layers",
               "GPTNeoXJapaneseModel": "layers", "GPTNeoXJapaneseForCausalLM": "gpt_neox_japanese.layers",
               "GPTNeoXForCausalLM": "gpt_neox.layers", "PhiModel": "layers",
               "PhiForCausalLM": "model.layers", "OPTModel": "decoder.layers", "OPTForCausalLM": "model.decoder.layers",
               "CohereModel": "layers", "CohereForCausalLM": "model.layers", "Starcoder2Model": "layers",
               "Starcoder2ForCausalLM": "model.layers", "GPTNeoModel": "h", "GPTNeoForCausalLM": "transformer.h",
               "BloomModel": "h", "BloomForCausalLM": "transformer.h", "FalconModel": "h",
               "FalconForCausalLM": "transformer.h", "GPTBigCodeModel": "h", "GPTBigCodeForCausalLM": "transformer.h",
               "MptModel": "blocks", "MptForCausalLM": "transformer.blocks", "StableLmModel": "layers",
               "StableLmForCausalLM": "model.layers", "ModernBertDecoderModel": "layers",
               "ModernBertDecoderForCausalLM": "model.layers", "PersimmonModel": "layers",
               "PersimmonForCausalLM": "model.layers"}


def layers(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule(LAYER_PATHS[type(model).__name__]))


def down(name: str, layer: nn.Module) -> nn.Module:
    return layer.get_submodule(LAYOUTS[name][1])


def zero_inputs(name: str, layer: nn.Module, stage: str, gone: list[int]) -> None:
    """Zero the consumer's weights that read the removed units: rows of a Conv1D's ``(in, out)`` weight, columns
    of a Linear's ``(out, in)`` weight."""
    width = GROUP.get(name, 1) * HEAD_DIM  # columns of an attention unit
    cols = gone if stage == "ffn" else [u * width + i for u in gone for i in range(width)]
    consumer = layer.get_submodule(LAYOUTS[name][1] if stage == "ffn" else LAYOUTS[name][2])
    with torch.no_grad():
        if LAYOUTS[name][3]:
            consumer.weight[cols, :] = 0.0
        else:
            consumer.weight[:, cols] = 0.0


def zeroed_original(name: str, model: nn.Module, report) -> nn.Module:
    masked = copy.deepcopy(model)
    for unit in report.units:
        zero_inputs(name, masked.get_submodule(unit.block), unit.stage,
                    sorted(set(range(unit.n_units)) - set(unit.kept)))
    return masked


@pytest.mark.parametrize("name", NAMES)
def test_blocks_are_found(name: str) -> None:
    assert [b.kind for b in find_blocks(build(name))] == [KIND[name]] * LAYERS


@pytest.mark.parametrize("method", ["asym", "seq", "layer", "magnitude", "wanda", "random"])
@pytest.mark.parametrize("name", NAMES)
def test_keep_everything_without_refit_is_exact(name: str, method: str) -> None:
    model, data = build(name), batches()
    target = heads_target(name, "all", model, data)
    pruned, report = prune_transformer(model, data, keep=1.0, target=target, method=method, reweight=False)
    assert report.params_after == report.params_before
    assert report.n_padding_excluded > 0 or method in ("magnitude", "random")  # those two read no statistics
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
@pytest.mark.parametrize("name", NAMES)
def test_pruning_without_refit_is_the_original_with_the_removed_units_zeroed(name: str, target: str) -> None:
    model, data = build(name), batches()
    target = heads_target(name, target, model, data)
    if target is None:
        return
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="magnitude", reweight=False)
    masked = zeroed_original(name, model, report)
    assert len(report.units) == LAYERS * (2 if target == "all" else 1)
    assert all(u.n_units == (inter(name) if u.stage == "ffn" else HEADS // GROUP.get(name, 1))
               and u.n_kept == (u.n_units if u.stage == "heads" and name == "codegen" else u.n_units // 2)
               for u in report.units)
    assert report.params_after < report.params_before
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)  # something was removed


@pytest.mark.parametrize("name", ["opt", "gpt2", "gptj", "neox", "phi", "cohere", "starcoder2", "gptneo", "bloom",
                                  "falcon", "falcon_mqa", "falcon_seq", "bigcode", "bigcode_mha", "mpt", "stablelm",
                                  "stablelm_par"])
def test_head_bookkeeping_and_generation_with_the_cache(name: str) -> None:
    """The pruned causal LM generates, with its key/value cache, the tokens of the zeroed original; the attention's
    head counts and widths agree with its weights."""
    model, data = build(name, head=True), batches(n_batches=2)
    keep = {0: 0.5, 1: 0.75}
    target = heads_target(name, "all", model, data)
    pruned, report = prune_transformer(model, data, keep=keep, target=target, method="wanda", reweight=False)
    _, _, out_path, conv1d, counts = LAYOUTS[name]
    kept_units = {u.block: u.n_kept for u in report.units if u.stage == "heads"}
    for i, layer in enumerate(layers(pruned)):
        heads = kept_units[report.spec["blocks"][i]["name"]] * GROUP.get(name, 1) if target == "all" else HEADS
        out_proj = layer.get_submodule(out_path)
        attn = layer.get_submodule(out_path.rpartition(".")[0])
        assert tuple(out_proj.weight.shape)[::-1 if conv1d else 1] == (HIDDEN, heads * HEAD_DIM)
        assert all(getattr(attn, c) == heads for c in counts if hasattr(attn, c))
        if name == "gpt2":
            assert attn.split_size == heads * HEAD_DIM
            assert tuple(attn.c_attn.weight.shape) == (HIDDEN, 3 * heads * HEAD_DIM)
        width = down(name, layer).weight.shape[0 if conv1d else 1]
        assert width == inter(name) * (2 if i == 0 else 3) // 4
    masked = zeroed_original(name, model, report)
    assert_same_greedy_generation(pruned, masked, data[0]["input_ids"][:1, :4])


@pytest.mark.parametrize("name", NAMES)
def test_ffn_refit_equals_lstsq_on_the_captured_inputs(name: str) -> None:
    """OPT runs its FFN on the tokens flattened to (batch * tokens, features): the rows of the real tokens are
    found there as in the (batch, tokens, features) layouts. The refit (ridge 0) is least squares toward the trained
    weights: their minimum-norm correction, so a kept unit that is dead on every calibration token (ReLU, as in the
    post-LN model here) keeps its trained weights."""
    model, data = build(name), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="layer", ridge=0.0,
                                       weighting="none")
    dead_kept = 0
    for i, layer in enumerate(layers(model)):
        d = down(name, layer)
        A32 = torch.cat([captured_input(model, d, b).reshape(*b["input_ids"].shape, -1)[b["attention_mask"].bool()]
                         for b in data])
        A = A32.double().numpy()
        # Conv1D: y = x @ W (W is (in, out)); Linear: y = x @ W.T
        w_in_out = d.weight.detach().double().numpy() if LAYOUTS[name][3] else d.weight.detach().double().numpy().T
        # the targets are what the layer computes (in float32: with BLOOM's ill-conditioned activations, float32
        # rounding of A @ W alone moves the least-squares weights by 1e-3)
        with torch.no_grad():
            Y = (d(A32) - (0.0 if d.bias is None else d.bias)).double().numpy()
        kept = report.units[i].kept
        has_bias = d.bias is not None
        design = np.hstack([A[:, kept], np.ones((len(A), 1))]) if has_bias else A[:, kept]
        sol = np.linalg.lstsq(design, Y - A[:, kept] @ w_in_out[kept], rcond=None)[0]
        dead_kept += int((np.abs(A[:, kept]).max(0) == 0).sum())
        new = down(name, layers(pruned)[i])
        got = new.weight.detach().double().numpy()
        np.testing.assert_allclose(got if LAYOUTS[name][3] else got.T, w_in_out[kept] + sol[:len(kept)], atol=2e-4,
                                   rtol=1e-3)
        assert (new.bias is None) == (not has_bias)
        if has_bias:
            np.testing.assert_allclose(new.bias.detach().double().numpy(), d.bias.detach().double().numpy()
                                       + sol[-1], atol=2e-4, rtol=1e-3)
    assert dead_kept > 0 if name == "opt_post" else True  # the case the docstring names is exercised


@pytest.mark.parametrize("name", ["opt", "opt_post", "gpt2", "gptj", "neox", "neox_seq", "phi", "cohere", "gptneo",
                                  "bloom_post", "falcon", "falcon_seq", "bigcode"])
def test_padding_tokens_do_not_change_the_statistics(name: str) -> None:
    model = build(name)
    target = heads_target(name, "all", model, batches())
    runs = [prune_transformer(model, batches(garbage=g), keep=0.5, target=target, method="asym") for g in (0, 1)]
    assert_padding_does_not_matter(*runs)


@pytest.mark.parametrize("name", NAMES)
def test_asym_with_refit_beats_magnitude_without_refit(name: str) -> None:
    """Not a test of a number: greedy selection with refit must reconstruct the unpruned outputs better than the
    Torch-Pruning-style baseline on held-out batches (a refit or a selection on the wrong rows would not)."""
    model, data, held_out = build(name), batches(), batches(seed=7)
    errs = {}
    for method, reweight in (("asym", True), ("magnitude", False)):
        pruned, _ = prune_transformer(model, data, keep=0.5, target="ffn", method=method, reweight=reweight)
        errs[method] = sum(float((out(pruned, b) - out(model, b)).pow(2).sum()) for b in held_out)
    assert errs["asym"] < 0.5 * errs["magnitude"], errs


@pytest.mark.parametrize("name", ["opt", "opt_post", "gpt2", "gptj", "neox", "phi", "cohere", "starcoder2", "gptneo",
                                  "bloom", "falcon", "falcon_mqa", "bigcode", "mpt", "stablelm_par",
                                  "modernbertdec", "persimmon"])
def test_save_and_reload(tmp_path, name: str) -> None:
    model, data = build(name), batches()
    target = heads_target(name, "all", model, data)
    pruned, report = prune_transformer(model, data, keep={0: 0.5}, target=target, method="asym")
    heads = HEADS // 2 if target == "all" else HEADS
    blocks = report.spec["blocks"]
    assert [(b["intermediate_size"], b["num_heads"]) for b in blocks] == [(inter(name) // 2, heads),
                                                                          (inter(name), HEADS)]
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert type(back) is type(model)
    for b in data:
        torch.testing.assert_close(out(back, b), out(pruned, b), atol=1e-6, rtol=1e-6)


def test_gpt2_heads_match_transformers_prune_heads() -> None:
    """transformers 4's own GPT-2 head pruning (``prune_heads``) removes the same heads to the same model."""
    model, data = build("gpt2"), batches(n_batches=2)
    if not hasattr(model, "prune_heads") or not hasattr(layers(model)[0].attn, "prune_heads"):
        pytest.skip(f"transformers {transformers.__version__} has no GPT-2 prune_heads")
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="magnitude", reweight=False)
    theirs = copy.deepcopy(model)
    theirs.prune_heads({int(u.block.rpartition(".")[2]): sorted(set(range(HEADS)) - set(u.kept))
                        for u in report.units})
    for ours, other in zip(layers(pruned), layers(theirs), strict=True):
        assert (ours.attn.num_heads, ours.attn.split_size) == (other.attn.num_heads, other.attn.split_size)
        torch.testing.assert_close(ours.attn.c_attn.weight, other.attn.c_attn.weight)
        torch.testing.assert_close(ours.attn.c_proj.weight, other.attn.c_proj.weight)
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(theirs, b), atol=1e-5, rtol=1e-5)


def test_the_callers_model_and_batches_are_untouched() -> None:
    model, data = build("gpt2"), batches(n_batches=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [{k: v.clone() for k, v in b.items()} for b in data]
    types = [type(m) for m in model.modules()]
    pruned, _ = prune_transformer(model, data, keep=0.5, target="all", method="asym")
    assert [type(m) for m in pruned.modules()] == types  # Conv1D stays Conv1D
    assert all(layer.attn.num_heads == HEADS for layer in layers(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for b, kept in zip(data, inputs, strict=True):
        assert all(torch.equal(b[k], kept[k]) for k in kept)


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_asym_refit_aims_at_the_original_output_minus_the_pruned_residual(name: str) -> None:
    """In a parallel block ``out = x + attn(.) + mlp(.)``, asym refits the last block's down projection toward the
    original block output minus what the pruned network adds besides the FFN (its block input and attention
    output). The oracle reads those from the final pruned model with hooks: the first block is pruned before the
    second (so the second block's inputs are the ones asym saw), and pruning FFNs only leaves attentions as they
    were. Least squares toward the trained weights (ridge 0), as the refit is documented."""
    model, data = build(name), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="ffn", method="asym", ridge=0.0,
                                       weighting="none")
    last, last_p = layers(model)[-1], layers(pruned)[-1]
    attn_out = last_p.get_submodule(LAYOUTS[name][2])
    seen: dict[str, list[torch.Tensor]] = {"out_o": [], "x_p": [], "attn_p": [], "a_p": []}
    hooks = [last.register_forward_hook(lambda _m, _a, o: seen["out_o"].append(o[0] if isinstance(o, tuple)
                                                                               else o)),
             last_p.register_forward_pre_hook(lambda _m, a, k: seen["x_p"].append(
                 a[0] if a else k["hidden_states"]), with_kwargs=True),
             attn_out.register_forward_hook(lambda _m, _a, o: seen["attn_p"].append(o)),
             down(name, last_p).register_forward_pre_hook(lambda _m, a: seen["a_p"].append(a[0]))]
    run_hooked([model, pruned], data, hooks)
    target = token_rows(data, seen["out_o"]) - token_rows(data, seen["x_p"]) - token_rows(data, seen["attn_p"])
    A = token_rows(data, seen["a_p"])  # the kept units' activations in the pruned network (only their up rows left)
    d = down(name, last)
    kept = report.units[-1].kept
    w_kept = d.weight.detach().double().numpy().T[kept]
    has_bias = d.bias is not None  # Cohere's projections have none: no intercept then
    design = np.hstack([A, np.ones((len(A), 1))]) if has_bias else A
    sol = np.linalg.lstsq(design, target - A @ w_kept, rcond=None)[0]
    new = down(name, last_p)
    np.testing.assert_allclose(new.weight.detach().double().numpy().T, w_kept + sol[:len(kept)], atol=2e-4,
                               rtol=1e-3)
    assert (new.bias is None) == (not has_bias)
    if has_bias:
        np.testing.assert_allclose(new.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)


def test_gpt_neox_japanese_asym_heads_refit_reads_the_residual_past_the_separate_bias() -> None:
    """GPT-NeoX-Japanese's last attention returns its output projection's bias apart (``dense_bias``), added with the
    residual: the heads' asym target is the original sum entering post_attention_layernorm minus the pruned
    network's residual-and-bias, i.e. ``y_o + x_o - x_p`` (the bias cancels), least squares without an intercept
    (``dense`` has no bias), written out from hooks on the original and on the pruned model up to that layer."""
    model, data = build("neoxja"), batches()
    last = layers(model)[-1]
    assert isinstance(last.attention.dense_bias, torch.Tensor) and last.attention.dense_bias.abs().sum() > 0
    pruned, report = prune_transformer(model, data, keep=0.5, target="heads", method="asym", ridge=0.0,
                                       weighting="none")
    mixed = copy.deepcopy(pruned)  # the pruned network up to the last layer, then the original last layer
    mixed.layers[-1] = last
    seen: dict[str, list[torch.Tensor]] = {"x_o": [], "a_o": [], "x_p": [], "a_p": []}

    def grab(key: str):
        return lambda _m, a, k: seen[key].append(a[0] if a else k["hidden_states"])

    hooks = [last.register_forward_pre_hook(grab("x_o"), with_kwargs=True),
             last.attention.dense.register_forward_pre_hook(grab("a_o"), with_kwargs=True)]
    run_hooked([model], data, hooks)
    hooks = [last.register_forward_pre_hook(grab("x_p"), with_kwargs=True),
             last.attention.dense.register_forward_pre_hook(grab("a_p"), with_kwargs=True)]
    run_hooked([mixed], data, hooks)
    W = last.attention.dense.weight.detach().double().numpy()
    target = (token_rows(data, seen["a_o"]) @ W.T + token_rows(data, seen["x_o"]) - token_rows(data, seen["x_p"]))
    cols = [h * HEAD_DIM + i for h in report.units[-1].kept for i in range(HEAD_DIM)]
    sol = np.linalg.lstsq(token_rows(data, seen["a_p"])[:, cols], target, rcond=None)[0]
    new = layers(pruned)[-1].attention.dense
    assert new.bias is None
    np.testing.assert_allclose(new.weight.detach().double().numpy(), sol.T, atol=2e-4, rtol=1e-3)


class _ScaledParallelBlock(nn.Module):
    """A GPT-J look-alike that doubles its FFN branch: ``x + attn(ln_1(x)) + 2 mlp(ln_1(x))`` (the block's own
    forward plus the FFN output it computed once more; the rest of its outputs, such as a cache, as they were)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.ln_1, self.attn, self.mlp = block.ln_1, block.attn, block.mlp

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        mlp_out: list[torch.Tensor] = []
        hook = self.mlp.register_forward_hook(lambda _m, _a, o: mlp_out.append(o))
        try:
            out = self.block(hidden_states, *args, **kwargs)
        finally:
            hook.remove()
        return (out[0] + mlp_out[0], *out[1:]) if isinstance(out, tuple) else out + mlp_out[0]


def test_a_parallel_look_alike_that_scales_a_branch_is_refused() -> None:
    model, data = build("gptj"), batches(n_batches=2)
    for i, block in enumerate(list(model.h)):
        model.h[i] = _ScaledParallelBlock(block)
    assert [b.kind for b in find_blocks(model)] == ["hf_gptj"] * LAYERS
    with pytest.raises(ValueError, match="down projection's output is not added straight to the block output"):
        prune_transformer(model, data, keep=0.5, target="ffn", method="asym")


def test_modernbert_decoder_magnitude_head_scores_read_the_separate_value_rows() -> None:
    """The ModernBERT decoder keeps its queries, keys and values apart (the encoder fuses them in Wqkv): a head whose
    value rows are large is kept though its query and key rows and output columns are the smallest; a head small
    in all four (but larger than those of the first) goes."""
    model, data = build("modernbertdec"), batches(n_batches=1)
    attn = layers(model)[0].attn
    with torch.no_grad():
        for head, small in ((0, 1e-3), (1, 2e-3)):
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                lin.weight[rows] = small
            attn.Wo.weight[:, rows] = small
        attn.v_proj.weight[:HEAD_DIM] = 1e3
    _, report = prune_transformer(model, data, keep={0: 0.75}, target="heads", method="magnitude", reweight=False)
    assert 0 in report.units[0].kept and 1 not in report.units[0].kept


def test_multi_query_magnitude_scores_leave_the_shared_key_and_value_out() -> None:
    """Falcon's multi-query projection ends with one key and one value head shared by every query head: they belong
    to no unit, so a head whose query rows and output columns are the smallest goes, however large the shared
    rows are."""
    model, data = build("falcon_mqa"), batches(n_batches=1)
    d = HEAD_DIM
    for layer in layers(model):
        attn = layer.self_attention
        with torch.no_grad():
            attn.query_key_value.weight[3 * d:4 * d] = 1e-3  # query head 3 (the last before the shared rows)
            attn.dense.weight[:, 3 * d:4 * d] = 1e-3
            attn.query_key_value.weight[HEADS * d:] = 1e3  # the shared key and value heads
    _, report = prune_transformer(model, data, keep=0.75, target="heads", method="magnitude", reweight=False)
    assert all(u.kept == [0, 1, 2] for u in report.units), [u.kept for u in report.units]


@pytest.mark.parametrize("name", ["bloom", "mpt"])
def test_alibi_heads_pruned_twice_are_the_original_with_the_removed_heads_zeroed(name: str) -> None:
    """ALiBi slopes are built by the model for all its heads: a layer that lost heads takes its own heads' slopes,
    also after a second pruning (the kept indices compose: the second run's units index the first run's heads)."""
    model, data = build(name), batches()
    once, r1 = prune_transformer(model, data, keep=0.75, target="heads", method="magnitude", reweight=False)
    twice, r2 = prune_transformer(once, data, keep=0.67, target="heads", method="magnitude", reweight=False)
    masked = copy.deepcopy(model)
    for u1, u2 in zip(r1.units, r2.units, strict=True):
        kept = [u1.kept[j] for j in u2.kept]  # original head indices
        assert len(kept) == 2
        zero_inputs(name, masked.get_submodule(u1.block), "heads", sorted(set(range(HEADS)) - set(kept)))
    for b in data:
        torch.testing.assert_close(out(twice, b), out(masked, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(twice, b), out(model, b), atol=1e-3)
