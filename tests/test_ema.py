"""EMA schedules against the code they come from: diffusers' EMAModel (SwiftBrush) and the EDM
half-life with ramp-up that SiD-LSG's training loop computes."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from components.config import ConfigError, from_dict
from components.ema import EMA, EMAConfig


def updates(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=g) for _ in range(n)]


def test_warmup_equals_diffusers_ema_model():
    net = torch.nn.Linear(2, 3, bias=False)
    theirs = EMAModel(net.parameters(), decay=0.9999)
    ours = EMA(net, EMAConfig("warmup", 0.9999), batch_size=4)
    for n, w in enumerate(updates(40), start=1):
        with torch.no_grad():
            net.weight.copy_(w)
        theirs.step(net.parameters())
        ours.update(net, n)
        torch.testing.assert_close(ours.shadow["weight"], theirs.shadow_params[0])


def test_halflife_is_sids_edm_schedule():
    """β = 0.5 ** (B / max(min(h, nimg · rampup), 1e-8)) with nimg the images seen before."""
    cfg, B = EMAConfig("halflife", halflife_kimg=0.05, rampup=0.05), 16
    net = torch.nn.Linear(2, 3, bias=False)
    ema = EMA(net, cfg, batch_size=B)
    shadow = net.weight.detach().clone()
    for n, w in enumerate(updates(200), start=1):
        cur_nimg = (n - 1) * B
        beta = 0.5 ** (B / max(min(50.0, cur_nimg * 0.05), 1e-8))
        shadow = w.lerp(shadow, beta)
        with torch.no_grad():
            net.weight.copy_(w)
        ema.update(net, n)
    torch.testing.assert_close(ema.shadow["weight"], shadow)
    assert cfg.beta(1, B) == 0.0  # the first update copies the weights, as in the official loop


def test_none_keeps_no_average():
    net = torch.nn.Linear(2, 3, bias=False)
    ema = EMA(net, EMAConfig("none"), batch_size=4)
    assert ema.shadow is None and not ema.enabled
    before = net.weight.detach().clone()
    ema.update(net, 1)
    ema.copy_to(net)
    with ema.applied(net) as same:
        assert same is net
    torch.testing.assert_close(net.weight, before)


def test_applied_restores_the_raw_weights():
    net = torch.nn.Linear(2, 3, bias=False)
    ema = EMA(net, EMAConfig("constant", 0.5), batch_size=4)
    raw = updates(1)[0]
    with torch.no_grad():
        net.weight.copy_(raw)
    ema.update(net, 1)
    with ema.applied(net):
        torch.testing.assert_close(net.weight, ema.shadow["weight"])
    torch.testing.assert_close(net.weight, raw)


@pytest.mark.parametrize("bad", [{"kind": "cosine"}, {"decay": 1.0}, {"halflife_kimg": 0},
                                 {"rampup": -1}])
def test_bad_ema_settings_are_named(bad):
    with pytest.raises(ConfigError, match="ema"):
        from_dict(EMAConfig, bad, "distill.methods.sid_lsg.ema")
