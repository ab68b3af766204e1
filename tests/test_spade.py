"""SPADE blocks: shapes, gradients, and that the conditioning map actually conditions."""

from __future__ import annotations

import pytest
import torch

from histosynth.generators.spade import SPADE, SPADEResBlock

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cond(n, c, h, w, seed=0):
    """One-hot class maps (c classes) of random squares."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, 1, h // 4, w // 4), generator=g)
    labels = torch.nn.functional.interpolate(labels.float(), size=(h, w), mode="nearest").long()[:, 0]
    return torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("size,cond_size", [(8, 8), (16, 32), (32, 16), (4, 32)])
def test_spade_shapes_any_feature_and_map_size(size, cond_size):
    torch.manual_seed(0)
    spade = SPADE(channels=12, cond_channels=3, hidden=8, groups=4)
    x = torch.randn(2, 12, size, size)
    assert spade(x, _cond(2, 3, cond_size, cond_size)).shape == x.shape


def test_spade_gradients_reach_input_and_cond_convs():
    torch.manual_seed(0)
    spade = SPADE(8, 3, hidden=8, groups=4)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    spade(x, _cond(2, 3, 16, 16)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for conv in (spade.shared[0], spade.gamma, spade.beta):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_spade_output_follows_the_conditioning_map():
    torch.manual_seed(0)
    spade = SPADE(8, 3, hidden=8, groups=4)
    x = torch.randn(2, 8, 16, 16)
    a, b = spade(x, _cond(2, 3, 16, 16, seed=1)), spade(x, _cond(2, 3, 16, 16, seed=2))
    zero = spade(x, torch.zeros(2, 3, 16, 16))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, zero)


def test_spade_is_the_normalised_input_modulated():
    """With gamma = beta = 0 the block is plain parameter-free GroupNorm."""
    spade = SPADE(8, 2, hidden=4, groups=2)
    for conv in (spade.gamma, spade.beta):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    x = torch.randn(3, 8, 8, 8)
    expected = torch.nn.functional.group_norm(x, 2, eps=1e-6)
    torch.testing.assert_close(spade(x, _cond(3, 2, 8, 8)), expected)


@pytest.mark.parametrize("c_in,c_out", [(8, 8), (8, 16)])
def test_spade_resblock_shapes_skip_and_conditioning(c_in, c_out):
    torch.manual_seed(0)
    block = SPADEResBlock(c_in, c_out, temb_channels=16, cond_channels=3, hidden=8, groups=4, dropout=0.1).eval()
    x, temb = torch.randn(2, c_in, 16, 16, requires_grad=True), torch.randn(2, 16)
    y = block(x, temb, _cond(2, 3, 32, 32))
    assert y.shape == (2, c_out, 16, 16)
    assert isinstance(block.skip, torch.nn.Conv2d) == (c_in != c_out)
    assert not torch.allclose(y, block(x, temb, _cond(2, 3, 32, 32, seed=5)))
    assert not torch.allclose(y, block(x, torch.randn(2, 16), _cond(2, 3, 32, 32)))  # timestep embedding enters
    y.mean().backward()
    assert x.grad.abs().sum() > 0 and block.norm2.gamma.weight.grad.abs().sum() > 0
