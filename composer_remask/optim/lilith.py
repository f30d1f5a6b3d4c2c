"""Lilith: the optimizer of the ReMask-3B recipe (docs/design.md#lilith).

Lilith (by the model card's author, published in supertrainer2000) rescales each gradient by a
LAMB-style trust ratio, keeps two chained momenta (a momentum and a momentum of its change, the
"acceleration") and an Adam-style second moment of the combined update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.optim import Optimizer

from composer_remask.checks import finite_number

__all__ = ["Lilith"]


class Lilith(Optimizer):
    r"""Lilith, one step per parameter tensor :math:`\theta` with gradient :math:`g` (step :math:`t`):

    1. trust ratio: :math:`g \leftarrow \max(\lVert\theta\rVert / \max(\lVert g\rVert, g_{min}), r_{min})\, g`,
       skipped for tensors whose dimensions sum to at most 1 (scalars and shape ``(1,)``);
    2. :math:`m_1 \leftarrow \beta_{1m}(m_1 + m_2) + (1-\beta_{1m}) g` (remembering the old :math:`m_1`);
    3. :math:`m_2 \leftarrow \beta_{2m} m_2 + (1-\beta_{2m})(m_1 - m_1^{old})`;
    4. :math:`u = m_1 + a\, m_2` (``acceleration`` :math:`a`);
    5. :math:`v \leftarrow \beta_v v + (1-\beta_v) u^2`, :math:`\hat v = v / (1-\beta_v^t)`;
    6. :math:`u \leftarrow u / \sqrt{\hat v + \epsilon}` (eps inside the square root);
    7. :math:`\theta \leftarrow \theta - \eta\,(u + \lambda\theta)`.

    With ``ema_k > 0`` an exponential moving average of the parameters is kept
    (``ema <- ema + ema_beta * (theta - ema)`` after each step) and copied into the parameters
    every ``ema_k`` steps, as the published implementation does. Off by default.

    Param groups carry no ``momentum`` / ``betas`` entry, so schedulers that cycle momentum
    (One Cycle) leave Lilith alone.

    Args:
        params: parameters or param groups.
        lr: learning rate :math:`\eta` (the schedule multiplies it).
        eps: added to :math:`\hat v` inside the square root.
        beta1_m, beta2_m: decay of the momentum :math:`m_1` and of its change :math:`m_2`.
        beta_v: decay of the second moment :math:`v`.
        weight_decay: decoupled decay :math:`\lambda`, applied as ``lr * weight_decay * theta``.
        g_norm_min: floor on the gradient norm in the trust ratio.
        ratio_min: floor on the trust ratio.
        acceleration: weight :math:`a` of :math:`m_2` in the update.
        ema_k, ema_beta: parameter EMA period (0 = off) and interpolation weight.
        bias_correction: divide :math:`v` by :math:`1-\beta_v^t` (docs/design.md#lilith). The published code at
            the card's time computes the corrected value but divides by the raw :math:`v`; set
            ``False`` to reproduce that exactly.
        sharded: every rank of the default process group holds a different shard of each tensor
            (FSDP ``FULL_SHARD`` / ``SHARD_GRAD_OP`` with ``use_orig_params``). The norms of the
            trust ratio are then summed over ranks, so the ratio is the one of the whole tensor,
            and the skip rule uses the whole tensor's element count (``numel <= 1``). Set from
            ``fsdp_config`` by ``train/transforms.py``; leave ``False`` for single-process and DDP training.
        replicas: with ``sharded`` under HSDP (``HYBRID_SHARD``), how many identical copies of
            each shard the default group holds (Composer's ``data_parallel_replicate_degree``):
            the summed statistics are divided by it, so the norms and the element count are the
            whole tensor's once. Set from ``fsdp_config`` by ``train/transforms.py``.

    Example::

        optimizer = Lilith(model.parameters(), lr=1e-5)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        eps: float = 1e-8,
        beta1_m: float = 0.9,
        beta2_m: float = 0.99,
        beta_v: float = 0.999,
        weight_decay: float = 0.01,
        g_norm_min: float = 1e-4,
        ratio_min: float = 1e-4,
        acceleration: float = 1.0,
        ema_k: int = 0,
        ema_beta: float = 0.99,
        bias_correction: bool = True,
        sharded: bool = False,
        replicas: int = 1,
    ) -> None:
        lr = finite_number(lr, "Lilith: lr", low=0.0)
        beta1_m, beta2_m, beta_v = (finite_number(beta, f"Lilith: {name}", low=0.0, high=1.0, high_open=True)
                                    for name, beta in (("beta1_m", beta1_m), ("beta2_m", beta2_m), ("beta_v", beta_v)))
        ema_beta = finite_number(ema_beta, "Lilith: ema_beta", low=0.0, high=1.0)
        eps, weight_decay, ratio_min = (finite_number(value, f"Lilith: {name}", low=0.0) for name, value in
                                        (("eps", eps), ("weight_decay", weight_decay), ("ratio_min", ratio_min)))
        g_norm_min = finite_number(g_norm_min, "Lilith: g_norm_min", low=0.0, low_open=True)
        acceleration = finite_number(acceleration, "Lilith: acceleration")
        if isinstance(ema_k, bool) or not isinstance(ema_k, int) or ema_k < 0:
            raise ValueError(f"Lilith: ema_k must be an integer >= 0, got {ema_k!r}")
        defaults = dict(
            lr=lr, eps=eps, beta1_m=beta1_m, beta2_m=beta2_m, beta_v=beta_v,
            weight_decay=weight_decay, g_norm_min=g_norm_min, ratio_min=ratio_min,
            acceleration=acceleration, ema_k=ema_k, ema_beta=ema_beta,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)
        self.sharded = sharded
        if replicas < 1:
            raise ValueError(f"Lilith: replicas must be >= 1, got {replicas}")
        self.replicas = int(replicas)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        trust_ratios = self._trust_ratios()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param, group, trust_ratios.get(param))
        return loss

    def _trust_ratios(self) -> dict[torch.Tensor, torch.Tensor]:
        """Per-tensor trust ratio, or no entry where the rule skips the tensor."""
        ratios: dict[torch.Tensor, torch.Tensor] = {}
        if not self.sharded:
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is None or sum(param.shape) <= 1:
                        continue
                    grad_norm = param.grad.norm().clamp(min=group["g_norm_min"])
                    ratios[param] = (param.norm() / grad_norm).clamp(min=group["ratio_min"])
            return ratios

        # Sharded: sum squares and element counts over ranks in one all-reduce. Every rank walks
        # every parameter in the same order (an empty or grad-less shard contributes zeros).
        params = [(param, group) for group in self.param_groups for param in group["params"]]
        if not params:
            return ratios
        device = params[0][0].device
        stats = torch.zeros(len(params), 3, dtype=torch.float64, device=device)
        for row, (param, _) in enumerate(params):
            stats[row, 0] = param.detach().norm().to(torch.float64).square()
            if param.grad is not None:
                stats[row, 1] = param.grad.norm().to(torch.float64).square()
            stats[row, 2] = param.numel()
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(stats)
            if self.replicas > 1:  # HSDP: every shard was counted once per replica
                stats /= self.replicas
        for row, (param, group) in enumerate(params):
            if param.grad is None or stats[row, 2] <= 1:
                continue
            grad_norm = stats[row, 1].sqrt().clamp(min=group["g_norm_min"])
            ratio = (stats[row, 0].sqrt() / grad_norm).clamp(min=group["ratio_min"])
            ratios[param] = ratio.to(param.dtype)
        return ratios

    def _update(self, param: torch.Tensor, group: dict[str, Any], trust_ratio: torch.Tensor | None) -> None:
        grad = param.grad if trust_ratio is None else param.grad * trust_ratio
        state = self.state[param]
        if not state:
            # A tensor step (like torch's Adam) so FSDP's optimizer-state gathering handles it.
            state["step"] = torch.tensor(0.0)
            state["m1"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["m2"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["v"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["ema_k"] > 0:
                state["ema"] = param.detach().clone()
        state["step"] += 1
        step = int(state["step"].item())
        m1, m2, v = state["m1"], state["m2"], state["v"]

        m1_previous = m1.clone()
        m1.add_(m2).lerp_(grad, 1 - group["beta1_m"])
        m2.lerp_(m1 - m1_previous, 1 - group["beta2_m"])
        update = m1 + group["acceleration"] * m2
        v.lerp_(update.square(), 1 - group["beta_v"])
        v_hat = v / (1 - group["beta_v"] ** step) if group["bias_correction"] else v
        update.div_((v_hat + group["eps"]).sqrt())
        update.add_(param, alpha=group["weight_decay"])
        param.add_(update, alpha=-group["lr"])

        if group["ema_k"] > 0:
            state["ema"].lerp_(param, group["ema_beta"])
            if step % group["ema_k"] == 0:
                param.copy_(state["ema"])
