"""Tier 1: the GPU speed flags (validated at config time, wired into megatron-core), the
CUDA environment the launcher sets, the step loader's order, TFLOP/s/GPU and MFU."""

import logging

import pytest
import torch

from mtp_megatron.config import ConfigError, build_config, load_config
from mtp_megatron.training.metrics import (
    MetricsLogger,
    StepMetrics,
    peak_tflops_for,
    tflops_per_gpu,
)
from mtp_megatron.training.writers import read_rows


def cfg_from(*argv, world=1):
    return load_config(list(argv), world)[0]


def rejects(flags, *argv, world=1):
    with pytest.raises(ConfigError) as err:
        cfg_from(*argv, world=world)
    for flag in flags:
        assert flag in str(err.value), str(err.value)
    return str(err.value)


# --- validation ----------------------------------------------------------------------

def test_overlap_param_gather_needs_the_distributed_optimizer_naming_both_flags():
    rejects(["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather")
    cfg = cfg_from("--overlap-param-gather", "--use-distributed-optimizer",
                   "--overlap-grad-reduce", "--ddp-bucket-size", "1000")
    assert cfg.parallel.overlap_param_gather and cfg.parallel.ddp_bucket_size == 1000


def test_ddp_bucket_size_positive_and_warns_without_overlap(caplog):
    rejects(["--ddp-bucket-size"], "--ddp-bucket-size", "0")
    with caplog.at_level(logging.WARNING):
        cfg_from("--ddp-bucket-size", "100")
    assert "--ddp-bucket-size has no effect without --overlap-grad-reduce" in caplog.text


@pytest.mark.parametrize("argv,flags", [
    (["--recompute-granularity", "full"], ["--recompute-method"]),
    (["--recompute-granularity", "full", "--recompute-method", "block"],
     ["--recompute-num-layers"]),
    (["--recompute-method", "uniform"], ["--recompute-method", "--recompute-granularity"]),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     ["--recompute-num-layers", "selective"]),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "3", "--num-layers", "4", "--pipeline-model-parallel-size", "2"],
     ["--recompute-num-layers", "2 layers"]),
])
def test_recompute_rules(argv, flags):
    world = 2 if "--pipeline-model-parallel-size" in argv else 1
    rejects(flags, *argv, world=world)


def test_recompute_granularity_from_yaml_is_checked_too():
    with pytest.raises(ConfigError, match="--recompute-granularity"):
        build_config({"training": {"recompute_granularity": "fast"}}, None, 1)


