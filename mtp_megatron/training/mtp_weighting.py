"""The MTP objective's per-depth weights and factor schedule, handed to megatron-core.

The objective (docs/mtp-objective.md)::

    lm + factor(i) * sum_k w_k * mtp_k        sum_k w_k = 1, i = the iteration trained

megatron-core computes every depth's loss and attaches ``factor / D * mtp_k`` to the
hidden states through ``MTPLossAutoScaler`` (0.19: ``process_mtp_loss``; 0.16:
``GPTModel._postprocess``), reading the factor from the ``TransformerConfig`` at every
forward. This module changes only those two inputs, never the losses themselves:

* **factor(i)**: :class:`FactorSchedule` (``--mtp-loss-scaling-factor*``), a function of
  the iteration only, written into the model's ``TransformerConfig`` before each step;
  resuming at any iteration gives the same factors.
* **w_k**: while a model chunk runs its forward, :func:`depth_weights_applied` puts a
  stand-in for ``MTPLossAutoScaler`` in the one megatron-core module that attaches the
  depth terms (``mcore_compat.mtp_depth_term_module()``); the stand-in multiplies depth
  k's term by ``D * w_k`` before handing it to the real autoscaler. The autoscaler's
  backward scale (set by the schedule after the forward) is untouched, so each depth's
  gradient is scaled by exactly ``D * w_k``; the logged ``mtp_k loss`` (the tracker,
  written before the term) stays unweighted. ``uniform`` installs nothing: megatron-core's
  own ``factor / D`` computation, bit for bit.

    weighting = MTPWeighting.for_run(cfg, chunks=model, tconfig=tconfig)
    factor = weighting.start_iteration(12)   # sets the factor of iteration 12
    forward_backward(forward_step_func=weighting.forward_step, ...)
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from mtp_megatron.config import RunConfig
from mtp_megatron.config.mtp import MTPConfig, raw_depth_weights

_DEPTH_TERM_NAME = "MTPLossAutoScaler"


@dataclass(frozen=True)
class FactorSchedule:
    """``--mtp-loss-scaling-factor`` over iterations, with the LR schedule's rules.

    ``at(i)`` is the factor while iteration ``i`` (1-based) trains, from the ``n = i - 1``
    iterations completed before it (megatron-core's LR scheduler counts the same way):
    warmup ``peak * n / W`` for ``n <= W``; then ``constant`` stays at ``peak``; ``step``
    is ``peak`` until ``n = N`` (``decay_iters``) and ``final`` from there; ``linear`` and
    ``cosine`` go from ``peak`` at ``n = W`` to ``final`` at ``n = N``; ``final`` after N.
    So ``step`` at N = 1000 trains iterations 1..1000 with the peak.
    """

    peak: float
    final: float
    warmup_iters: int = 0
    decay_style: str = "constant"
    decay_iters: int = 0

    @classmethod
    def of(cls, cfg: RunConfig) -> "FactorSchedule":
        mtp = cfg.mtp
        return cls(peak=mtp.mtp_loss_scaling_factor, final=mtp.final_factor,
                   warmup_iters=mtp.mtp_loss_scaling_factor_warmup_iters,
                   decay_style=mtp.mtp_loss_scaling_factor_decay_style,
                   decay_iters=cfg.mtp_factor_decay_iters)

    def at(self, iteration: int) -> float:
        done, warmup = iteration - 1, self.warmup_iters
        if warmup and done <= warmup:
            return self.peak * (done / warmup)
        if self.decay_style == "constant":
            return self.peak
        if done >= self.decay_iters:
            return self.final
        if self.decay_style == "step":
            return self.peak
        ratio = (done - warmup) / (self.decay_iters - warmup)
        if self.decay_style == "linear":
            return self.peak + (self.final - self.peak) * ratio
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def depth_multipliers(mtp: MTPConfig) -> Optional[Tuple[float, ...]]:
    """``D * w_k`` per depth: what each of megatron-core's ``factor / D * mtp_k`` terms
    is multiplied by; None when every weight is equal (uniform: nothing to change)."""
    if not mtp.enabled:
        return None
    raw = raw_depth_weights(mtp.mtp_depth_weights, mtp.mtp_num_layers)
    if len(set(raw)) == 1:
        return None
    return tuple(mtp.mtp_num_layers * w for w in mtp.depth_weights())


class _DepthWeightedAutoScaler:
    """Stands in for ``MTPLossAutoScaler`` during one model-chunk forward: megatron-core
    calls ``apply(hidden_states, term)`` once per depth, in depth order; depth k's term
    is multiplied by ``multipliers[k - 1]``. Everything else is the real class."""

    def __init__(self, original, multipliers: Sequence[float]):
        self.original = original
        self.multipliers = tuple(multipliers)
        self.calls = 0

    def apply(self, hidden_states, mtp_term):
        if self.calls >= len(self.multipliers):
            raise RuntimeError(
                f"megatron-core attached more than {len(self.multipliers)} MTP depth terms in "
                "one forward: --mtp-depth-weights cannot tell the depths apart")
        weight = self.multipliers[self.calls]
        self.calls += 1
        return self.original.apply(hidden_states, mtp_term * weight)

    def __getattr__(self, name):
        return getattr(self.original, name)


@contextlib.contextmanager
def depth_weights_applied(multipliers: Optional[Sequence[float]]
                          ) -> Iterator[Optional[_DepthWeightedAutoScaler]]:
    """Within the block, megatron-core's depth terms are multiplied by ``multipliers``
    (one per depth); the name is restored on exit. ``None``: nothing is replaced.

    Raises RuntimeError if the block attached some but not all depths' terms."""
    if multipliers is None:
        yield None
        return
    from mtp_megatron.runtime import mcore_compat

    module = importlib.import_module(mcore_compat.mtp_depth_term_module())
    original = getattr(module, _DEPTH_TERM_NAME)
    if isinstance(original, _DepthWeightedAutoScaler):
        raise RuntimeError("depth_weights_applied is already active (nested forwards)")
    scaler = _DepthWeightedAutoScaler(original, multipliers)
    setattr(module, _DEPTH_TERM_NAME, scaler)
    try:
        yield scaler
    finally:
        setattr(module, _DEPTH_TERM_NAME, original)
    if scaler.calls not in (0, len(scaler.multipliers)):
        raise RuntimeError(f"megatron-core attached {scaler.calls} of "
                           f"{len(scaler.multipliers)} MTP depth terms in one forward")


def _model_configs(chunks, tconfig) -> List:
    """Every distinct TransformerConfig the chunks' modules hold (normally one object)."""
    found = {id(tconfig): tconfig}
    for chunk in chunks:
        module = chunk
        while module is not None:
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "mtp_loss_scaling_factor"):
                found.setdefault(id(config), config)
            module = getattr(module, "module", None)
    return list(found.values())


