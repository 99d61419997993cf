"""Schedule-free SignSGD: the TopK SAE optimizer of EleutherAI's sparsify ("signum", its default since 1.x).

    z_{t+1} = z_t - lr * sign(g(y_t))                      SignSGD: steepest descent in the L-inf norm
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}          c = lr_max^2 / sum of lr_max^2 (a running average)
    y_{t+1} = beta x_{t+1} + (1 - beta) z_{t+1}            gradients are taken at y; x is the model to use

SignSGD: Bernstein et al. 2018 (arXiv:1802.04434); schedule-free: Defazio et al. 2024 (arXiv:2405.15682),
`schedulefree.ScheduleFreeWrapper(SignSGD, momentum=0.95)` with weight_lr_power 2, r 0, exactly as sparsify
builds it, with lr = 5e-3 / sqrt(n_latents / 2^14). No LR decay is needed: the averaged iterate x plays its
role. We adopted it because, side by side on the same activations and token budget (bench/RESULTS.md), Adam
at the dictionary_learning learning rate 2e-4 / sqrt(n / 2^14) ended with about three times sparsify's held-out FVU.

The parameters hold y while training (`train()`) and x for evaluation and saving (`eval()`); the switch is
exact up to rounding. Everything (z, the running weight sum, the mode) lives in `state_dict()`, so a run can
be resumed. One fused in-place pass per step over all parameters (torch._foreach_*), no extra buffers but z.
"""
from __future__ import annotations

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95, weight_lr_power: float = 2.0):
        if lr <= 0 or not 0 < momentum < 1:
            raise ValueError(f"need lr > 0 and 0 < momentum < 1 (got lr={lr}, momentum={momentum})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_lr_power=weight_lr_power,
                                      weight_sum=0.0, lr_max=0.0, train_mode=True))

    def _swap(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta = group["momentum"]
            ps = [p for p in group["params"] if "z" in self.state[p]]
            if ps:
                zs = [self.state[p]["z"] for p in ps]
                # y -> x: x = y + (1 - 1/beta)(z - y);  x -> y: y = x + (1 - beta)(z - x)
                torch._foreach_lerp_(ps, zs, (1 - beta) if to_train else (1 - 1 / beta))
            group["train_mode"] = to_train

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters := x, the averaged iterate (the model to evaluate and save)."""
        self._swap(to_train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Parameters := y, where the next gradient is taken."""
        self._swap(to_train=True)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closures are not supported")
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("ScheduleFreeSignSGD.step() in eval mode; call .train() first")
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
            zs = [self.state[p]["z"] for p in ps]
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            group["weight_sum"] += weight
            c = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
            torch._foreach_lerp_(ps, zs, 1 - 1 / beta)                       # p: y -> x
            torch._foreach_add_(zs, torch._foreach_sign([p.grad for p in ps]), alpha=-lr)   # z step
            torch._foreach_lerp_(ps, zs, c)                                 # x update (running average)
            torch._foreach_lerp_(ps, zs, 1 - beta)                          # p: x -> y
        return None
