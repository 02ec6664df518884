"""The planner against built megatron-core models on CPU ranks (gloo).

Four ranks build several layouts in turn (one spawn: importing megatron-core costs
~20 s per process here) and report how many parameters each holds; the plan must
predict each rank's count exactly (one TP shard) and each stage's (summed over TP).
"""

import pytest

from mtp_megatron.config import build_config
from mtp_megatron.plan import build_plan
from tests.dist_utils import spawn

pytestmark = pytest.mark.multirank

COMMON = dict(transformer_impl="local", seq_length=32, micro_batch_size=1, global_batch_size=4)
LAYOUTS = {
    "tp2_pp2_mtp2_tied": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              mtp_num_layers=2),
    "tp2_pp2_vpp2_mtp1_untied_swiglu_gqa_layernorm": dict(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
        num_layers_per_virtual_pipeline_stage=1, mtp_num_layers=1,
        untie_embeddings_and_output_weights=True, swiglu=True, num_query_groups=2,
        ffn_hidden_size=96, normalization="LayerNorm"),
    "pp4_tied_learned_pos_nobias": dict(
        pipeline_model_parallel_size=4, position_embedding_type="learned_absolute",
        disable_bias_linear=True),
    "tp2_dp2_mtp3": dict(tensor_model_parallel_size=2, mtp_num_layers=3),
}


def _held_params(rank, world_size, layouts):
    from megatron.core import parallel_state as ps

    from mtp_megatron.model.builder import build_model, transformer_config
    from mtp_megatron.runtime.distributed import set_seeds
    from tests.dist_utils import init_ranks

    held = {}
    for i, (name, cli) in enumerate(layouts.items()):
        cfg = build_config(None, cli, world_size)
        if i == 0:
            device = init_ranks(cfg)
        else:
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(
                tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
                pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
            )
            set_seeds(cfg.training.seed)
        vocab = build_plan(cfg).vocab_size
        chunks = build_model(cfg, transformer_config(cfg, on_cpu=True), "local", vocab, device)
        params = [p for chunk in chunks for p in chunk.parameters()]
        split = sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))
        local = sum(p.numel() for p in params)
        held[name] = {"pp": ps.get_pipeline_model_parallel_rank(),
                      "tp": ps.get_tensor_model_parallel_rank(),
                      "dp": ps.get_data_parallel_rank(),
                      "local": local, "split": split, "replicated": local - split}
    return held


@pytest.fixture(scope="module")
def held():
    layouts = {name: dict(COMMON, **cli) for name, cli in LAYOUTS.items()}
    return layouts, spawn(4, _held_params, layouts)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_params_per_rank_and_stage_match_built_model(held, name):
    layouts, per_rank = held
    plan = build_plan(build_config(None, layouts[name], 4))
    ranks = [r[name] for r in per_rank]
    for rank, got in enumerate(ranks):
        stage = plan.stages[got["pp"]]
        assert stage.layout.first_rank <= rank <= stage.layout.last_rank, (rank, got)
        assert got["local"] == stage.rank_params["total"], (rank, got, stage.rank_params)
    for stage in plan.stages:
        replica = [g for g in ranks if g["pp"] == stage.layout.pp_rank and g["dp"] == 0]
        whole = sum(g["split"] for g in replica) + replica[0]["replicated"]
        assert whole == stage.stage_params["total"], (stage.layout.pp_rank, whole)
