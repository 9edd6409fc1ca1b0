"""diffusers' own ``UNet2DModel`` (randomly initialised from a small config; no download), pruned end to end.

Its forward() takes ``len()`` of the timestep's shape and its attention processors and resamplers branch on
``ndim``, dtypes and batch sizes, so plain torch.fx cannot trace it: it is traced while running on the first batch
(``nn_adapters._value_trace``). What may be pruned follows from the architecture (Ho et al. 2020; diffusers'
``ResnetBlock2D``): in every resnet block ``conv1``, whose output goes through the time-embedding term and ``norm2``
to ``conv2`` only, by groups of ``norm2``, with the rows of the block's ``time_emb_proj``; and the time MLP's first
Linear. Everything else feeds a residual sum, the skip connections, the attention (its projections act on tokens
reshaped from the channels) or the output.

Oracles: that list, derived from the modules; the unpruned network (keep everything, every method); the original
network with the removed groups zeroed at the consumers' inputs (no refit); the parameter counts of the built
networks; the pruned model's own forward on inputs the calibration did not have (a number as the timestep, one
image).
"""

from __future__ import annotations

import pytest
import torch
from _torch_helpers import check_budgets_against_built_networks, zeroed_at_consumers

import nn_adapters as nna
from nn_adapters.io import load_pruned, save_pruned

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GROUPS = 4


def _unet(time_norm: str) -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=GROUPS, attention_head_dim=4, resnet_time_scale_shift=time_norm,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def _batch(n: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(n, 3, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (n,), generator=g)}


def _resnets(net: torch.nn.Module) -> dict[str, int]:
    """Every ResnetBlock2D and the channels of its conv1."""
    return {name: m.conv1.out_channels for name, m in net.named_modules()
            if type(m).__name__ == "ResnetBlock2D"}


@pytest.mark.parametrize("time_norm", ["default", "scale_shift"])
def test_every_resnet_conv1_is_pruned_by_groups_with_its_time_projection(time_norm):
    net = _unet(time_norm)
    pairs, skipped = nna.find_pairs(net, _batch(2))
    by_name = {p.name: p for p in pairs}
    resnets = _resnets(net)
    assert len(resnets) == 8  # down 1 + 1, mid 2, up 2 + 2 (layers_per_block + 1 each)
    assert set(by_name) == {"time_embedding.linear_1->time_embedding.linear_2"} | {
        f"{b}.conv1->{b}.conv2" for b in resnets}
    for block, channels in resnets.items():
        p = by_name[f"{block}.conv1->{block}.conv2"]
        assert p.conditioning == (f"{block}.time_emb_proj",)
        assert p.conditioning_chunks == ((2,) if time_norm == "scale_shift" else (1,))
        assert (p.n_units, p.group_size) == (GROUPS, channels // GROUPS)
    names = dict(skipped)
    assert all(f"{b}.conv2" in names for b in resnets)  # residual sums
    assert not any(f"{b}.time_emb_proj" in names for b in resnets)


@pytest.mark.parametrize(("method", "weighting"), [("layer", "none"), ("seq", "none"), ("asym", "none"),
                                                  ("asym", "output")])
def test_keeping_every_unit_reproduces_the_diffusers_unet(method, weighting):
    net, xt = _unet("default"), _batch()
    pruned, _ = nna.prune(net, xt, keep=1.0, method=method, weighting=weighting)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt).sample, net(**xt).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("time_norm", ["default", "scale_shift"])
def test_without_refit_the_pruned_unet_is_the_original_with_the_removed_groups_zeroed(time_norm):
    net, xt = _unet(time_norm), _batch()
    pruned, report = nna.prune(net, xt, keep=0.5, method="asym", reweight=False)
    for block, channels in _resnets(net).items():
        assert pruned.get_submodule(f"{block}.conv1").out_channels == channels // 2
        assert pruned.get_submodule(f"{block}.norm2").num_groups == GROUPS // 2
        rows = channels // 2 * (2 if time_norm == "scale_shift" else 1)
        assert pruned.get_submodule(f"{block}.time_emb_proj").out_features == rows
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt).sample, zeroed_at_consumers(net, report, xt).sample,
                                   rtol=1e-4, atol=1e-5)


