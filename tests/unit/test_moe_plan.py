"""--dry-run plans MoE honestly (pure Python): total vs active parameters, FLOPs from the
active experts (MTP included), experts split over EP x ETP per rank with their optimizer
state over expert-DP, and the rank grid with EP. The per-rank counts and EP coordinates
are checked against built models in test_moe_layouts.py."""

import pytest

from mtp_megatron.config import build_config, read_yaml
from mtp_megatron.model.counting import flops_per_token, model_params
from mtp_megatron.plan import build_plan
from mtp_megatron.plan.layout import expert_coord_of
from mtp_megatron.plan.report import format_plan
from mtp_megatron.runtime import mcore_compat

H, V, E, K, F, S = 64, 512, 8, 2, 32, 48
MOE = dict(num_layers=4, hidden_size=H, num_attention_heads=4, ffn_hidden_size=128,
           vocab_size=V, make_vocab_size_divisible_by=128, num_experts=E, moe_router_topk=K,
           moe_ffn_hidden_size=F, moe_shared_expert_intermediate_size=S,
           moe_layer_freq="[0]*1+[1]*3", mtp_num_layers=1)


def _cfg(world=1, **values):
    return build_config({}, dict(MOE, **values), world)


def _mlp(width):  # SwiGLU: fc1 two halves + fc2
    return 3 * H * width


ATTENTION = 4 * H * H  # MHA: QKV + projection
DENSE = ATTENTION + _mlp(128)


def _moe(experts):
    return ATTENTION + E * H + experts * _mlp(F) + _mlp(S)


def test_total_and_active_parameters_count_all_experts_and_the_top_k():
    counts = model_params(_cfg(), V)
    mtp = 2 * H * H  # eh_proj; the MTP layer is MoE like the last layer
    assert counts["total"] == DENSE + 3 * _moe(E) + _moe(E) + mtp + V * H
    assert counts["active"] == DENSE + 3 * _moe(K) + _moe(K) + mtp + V * H
    dense = model_params(build_config({}, dict(num_layers=4, hidden_size=H), 1), V)
    assert dense["total"] == dense["active"]


def test_flops_count_the_active_experts_mtp_included():
    seq = 128
    attention = 4 * seq * H
    flops = flops_per_token(_cfg(), V)
    assert flops["decoder"] == 3 * (2 * DENSE + attention + 3 * (2 * _moe(K) + attention))
    assert flops["mtp_layers"] == 3 * (2 * _moe(K) + attention)
    more_experts = flops_per_token(_cfg(num_experts=16), V)
    assert more_experts["total"] - flops["total"] == 3 * 2 * 4 * 8 * H  # routers only


def test_a_dense_last_layer_makes_dense_mtp_layers():
    cfg = _cfg(moe_layer_freq=2)  # 1, 0, 1, 0
    assert flops_per_token(cfg, V)["mtp_layers"] == 3 * (2 * DENSE + 4 * 128 * H)


def test_experts_split_over_ep_and_their_optimizer_state_over_expert_dp():
    one = build_plan(_cfg(4, use_distributed_optimizer=True))
    ep4 = build_plan(_cfg(4, use_distributed_optimizer=True, expert_model_parallel_size=4))
    experts = 4 * E * _mlp(F)  # 3 MoE decoder layers + the MTP layer
    assert one.stages[0].rank_params["experts"] == experts
    assert ep4.stages[0].rank_params["experts"] == experts // 4
    assert one.stages[0].rank_params["total"] - ep4.stages[0].rank_params["total"] == \
        experts - experts // 4
    # Adam (fp32: 8 bytes) sharded over DP=4 for the dense part; experts: over EDP = 1
    dense = one.stages[0].rank_params["total"] - experts
    assert ep4.stages[0].state.optimizer == -(-8 * dense // 4) + 8 * experts // 4
    assert one.stages[0].state.optimizer == -(-8 * dense // 4) + -(-8 * experts // 4)


def test_the_rank_grid_orders_experts_etp_ep_edp_inside_each_stage():
    cfg = _cfg(8, tensor_model_parallel_size=2, sequence_parallel=True,
               expert_model_parallel_size=2, expert_tensor_parallel_size=1,
               pipeline_model_parallel_size=2)
    assert cfg.parallel.expert_data_parallel_size == 2  # stage of TP2 x DP2 = 4 ranks
    assert [expert_coord_of(cfg, r) for r in range(8)] == [
        (0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)] * 2
    text = format_plan(build_plan(cfg))
    assert "EP 2 x ETP 1 x expert-DP 2, 4 experts of each MoE layer per rank" in text
    assert "EP groups: 2 ranks 1 apart within a stage (0, 1)" in text
    assert "3:(dp1,pp0,tp1,ep1)" in text
    assert "MTP layers MoE (the last layer's type)" in text
    assert "active per token" in text


@pytest.mark.parametrize("freq,moe_layers", [(1, 4), (2, 2), ("[0]*3+[1]*1", 1)])
def test_moe_activations_replace_the_mlp_per_moe_layer(freq, moe_layers):
    dense = build_plan(build_config({}, dict(
        {k: v for k, v in MOE.items() if not k.startswith(("num_experts", "moe_"))}), 1))
    plan = build_plan(_cfg(moe_layer_freq=freq))
    assert plan.stages[0].activations["decoder"] != dense.stages[0].activations["decoder"]
    assert sum(plan.cfg.model.moe_layers) == moe_layers


def test_the_gpu_example_is_planned_and_fits(capsys):
    """examples/dsv3_moe_gpu.yaml on 64 GPUs: EP 8 inside 2 stages, fits 80 GiB."""
    import os

    from mtp_megatron.cli import main

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "examples", "dsv3_moe_gpu.yaml")
    cfg = build_config(read_yaml(path), None, 64)
    code = main(["--config", path, "--world-size", "64", "--dry-run", "--gpu-memory-gb", "80"])
    if mcore_compat.line() != mcore_compat.MAIN_LINE:  # the 0.16 floor refuses MoE by name
        assert code == 2 and "--num-experts=64" in capsys.readouterr().err
    else:
        assert code == 0
        out = capsys.readouterr().out
        assert "EP 8 x ETP 1 x expert-DP 4, 8 experts of each MoE layer per rank" in out
        assert "27 of 28 layers MoE; MTP layers MoE" in out
    text = format_plan(build_plan(cfg, gpu_memory_gb=80))
    assert "DOES NOT FIT" not in text and "fits 80 GiB" in text
    counts = model_params(cfg, build_plan(cfg).vocab_size)
    assert 16e9 < counts["total"] < 18e9 and 2.5e9 < counts["active"] < 3.2e9
