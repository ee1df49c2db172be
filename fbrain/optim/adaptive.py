"""torch.optim's other adaptive methods as pure transformations: Adagrad, Adadelta, Adamax, NAdam, RAdam.

Each follows the arithmetic of torch's single-tensor implementation (what torch.optim runs on the
CPU), operation by operation, so a twin tracks torch.optim to float rounding (tested to 1e-6 over
200 steps). Everything that depends on the step count is computed from the state's count tensor on
the device: no host read, so the steps stay pure and capturable (RAdam's "rectified or not" branch
is a ``torch.where``). These run one small loop over the parameters; the per-tensor ops keep them
usable under ``vmap``.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.nadam(lr=2e-3)
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> int(state.count), updates["w"].shape
    (1, torch.Size([2]))
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fbrain.optim import hyperparams as hp
from fbrain.optim.base import GradientTransformation


class AdaptiveState(NamedTuple):
    """The step count, per-parameter buffers by name (``slots[buffer][param]``), hyperparameters."""

    count: torch.Tensor
    slots: dict[str, dict[str, torch.Tensor]]
    hyperparams: dict


def _transformation(schedules: dict, slots: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                    step: Callable, maximize: bool) -> GradientTransformation:
    """A transformation whose ``step(g, p, buffers, x, count) -> (delta, new_buffers)`` updates one
    parameter; ``x`` holds the hyperparameters as tensors, ``count`` the new step count (float64)."""

    def init(params):
        return AdaptiveState(
            count=torch.zeros((), dtype=torch.int64, device=hp.device_of(params)),
            slots={name: {n: make(p) for n, p in params.items()} for name, make in slots.items()},
            hyperparams=hp.init(params, **schedules))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("this optimizer needs the parameters: call update(grads, state, params)")
        h = hp.current(state.hyperparams, schedules, state.count)
        x = hp.as_tensors(h, state.count.device)
        count = (state.count + 1).to(torch.float64)
        updates, new_slots = {}, {name: dict(values) for name, values in state.slots.items()}
        for n, g in grads.items():
            g = -g if maximize else g
            delta, buffers = step(g, params[n], {name: state.slots[name][n] for name in slots}, x, count)
            updates[n] = delta
            for name, value in buffers.items():
                new_slots[name][n] = value
        return updates, AdaptiveState(state.count + 1, new_slots, h)

    return GradientTransformation(init, update)


def _coupled_decay(g, p, x):
    """torch.optim's L2 weight decay: the gradient plus ``weight_decay * param``."""
    return g.add(p * x["weight_decay"].to(p.dtype))


def adagrad(lr: hp.Hyperparam = 1e-2, lr_decay: float = 0.0, weight_decay: hp.Hyperparam = 0.0,
            initial_accumulator_value: float = 0.0, eps: hp.Hyperparam = 1e-10,
            maximize: bool = False) -> GradientTransformation:
    """``torch.optim.Adagrad``."""
    schedules = hp.checked("adagrad", lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)
    initial_accumulator_value = hp.checked_value("adagrad: initial_accumulator_value", "initial_accumulator_value",
                                                 initial_accumulator_value, schedule=False)

    def step(g, p, b, x, count):
        g = _coupled_decay(g, p, x)
        clr = x["lr"] / (1 + (count - 1) * x["lr_decay"])
        total = b["sum"].addcmul(g, g, value=1)
        std = total.sqrt().add(x["eps"].to(p.dtype))
        return g / std * (-clr).to(p.dtype), {"sum": total}

    return _transformation(schedules, {"sum": lambda p: torch.full_like(p, initial_accumulator_value)}, step,
                           maximize)


def adadelta(lr: hp.Hyperparam = 1.0, rho: hp.Hyperparam = 0.9, eps: hp.Hyperparam = 1e-6,
             weight_decay: hp.Hyperparam = 0.0, maximize: bool = False) -> GradientTransformation:
    """``torch.optim.Adadelta``."""
    schedules = hp.checked("adadelta", lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)

    def step(g, p, b, x, count):
        g = _coupled_decay(g, p, x)
        rho_, eps_ = x["rho"].to(p.dtype), x["eps"].to(p.dtype)
        square_avg = b["square_avg"] * rho_ + g * g * (1 - rho_)
        std = square_avg.add(eps_).sqrt()
        delta = b["acc_delta"].add(eps_).sqrt() / std * g
        acc_delta = b["acc_delta"] * rho_ + delta * delta * (1 - rho_)
        return delta * (-x["lr"]).to(p.dtype), {"square_avg": square_avg, "acc_delta": acc_delta}

    return _transformation(schedules, {"square_avg": torch.zeros_like, "acc_delta": torch.zeros_like}, step,
                           maximize)