def test_a_data_loader_with_a_smaller_last_batch_is_pruned_sequentially():
    """diffusers' Upsample2D tests ``shape[0] >= 64``: batches of 64 and a last batch of 20 (a DataLoader without
    drop_last) get one traced graph each in the sequential modes; was refused by the guard."""
    net = _unet("default")
    batches = [_batch(64, 1), _batch(20, 2)]
    pruned, _ = nna.prune(net, batches, keep=1.0, method="asym")
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(pruned(**b).sample, net(**b).sample, rtol=1e-4, atol=1e-5)
    pruned, report = nna.prune(net, batches, keep=0.5, method="seq")
    assert report.params_after < report.params_before and report.n_samples == 84


def test_the_parameter_budget_of_the_diffusers_unet_matches_the_built_networks():
    check_budgets_against_built_networks(_unet("default"), _batch(), (1.25,))


def test_the_pruned_unet_runs_on_new_inputs_and_saves_and_loads(tmp_path):
    net, xt = _unet("scale_shift"), _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, _ = nna.prune(net, [_batch(16, s) for s in range(3)], keep=0.5, method="asym", weighting="output")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the caller's model is untouched
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        one = pruned(xt["sample"][:1], 10).sample  # a number as the timestep: the model's own branch
        torch.testing.assert_close(one, pruned(xt["sample"][:1], torch.tensor([10])).sample)
        save_pruned(pruned, tmp_path / "unet")
        again = load_pruned(tmp_path / "unet", _unet("scale_shift"))
        torch.testing.assert_close(again(**xt).sample, pruned(**xt).sample)


def _conditional_unet() -> diffusers.UNet2DConditionModel:
    """Stable Diffusion's layout, small: cross-attention transformer blocks (GEGLU feed-forward) between the resnet
    blocks, text embeddings as ``encoder_hidden_states``."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=GROUPS, cross_attention_dim=24, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def _text_batch(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"sample": torch.randn(n, 4, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (n,), generator=g),
            "encoder_hidden_states": torch.randn(n, 7, 24, generator=g)}


def test_the_conditional_unet_prunes_its_resnets_and_the_geglu_feed_forwards():
    """Each BasicTransformerBlock's feed-forward is ``net.2(h * gelu(g))`` with ``h, g = net.0.proj(x).chunk(2,
    -1)`` (GEGLU, Shazeer 2020): unit ``i`` is rows ``i`` and ``H + i`` of ``net.0.proj`` and column ``i`` of
    ``net.2``."""
    net, xt = _conditional_unet(), _text_batch()
    pairs, _ = nna.find_pairs(net, _text_batch(2))
    by_name = {p.name: p for p in pairs}
    feed_forwards = [name for name, m in net.named_modules() if type(m).__name__ == "FeedForward"]
    assert len(feed_forwards) == 4  # down 1, mid 1, up 2
    expected = {f"{ff}.net.0.proj->{ff}.net.2" for ff in feed_forwards}
    expected |= {f"{b}.conv1->{b}.conv2" for b in _resnets(net)}
    assert set(by_name) == expected | {"time_embedding.linear_1->time_embedding.linear_2"}
    for ff in feed_forwards:
        p = by_name[f"{ff}.net.0.proj->{ff}.net.2"]
        hidden = net.get_submodule(f"{ff}.net.2").in_features
        assert (p.kind, p.chunked, p.n_units) == ("linear->linear", True, hidden)
    pruned, _ = nna.prune(net, xt, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt).sample, net(**xt).sample, rtol=1e-4, atol=1e-5)
    pruned, report = nna.prune(net, xt, keep=0.5, method="asym", reweight=False)
    for ff in feed_forwards:
        hidden = net.get_submodule(f"{ff}.net.2").in_features
        assert pruned.get_submodule(f"{ff}.net.0.proj").out_features == hidden  # 2 x hidden / 2
        assert pruned.get_submodule(f"{ff}.net.2").in_features == hidden // 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt).sample, zeroed_at_consumers(net, report, xt).sample,
                                   rtol=1e-4, atol=1e-5)
