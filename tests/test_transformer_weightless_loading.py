"""Loading a pruned transformer holds no weights but the saved ones.

``load_pruned(directory)`` builds the architecture from ``config.json`` with shape-only (``meta``) parameters
(:func:`nn_adapters._modes.meta_parameters`: no memory for the weights, no time initialising them, buffers computed
as usual), shrinks it to the saved sizes and gives it the saved tensors; ``load_pruned(directory, model)`` does the
same from a shape-only copy of ``model``. Kept-unit indices stay on the CPU when the weights they select from are
shape-only, so the checks that read them (query heads as many in each key/value group, CodeGen's heads as many in
each model-parallel part) run there too. A model whose construction or shrinking reads weight values falls back to
real weights, with the same result.

Oracles: the device of every tensor (``meta`` or not) where the loader shrinks the model; the pruned model's own
outputs, which the loaded one must reproduce exactly; a build with real weights for the fallbacks."""

from __future__ import annotations

import pytest
import torch
from _torch_helpers import ragged_token_batches, shrink_routes
from torch import nn

import nn_adapters._transformer_blocks as blocks
import nn_adapters.transformer as tr
from nn_adapters._modes import meta_parameters
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # (CI runs a few other files with transformers 4.40 too)
    pytest.skip("these tests prune Llama's key/value groups and query heads, Mixtral's experts and T5's heads, and "
                "read the model-level rotary embedding: transformers >= 5", allow_module_level=True)

VOCAB = 40


def llama(tied: bool = False, kv: int = 2) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def same_logits(loaded: nn.Module, pruned: nn.Module, batches) -> None:
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(loaded(**b).logits, pruned(**b).logits, rtol=0, atol=0)


def no_meta_left(model: nn.Module) -> bool:
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


# --- meta_parameters ------------------------------------------------------------------------------------------------

def test_meta_parameters_makes_parameters_shape_only_and_buffers_real() -> None:
    with meta_parameters():
        lin = nn.Linear(5, 3)
        bn = nn.BatchNorm1d(3)
    assert all(p.is_meta for p in (*lin.parameters(), *bn.parameters()))
    assert (lin.weight.shape, lin.weight.dtype, lin.bias.shape) == ((3, 5), torch.float32, (3,))
    assert not any(b.is_meta for b in bn.buffers()) and torch.equal(bn.running_var, torch.ones(3))
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    with meta_parameters():
        m = nn.Module()
        m.w = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    assert m.w.is_meta and m.w.dtype == torch.float64 and not m.w.requires_grad
    assert not nn.Linear(2, 2).weight.is_meta  # outside the block: as usual


def test_meta_parameters_restores_registration_after_an_error_and_leaves_subclasses() -> None:
    register = nn.Module.register_parameter
    with pytest.raises(ValueError, match="while building"), meta_parameters():
        nn.Linear(2, 2)
        raise ValueError("while building")
    assert nn.Module.register_parameter is register
    with meta_parameters():
        lazy = nn.LazyLinear(3)  # an UninitializedParameter: left as it is, it is materialised on first use
    assert isinstance(lazy.weight, nn.parameter.UninitializedParameter)
    assert lazy(torch.ones(2, 4)).shape == (2, 3)


