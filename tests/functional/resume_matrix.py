"""Save -> resume runs of the real Trainer, many cases in one spawned process group.

One ``spawn`` per layout (DP2, TP2xPP2) keeps the matrix cheap: the ranks set up their
process groups once, then for each case build a Trainer, train ``ITERS`` steps saving
at ``ITERS // 2``, build a second Trainer that resumes from that checkpoint, train to
``ITERS`` and compare (every logged value equal, final weights ``torch.equal``).

    results = spawn(2, run_cases, cases, str(tmp_path), 2)

A case is ``(name, yaml_path_or_None, cli_overrides)``. Results per rank:
``{name: CaseResult}`` (plus whatever the ``probes`` returned).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ITERS = 4
TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "lr_warmup_iters": 1,
        "mock_data": True, "eval_iters": 0, "log_interval": 1}
# What an example YAML keeps (its flags) and what a CPU test shrinks (shapes, length).
CPU_SIZED = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
             "micro_batch_size": 2, "global_batch_size": 8, "train_iters": ITERS,
             "lr_warmup_iters": 1, "mock_data": True, "eval_iters": 0, "log_interval": 1,
             "transformer_impl": "local"}

Case = Tuple[str, Optional[str], Dict[str, Any]]


@dataclass
class CaseResult:
    iterations: List[int]
    resumed_iterations: List[int]
    mismatches: List[str] = field(default_factory=list)  # "iteration key: a != b"
    weights_equal: Optional[bool] = None
    weights_compared: int = 0
    losses: Dict[int, float] = field(default_factory=dict)  # last stage only
    checkpoint: str = ""
    seconds: float = 0.0


def _values(step) -> Dict[str, Any]:
    out = {"lm loss": step.lm_loss, "lr": step.lr, "grad norm": step.grad_norm,
           "skipped": step.skipped, "mtp_factor": step.mtp_factor}
    for depth, value in enumerate(step.mtp_losses or [], start=1):
        out[f"mtp_{depth} loss"] = value
    return out


def _weights(model) -> Dict[str, Any]:
    return {f"{i}.{name}": p.detach().clone() for i, chunk in enumerate(model)
            for name, p in chunk.named_parameters()}


def build(yaml_path: Optional[str], cli: Dict[str, Any], world_size: int):
    from mtp_megatron.config import build_config
    from mtp_megatron.config.loader import read_yaml

    return build_config(read_yaml(yaml_path) if yaml_path else None, cli, world_size)


class Session:
    """Process groups once per spawned rank; a Trainer per run on top of them."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.device = None

    def trainer(self, yaml_path, cli):
        from mtp_megatron.runtime import distributed
        from mtp_megatron.runtime.launch_env import read_launch_env
        from mtp_megatron.training import trainer as trainer_module

        cfg = build(yaml_path, cli, self.world_size)
        if self.device is None:
            self.device = distributed.initialize(cfg, read_launch_env(os.environ))
            device = self.device

            def initialize(cfg, launch):  # groups exist: only reseed, as a new run would
                distributed.set_seeds(cfg.training.seed)
                return device

            trainer_module.distributed.initialize = initialize
        return trainer_module.Trainer(cfg, read_launch_env(os.environ), "local")

    def run(self, yaml_path, cli) -> Tuple[Any, list]:
        t = self.trainer(yaml_path, cli)
        history = []
        t.train(on_step=history.append)
        t.metrics.close()
        return t, history


def run_case(session: Session, root: str, name: str, yaml_path, cli) -> CaseResult:
    start = time.perf_counter()
    out = os.path.join(root, name)
    ck = os.path.join(out, "ck")
    base = dict(cli, train_iters=ITERS)
    straight, hist_a = session.run(yaml_path, dict(
        base, save=ck, save_interval=ITERS // 2, output_dir=os.path.join(out, "a")))
    weights_a = _weights(straight.model)
    del straight
    half = os.path.join(ck, f"iter_{ITERS // 2:07d}")
    resumed, hist_b = session.run(yaml_path, dict(
        base, load=half, output_dir=os.path.join(out, "b")))
    weights_b = _weights(resumed.model)
    a = {s.iteration: _values(s) for s in hist_a}
    b = {s.iteration: _values(s) for s in hist_b}
    result = CaseResult(sorted(a), sorted(b), checkpoint=half,
                        losses={i: v["lm loss"] for i, v in a.items()})
    for it in sorted(b):
        for key, value in b[it].items():
            if a.get(it, {}).get(key) != value:
                result.mismatches.append(f"{it} {key}: {a.get(it, {}).get(key)!r} != {value!r}")
    result.weights_compared = len(weights_a)
    result.weights_equal = weights_a.keys() == weights_b.keys() and all(
        weights_a[k].equal(weights_b[k]) for k in weights_a)
    result.seconds = time.perf_counter() - start
    return result


def run_cases(rank: int, world_size: int, cases: Sequence[Case], root: str,
              probes: Sequence[Tuple[str, Callable]] = ()) -> Dict[str, Any]:
    """Spawn target: every case, then each ``probe(session, root, results)``."""
    import torch

    torch.set_num_threads(1)
    session = Session(world_size)
    results: Dict[str, Any] = {}
    for name, yaml_path, cli in cases:
        results[name] = run_case(session, root, name, yaml_path, cli)
    for name, probe in probes:
        try:
            results[name] = probe(session, root, results)
        except Exception:  # report, do not hang the other ranks' collectives
            results[name] = traceback.format_exc()
            raise
    return results
