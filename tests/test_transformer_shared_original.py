"""The unpruned network that ``prune_transformer`` runs (targets of asym mode, statistics of layer mode) reads the
caller's own weights, and so does the model being pruned until its blocks shrink:
:func:`nn_adapters._modes.shared_copy` copies the modules, not the tensors; :func:`nn_adapters._modes.own_tensors`
gives the pruned model copies of what it still shares at the end; :class:`nn_adapters._modes.TensorGuard` checks
after every pruning that none of the caller's tensors was written (every ``prune_transformer`` call in the test
suite runs that check).

Oracles: tensor identity and storage pointers; torch's version counter, bumped by any in-place write; the kept units
and weights of a pruning against those of the same pruning with private deep copies (the earlier way)."""

from __future__ import annotations

import copy

import pytest
import torch
from _torch_helpers import ragged_token_batches, shrink_routes, spy_shared_copies
from torch import nn

import nn_adapters.transformer as tr
from nn_adapters._modes import TensorGuard, own_tensors, shared_copy
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")

VOCAB = 40


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_the_copy_shares_tensors_not_modules() -> None:
    model = llama().train()
    twin = shared_copy(model)
    assert not twin.training and model.training  # the copy is in eval mode, the caller's model as it was
    for (name, p), (name2, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert name == name2 and p is q
    for (_, b), (_, c) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert b is not c and torch.equal(b, c)  # buffers are copied: a forward may update its own
    assert twin.model.layers[0] is not model.model.layers[0] and twin.config is not model.config
    twin.model.layers[0].mlp.down_proj = nn.Linear(24, 32, bias=False)  # a module replaced in the copy only
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, nn.Parameter)
    assert model.model.layers[0].mlp.down_proj is not twin.model.layers[0].mlp.down_proj


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def test_own_tensors_copies_what_is_still_shared_and_keeps_ties() -> None:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.lm_head.weight.requires_grad_(False)  # (tied: the embedding's too)
    twin = shared_copy(model)
    new_down = nn.Parameter(torch.randn(32, 24))
    twin.model.layers[0].mlp.down_proj.weight = new_down  # what a pruning gives a shrunk layer
    own_tensors(twin, model)
    assert not storages(twin) & storages(model)
    assert twin.model.layers[0].mlp.down_proj.weight is new_down  # its own already: left as it is
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # still tied, to one copy
    assert isinstance(twin.lm_head.weight, nn.Parameter) and not twin.lm_head.weight.requires_grad
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if "down_proj" not in name:
            assert torch.equal(p, q)
    for (_, b), (_, c) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(b, c) and b.data_ptr() != c.data_ptr()


def test_a_forward_that_updates_a_buffer_in_place_updates_the_copys() -> None:
    """A model whose forward writes a buffer of its own in place (a call counter, through a hook): pruning runs it
    on copies of its buffers, as it did on deep copies; the caller's buffer stays as it was."""
    model = llama()
    mlp = model.model.layers[0].mlp
    mlp.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def count(m: nn.Module, args: tuple) -> None:
        m.calls.add_(1)

    mlp.register_forward_pre_hook(count)
    pruned, _ = prune_transformer(model, ragged_token_batches(VOCAB, 2), keep=0.5, method="asym")
    assert int(model.model.layers[0].mlp.calls) == 0
    assert int(pruned.model.layers[0].mlp.calls) > 0  # the copy's: counted its calls


def test_the_guard_sees_in_place_writes_and_swapped_storage() -> None:
    model = llama()
    guard = TensorGuard(model)
    guard.check()  # nothing changed
    twin = shared_copy(model)
    twin.model.layers[1].mlp.up_proj = nn.Linear(32, 12, bias=False)  # the copy's own module: not the caller's
    guard.check()
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight[0, 0] += 0.0  # written through the copy: the caller's tensor
    with pytest.raises(RuntimeError, match="internal error: .*'model.layers.0.mlp.up_proj.weight'"):
        guard.check()
    model = llama()
    guard = TensorGuard(model)
    model.model.norm.weight.data = torch.ones(32)  # the same values, another storage
    with pytest.raises(RuntimeError, match="'model.norm.weight'"):
        guard.check()


@pytest.mark.parametrize(("target", "method"), [("ffn", "asym"), ("all", "asym"), ("all", "layer"),
                                                ("all", "seq")])
