"""Adam, stepped through torch.optim's functional API.

`Optimizer.step()` wraps each call in hooks, a profiler range and state checks: Python overhead that is
a noticeable share of the small MLP's step on a CPU. `step()` below runs the same kernel on the
optimizer's own state (so `state_dict()`, checkpoints and exact resume are unchanged) without that.
tests/test_train.py checks that it gives bit-identical parameters to `opt.step()`.
"""
from __future__ import annotations

import torch
from torch.optim.adam import adam


def make_adam(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over all of the model's parameters; one fused kernel per step (CPU and CUDA)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def step(opt: torch.optim.Adam) -> None:
    """`opt.step()` then `opt.zero_grad(set_to_none=True)`, for an Adam with one parameter group."""
    (group,) = opt.param_groups
    params = group["params"]
    state = [opt.state[p] for p in params]
    if not all(state) or any(p.grad is None for p in params):
        opt.step()  # the first step creates the state; a parameter without a gradient is skipped there
    else:
        beta1, beta2 = group["betas"]
        with torch.no_grad():  # as in opt.step(): the update is not part of any graph
            adam(params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                 [s["max_exp_avg_sq"] for s in state] if group["amsgrad"] else [], [s["step"] for s in state],
                 foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                 fused=group["fused"], decoupled_weight_decay=group["decoupled_weight_decay"],
                 amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
    for p in params:
        p.grad = None
