"""export_pretrained: a uniformly pruned Hugging Face model saved as a standard checkpoint.

Oracles: transformers' own loader (``AutoModel*.from_pretrained``, which knows nothing of submod) must rebuild a
model that gives the pruned model's outputs exactly; the configuration entries are compared with the sizes read
from the pruned modules' weights; refusals are checked for their message and for leaving nothing on disk."""

from __future__ import annotations

import json

import pytest
import torch
from _torch_helpers import MIXTRAL_USER_MODULE, ragged_token_batches
from torch import nn

from nn_adapters.transformer import export_pretrained, load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # (CI runs a few other files with transformers 4.40 too)
    pytest.skip("these tests prune Llama's key/value groups and query heads, Mixtral's experts and T5's heads, and "
                "read the model-level rotary embedding: transformers >= 5", allow_module_level=True)

VOCAB = 40


def llama(tied: bool = False) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=20, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def first(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def assert_same_outputs(a: nn.Module, b: nn.Module, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(first(a(**batch)), first(b(**batch)), rtol=1e-6, atol=1e-6)


def nothing_left(tmp_path) -> bool:
    return list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("target", "head_unit", "tied"), [("ffn", "group", False), ("all", "group", True),
                                                           ("heads", "query", False)])
def test_a_uniformly_pruned_llama_loads_with_from_pretrained(tmp_path, target: str, head_unit: str,
                                                             tied: bool) -> None:
    model, batches = llama(tied), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target=target, head_unit=head_unit)
    path = export_pretrained(pruned, tmp_path / "out")
    assert path == tmp_path / "out" and nothing_left(tmp_path / "out") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    back = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    attn, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["intermediate_size"] == mlp.down_proj.in_features
    assert cfg["num_attention_heads"] * 8 == attn.q_proj.out_features
    assert cfg["num_key_value_heads"] * 8 == attn.k_proj.out_features
    assert cfg["head_dim"] == 8
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    assert model.config.intermediate_size == 24 and pruned.config.num_attention_heads == 4  # configs unchanged
    assert_same_outputs(back, pruned, batches)


def test_bert_ffn_exports_and_its_heads_are_refused_with_the_reason(tmp_path) -> None:
    """BERT derives its head width from the model width and the head count, so a config cannot say 'fewer heads of
    the same width': the export of pruned heads is refused, and nothing is written."""
    model, batches = bert(), ragged_token_batches(VOCAB, 2)
    ffn, _ = prune_transformer(model, batches, keep=0.5, target="ffn")
    back = transformers.AutoModel.from_pretrained(export_pretrained(ffn, tmp_path / "ffn"), add_pooling_layer=False)
    assert back.config.intermediate_size == 10
    assert_same_outputs(back.eval(), ffn, batches)
    heads, _ = prune_transformer(model, batches, keep=0.5, target="heads")
    with pytest.raises(ValueError, match="save_pruned") as err:
        export_pretrained(heads, tmp_path / "heads")
    assert "mismatched" in str(err.value) or "shape" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffn"]


def test_blocks_of_different_sizes_are_refused(tmp_path) -> None:
    model, batches = llama(), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep={0: 0.5, 1: 0.75}, target="ffn")
    with pytest.raises(ValueError, match=r"intermediate_size=24 keep different sizes \(12 in model.layers.0; 18 in "
                                         r"model.layers.1\).*uniform keep="):
        export_pretrained(pruned, tmp_path / "m")
    assert nothing_left(tmp_path)
    save_pruned(pruned, tmp_path / "m")  # the per-block route still works
    assert_same_outputs(load_pruned(tmp_path / "m"), pruned, batches)


