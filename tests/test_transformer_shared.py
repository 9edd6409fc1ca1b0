"""A layer the model applies several times in one forward (ALBERT: one layer, or one per group, applied
``num_hidden_layers`` times to its own outputs), tiny randomly initialised models (no download).

Such a layer is pruned once for all its calls, in layer mode, from the statistics of every call. Oracles: the
unpruned model with the removed units' consumer columns set to zero (pruning without refit must give exactly its
outputs), numpy.linalg.lstsq over the consumer's inputs hooked in the model's own forward at every call (real tokens
only), and the saved and reloaded model's outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned
from tests._torch_helpers import zeroed_ffn, zeroed_heads

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, VOCAB = 16, 4, 24, 50
# (num_hidden_groups, inner_group_num): one shared layer; two groups of one layer each (calls 0 0 0 1 1 1); one
# group of two layers (calls 0 1 0 1 0 1)
GROUPINGS = {"one_layer": (1, 1), "two_groups": (2, 1), "two_inner": (1, 2)}


def build(grouping: str = "one_layer") -> nn.Module:
    groups, inner = GROUPINGS[grouping]
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=HIDDEN, num_hidden_layers=6,
                                    num_attention_heads=HEADS, intermediate_size=INTER, num_hidden_groups=groups,
                                    inner_group_num=inner)
    model = transformers.AlbertModel(cfg).eval()
    with torch.no_grad():  # LayerNorms with gains and biases of their own
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model


def batches(n_batches: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        lengths = torch.tensor([9, 6, 9, 4])
        out.append({"input_ids": torch.randint(0, VOCAB, (4, 9), generator=g),
                    "attention_mask": (torch.arange(9).view(1, -1) < lengths.view(-1, 1)).long()})
    return out


def out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def real_rows_of_every_call(model: nn.Module, module: nn.Module, data: list[dict[str, torch.Tensor]]
                            ) -> torch.Tensor:
    """The input rows of ``module`` at every call of the model's forward (float64), real tokens only."""
    rows: list[torch.Tensor] = []
    for b in data:
        seen: list[torch.Tensor] = []
        hook = module.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].detach()))
        try:
            out(model, b)
        finally:
            hook.remove()
        assert len(seen) > 1  # the layer is shared by several calls
        rows += [a[b["attention_mask"].bool()] for a in seen]
    return torch.cat(rows).double()


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("target", ["ffn", "heads"])
def test_layer_refit_is_lstsq_over_every_call(grouping: str, target: str) -> None:
    """Each shared layer's consumer (FFN ``ffn_output``; heads ``attention.dense``) is refitted once: least squares
    of the unpruned consumer's outputs on the kept units' columns, over the real tokens of every call."""
    model, data = build(grouping), batches()
    layers = [b.module for b in find_blocks(model)]
    assert len(layers) == {"one_layer": 1, "two_groups": 2, "two_inner": 2}[grouping]
    pruned, report = prune_transformer(model, data, keep=0.5, target=target, method="layer", ridge=0.0,
                                       weighting="none")
    assert [u.block for u in report.units] == [b.name for b in find_blocks(model)]
    path = "ffn_output" if target == "ffn" else "attention.dense"
    width = 1 if target == "ffn" else HIDDEN // HEADS
    for unit, layer in zip(report.units, layers, strict=True):
        consumer = layer.get_submodule(path)
        a = real_rows_of_every_call(model, consumer, data)
        cols = [u * width + j for u in unit.kept for j in range(width)]
        with torch.no_grad():
            y = consumer(a.float()).double()
        design = torch.cat([a[:, cols], torch.ones(len(a), 1, dtype=torch.float64)], dim=1)
        sol = torch.linalg.lstsq(design, y).solution.numpy()
        new = pruned.get_submodule(unit.block).get_submodule(path)
        np.testing.assert_allclose(new.weight.detach().double().numpy(), sol[:-1].T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), sol[-1], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_without_refit_equals_the_zeroed_model(grouping: str) -> None:
    """FFN neurons and heads of the shared layers, without refit: the unpruned model with the removed units'
    consumer columns zeroed, at every call."""
    model, data = build(grouping), batches()
    pruned, report = prune_transformer(model, data, keep=0.5, target="all", method="layer", reweight=False)
    zeroed = zeroed_heads(zeroed_ffn(model, report, "ffn_output"), report, HIDDEN // HEADS, "attention.dense")
    assert sorted((u.stage, u.n_kept) for u in report.units) == sorted(
        [("ffn", INTER // 2), ("heads", HEADS // 2)] * len(find_blocks(model)))
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(zeroed, b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out(pruned, b), out(model, b), atol=1e-3)


@pytest.mark.parametrize("grouping", ["one_layer", "two_inner"])
def test_keeping_every_unit_leaves_the_model_and_reports_each_layer_once(grouping: str) -> None:
    model, data = build(grouping), batches()
    pruned, report = prune_transformer(model, data, keep=1.0, target="all", method="layer")
    names = [b.name for b in find_blocks(model)]
    assert sorted((u.block, u.stage) for u in report.units) == sorted((n, s) for n in names for s in ("heads", "ffn"))
    assert all(u.n_kept == u.n_units for u in report.units)
    for b in data:
        torch.testing.assert_close(out(pruned, b), out(model, b))


def test_modes_that_read_the_pruned_network_are_refused_and_the_model_reloads(tmp_path) -> None:
    """Asym and seq modes would run the later calls on a network holding the layer being pruned: refused with what
    to pass, as is the error-curve allocation. Pruned in layer mode with the default refit, the model saves and
    reloads into the unpruned architecture."""
    model, data = build(), batches()
    for options in (dict(method="asym"), dict(method="seq"), dict(method="wanda")):
        with pytest.raises(ValueError, match=r"called several times.*method='layer'"):
            prune_transformer(model, data, keep=0.5, **options)
    with pytest.raises(ValueError, match=r"allocation='uniform'"):
        prune_transformer(model, data, keep=0.5, method="layer", allocation="error-curve")
    pruned, report = prune_transformer(model, data, keep=0.5, target="all", method="layer")
    assert report.params_after < report.params_before
    wanda, _ = prune_transformer(model, data, keep=0.5, method="wanda", propagation="layer")
    assert wanda is not None
    save_pruned(pruned, tmp_path / "albert")
    again = load_pruned(tmp_path / "albert", build())
    for b in data:
        torch.testing.assert_close(out(again, b), out(pruned, b))


def test_a_shared_block_called_with_other_arguments_is_refused() -> None:
    """A block the model calls twice with other arguments (here another attention mask) cannot be replayed from
    one call context: refused with the reason."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            layer = self.layers[0]
            mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            x = layer(x, src_key_padding_mask=mask)
            other = mask.clone()
            other[:, -1] = True
            return layer(x, src_key_padding_mask=other)

    torch.manual_seed(0)
    data = [torch.randn(3, 5, 8) for _ in range(2)]
    with pytest.raises(ValueError, match=r"called several times.*other arguments"):
        prune_transformer(Twice().eval(), data, keep=0.5, method="layer")
