"""Mixture-of-Experts flags: parsed, validated with errors naming the flag, mapped to
megatron-core's TransformerConfig, refused on the 0.16 floor (pure Python)."""

import pytest
import yaml

from mtp_megatron.config import ConfigError, build_config, load_config, save_config
from mtp_megatron.config.moe import layer_pattern, parse_layer_freq
from mtp_megatron.runtime import mcore_compat

DSV3 = dict(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
            moe_layer_freq="[0]*1+[1]*3", moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_router_load_balancing_type="seq_aux_loss",
            moe_aux_loss_coeff=1e-4, moe_shared_expert_intermediate_size=32,
            moe_router_num_groups=4, moe_router_group_topk=2,
            moe_router_topk_scaling_factor=2.5, mtp_num_layers=1)


def _cfg(world=None, **values):
    return build_config({}, values, world)


def _rejects(flag, world=None, **values):
    with pytest.raises(ConfigError) as err:
        _cfg(world, **values)
    assert str(err.value).startswith(flag + "="), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("text,pattern", [
    ("[0]*1+[1]*3", (0, 1, 1, 1)), ("([0]*3+[1]*1)", (0, 0, 0, 1)),
    ("[1, 0,1,0]", (1, 0, 1, 0)), ("[0,1]*2", (0, 1, 0, 1)), ("2", (1, 0, 1, 0)),
    ([0, 1, 1, 1], (0, 1, 1, 1)), (1, (1, 1, 1, 1)), (3, (1, 0, 0, 1)),
])
def test_layer_freq_reads_megatron_lm_forms_without_eval(text, pattern):
    assert layer_pattern(4, parse_layer_freq(text)) == pattern


@pytest.mark.parametrize("text", ["[0]*1+[2]*3", "__import__('os')", "[0]*x", "0", "", True])
def test_a_bad_layer_freq_names_the_flag(text):
    with pytest.raises(ConfigError, match="^--moe-layer-freq="):
        parse_layer_freq(text)