def test_recompute_of_mtp_layers_follows_megatron_core(caplog):
    # uniform: mcore asserts recompute_num_layers == 1 for the MTP layers
    rejects(["--recompute-num-layers", "--mtp-num-layers"], "--mtp-num-layers", "1",
            "--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "2")
    ok = cfg_from("--mtp-num-layers", "1", "--recompute-granularity", "full",
                  "--recompute-method", "uniform", "--recompute-num-layers", "1")
    assert ok.training.recompute_num_layers == 1
    with caplog.at_level(logging.WARNING):  # block: mcore skips the MTP layers
        cfg_from("--mtp-num-layers", "1", "--recompute-granularity", "full",
                 "--recompute-method", "block", "--recompute-num-layers", "2")
    assert "does not recompute the MTP layers" in caplog.text


def test_attention_backend_names_and_rules():
    assert cfg_from("--attention-backend", "flash").model.attention_backend == "flash"
    with pytest.raises(ConfigError, match="--attention-backend"):
        build_config({"model": {"attention_backend": "sdpa"}}, None, 1)
    rejects(["--attention-backend", "--transformer-impl"], "--attention-backend", "flash",
            "--transformer-impl", "local")
    rejects(["--attention-backend"], "--attention-backend", "local",
            "--transformer-impl", "transformer_engine")


def test_cross_entropy_fusion_impl_te_needs_transformer_engine():
    rejects(["--cross-entropy-fusion-impl"], "--cross-entropy-loss-fusion",
            "--cross-entropy-fusion-impl", "te", "--transformer-impl", "local")


def test_num_workers_async_save_timing_and_peak_flags():
    rejects(["--num-workers"], "--num-workers", "-1")
    rejects(["--async-save", "--save"], "--async-save")
    with pytest.raises(ConfigError, match="--timing-log-level"):
        build_config({"logging": {"timing_log_level": 3}}, None, 1)
    rejects(["--peak-tflops"], "--peak-tflops", "0")
    cfg = cfg_from("--num-workers", "2", "--timing-log-level", "1", "--peak-tflops", "989")
    assert (cfg.data.num_workers, cfg.logging.timing_log_level, cfg.logging.peak_tflops) == \
        (2, 1, 989.0)


def test_async_save_is_refused_on_cpu(monkeypatch, tmp_path):
    from mtp_megatron.runtime.preflight import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_config(None, {"async_save": True, "save": str(tmp_path / "ck"),
                              "output_dir": str(tmp_path / "run")}, 1)
    with pytest.raises(ConfigError, match="--async-save.*only on a GPU"):
        preflight(cfg, env={})


# --- wiring into megatron-core -------------------------------------------------------

def test_flags_reach_transformer_config_and_ddp_config():
    from megatron.core.transformer.enums import AttnBackend

    from mtp_megatron.model.builder import ddp_config_for, transformer_config

    cfg = build_config(None, {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2,
        "cross_entropy_loss_fusion": True, "attention_backend": "unfused",
        "overlap_grad_reduce": True, "overlap_param_gather": True,
        "use_distributed_optimizer": True, "ddp_bucket_size": 12345,
    }, 1)
    tc = transformer_config(cfg, on_cpu=True)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == \
        ("full", "block", 2)
    assert tc.cross_entropy_loss_fusion and tc.cross_entropy_fusion_impl == "native"
    assert tc.attention_backend == AttnBackend.unfused
    ddp = ddp_config_for(cfg)
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.bucket_size == 12345
    assert ddp.use_distributed_optimizer and not ddp.check_for_nan_in_grad


def test_cuda_device_max_connections_set_only_where_megatron_core_needs_it():
    from mtp_megatron.runtime.cuda_env import MAX_CONNECTIONS, apply_cuda_env

    tp2 = build_config(None, {"tensor_model_parallel_size": 2}, 2)
    tp1 = build_config(None, {}, 1)
    env = {}
    assert apply_cuda_env(tp2, env, cuda_available=True) == "1" and env[MAX_CONNECTIONS] == "1"
    env = {}
    assert apply_cuda_env(tp1, env, cuda_available=True) is None and env == {}
    assert apply_cuda_env(tp2, {}, cuda_available=False) is None  # CPU: nothing to do
    env = {MAX_CONNECTIONS: "8"}
    assert apply_cuda_env(tp2, env, cuda_available=True) == "8"  # the user's value is kept


# --- the step loader: same samples, same order, resumable ----------------------------

@pytest.mark.multirank  # DataLoader worker processes
def test_prefetching_loader_matches_the_sampler_step_for_step():
    from mtp_megatron.data.iterator import GlobalBatchSampler
    from mtp_megatron.data.loader import build_step_loader

    data = [{"tokens": torch.full((4,), i), "loss_mask": torch.ones(4)} for i in range(37)]
    args = dict(micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2,
                consumed_samples=24)  # a resumed run, on data-parallel rank 1
    plain = GlobalBatchSampler(data, **args)
    loader = build_step_loader(data, num_workers=2, **args)
    try:
        for _ in range(6):  # wraps around the 37 samples
            a, b = plain.next_step(), loader.next_step()
            assert len(a) == len(b) == 2
            for x, y in zip(a, b):
                assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
            assert plain.consumed_samples == loader.consumed_samples
    finally:
        loader.close()
    assert loader.num_microbatches == plain.num_microbatches == 2


# --- TFLOP/s per GPU and MFU ---------------------------------------------------------

def test_tflops_per_gpu_and_mfu_arithmetic(tmp_path):
    assert tflops_per_gpu(1e6, 6e9, 8) == pytest.approx(1e6 * 6e9 / 8 / 1e12)  # 750
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for(None) is None and peak_tflops_for("cpu") is None
    from mtp_megatron.training.writers import JsonlSink, MetricsWriter

    writer = MetricsWriter([JsonlSink(str(tmp_path / "metrics.jsonl"))])
    log = MetricsLogger(log_interval=2, train_iters=10, tokens_per_step=1000,
                        flops_per_token=2e9, is_logging_rank=True, writer=writer,
                        world_size=4, peak_tflops=1.0)
    for it in (1, 2):
        log.record(StepMetrics(iteration=it, lm_loss=None, mtp_losses=None, lr=1e-3,
                               grad_norm=1.0, seconds=0.5))
    assert not log.due(1) and log.due(2) and log.due(10)
    line = log.log(timings={"data": 1.0, "forward-backward": 400.0})
    # 2000 tokens/s x 2 GFLOP / 4 GPUs = 1 TFLOP/s per GPU; MFU 1.0 of a 1 TFLOP/s peak
    assert "TFLOP/s/GPU 1.0000" in line and "MFU 1.0000" in line
    assert "TFLOP/s 4" not in line  # the job's rate stays in metrics.jsonl only

    (row,) = read_rows(str(tmp_path))
    assert row["TFLOP/s"] == pytest.approx(4.0) and row["TFLOP/s/GPU"] == pytest.approx(1.0)
    assert "time ms/iter: data 1.0, forward-backward 400.0" in line
    log.close()


def test_plan_counts_recompute_in_activation_memory():
    from mtp_megatron.plan import build_plan

    base = {"num_layers": 8, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 256,
            "mtp_num_layers": 1, "transformer_impl": "local"}
    plain = build_plan(build_config(None, base, 1))
    selective = build_plan(build_config(None, dict(base, recompute_granularity="selective"), 1))
    full = build_plan(build_config(None, dict(
        base, recompute_granularity="full", recompute_method="uniform",
        recompute_num_layers=1), 1))
    a, s, f = (p.stages[0].activation_peak for p in (plain, selective, full))
    assert f < s < a