@pytest.mark.parametrize("name", ["gpt2", "bart", "t5", "mixtral", "vit", "distilbert"])
def test_other_architectures_name_their_sizes_their_own_way(tmp_path, name: str) -> None:
    """GPT-2's n_inner (None: 4 x width, given the pruned size), BART's encoder_ffn_dim / decoder_ffn_dim (two
    unpruned sizes, each to its own), T5's d_ff, Mixtral's per-expert intermediate_size, ViT (probe images),
    DistilBERT's hidden_dim."""
    gen = torch.Generator().manual_seed(3)
    ids = [{"input_ids": torch.randint(3, VOCAB, (4, 10), generator=gen)} for _ in range(2)]
    torch.manual_seed(0)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                                                     n_positions=32))
        batches, key, want = ids, "n_inner", 32
    elif name == "bart":
        model = transformers.BartModel(transformers.BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=28, max_position_embeddings=32))
        batches, key, want = [{**b, "decoder_input_ids": b["input_ids"][:, :5]} for b in ids], "decoder_ffn_dim", 14
    elif name == "t5":
        model = transformers.T5Model(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                                           num_heads=2, decoder_start_token_id=0))
        batches, key, want = [{**b, "decoder_input_ids": b["input_ids"][:, :5]} for b in ids], "d_ff", 12
    elif name == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))
        batches, key, want = ids, "intermediate_size", 12
    elif name == "distilbert":
        model = transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=VOCAB, dim=16, hidden_dim=24,
                                                                           n_layers=2, n_heads=2))
        batches, key, want = ids, "hidden_dim", 12
    else:
        model = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=20, image_size=8, patch_size=4),
                                      add_pooling_layer=False)
        batches = [{"pixel_values": torch.randn(3, 3, 8, 8, generator=gen)} for _ in range(2)]
        key, want = "intermediate_size", 10
    pruned, _ = prune_transformer(model.eval(), batches, keep=0.5, target="ffn")
    path = export_pretrained(pruned, tmp_path / name)
    assert json.loads((path / "config.json").read_text())[key] == want
    kwargs = {"add_pooling_layer": False} if name == "vit" else {}
    back = type(model).from_pretrained(path, **kwargs).eval()
    assert_same_outputs(back, pruned, batches)


def test_a_buffer_the_checkpoint_does_not_carry_is_caught_by_the_outputs(tmp_path) -> None:
    """Weights, shapes and module numbers all agree, but the pruned model's rotary frequencies (a buffer that is
    not saved) were changed: only the output comparison sees it, and refuses."""
    model, batches = llama(), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="ffn")
    pruned.model.rotary_emb.inv_freq.mul_(1.5)
    with pytest.raises(ValueError, match="other outputs"):
        export_pretrained(pruned, tmp_path / "m", example_inputs=batches[0])
    assert nothing_left(tmp_path)


def test_inputs_that_cannot_be_probed_and_models_that_are_not_hugging_face_are_refused(tmp_path) -> None:
    model, batches = llama(), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="ffn")
    with pytest.raises(ValueError, match="example_inputs must be a mapping .* got list"):
        export_pretrained(pruned, tmp_path / "m", example_inputs=[batches[0]["input_ids"]])
    pruned.main_input_name = "input_features"  # as Whisper's: no probe batch is built for it
    with pytest.raises(ValueError, match="example_inputs="):
        export_pretrained(pruned, tmp_path / "m")
    assert nothing_left(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(export_pretrained(pruned, tmp_path / "m",
                                                                               example_inputs=batches[1]))
    assert_same_outputs(back.eval(), pruned, batches)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    small, _ = prune_transformer(layer, [torch.randn(4, 5, 8)], keep=0.5, target="ffn")
    with pytest.raises(ValueError, match="not a transformers model: save it with save_pruned"):
        export_pretrained(small, tmp_path / "plain")


def test_cli_export_pretrained_writes_a_checkpoint_from_pretrained_reads(tmp_path, monkeypatch, capsys) -> None:
    """``submod prune ... --export-pretrained``: whole experts of a Mixtral removed (``num_local_experts`` 8 -> 4 in
    the config) load with ``from_pretrained`` and compute what ``nna.prune`` gives; BERT's heads, which its config
    cannot express, are refused with the reason and nothing is written."""
    import nn_adapters as nna
    from submod.cli import main

    (tmp_path / "exportmods.py").write_text(
        MIXTRAL_USER_MODULE + "def bert():\n"
        "    torch.manual_seed(0)\n"
        "    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,\n"
        "                                  intermediate_size=20)\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    return transformers.BertModel(cfg).eval(), [{'input_ids': torch.randint(0, 50, (4, 12), generator=g)}]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["prune", "exportmods:build", "--target", "experts", "--keep", "0.5", "--export-pretrained",
                 "--out", "std"]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    import exportmods

    model, data = exportmods.build()
    pruned, _ = nna.prune(model, data, keep=0.5, target="experts")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "std").eval()
    assert back.config.num_local_experts == 4 and model.config.num_local_experts == 8
    assert_same_outputs(back, pruned, data)
    assert main(["prune", "exportmods:bert", "--target", "heads", "--keep", "0.5", "--export-pretrained",
                 "--out", "heads"]) == 2
    assert "prune target='ffn' for a standard checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("exportmods", "__"))) == ["std"]


