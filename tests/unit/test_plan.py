"""The --dry-run planner as pure Python: rank grid, hand counts, memory rules, output.

Parameter counts per rank are checked against built models in test_plan_models.py.
"""

import subprocess
import sys

import pytest

from mtp_megatron.cli import main
from mtp_megatron.config import build_config
from mtp_megatron.model.counting import sizes
from mtp_megatron.plan import H100_BF16_TFLOPS, build_plan, memory
from mtp_megatron.plan.layout import coord_of, rank_of

# A DeepSeek-V3-sized dense GPT (V3 uses MLA + MoE; 61 layers rounded to 64 for PP 16).
DSV3_DENSE = dict(
    num_layers=64, hidden_size=7168, num_attention_heads=128, num_query_groups=8,
    ffn_hidden_size=18432, swiglu=True, disable_bias_linear=True,
    untie_embeddings_and_output_weights=True, vocab_size=129280, seq_length=4096,
    mtp_num_layers=1, tensor_model_parallel_size=8, pipeline_model_parallel_size=16,
    sequence_parallel=True, use_distributed_optimizer=True, bf16=True,
    micro_batch_size=1, global_batch_size=1024, transformer_impl="transformer_engine",
)


def cfg_of(world=None, **cli):
    return build_config(None, cli, world)


# The hand counts below are for a plain GPT (GELU MLP with biases), the shape of the
# formulas they check (Korthikanti et al.); the default model is Llama-shaped.
PLAIN_GPT = {"swiglu": False, "disable_bias_linear": False}


@pytest.mark.parametrize("tp,cp,pp,world", [(2, 1, 2, 8), (4, 1, 2, 16), (2, 2, 2, 16),
                                            (1, 1, 4, 8)])