def test_pruning_reads_the_callers_tensors_and_gives_what_a_private_copy_gives(monkeypatch, target: str,
                                                                                method: str) -> None:
    model = llama()
    batches = ragged_token_batches(VOCAB, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    copies = spy_shared_copies(monkeypatch, tr)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method=method)
    assert len(copies) == 2  # the model being pruned, then the unpruned network that it is compared with
    assert all(p is q for p, q in zip(model.parameters(), copies[1].parameters(), strict=True))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model as it was
    assert not storages(pruned) & storages(model)  # the pruned model holds its own tensors, even those not pruned

    monkeypatch.setattr(tr, "shared_copy", lambda m: copy.deepcopy(m).eval())  # the earlier way: deep copies
    alone, report_alone = prune_transformer(model, batches, keep=0.5, target=target, method=method)
    assert [u.kept for u in report.units] == [u.kept for u in report_alone.units]
    for (k, v), (k2, w) in zip(pruned.state_dict().items(), alone.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, w)


def test_a_write_into_the_callers_weights_during_pruning_is_reported(monkeypatch) -> None:
    """Mutation check of the guard in place: a (simulated) bug that writes an original block's weight in place."""
    model = llama()
    original_pass = tr._original_pass

    def writing_pass(oblk, *args, **kwargs):
        with torch.no_grad():
            oblk.module.mlp.up_proj.weight.mul_(1.0)  # the same values, written
        return original_pass(oblk, *args, **kwargs)

    monkeypatch.setattr(tr, "_original_pass", writing_pass)
    with pytest.raises(RuntimeError, match="internal error: pruning changed the caller's tensor "
                                           "'model.layers.0.mlp.up_proj.weight'"):
        prune_transformer(model, ragged_token_batches(VOCAB, 2), keep=0.5)


def test_an_encoder_decoder_pruned_stack_by_stack_holds_tensors_of_its_own() -> None:
    """BART, pruned stack by stack (each stack's pruning copies its modules again): the result shares no tensor
    with the caller's model, which is as it was; tied embeddings stay tied in the result."""
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=20,
                                  decoder_ffn_dim=20, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    batches = [{**b, "decoder_input_ids": b["input_ids"][:, :5]} for b in ragged_token_batches(VOCAB, 2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all")
    assert {u.block.split(".")[1] for u in report.units} == {"encoder", "decoder"}
    assert not storages(pruned) & storages(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    shared = pruned.model.shared.weight
    assert pruned.model.encoder.embed_tokens.weight is shared and pruned.lm_head.weight is shared


@pytest.mark.parametrize("tied", [False, True])
def test_loading_from_an_instance_copies_no_weight_of_it(monkeypatch, tmp_path, tied: bool) -> None:
    """``load_pruned(directory, model)`` shrinks a copy of ``model`` whose parameters are shapes only, then gives it
    the saved tensors: the loaded model computes what the pruned one did (tied embeddings tied again, rotary
    buffers real), holds no tensor of the caller's and none on the meta device; the caller's model is as it was."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    tr.save_pruned(pruned, tmp_path / "m")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    routes = shrink_routes(monkeypatch)
    loaded = tr.load_pruned(tmp_path / "m", model)
    assert routes == [True]
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert not storages(loaded) & storages(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(loaded(**b).logits, pruned(**b).logits, rtol=0, atol=0)


def test_codegen_heads_are_loaded_on_a_weightless_copy(monkeypatch, tmp_path) -> None:
    """CodeGen's head pruning checks by value that the kept heads are as many in each model-parallel part: the
    check reads the kept indices, not the weights, so it runs on the shape-only copy too (the indices stay on the
    CPU) and the loaded model computes what the pruned one did."""
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=8, n_inner=24, rotary_dim=4,
                                     n_positions=32)
    torch.manual_seed(0)
    model = transformers.CodeGenModel(cfg).eval()
    batches = ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    tr.save_pruned(pruned, tmp_path / "m")
    routes = shrink_routes(monkeypatch)
    loaded = tr.load_pruned(tmp_path / "m", model)
    assert routes == [True]
    assert not storages(loaded) & storages(model)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(loaded(**b).last_hidden_state, pruned(**b).last_hidden_state, rtol=0, atol=0)