class _ReadsItsWeight(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        if how == "buffer":  # a buffer computed from a parameter: meta too on a shape-only build
            self.register_buffer("scale", self.weight.detach().abs().amax(dim=1))
        else:
            self.norm = float(self.weight.detach().norm())  # a value read while building: fails on meta


@pytest.mark.parametrize("how", ["buffer", "value"])
def test_a_construction_that_reads_weights_is_built_with_real_weights(how: str) -> None:
    real = tr._build_from_config(_ReadsItsWeight, how)
    assert not any(t.is_meta for t in (*real.parameters(), *real.buffers()))
    if how == "buffer":  # the buffer computed from the real weights, as a plain build computes it
        torch.testing.assert_close(real.scale, real.weight.detach().abs().amax(dim=1))
    built = tr._build_from_config(nn.LayerNorm, 3)  # (a config of one number: the class is called with it)
    assert built.weight.is_meta and built.weight.shape == (3,)


# --- load_pruned(directory): built from config.json ----------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_a_model_built_from_its_config_holds_no_weights_before_loading(monkeypatch, tmp_path, tied: bool) -> None:
    model, batches = llama(tied), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    tr.save_pruned(pruned, tmp_path / "m")
    built: list[nn.Module] = []
    build = tr._build_from_config
    monkeypatch.setattr(tr, "_build_from_config", lambda cls, cfg: built.append(build(cls, cfg)) or built[-1])
    routes = shrink_routes(monkeypatch)
    loaded = tr.load_pruned(tmp_path / "m")
    assert routes == [True] and len(built) == 1
    assert built[0] is loaded  # the weightless build is the model returned, given the saved tensors
    assert no_meta_left(loaded)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    rotary = dict(loaded.named_buffers())["model.rotary_emb.inv_freq"]
    torch.testing.assert_close(rotary, dict(model.named_buffers())["model.rotary_emb.inv_freq"], rtol=0, atol=0)
    same_logits(loaded, pruned, batches)


def test_query_heads_load_without_a_real_copy(monkeypatch, tmp_path) -> None:
    """Query heads kept as many in each key/value group: the loader's check of that reads the kept indices, which
    stay on the CPU when the weights are shape-only (they went to ``meta`` and the loading fell back to a full
    copy of the instance)."""
    model, batches = llama(kv=2), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="heads", method="wanda", head_unit="query")
    tr.save_pruned(pruned, tmp_path / "q")
    routes = shrink_routes(monkeypatch)
    for loaded in (tr.load_pruned(tmp_path / "q", model), tr.load_pruned(tmp_path / "q")):
        assert no_meta_left(loaded)
        assert [a.self_attn.q_proj.out_features for a in loaded.model.layers] == [16, 16]
        same_logits(loaded, pruned, batches)
    assert routes == [True, True]


@pytest.mark.parametrize("with_model", [True, False])
def test_a_block_whose_shrinking_reads_weights_falls_back_to_real_ones(monkeypatch, tmp_path,
                                                                        with_model: bool) -> None:
    """A block adapter whose resizing reads weight values cannot run on a shape-only model: the loader shrinks a
    full copy of the instance, or a build with real weights, and the result is the same."""
    model, batches = llama(), ragged_token_batches(VOCAB, 2)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    tr.save_pruned(pruned, tmp_path / "m")
    set_sizes = blocks._HFLlamaBlock.set_sizes

    def reading(self, intermediate_size: int, num_heads: int) -> None:
        float(self.out_proj.weight.abs().sum())  # RuntimeError on meta tensors
        set_sizes(self, intermediate_size, num_heads)

    monkeypatch.setattr(blocks._HFLlamaBlock, "set_sizes", reading)
    routes = shrink_routes(monkeypatch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = tr.load_pruned(tmp_path / "m", model if with_model else None)
    assert routes == [True, False]
    assert no_meta_left(loaded)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    same_logits(loaded, pruned, batches)


# --- new layers are not initialised ---------------------------------------------------------------------------------

def test_shrinking_initialises_no_real_tensor(monkeypatch, tmp_path) -> None:
    """The smaller layers that replace pruned ones are built on ``meta`` and given empty storage that the kept
    weights then fill: no random initialisation runs on real memory (it writes a whole layer for nothing), while
    pruning a Llama and a ``TransformerEncoder`` (its attention converted to PrunedMultiheadAttention and back) and
    loading them. The models' outputs are those of the pruned models (uninitialised memory left anywhere would
    show)."""
    model, batches = llama(), ragged_token_batches(VOCAB, 2)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    real_inits: list[str] = []
    for name in ("kaiming_uniform_", "xavier_uniform_", "uniform_", "normal_", "zeros_", "ones_"):
        init = getattr(nn.init, name)

        def spy(*a, _init=init, _name=name, **k):
            if not (a[0] if a else k["tensor"]).is_meta:
                real_inits.append(_name)
            return _init(*a, **k)

        monkeypatch.setattr(nn.init, name, spy)
    pruned, _ = prune_transformer(model, batches, keep=0.5, target="all")
    half, _ = prune_transformer(encoder, [x], keep=0.5, target="all")
    whole, _ = prune_transformer(encoder, [x], keep={0: 1.0, 1: 0.5}, target="heads")  # layer 0 converted back
    tr.save_pruned(pruned, tmp_path / "llama")
    loaded = tr.load_pruned(tmp_path / "llama")
    assert real_inits == []
    same_logits(loaded, pruned, batches)
    assert type(whole.layers[0].self_attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(whole.layers[0].self_attn(x, x, x)[0], encoder.layers[0].self_attn(x, x, x)[0],
                                   rtol=0, atol=0)
        assert torch.isfinite(half(x)).all()