def test_the_deepseek_v3_shape_is_accepted_and_mapped_to_megatron_core():
    from mtp_megatron.model.moe import moe_config_kwargs

    cfg = _cfg(2, expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall", **DSV3)
    assert cfg.model.moe_layers == (0, 1, 1, 1)
    assert cfg.parallel.expert_tensor_size == 1 and cfg.parallel.expert_data_parallel_size == 1
    kwargs = moe_config_kwargs(cfg)
    assert kwargs["num_moe_experts"] == 8 and kwargs["moe_layer_freq"] == [0, 1, 1, 1]
    assert kwargs["moe_router_enable_expert_bias"] and kwargs["expert_model_parallel_size"] == 2
    assert kwargs["moe_token_dispatcher_type"] == "alltoall"
    assert moe_config_kwargs(_cfg()) == {}  # dense: megatron-core's defaults untouched


def test_the_resolved_layer_pattern_round_trips_through_the_saved_yaml(tmp_path):
    cfg = _cfg(**DSV3)
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    assert yaml.safe_load(path.read_text())["model"]["moe_layer_freq"] == [0, 1, 1, 1]
    again, _ = load_config(["--config", str(path)])
    assert again == cfg


@pytest.mark.parametrize("flag,values", [
    ("--moe-router-topk", dict(moe_router_topk=4)),
    ("--moe-layer-freq", dict(moe_layer_freq="[1]*3")),
    ("--expert-model-parallel-size", dict(expert_model_parallel_size=2)),
    ("--moe-token-dispatcher-type", dict(moe_token_dispatcher_type="alltoall")),
])
def test_moe_flags_without_num_experts_are_refused(flag, values):
    assert "only with --num-experts" in _rejects(flag, 2, **values)


@pytest.mark.parametrize("flag,values,allowed", [
    ("--moe-router-topk", dict(moe_router_topk=5), "at most --num-experts=4"),
    ("--moe-router-topk", dict(moe_router_topk=1), "--moe-router-pre-softmax"),
    ("--moe-layer-freq", dict(moe_layer_freq="[0]*2"), "4 entries"),
    ("--moe-layer-freq", dict(moe_layer_freq="[0]*4"), "at least one MoE layer"),
    ("--moe-layer-freq", dict(moe_layer_freq=5), "at most --num-layers=4"),
    ("--moe-router-enable-expert-bias", dict(moe_router_enable_expert_bias=True), "sigmoid"),
    ("--moe-router-num-groups", dict(moe_router_num_groups=2), "--moe-router-group-topk"),
    ("--moe-router-num-groups", dict(moe_router_num_groups=3, moe_router_group_topk=1),
     "a divisor of --num-experts=4"),
    ("--moe-router-group-topk", dict(moe_router_num_groups=2, moe_router_group_topk=3),
     "at most --moe-router-num-groups=2"),
    ("--moe-router-topk", dict(moe_router_topk=3, moe_router_num_groups=4,
                               moe_router_group_topk=2), "the 2 experts"),
    ("--moe-aux-loss-coeff", dict(moe_aux_loss_coeff=-1.0), ">= 0"),
    ("--moe-grouped-gemm", dict(moe_grouped_gemm=True, transformer_impl="local"),
     "transformer_engine"),
])
def test_model_section_rules_name_the_flag(flag, values, allowed):
    assert allowed in _rejects(flag, num_experts=4, **values)


@pytest.mark.parametrize("flag,world,values,allowed", [
    ("--expert-model-parallel-size", 2, dict(expert_model_parallel_size=3), "a divisor of"),
    ("--expert-model-parallel-size", 2, dict(expert_model_parallel_size=4),
     "dividing the TP x CP x DP = 2 ranks"),
    ("--expert-model-parallel-size", 4,
     dict(expert_model_parallel_size=4, pipeline_model_parallel_size=2, num_layers=4),
     "dividing the TP x CP x DP = 2 ranks"),
    ("--expert-tensor-parallel-size", 2, dict(expert_tensor_parallel_size=2,
                                               moe_ffn_hidden_size=15), "a divisor of"),
    ("--sequence-parallel", 2, dict(tensor_model_parallel_size=2), "on with --num-experts"),
    ("--expert-tensor-parallel-size", 2, dict(expert_tensor_parallel_size=2,
                                               disable_bias_linear=False), "biases"),
])
def test_expert_parallel_rules_name_the_flag(flag, world, values, allowed):
    assert allowed in _rejects(flag, world, num_experts=4, **values)


def test_expert_parallel_grids_that_fit_are_accepted():
    cfg = _cfg(4, num_experts=4, expert_model_parallel_size=2, tensor_model_parallel_size=2,
               sequence_parallel=True, expert_tensor_parallel_size=1)
    assert cfg.parallel.expert_data_parallel_size == 2  # 2 TP x 2 DP ranks over ETP1 x EP2
    cfg = _cfg(4, num_experts=4, expert_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert cfg.parallel.expert_data_parallel_size == 1


def test_balancing_flags_that_do_nothing_warn(caplog):
    _cfg(num_experts=4, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.1)
    assert "--moe-aux-loss-coeff=0.1 has no effect" in caplog.text
    _cfg(num_experts=4, moe_router_bias_update_rate=0.01)
    assert "--moe-router-bias-update-rate has no effect" in caplog.text


def test_moe_is_refused_on_the_016_floor_naming_the_version():
    cfg = _cfg(**DSV3)
    with pytest.raises(ConfigError, match=r"^--num-experts=8 .*megatron-core 0\.16\.1 is "
                                          r"installed.*Allowed: megatron-core >=0\.19\.2"):
        mcore_compat.check_config(cfg, found="0.16.1")
    mcore_compat.check_config(cfg, found="0.19.2")
    mcore_compat.check_config(_cfg(mtp_num_layers=1), found="0.16.1")  # dense: fine


def test_checkpoint_compat_names_a_changed_moe_shape(tmp_path):
    from mtp_megatron.checkpoint.compat import check_compatible
    from mtp_megatron.checkpoint.layout import CONFIG_NAME, CheckpointError

    saved = _cfg(**DSV3)
    save_config(saved, str(tmp_path / CONFIG_NAME))
    check_compatible(str(tmp_path), _cfg(**dict(DSV3, moe_layer_freq=[0, 1, 1, 1])))
    for change, field in ((dict(num_experts=16), "num_experts"),
                          (dict(moe_layer_freq=1), "moe_layer_freq"),
                          (dict(moe_router_enable_expert_bias=False,
                                moe_router_score_function="softmax"),
                           "moe_router_enable_expert_bias")):
        with pytest.raises(CheckpointError, match=f"model.{field}="):
            check_compatible(str(tmp_path), _cfg(**dict(DSV3, **change)))
    dense = tmp_path / "dense"
    dense.mkdir()
    save_config(_cfg(mtp_num_layers=1), str(dense / CONFIG_NAME))
    check_compatible(str(dense), _cfg(mtp_num_layers=1))
    with pytest.raises(CheckpointError, match="model.num_experts=None"):
        check_compatible(str(dense), _cfg(**DSV3))


def test_without_a_world_size_the_expert_grid_is_checked_against_the_launch():
    """A YAML parsed alone (no --world-size) cannot know DP: preflight checks EP then."""
    from mtp_megatron.runtime.preflight import preflight

    cfg = _cfg(None, num_experts=4, expert_model_parallel_size=2)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match="^--expert-model-parallel-size=2 .*= 1 ranks"):
        preflight(cfg, env)