def test_each_check_names_what_differs(tmp_path) -> None:
    """What the standard model cannot hold is refused by the check that sees it first: T5's record of the heads each
    attention kept (its relative position bias picks those channels) is a weight the standard T5 does not have; a
    scaling changed on the pruned model is a number its modules hold."""
    gen = torch.Generator().manual_seed(3)
    ids = [{"input_ids": torch.randint(3, VOCAB, (4, 10), generator=gen)} for _ in range(2)]
    torch.manual_seed(0)
    t5 = transformers.T5Model(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                                    num_heads=4, decoder_start_token_id=0)).eval()
    dec = [{**b, "decoder_input_ids": b["input_ids"][:, :5]} for b in ids]
    heads, _ = prune_transformer(t5, dec, keep=0.5, target="heads")
    with pytest.raises(ValueError, match=r"reports unexpected keys: .*kept_heads"):
        export_pretrained(heads, tmp_path / "t5")
    model, batches = llama(tied=True), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="ffn")
    pruned.model.layers[1].self_attn.scaling *= 0.5
    with pytest.raises(ValueError, match=r"hold other numbers: model\.layers\.1\.self_attn\.scaling"):
        export_pretrained(pruned, tmp_path / "scaled")
    assert nothing_left(tmp_path)


def test_a_loader_that_changes_a_weight_silently_is_caught(monkeypatch, tmp_path) -> None:
    """A loading that reports nothing wrong but gives a weight other values (as a loader that re-initialises or
    re-ties a weight without saying so would) is refused by the comparison of every weight."""
    model, batches = llama(), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="ffn")
    load = transformers.LlamaForCausalLM.from_pretrained.__func__

    def quietly_changed(cls, *args, **kwargs):
        loaded, info = load(cls, *args, **kwargs)
        with torch.no_grad():
            loaded.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
        return loaded, info

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(quietly_changed))
    with pytest.raises(ValueError, match=r"loads other weights for \['model\.layers\.0\.mlp\.up_proj\.weight'\]"):
        export_pretrained(pruned, tmp_path / "m")
    assert nothing_left(tmp_path)


def test_a_head_width_the_config_did_not_state_is_stated(tmp_path) -> None:
    """Phi-3 derives its head width from the width and the head count unless the config states ``head_dim``: with
    fewer heads the export states it (8), and transformers' loader builds the pruned attention."""
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model, batches = transformers.Phi3ForCausalLM(cfg).eval(), ragged_token_batches(VOCAB, 2)
    assert getattr(model.config, "head_dim", None) is None
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    saved = json.loads((export_pretrained(pruned, tmp_path / "phi3") / "config.json").read_text())
    assert (saved["head_dim"], saved["num_attention_heads"], saved["num_key_value_heads"]) == (8, 2, 1)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phi3").eval()
    assert_same_outputs(back, pruned, batches)


def test_the_outputs_are_compared_in_eval_mode_and_the_models_modes_kept(tmp_path) -> None:
    """A pruned model left in train mode (dropout on) is compared without dropout, and gets its modes back: the
    attention's dropout module stays in eval mode as the user set it."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=20, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    torch.manual_seed(0)
    model, batches = transformers.BertModel(cfg).eval(), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="ffn")
    pruned.train()
    pruned.encoder.layer[0].attention.self.dropout.eval()
    export_pretrained(pruned, tmp_path / "m")
    assert pruned.training and not pruned.encoder.layer[0].attention.self.dropout.training
    assert pruned.encoder.layer[1].output.dropout.training
