"""The validation metrics are the same under TP=2 and PP=2 as on one rank.

Each layout builds the model, then overwrites every parameter with values drawn from
its *global* name and coordinates (megatron-core's sharded state dict), so the three
layouts hold the same network; a forward-only evaluation must then agree.
"""

import zlib

import pytest
import torch

from tests.dist_utils import spawn

pytestmark = pytest.mark.multirank

# swiglu off: megatron-core shards SwiGLU's fc1 ([gate; up]) through a ShardedTensorFactory,
# which fill_deterministically does not expand, so it would keep its per-stage random init.
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
         "swiglu": False}


def fill_deterministically(chunks) -> None:
    """Every parameter from a seeded draw of its global tensor, sliced to this rank's shard."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    metadata = {"singleton_local_shards": False,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for item in module.sharded_state_dict(metadata=metadata).values():
            if not isinstance(item, ShardedTensor):
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(item.key.encode()))
            full = torch.randn(item.global_shape, generator=gen) * 0.1
            if "norm" in item.key:
                full += 1.0
            local = tuple(item.data.shape)
            sizes = (1,) * item.prepend_axis_num + local
            index = tuple(slice(o, o + n) for o, n in zip(item.global_offset, sizes))
            with torch.no_grad():
                item.data.copy_(full[index].reshape(local))


def _evaluate(rank, world_size, parallel):
    from mtp_megatron.config import build_config
    from mtp_megatron.data.datasets import build_datasets, prepare_data
    from mtp_megatron.model.builder import build_model, transformer_config, vocab_size_for
    from mtp_megatron.training.evaluate import Evaluator
    from tests.dist_utils import init_ranks

    cfg = build_config({
        "model": MODEL, "parallel": parallel, "mtp": {"mtp_num_layers": 2},
        "data": {"mock_data": True, "eval_iters": 2},
        "training": {"micro_batch_size": 2, "global_batch_size": 4},
    }, world_size=world_size)
    device = init_ranks(cfg)
    plan = prepare_data(data=cfg.data, model=cfg.model)
    tconfig = transformer_config(cfg, on_cpu=True)
    model = build_model(cfg, tconfig, "local", vocab_size_for(cfg, plan.vocab_size), device)
    fill_deterministically(model)
    data = build_datasets(plan, data=cfg.data, model=cfg.model, training=cfg.training)
    evaluator = Evaluator(model, data.valid, micro_batch_size=2, global_batch_size=4,
                          seq_length=MODEL["seq_length"], mtp_depth=2, is_logging_rank=False)
    return evaluator.run(0, cfg.data.eval_iters)


@pytest.fixture(scope="module")
def one_rank():
    return spawn(1, _evaluate, {})[0]


def _assert_same(metrics, reference):
    assert metrics.keys() == reference.keys()
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_one_rank_reports_every_depth(one_rank):
    assert set(one_rank) == {"lm loss", "lm PPL", "lm accuracy", "mtp_1 loss", "mtp_1 acceptance",
                             "mtp_2 loss", "mtp_2 acceptance", "chained_2 acceptance"}
    assert 0 <= one_rank["chained_2 acceptance"] <= min(one_rank["mtp_1 acceptance"],
                                                        one_rank["mtp_2 acceptance"])


def test_tp2_equals_one_rank(one_rank):
    results = spawn(2, _evaluate, {"tensor_model_parallel_size": 2})
    for metrics in results:  # both TP ranks hold the reduced values
        _assert_same(metrics, one_rank)


def test_pp2_equals_one_rank(one_rank):
    first, last = spawn(2, _evaluate, {"pipeline_model_parallel_size": 2})
    assert first is None  # metrics live on the last stage
    _assert_same(last, one_rank)