class MTPWeighting:
    """What the Trainer holds: the factor schedule and the depth weights of one run."""

    def __init__(self, schedule: Optional[FactorSchedule],
                 multipliers: Optional[Tuple[float, ...]], configs: Sequence,
                 forward_step: Callable):
        self.schedule = schedule
        self.multipliers = multipliers
        self.configs = list(configs)
        self._forward_step = forward_step

    @classmethod
    def for_run(cls, cfg: RunConfig, *, chunks, tconfig, forward_step: Callable
                ) -> "MTPWeighting":
        schedule = FactorSchedule.of(cfg) if cfg.mtp.enabled else None
        return cls(schedule, depth_multipliers(cfg.mtp), _model_configs(chunks, tconfig),
                   forward_step)

    def start_iteration(self, iteration: int) -> Optional[float]:
        """Set the factor of ``iteration`` (1-based) in the model's config; returns it
        (None without MTP)."""
        if self.schedule is None:
            return None
        factor = self.schedule.at(iteration)
        for config in self.configs:
            config.mtp_loss_scaling_factor = factor
        return factor

    @property
    def forward_step(self) -> Callable:
        """megatron-core's forward-step function, with the depth weights applied during
        the model's forward (the plain one when the weights are uniform)."""
        if self.multipliers is None:
            return self._forward_step
        return self._weighted_forward_step

    def _weighted_forward_step(self, data_iterator, model):
        with depth_weights_applied(self.multipliers):
            return self._forward_step(data_iterator, model)