def test_rank_grid_is_megatron_cores_order(tp, cp, pp, world):
    from megatron.core.parallel_state import RankGenerator

    cfg = cfg_of(world, tensor_model_parallel_size=tp, context_parallel_size=cp,
                 pipeline_model_parallel_size=pp, global_batch_size=64, micro_batch_size=1)
    dp = cfg.parallel.data_parallel_size
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for axis in ("tp", "cp", "dp", "pp"):
        for group in gen.get_ranks(axis):
            coords = [coord_of(cfg, r) for r in group]
            assert [getattr(c, axis) for c in coords] == list(range(len(group)))
            others = {tuple(v for k, v in vars(c).items() if k != axis) for c in coords}
            assert len(others) == 1, (axis, group)
    assert [rank_of(cfg, coord_of(cfg, r)) for r in range(world)] == list(range(world))
    for stage in build_plan(cfg).stages:
        assert [coord_of(cfg, r).pp for r in range(stage.layout.first_rank,
                                                   stage.layout.last_rank + 1)] == \
            [stage.layout.pp_rank] * (world // pp)


def test_flops_per_token_match_a_hand_count():
    cfg = cfg_of(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                 vocab_size=100, mtp_num_layers=2, **PLAIN_GPT)  # vocab padded to 128
    plan = build_plan(cfg)
    assert plan.vocab_size == 128
    layer_fwd = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 2 * 2 * 32 * 64  # 106,496
    hand = {
        "decoder": 3 * 2 * layer_fwd,  # 638,976
        "logits": 3 * 2 * 64 * 128,  # 49,152
        "mtp_layers": 3 * 2 * layer_fwd,  # two MTP depths
        "eh_proj": 3 * 2 * 2 * (2 * 64) * 64,  # 98,304
        "mtp_logits": 3 * 2 * 2 * 64 * 128,  # 98,304
    }
    for part, value in hand.items():
        assert plan.flops[part] == value, part
    assert plan.flops["total"] == 1_523_712 == sum(hand.values())
    assert plan.flops_without_mtp["total"] == 638_976 + 49_152
    assert plan.tokens_per_second == pytest.approx(0.4 * H100_BF16_TFLOPS * 1e12 / 1_523_712)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_layer_activations_are_korthikanti_for_a_plain_gpt(tp, sp):
    h, a, s = 256, 8, 128
    cfg = cfg_of(tp, hidden_size=h, num_attention_heads=a, seq_length=s, bf16=True,
                 hidden_dropout=0.1, attention_dropout=0.1, transformer_impl="local",
                 tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1, **PLAIN_GPT)
    got = memory.layer_activation_bytes_per_token(cfg, sizes(cfg, 512))
    if sp and tp > 1:
        expected = h * (34 + 5 * a * s / h) / tp  # paper eq. (4) per token
    else:
        expected = h * (10 + 24 / tp + 5 * a * s / (h * tp))  # eq. (2)
    assert got == pytest.approx(expected)
    fused = cfg_of(tp, hidden_size=h, num_attention_heads=a, seq_length=s, bf16=True,
                   hidden_dropout=0.1, attention_dropout=0.1, tensor_model_parallel_size=tp,
                   **PLAIN_GPT)
    assert memory.layer_activation_bytes_per_token(fused, sizes(fused, 512)) == \
        pytest.approx(h * (10 + 24 / tp))  # flash attention keeps no s x s


def test_in_flight_microbatches_follow_the_schedules():
    one_f_one_b = cfg_of(4, pipeline_model_parallel_size=4, micro_batch_size=1,
                         global_batch_size=8)
    assert [memory.in_flight_chunks(one_f_one_b, r) for r in range(4)] == [4, 3, 2, 1]
    few = cfg_of(4, pipeline_model_parallel_size=4, micro_batch_size=1, global_batch_size=2)
    assert [memory.in_flight_chunks(few, r) for r in range(4)] == [2, 2, 2, 1]
    interleaved = cfg_of(2, pipeline_model_parallel_size=2, micro_batch_size=1,
                         global_batch_size=4, num_layers_per_virtual_pipeline_stage=1)
    # megatron-core's warmup (pp - r - 1) * 2 + (vpp - 1) * pp, plus the one in flight
    assert [memory.in_flight_chunks(interleaved, r) for r in range(2)] == [5, 3]
    assert memory.in_flight_chunks(cfg_of(mtp_num_layers=1), 0) == 1


def test_state_bytes_mixed_precision_and_distributed_optimizer():
    n = 1_000_000
    plain = memory.state_bytes(cfg_of(8, global_batch_size=32), n)
    assert (plain.weights, plain.grads, plain.optimizer) == (4 * n, 4 * n, 8 * n)
    mixed = memory.state_bytes(cfg_of(8, bf16=True, use_distributed_optimizer=True,
                                      global_batch_size=32), n)
    assert (mixed.weights, mixed.grads, mixed.optimizer) == (2 * n, 4 * n, 12 * n // 8)


def test_small_config_layout_and_params():
    cfg = cfg_of(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                 mtp_num_layers=1, **PLAIN_GPT)
    plan = build_plan(cfg)
    first, last = plan.stages
    assert (first.layout.first_rank, first.layout.last_rank) == (0, 3)
    assert (last.layout.first_rank, last.layout.last_rank) == (4, 7)
    assert first.layout.layers == ((0, 2),) and last.layout.layers == ((2, 4),)
    assert any("MTP x1" in h for h in last.layout.holds)
    assert not any("MTP" in h for h in first.layout.holds)
    # h=128, ffn=512, bias, RMSNorm: a layer holds 198,016 parameters, 99,008 per TP rank
    layer = 128 * 384 + 384 + 128 * 128 + 128 + 128 * 512 + 512 + 512 * 128 + 128 + 2 * 128
    assert layer == 198_016
    assert first.stage_params == {"decoder": 2 * layer, "embedding": 512 * 128, "output": 0,
                                  "final_norm": 0, "mtp": 0, "total": 2 * layer + 65_536}
    mtp = 2 * 128 + 2 * 128 * 128 + layer + 128
    assert last.stage_params["mtp"] == mtp
    assert last.stage_params["output"] == 0  # tied: logits use the MTP stage's embedding copy
    per_rank_layer = (layer - 2 * 128 - 2 * 128) // 2 + 2 * 128 + 2 * 128
    assert first.rank_params["total"] == 2 * per_rank_layer + 512 * 128 // 2
    assert last.activations["mtp_logits"] == 4 * 512 / 2 * 4 * 128  # fp32, V/TP, b x s


def test_dsv3_dense_1024_gpus():
    plan = build_plan(cfg_of(1024, **DSV3_DENSE), gpu_memory_gb=80)
    h, kv, ffn, vocab = 7168, 448, 18432, 130048
    layer = h * (h + 2 * kv) + h * h + 3 * h * ffn + 2 * h
    assert layer == 505_559_040 and plan.vocab_size == vocab
    assert len(plan.stages) == 16 and plan.world_size == 1024
    last = plan.stages[-1]
    assert (last.layout.first_rank, last.layout.last_rank) == (960, 1023)
    assert last.stage_params["mtp"] == 2 * h * h + layer + 3 * h == 608_340_992
    assert last.stage_params["total"] == 4 * layer + 2 * vocab * h + h + 608_340_992
    assert plan.stages[1].rank_params["total"] == 4 * (layer - 2 * h) // 8 + 4 * 2 * h
    assert plan.stages[0].in_flight == 16 and last.in_flight == 1
    assert plan.all_fit
    assert plan.flops["total"] / plan.flops_without_mtp["total"] == pytest.approx(1.0432, abs=1e-4)
    # Without sharding the optimizer, TP or sequence parallelism it does not fit an 80 GiB GPU.
    naive = dict(DSV3_DENSE, tensor_model_parallel_size=1, sequence_parallel=False,
                 use_distributed_optimizer=False)
    assert build_plan(cfg_of(1024, **naive), gpu_memory_gb=80).all_fit is False


def test_dry_run_cli_prints_the_plan_and_flags_what_does_not_fit(capsys):
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
             for k, v in DSV3_DENSE.items()]
    assert main(flags + ["--world-size", "1024", "--dry-run", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "Plan for 1024 GPUs: TP 8 x CP 1 x DP 8 x PP 16" in out
    assert "15     960-1023  60-63" in out and "MTP x1" in out
    assert "fits 80 GiB" in out and "DOES NOT FIT" not in out
    assert main(flags + ["--world-size", "1024", "--dry-run", "--gpu-memory-gb", "4"]) == 2
    assert "DOES NOT FIT: stage 0 needs" in capsys.readouterr().out
    assert main(["--dry-run", "--gpu-memory-gb", "-1"]) == 2
    assert "--gpu-memory-gb=-1.0 is not allowed" in capsys.readouterr().err


@pytest.mark.functional
def test_dry_run_starts_no_processes_and_imports_no_torch():
    code = ("import sys; from mtp_megatron.cli import main; "
            "rc = main(['--world-size', '4096', '--global-batch-size', '4096', "
            "'--micro-batch-size', '1', '--mtp-num-layers', '1', '--dry-run']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Plan for 4096 GPUs" in done.stdout


def test_dry_run_that_does_not_fit_exits_2_only_when_the_memory_is_given(capsys):
    """Regression: "DOES NOT FIT" was printed with exit code 0."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
             for k, v in DSV3_DENSE.items()] + ["--world-size", "1024", "--dry-run"]
    assert main(flags + ["--gpu-memory-gb", "4"]) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT: stage 0 needs" in captured.out and "> --gpu-memory-gb 4." in captured.out
    assert "error: --gpu-memory-gb=4: the plan does not fit" in captured.err
    # without the flag: checked against an 80 GiB GPU, as advice (exit 0 either way)
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "fits 80 GiB (assumed)" in out and "DOES NOT FIT" not in out
    naive = [f for f in flags if not f.startswith(("--tensor-model", "--sequence-parallel",
                                                   "--use-distributed-optimizer"))]
    assert main(naive) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "80 GiB (assumed: set --gpu-memory-gb" in out
