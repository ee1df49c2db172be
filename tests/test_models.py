"""Models: the configurations the recipes use build, shapes, causality, functional training."""

from __future__ import annotations

import pytest
import torch

import fbrain
from fbrain import optim
from fbrain.models import ConvTasNet, SpectralMasker


def test_spectral_masker_has_the_templates_parameter_count():
    assert sum(p.numel() for p in SpectralMasker().parameters()) == 2_042_753


@pytest.mark.parametrize("config", [
    dict(N=32, L=16, B=32, H=32, P=3, X=1, R=2, C=2),        # SpeechBrain's integration test
    dict(N=256, L=16, B=256, H=512, P=3, X=6, R=4, C=2),     # its WSJ0-2mix recipe
    dict(N=16, L=8, B=16, H=24, P=3, X=2, R=1, C=3, norm_type="cLN", mask_nonlinear="softmax"),
])
def test_conv_tasnet_configurations_build_and_separate(config):
    model = ConvTasNet(**config)
    with torch.no_grad():
        out = model(torch.randn(2, 4001))
    assert out.shape == (2, 4001, config["C"])


def test_causal_conv_tasnet_does_not_look_ahead():
    torch.manual_seed(0)
    model = ConvTasNet(N=16, L=8, B=16, H=16, P=3, X=3, R=1, C=2, causal=True)
    x = torch.randn(1, 800)
    future = x.clone()
    future[:, 500:] += 1.0
    with torch.no_grad():
        # Samples before the change come from frames that end before it (window 8, hop 4).
        assert torch.equal(model(x)[:, :490], model(future)[:, :490])
    non_causal = ConvTasNet(N=16, L=8, B=16, H=16, P=3, X=3, R=1, C=2)
    with torch.no_grad():
        assert not torch.equal(non_causal(x)[:, :490], non_causal(future)[:, :490])


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm_type="BN"), "norm_type"), (dict(L=15), "even"), (dict(N=0), "N"),
    (dict(mask_nonlinear="tanh"), "mask_nonlinear"),
])
def test_bad_conv_tasnet_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvTasNet(**{**dict(N=8, L=4, B=8, H=8, P=3, X=1, R=1, C=2), **kwargs})


def test_conv_tasnet_rejects_a_wrongly_shaped_mixture():
    with pytest.raises(ValueError, match=r"mixture: expected \[batch, time\]"):
        ConvTasNet(N=8, L=4, B=8, H=8, P=3, X=1, R=1, C=2)(torch.randn(2, 1, 100))


def test_conv_tasnet_trains_with_the_pure_step():
    torch.manual_seed(0)
    model = ConvTasNet(N=16, L=8, B=16, H=16, P=3, X=1, R=1, C=2)
    opt = optim.adam(1e-3)
    state = fbrain.TrainState.create(model, opt)

    def loss_fn(params, buffers, batch, rng):
        est, _ = fbrain.apply_module(model, params, buffers, batch[0])
        return torch.nn.functional.mse_loss(est, batch[1])

    step = fbrain.make_train_step(loss_fn, opt, max_grad_norm=5.0)
    g = torch.Generator().manual_seed(0)
    sources = torch.randn(2, 400, 2, generator=g)
    batch = (sources.sum(-1), sources)
    first = None
    for _ in range(20):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first
