"""The temporal-residual network: an untrained net is exactly its base (zero-initialised head), the residual lands
only under the cloud, and a masked reference cannot influence the output."""

from __future__ import annotations

import torch

from cloudfree.models.temporal_residual import BANDS, build_net


def _inputs(seed=0, h=16):
    g = torch.Generator().manual_seed(seed)
    c = len(BANDS)
    base = torch.rand(1, c, h, h, generator=g)
    refs = torch.rand(1, 3, c, h, h, generator=g)
    masks = torch.zeros(1, 3, h, h)
    masks[:, 2] = 1.0
    cloud = torch.zeros(1, h, h)
    cloud[:, 4:12, 4:12] = 1.0
    return base, refs, masks, torch.tensor([[-10.0, 5.0, 20.0]]), cloud


def test_untrained_net_is_its_base_and_residual_only_under_cloud():
    net = build_net()
    base, refs, masks, dt, cloud = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(base, refs, masks, dt, cloud), base, rtol=0, atol=0)
        for p in net.head.parameters():
            p.normal_(0, 0.1)
        out = net(base, refs, masks, dt, cloud)
    clear = cloud[:, None].expand_as(base) == 0
    torch.testing.assert_close(out[clear], base[clear], rtol=0, atol=0)
    assert (out - base)[~clear].abs().max() > 1e-3


def test_masked_reference_has_no_influence():
    net = build_net()
    with torch.no_grad():
        for p in net.head.parameters():
            p.normal_(0, 0.1)
        base, refs, masks, dt, cloud = _inputs()
        a = net(base, refs, masks, dt, cloud)
        refs2 = refs.clone()
        refs2[:, 2] = torch.rand_like(refs2[:, 2])  # the masked reference changes
        torch.testing.assert_close(net(base, refs2, masks, dt, cloud), a)
        refs3 = refs.clone()
        refs3[:, 0] += 0.3  # an unmasked one does change the output
        assert (net(base, refs3, masks, dt, cloud) - a).abs().max() > 1e-4
