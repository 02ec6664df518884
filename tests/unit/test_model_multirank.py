"""Tier 2: megatron-core GPT + MTP on several CPU ranks (gloo), built and stepped.

For TP=2 x PP=2 (4 ranks: both splits at once): the MTP block exists only on the last
pipeline stage, the parameter count of every stage equals the planner's, and one training
step gives a finite lm loss and finite per-depth MTP losses on the stage that computes
them. TP2 and PP2 alone are built and trained in test_layout_equivalence and
test_plan_models (parameter counts per rank and stage).
"""

import math

import pytest

from tests.dist_utils import spawn


def _build_and_step(rank, world_size, cli, output_dir):
    import os

    from megatron.core import parallel_state as ps

    from mtp_megatron.config import build_config
    from mtp_megatron.plan.memory import stage_params
    from mtp_megatron.runtime.launch_env import read_launch_env
    from mtp_megatron.training.trainer import Trainer

    cfg = build_config(None, dict(cli, output_dir=output_dir, mock_data=True), world_size)
    trainer = Trainer(cfg, read_launch_env(os.environ), "local")
    try:
        chunk = trainer.model[0].module
        has_mtp = hasattr(chunk, "mtp")
        tp_rank = ps.get_tensor_model_parallel_rank()
        local = sum(p.numel() for p in chunk.parameters()
                    if getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
        import torch

        total = torch.tensor([local])
        torch.distributed.all_reduce(total, group=ps.get_tensor_model_parallel_group())
        pp_rank = ps.get_pipeline_model_parallel_rank()
        expected = stage_params(cfg, trainer.vocab_size, pp_rank)["total"]
        step = trainer.train_step()
        return {
            "pp_rank": pp_rank,
            "last": ps.is_pipeline_last_stage(),
            "has_mtp": has_mtp,
            "mtp_layers": len(chunk.mtp.layers) if has_mtp else 0,
            "params": int(total),
            "expected": expected,
            "lm_loss": step.lm_loss,
            "mtp_losses": step.mtp_losses,
        }
    finally:
        trainer.close()


TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
            micro_batch_size=2, global_batch_size=4, train_iters=1, log_interval=1)


@pytest.mark.multirank
@pytest.mark.parametrize("tp,pp", [(2, 2)], ids=["tp2_pp2"])
def test_mtp_block_only_on_last_stage_and_one_step_is_finite(tp, pp, tmp_path):
    cli = dict(TINY, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
               mtp_num_layers=2)
    results = spawn(tp * pp, _build_and_step, cli, str(tmp_path))
    for r in results:
        assert r["has_mtp"] == r["last"], r
        assert r["mtp_layers"] == (2 if r["last"] else 0)
        assert r["params"] == r["expected"], r
        if r["last"]:
            assert r["lm_loss"] is not None and math.isfinite(r["lm_loss"])
            assert len(r["mtp_losses"]) == 2
            assert all(math.isfinite(x) and x > 0 for x in r["mtp_losses"])
            # an untrained model predicts near-uniformly over the padded vocabulary
            assert abs(r["lm_loss"] - math.log(512)) < 1.0
        else:
            assert r["mtp_losses"] is None
