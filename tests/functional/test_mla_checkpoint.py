"""MLA + MoE + MTP checkpoints: save -> resume bit-exact (CPU) with the latent projections
split over TP (sequence parallel) and the experts over EP, in bf16 with the distributed
optimizer and in fp32. One 2-rank spawn; ``resume_matrix``: train 4 steps saving at 2,
resume from 2, every logged value and the final weights equal."""

import pytest

from tests.dist_utils import spawn
from tests.functional import resume_matrix as rm
from tests.functional.test_moe_checkpoint import DSV3

pytestmark = pytest.mark.functional

MLA = dict(multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8,
           qk_pos_emb_head_dim=8, v_head_dim=8, qk_layernorm=True, rotary_scaling_factor=4.0,
           mscale_all_dim=1.0, yarn_original_max_position_embeddings=16)
# one layout per spawn (resume_matrix.Session): TP2 with sequence parallelism (the latent
# projections split) x EP2 (ETP 1) on 2 ranks
LAYOUT = dict(tensor_model_parallel_size=2, sequence_parallel=True,
              expert_model_parallel_size=2, expert_tensor_parallel_size=1)
CASES = {
    "tp2_ep2_mla_bf16_distopt": dict(rm.TINY, **DSV3, **MLA, **LAYOUT, bf16=True,
                                     use_distributed_optimizer=True),
    "tp2_ep2_mla_fp32": dict(rm.TINY, **DSV3, **MLA, **LAYOUT),
}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mla_ck"))
    return spawn(2, rm.run_cases, [(n, None, cli) for n, cli in CASES.items()], root)


@pytest.mark.parametrize("name", list(CASES))
def test_mla_resume_is_bit_exact(resumed, name):
    for rank, results in enumerate(resumed):
        r = results[name]
        assert r.resumed_iterations == list(range(rm.ITERS // 2 + 1, rm.ITERS + 1)), (rank, r)
        assert r.mismatches == [], (rank, name, r.mismatches)
        assert r.weights_equal and r.weights_compared >= 20, (rank, name, r)
        assert any(k for k in r.losses)  # the straight run logged
