"""A small DDPM-style U-Net, end to end: residual blocks with a time embedding (added, or FiLM's scale and shift after
the GroupNorm), GroupNorm(8, C) units of several channels, skip connections concatenated in the decoder, a transposed
convolution for the upsampling and a sinusoidal timestep embedding whose frequencies are computed in ``forward()``.

What may be pruned (Ho et al. 2020; the layout of diffusers' ``UNet2DModel``): in every residual block ``conv1``,
whose output goes through the time-embedding term and ``norm2`` to ``conv2`` only; the time-embedding projection
``temb_proj`` of the block loses the rows of the removed channels. Everything else feeds a residual sum, a branch
(the skip connections) or the network output. The time MLP's first Linear is prunable too (``t1 -> t2``).

Oracles: the unpruned network (keep everything, every method), the original network with the removed units zeroed
at the consumers' inputs (no refit), the parameter counts of the built networks, the list of pairs derived from the
architecture above.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import check_budgets_against_built_networks, zeroed_at_consumers
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIDE, TIME = 8, 16  # image side, width of the sinusoidal embedding


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, scale_shift: bool) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(t_dim, c_out * (2 if scale_shift else 1))
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.shortcut(x) + self.conv2(F.dropout(F.silu(h), 0.1, self.training))


class TinyUNet(nn.Module):
    """Two resolutions (16 and 32 channels), one block each way and one in the middle; ``forward(x, t)``, pruned
    from dict batches ``{"x": images, "t": timesteps}``."""

    def __init__(self, scale_shift: bool) -> None:
        super().__init__()
        t_dim = 32
        self.t1, self.t2 = nn.Linear(TIME, t_dim), nn.Linear(t_dim, t_dim)
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.down1 = ResBlock(16, 16, t_dim, scale_shift)
        self.pool = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.down2 = ResBlock(16, 32, t_dim, scale_shift)
        self.mid = ResBlock(32, 32, t_dim, scale_shift)
        self.up2 = ResBlock(64, 32, t_dim, scale_shift)
        self.upsample = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        self.up1 = ResBlock(48, 16, t_dim, scale_shift)
        self.norm_out, self.out = nn.GroupNorm(8, 16), nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None]
        freqs = torch.exp(-math.log(1000.0) * torch.arange(TIME // 2, dtype=x.dtype) / (TIME // 2))
        temb = self.t2(F.silu(self.t1(torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], dim=1))))
        h1 = self.down1(self.inp(x), temb)
        h2 = self.down2(self.pool(h1), temb)
        h = self.up2(torch.cat([self.mid(h2, temb), h2], dim=1), temb)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), temb)
        return self.out(F.silu(self.norm_out(h)))


BLOCKS = {"down1": 16, "down2": 32, "mid": 32, "up2": 32, "up1": 16}  # conv1's channels


def _net(scale_shift: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = TinyUNet(scale_shift).eval()
    return net, {"x": torch.randn(48, 3, SIDE, SIDE), "t": torch.rand(48) * 100}


@pytest.mark.parametrize("scale_shift", [False, True])
def test_every_blocks_conv1_is_pruned_with_the_rows_of_its_time_projection(scale_shift):
    net, xt = _net(scale_shift)
    pairs, skipped = nna.find_pairs(net, {k: v[:2] for k, v in xt.items()})
    by_name = {p.name: p for p in pairs}
    assert set(by_name) == {"t1->t2"} | {f"{b}.conv1->{b}.conv2" for b in BLOCKS}
    for block, channels in BLOCKS.items():
        p = by_name[f"{block}.conv1->{block}.conv2"]
        assert p.conditioning == (f"{block}.temb_proj",)
        assert p.conditioning_chunks == ((2,) if scale_shift else (1,))
        assert (p.group_size, p.n_units) == (channels // 8, 8)  # GroupNorm(8, C): a unit is a group
    names = dict(skipped)
    assert not any(f"{b}.temb_proj" in names for b in BLOCKS)  # pruned with the pairs, not skipped
    assert all(f"{b}.conv2" in names for b in BLOCKS)  # residual sums


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_keeping_every_unit_reproduces_the_unet(scale_shift, method):
    net, xt = _net(scale_shift)
    pruned, _ = nna.prune(net, xt, keep=1.0, method=method)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt), net(**xt), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["asym", "weight_norm"])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_without_refit_the_pruned_unet_is_the_original_with_the_removed_groups_zeroed(scale_shift, method):
    net, xt = _net(scale_shift)
    pruned, report = nna.prune(net, xt, keep=0.5, method=method, reweight=False)
    for block, channels in BLOCKS.items():
        rows = channels // 2 * (2 if scale_shift else 1)
        assert pruned.get_submodule(f"{block}.temb_proj").out_features == rows
        assert pruned.get_submodule(f"{block}.norm2").num_groups == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xt), zeroed_at_consumers(net, report, xt), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_the_parameter_budget_of_the_unet_matches_the_built_networks(scale_shift):
    net, xt = _net(scale_shift)
    check_budgets_against_built_networks(net, xt, (1.25,))


class ADMBlock(nn.Module):
    """The residual block of Improved DDPM / ADM (Nichol & Dhariwal 2021, Dhariwal & Nichol 2021) with
    ``use_scale_shift_norm``, written as its reference code is: the embedding is cast to the path's dtype and
    broadcast with ``while len(emb_out.shape) < len(h.shape)`` (which plain torch.fx cannot trace)."""

    def __init__(self, c: int = 16, emb: int = 32) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * c))
        self.out_norm = nn.GroupNorm(8, c)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(0.1), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        scale, shift = torch.chunk(emb_out, 2, dim=1)
        return x + self.out_layers(self.out_norm(h) * (1 + scale) + shift)


class ADMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)
        self.b1, self.b2 = ADMBlock(), ADMBlock()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.out(self.b2(self.b1(self.inp(x), emb), emb))


def test_adm_blocks_with_their_broadcast_loop_are_pruned_with_their_embedding_rows():
    torch.manual_seed(0)
    net = ADMNet().eval()
    xe = {"x": torch.randn(48, 3, SIDE, SIDE), "emb": torch.randn(48, 32)}
    pairs, _ = nna.find_pairs(net, {k: v[:2] for k, v in xe.items()})
    assert [(p.name, p.conditioning, p.conditioning_chunks, p.n_units) for p in pairs] == [
        (f"{b}.in_layers.2->{b}.out_layers.2", (f"{b}.emb_layers.1",), (2,), 8) for b in ("b1", "b2")]
    pruned, _ = nna.prune(net, xe, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xe), net(**xe), rtol=1e-4, atol=1e-5)
    pruned, report = nna.prune(net, xe, keep=0.5, method="asym", reweight=False)
    assert pruned.b1.emb_layers[1].out_features == 16  # rows c and 16 + c of the 8 kept channels
    with torch.no_grad():
        torch.testing.assert_close(pruned(**xe), zeroed_at_consumers(net, report, xe), rtol=1e-4, atol=1e-5)
