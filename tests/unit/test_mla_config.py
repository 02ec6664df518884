"""Multi-latent attention flags: validated naming the flag, mapped to megatron-core's
MLATransformerConfig, counted exactly by --dry-run's formulas, refused on the 0.16 floor,
and part of a checkpoint's shape (pure Python; built models: test_mla_layouts.py)."""

import pytest

from mtp_megatron.config import ConfigError, build_config, save_config
from mtp_megatron.model.counting import flops_per_token, model_params
from mtp_megatron.runtime import mcore_compat

H, HEADS, V = 64, 4, 256
MLA = dict(num_layers=2, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=96,
           vocab_size=V, make_vocab_size_divisible_by=128, seq_length=32, swiglu=False,
           multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=12,
           qk_pos_emb_head_dim=6, v_head_dim=10, qk_layernorm=True, mtp_num_layers=1)


def _cfg(world=None, **values):
    return build_config({}, dict(MLA, **values), world)


def _rejects(flag, world=None, **values):
    with pytest.raises(ConfigError) as err:
        _cfg(world, **values)
    assert str(err.value).startswith(flag + "="), str(err.value)
    return str(err.value)


def test_the_flags_map_to_megatron_cores_mla_config():
    from mtp_megatron.model.builder import transformer_config

    tc = transformer_config(_cfg(rotary_scaling_factor=40.0, mscale_all_dim=1.0), on_cpu=True)
    assert type(tc).__name__ == "MLATransformerConfig" and tc.multi_latent_attention
    assert (tc.q_lora_rank, tc.kv_lora_rank, tc.qk_head_dim, tc.qk_pos_emb_head_dim,
            tc.v_head_dim, tc.qk_layernorm) == (24, 16, 12, 6, 10, True)
    assert (tc.rope_type, tc.rotary_scaling_factor, tc.mscale_all_dim) == ("yarn", 40.0, 1.0)
    dense = transformer_config(build_config({}, dict(num_layers=2), None), on_cpu=True)
    assert type(dense).__name__ == "TransformerConfig"


@pytest.mark.parametrize("flag,values", [
    ("--q-lora-rank", dict(multi_latent_attention=False, q_lora_rank=8)),
    ("--kv-lora-rank", dict(multi_latent_attention=False, kv_lora_rank=8)),
    ("--qk-layernorm", dict(multi_latent_attention=False, qk_layernorm=True)),
    ("--rotary-scaling-factor", dict(multi_latent_attention=False, rotary_scaling_factor=4.0)),
    ("--q-lora-rank", dict(q_lora_rank=0)),
    ("--v-head-dim", dict(v_head_dim=0)),
    ("--qk-pos-emb-head-dim", dict(qk_pos_emb_head_dim=5)),
    ("--num-query-groups", dict(num_query_groups=2)),
    ("--position-embedding-type", dict(position_embedding_type="learned_absolute")),
    ("--rotary-scaling-factor", dict(rotary_scaling_factor=0.5)),
    ("--mscale", dict(rope_type="rope", mscale=0.7)),
    ("--rope-type", dict(rope_type="ntk")),
])
def test_bad_mla_settings_name_the_flag(flag, values):
    extra = {} if values.get("multi_latent_attention", True) else dict(
        q_lora_rank=None, kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64,
        v_head_dim=128, qk_layernorm=False)
    _rejects(flag, **dict(extra, **values))


def test_tp_must_split_the_latent_projections_on_the_local_backend():
    tp4 = dict(tensor_model_parallel_size=4, sequence_parallel=True)
    msg = _rejects("--kv-lora-rank", 4, kv_lora_rank=16, qk_pos_emb_head_dim=6,
                   **tp4)  # 16 + 6 = 22 columns over 4 ranks
    assert "--tensor-model-parallel-size=4" in msg
    _rejects("--q-lora-rank", 4, q_lora_rank=6, qk_pos_emb_head_dim=4, **tp4)
    _cfg(4, qk_pos_emb_head_dim=4, **tp4)  # 24 and 20: fine


def test_tp_needs_sequence_parallel_on_the_local_backend():
    msg = _rejects("--tensor-model-parallel-size", 2, tensor_model_parallel_size=2)
    assert "--sequence-parallel" in msg
    _cfg(2, tensor_model_parallel_size=2, sequence_parallel=True)


def test_hidden_size_need_not_split_into_heads_with_mla():
    _cfg(hidden_size=66)  # MLA's head widths are their own flags
    with pytest.raises(ConfigError, match="^--hidden-size=66"):
        build_config({}, dict(num_layers=2, hidden_size=66, num_attention_heads=4), None)


def test_dry_run_counts_mla_projections_and_score_flops():
    q = HEADS * (12 + 6)
    attention = H * 24 + 24 * q + H * (16 + 6) + 16 * HEADS * (12 + 10) + HEADS * 10 * H
    layer = attention + 2 * H * 96  # GELU MLP: fc1, fc2
    counts = model_params(_cfg(), V)
    assert counts["total"] == 3 * layer + 2 * H * H + V * H  # 2 layers + MTP's, eh_proj, emb
    flops = flops_per_token(_cfg(), V)
    scores = 2 * 32 * HEADS * (12 + 6 + 10)
    assert flops["decoder"] == 3 * 2 * (2 * layer + scores)
    no_q_latent = model_params(_cfg(q_lora_rank=None), V)["total"]
    assert counts["total"] - no_q_latent == 3 * (H * 24 + 24 * q - H * q)


def test_mla_is_refused_on_the_016_floor_naming_the_version():
    with pytest.raises(ConfigError, match=r"^--multi-latent-attention=True .*0\.16\.1 is "
                                          r"installed"):
        mcore_compat.check_config(_cfg(), found="0.16.1")
    mcore_compat.check_config(_cfg(), found="0.19.2")


def test_checkpoint_compat_names_a_changed_mla_shape(tmp_path):
    from mtp_megatron.checkpoint.compat import check_compatible
    from mtp_megatron.checkpoint.layout import CONFIG_NAME, CheckpointError

    save_config(_cfg(), str(tmp_path / CONFIG_NAME))
    check_compatible(str(tmp_path), _cfg(rotary_scaling_factor=4.0))  # not a shape
    for change, field in ((dict(kv_lora_rank=32), "kv_lora_rank"),
                          (dict(qk_layernorm=False), "qk_layernorm"),
                          (dict(multi_latent_attention=False, q_lora_rank=None,
                                kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64,
                                v_head_dim=128, qk_layernorm=False),
                           "multi_latent_attention")):
        with pytest.raises(CheckpointError, match=f"model.{field}="):
            check_compatible(str(tmp_path), _cfg(**change))
