"""The distributed optimizer's state survives save -> load element by element.

megatron-core 0.16.1 read each parameter's state from the wrong offset when a DDP buffer
has padding between buckets (see mtp_megatron/checkpoint/distopt_ranges.py): with PP2 +
--mtp-num-layers 2 the last stage's embedding copy (its own bucket after a padded one;
"param range exceeds unpadded buffer by 64 elements"), and with --overlap-grad-reduce
every bucket after the first. One PP2 run with small buckets covers both: train, save,
load into a fresh Trainer, compare fp32 main weights and Adam moments of every parameter.
"""

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from mtp_megatron.checkpoint.distopt_ranges import pad_like_buffer
from tests.dist_utils import spawn
from tests.functional import resume_matrix as rm

CLI = dict(rm.TINY, mtp_num_layers=2, use_distributed_optimizer=True,
           pipeline_model_parallel_size=2, overlap_grad_reduce=True, ddp_bucket_size=3000,
           train_iters=2)


def _optimizer_state(trainer):
    """{parameter name: {"param"|"exp_avg"|"exp_avg_sq": this rank's shard}}."""
    from mtp_megatron.checkpoint.distopt_ranges import distributed_optimizers

    names = {p: n for chunk in trainer.model for n, p in chunk.named_parameters()}
    out = {}
    for sub in distributed_optimizers(trainer.optimizer):
        for gbuf in sub.gbuf_ranges:
            for buckets in gbuf.values():
                for bucket in buckets:
                    for param in bucket["param_map"]:
                        tensors = sub._get_main_param_and_optimizer_states(param)
                        out[names[param]] = {k: v.detach().clone() for k, v in tensors.items()
                                             if k != "step"}
    return out


def _padded_buffers(trainer):
    from mtp_megatron.checkpoint.distopt_ranges import distributed_optimizers

    return sum(buf.numel > buf.numel_unpadded
               for sub in distributed_optimizers(trainer.optimizer) for buf in sub.buffers)


def _save_then_load(rank, world_size, root):
    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "exceeds unpadded buffer" in record.getMessage():
                warnings.append(record.getMessage())

    logging.getLogger("megatron.core.optimizer.distrib_optimizer").addHandler(Catch())
    session = rm.Session(world_size)
    ck = os.path.join(root, "ck")
    saved, _ = session.run(None, dict(CLI, save=ck, save_interval=2,
                                      output_dir=os.path.join(root, "a")))
    before, padded = _optimizer_state(saved), _padded_buffers(saved)
    del saved
    loaded = session.trainer(None, dict(CLI, load=ck, output_dir=os.path.join(root, "b")))
    after = _optimizer_state(loaded)
    differ = [f"{name} {key}: {int((value != after[name][key]).sum())} of {value.numel()}"
              for name, states in before.items() for key, value in states.items()
              if not value.equal(after[name][key])]
    return {"names": sorted(before), "keys": sorted({k for s in before.values() for k in s}),
            "differ": differ, "warnings": warnings, "padded": padded,
            "loaded_iteration": loaded.iteration}


@pytest.mark.functional
def test_pp2_mtp2_distributed_optimizer_state_round_trips_exactly(tmp_path):
    per_rank = spawn(2, _save_then_load, str(tmp_path))
    for rank, got in enumerate(per_rank):
        assert got["loaded_iteration"] == 2, (rank, got)
        assert got["padded"] >= 1, (rank, "no bucket padding: the case is not exercised")
        assert got["keys"] == ["exp_avg", "exp_avg_sq", "param"], (rank, got["keys"])
        assert got["differ"] == [], (rank, got["differ"])
        assert got["warnings"] == [], (rank, got["warnings"])
    # the last stage holds the MTP block and its copy of the shared embedding
    assert "module.embedding.word_embeddings.weight" in per_rank[1]["names"]
    assert any(".mtp.layers.1." in name for name in per_rank[1]["names"])


def test_pad_like_buffer_puts_each_bucket_at_its_offset():
    buffer = SimpleNamespace(numel=12, numel_unpadded=7, buckets=[
        SimpleNamespace(offset=0, numel_unpadded=3), SimpleNamespace(offset=4, numel_unpadded=2),
        SimpleNamespace(offset=8, numel_unpadded=2)])
    world = torch.arange(1.0, 8.0)
    assert pad_like_buffer(world, buffer).tolist() == [1, 2, 3, 0, 4, 5, 0, 0, 6, 7, 0, 0]
    assert pad_like_buffer(torch.ones(12), buffer).equal(torch.ones(12))  # already padded
    no_padding = SimpleNamespace(numel=7, numel_unpadded=7, buckets=buffer.buckets)
    assert pad_like_buffer(world, no_padding) is world
