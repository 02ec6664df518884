"""The training step on one CPU rank: host syncs per step, --num-workers, recompute.

One spawned rank trains the same tiny D=1 model four ways (3 steps each) and counts the
host syncs of the hot loop by patching ``Tensor.item/tolist/__bool__/__float__/__int__``
(what a GPU would stall on). Expected per step: megatron-core's grad-norm ``.item()``
and our one NaN/exit agreement; the loss reductions happen once per log window.
"""

import collections
import itertools
import os
import sys

import pytest
import torch

from tests.dist_utils import spawn

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
            micro_batch_size=2, global_batch_size=8, train_iters=50, log_interval=50,
            mtp_num_layers=1, mock_data=True, eval_iters=0, lr_warmup_iters=0)
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _forwarding(filename: str) -> bool:
    return "strict_device" in filename or f"{os.sep}torch{os.sep}" in filename


class SyncCounter:
    """Counts calls of the Tensor methods that copy a value to the host, by the file
    that calls them: ``ours`` (mtp_megatron, the CPU bridge excepted) and ``mcore``.

    Calls from torch's own CPU Adam (its step counters) and from megatron-core's
    no-apex norm fallback (``megatron/core/utils.py``) are CPU-only artifacts, so only
    the call sites are compared, not a raw total."""

    def __init__(self):
        self.ours = 0
        self.mcore = collections.Counter()
        self._saved = {}

    def _note(self, filename, lineno):
        if "mtp_megatron" in filename and "cpu_bridge" not in filename:
            self.ours += 1
        elif "megatron/core" in filename:
            self.mcore[f"{filename.split('megatron/core/')[-1]}:{lineno}"] += 1

    def __enter__(self):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                caller = sys._getframe(1)
                while caller is not None and _forwarding(caller.f_code.co_filename):
                    caller = caller.f_back  # strict mode's function mode, torch's dispatch
                self._note(caller.f_code.co_filename, caller.f_lineno)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _train(rank, world_size, variants, output_dir):
    import os

    from mtp_megatron.config import build_config
    from mtp_megatron.runtime.launch_env import read_launch_env
    from mtp_megatron.training.trainer import Trainer

    out = {}
    for name, extra in variants.items():
        cfg = build_config(None, dict(TINY, output_dir=os.path.join(output_dir, name), **extra),
                           world_size)
        trainer = Trainer(cfg, read_launch_env(os.environ), "local")
        try:
            for chunk in trainer.model:
                chunk.train()
            trainer.run_step()  # warm-up (first-call allocations)
            with SyncCounter() as counter:
                for _ in range(3):
                    trainer.run_step()
            per_step = counter.ours / 3
            # the grad norm's .item() (its line moves between megatron-core releases)
            mcore_norm = sum(n for site, n in counter.mcore.items()
                             if site.startswith("optimizer/clip_grads.py:")) / 3
            with SyncCounter() as counter:
                window = trainer.losses.flush()
            out[name] = {"syncs_per_step": per_step, "mcore_norm_syncs": mcore_norm,
                         "flush_syncs": counter.ours,
                         "lm": window.lm, "mtp": window.mtp,
                         "steps": [trainer.train_step().lm_loss for _ in range(2)]}
        finally:
            trainer.close()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    variants = {
        "base": {},
        # DP=1: the overlapped (bucketed) grad reduce must not change a bit either
        "workers": {"num_workers": 2, "overlap_grad_reduce": True, "ddp_bucket_size": 4096},
        "recompute": {"recompute_granularity": "full", "recompute_method": "uniform",
                      "recompute_num_layers": 1},
        "selective_timed": {"recompute_granularity": "selective", "timing_log_level": 1},
    }
    return spawn(1, _train, variants, str(tmp_path_factory.mktemp("hot")))[0]


@pytest.mark.multirank
def test_two_host_syncs_per_step_and_losses_reduced_once_per_window(runs):
    base = runs["base"]
    # ours: the NaN/exit agreement's .tolist(); before: isfinite per microbatch (4) and
    # per grad buffer (1), lm loss, MTP tracker, exit flags, NaN flag: 9.
    assert base["syncs_per_step"] == 1, base
    assert base["mcore_norm_syncs"] == 1  # megatron-core's grad norm .item(), as before
    assert base["flush_syncs"] == 2  # one .tolist() for the lm losses, one for MTP
    assert len(base["lm"]) == 4 and len(base["mtp"]) == 1  # 4 steps in the window, D=1


@pytest.mark.multirank
def test_num_workers_and_overlap_grad_reduce_give_the_same_losses(runs):
    base, workers = runs["base"], runs["workers"]
    assert workers["lm"] == base["lm"] and workers["mtp"] == base["mtp"]
    assert workers["steps"] == base["steps"]
    assert workers["syncs_per_step"] == 1


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["recompute", "selective_timed"])
def test_recompute_gives_the_same_losses(runs, name):
    base, other = runs["base"], runs[name]
    for a, b in zip(itertools.chain(base["lm"], base["mtp"], base["steps"]),
                    itertools.chain(other["lm"], other["mtp"], other["steps"])):
        assert abs(a - b) < 1e-5, (name, a, b)