def adamax(lr: hp.Hyperparam = 2e-3, betas: tuple = (0.9, 0.999), eps: hp.Hyperparam = 1e-8,
           weight_decay: hp.Hyperparam = 0.0, maximize: bool = False) -> GradientTransformation:
    """``torch.optim.Adamax``."""
    schedules = hp.checked("adamax", lr=lr, **hp.betas("adamax", betas), eps=eps, weight_decay=weight_decay)

    def step(g, p, b, x, count):
        g = _coupled_decay(g, p, x)
        exp_avg = b["exp_avg"].lerp(g, (1 - x["beta1"]).to(p.dtype))
        exp_inf = torch.maximum(b["exp_inf"] * x["beta2"].to(p.dtype), g.abs().add(x["eps"].to(p.dtype)))
        clr = x["lr"] / (1 - x["beta1"] ** count)
        return exp_avg / exp_inf * (-clr).to(p.dtype), {"exp_avg": exp_avg, "exp_inf": exp_inf}

    return _transformation(schedules, {"exp_avg": torch.zeros_like, "exp_inf": torch.zeros_like}, step, maximize)


def _adam_moments(g, b, x, dtype):
    exp_avg = b["exp_avg"].lerp(g, (1 - x["beta1"]).to(dtype))
    exp_avg_sq = b["exp_avg_sq"] * x["beta2"].to(dtype) + g * g * (1 - x["beta2"]).to(dtype)
    return exp_avg, exp_avg_sq


def _decay(g, p, x, decoupled: bool):
    """``(gradient, parameter)`` after weight decay: coupled (L2) or decoupled (AdamW-style)."""
    if decoupled:
        return g, p * (1 - x["lr"] * x["weight_decay"]).to(p.dtype)
    return _coupled_decay(g, p, x), p


def nadam(lr: hp.Hyperparam = 2e-3, betas: tuple = (0.9, 0.999), eps: hp.Hyperparam = 1e-8,
          weight_decay: hp.Hyperparam = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
          maximize: bool = False) -> GradientTransformation:
    """``torch.optim.NAdam`` (with ``decoupled_weight_decay``, the NAdamW variant)."""
    owner = "nadamw" if decoupled_weight_decay else "nadam"
    schedules = hp.checked(owner, lr=lr, **hp.betas(owner, betas), eps=eps, weight_decay=weight_decay,
                           momentum_decay=momentum_decay)

    def step(g, p, b, x, count):
        g, decayed = _decay(g, p, x, decoupled_weight_decay)
        bias_correction2 = 1 - x["beta2"] ** count
        mu = x["beta1"] * (1.0 - 0.5 * (0.96 ** (count * x["momentum_decay"])))
        mu_next = x["beta1"] * (1.0 - 0.5 * (0.96 ** ((count + 1) * x["momentum_decay"])))
        mu_product = b["mu_product"] * mu.to(b["mu_product"].dtype)  # float32, as torch keeps it
        exp_avg, exp_avg_sq = _adam_moments(g, b, x, p.dtype)
        denom = (exp_avg_sq / bias_correction2.to(p.dtype)).sqrt().add(x["eps"].to(p.dtype))
        mu_product_next = mu_product * mu_next
        new = decayed + g / denom * (-x["lr"] * (1.0 - mu) / (1.0 - mu_product)).to(p.dtype)
        new = new + exp_avg / denom * ((-x["lr"] * mu_next) / (1.0 - mu_product_next)).to(p.dtype)
        return new - p, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "mu_product": mu_product}

    slots = {"exp_avg": torch.zeros_like, "exp_avg_sq": torch.zeros_like,
             "mu_product": lambda p: torch.ones((), dtype=torch.float32, device=p.device)}
    return _transformation(schedules, slots, step, maximize)


def radam(lr: hp.Hyperparam = 1e-3, betas: tuple = (0.9, 0.999), eps: hp.Hyperparam = 1e-8,
          weight_decay: hp.Hyperparam = 0.0, decoupled_weight_decay: bool = False,
          maximize: bool = False) -> GradientTransformation:
    """``torch.optim.RAdam`` (with ``decoupled_weight_decay``, RAdamW)."""
    owner = "radamw" if decoupled_weight_decay else "radam"
    schedules = hp.checked(owner, lr=lr, **hp.betas(owner, betas), eps=eps, weight_decay=weight_decay)

    def step(g, p, b, x, count):
        g, decayed = _decay(g, p, x, decoupled_weight_decay)
        exp_avg, exp_avg_sq = _adam_moments(g, b, x, p.dtype)
        bias_correction1 = 1 - x["beta1"] ** count
        bias_correction2 = 1 - x["beta2"] ** count
        corrected = exp_avg / bias_correction1.to(p.dtype)
        rho_inf = 2 / (1 - x["beta2"]) - 1
        rho_t = rho_inf - 2 * count * (x["beta2"] ** count) / bias_correction2
        # The rectification exists only past rho_t > 5 (the first few steps): chosen on the device.
        rect = ((rho_t - 4).clamp_min(0) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive = (bias_correction2 ** 0.5).to(p.dtype) / exp_avg_sq.sqrt().add(x["eps"].to(p.dtype))
        rectified = corrected * x["lr"].to(p.dtype) * adaptive * rect.to(p.dtype)
        plain = corrected * x["lr"].to(p.dtype)
        new = decayed - torch.where(rho_t > 5.0, rectified, plain)
        return new - p, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    return _transformation(schedules, {"exp_avg": torch.zeros_like, "exp_avg_sq": torch.zeros_like}, step,
                           maximize)
