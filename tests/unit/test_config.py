"""Tier 1: configuration and validation, pure Python (no process group, no model)."""

import glob
import os

import pytest
import yaml

from mtp_megatron.config import ConfigError, build_config, load_config, save_config
from mtp_megatron.config.loader import cli_flags, read_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg_from(*argv, world=None):
    return load_config(list(argv), world)[0]


def rejects(flag_in_message, *argv, world=None):
    with pytest.raises(ConfigError) as err:
        cfg_from(*argv, world=world)
    assert flag_in_message in str(err.value), str(err.value)
    return str(err.value)


# --- the MTP rules ------------------------------------------------------------------

def test_context_parallel_with_mtp_is_rejected_naming_the_flag():
    msg = rejects("--context-parallel-size", "--mtp-num-layers", "1",
                  "--context-parallel-size", "2", world=2)
    assert "=2" in msg and "MTP" in msg


def test_context_parallel_without_mtp_is_allowed():
    assert cfg_from("--context-parallel-size", "2", world=2).parallel.context_parallel_size == 2


def test_learned_absolute_positions_with_mtp_are_rejected():
    msg = rejects("--position-embedding-type", "--mtp-num-layers", "2",
                  "--position-embedding-type", "learned_absolute")
    assert "learned_absolute" in msg and "rope" in msg


def test_learned_absolute_positions_without_mtp_are_allowed():
    cfg = cfg_from("--position-embedding-type", "learned_absolute")
    assert cfg.model.position_embedding_type == "learned_absolute"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_mtp_num_layers_below_one_is_an_error_not_a_silent_disable(value):
    rejects("--mtp-num-layers", "--mtp-num-layers", value)


def test_mtp_num_layers_must_be_an_integer_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mtp:\n  mtp_num_layers: 1.5\n")
    rejects("--mtp-num-layers", "--config", str(path))


def test_mtp_omitted_means_off():
    assert not cfg_from().mtp.enabled
    assert cfg_from("--mtp-num-layers", "3").mtp.mtp_num_layers == 3


@pytest.mark.parametrize("value", ["-0.1", "inf", "nan"])
def test_mtp_loss_scaling_factor_must_be_finite_and_non_negative(value):
    rejects("--mtp-loss-scaling-factor", "--mtp-num-layers", "1",
            "--mtp-loss-scaling-factor", value)


def test_zero_mtp_loss_scaling_factor_warns(caplog):
    cfg = cfg_from("--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0")
    assert cfg.mtp.mtp_loss_scaling_factor == 0
    assert "no gradient" in caplog.text


def test_seq_length_must_exceed_mtp_depth():
    rejects("--seq-length", "--mtp-num-layers", "4", "--seq-length", "4")
    assert cfg_from("--mtp-num-layers", "4", "--seq-length", "5").model.seq_length == 5


# --- shapes and parallel splits -------------------------------------------------------

def test_hidden_size_divisible_by_heads():
    rejects("--hidden-size", "--hidden-size", "100", "--num-attention-heads", "3")


@pytest.mark.parametrize("argv,width", [
    ((), 320),  # the defaults: h=128 with SwiGLU, int(8 * 128 / 3 / 64) * 64
    (("--hidden-size", "4096", "--num-attention-heads", "32"), 10880),  # as Megatron-LM
    (("--no-swiglu",), 512),  # GELU: 4h
    (("--ffn-hidden-size", "500"), 500),
])
def test_default_mlp_width_is_megatron_lms(argv, width):
    assert cfg_from(*argv).model.ffn_size == width


def test_swiglu_default_width_of_zero_names_ffn_hidden_size():
    message = rejects("--ffn-hidden-size", "--hidden-size", "16")
    assert "is 0" in message
    assert cfg_from("--hidden-size", "16", "--ffn-hidden-size", "48").model.ffn_size == 48


def test_heads_divisible_by_tensor_parallel():
    rejects("--tensor-model-parallel-size", "--num-attention-heads", "4",
            "--tensor-model-parallel-size", "3", world=3)


def test_query_groups_divisible_by_tensor_parallel():
    rejects("--tensor-model-parallel-size", "--num-attention-heads", "8",
            "--num-query-groups", "2", "--tensor-model-parallel-size", "4",
            "--hidden-size", "128", world=4)


def test_layers_divisible_by_pipeline_parallel():
    rejects("--pipeline-model-parallel-size", "--num-layers", "5",
            "--pipeline-model-parallel-size", "2", world=2)


def test_layers_per_stage_divisible_by_virtual_stage_size():
    rejects("--num-layers-per-virtual-pipeline-stage", "--num-layers", "8",
            "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
            "3", world=2)
    cfg = cfg_from("--num-layers", "8", "--pipeline-model-parallel-size", "2",
                   "--num-layers-per-virtual-pipeline-stage", "2", world=2)
    assert cfg.virtual_pipeline_size == 2


def test_world_size_divisible_by_model_parallel_size():
    rejects("--world-size", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--world-size", "6")


def test_global_batch_divisible_by_micro_batch_times_dp():
    msg = rejects("--global-batch-size", "--global-batch-size", "12", "--micro-batch-size", "4",
                  world=2)
    assert "8" in msg
    assert cfg_from("--global-batch-size", "16", "--micro-batch-size", "4",
                    world=2).num_microbatches == 2


def test_sequence_parallel_needs_tensor_parallel():
    rejects("--sequence-parallel", "--sequence-parallel")


def test_bf16_and_fp16_are_exclusive():
    rejects("--fp16", "--bf16", "--fp16")


def test_fp8_needs_transformer_engine_impl():
    rejects("--fp8-format", "--fp8-format", "hybrid", "--transformer-impl", "local")


def test_save_interval_needs_save():
    rejects("--save-interval", "--save-interval", "10")


def test_warmup_must_be_shorter_than_decay():
    rejects("--lr-warmup-iters", "--train-iters", "10", "--lr-warmup-iters", "10")
    assert cfg_from("--train-iters", "20").training.warmup_iters == 2


# --- loading: precedence, unknown names, files ----------------------------------------

def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_size: 96\nmtp:\n  mtp_num_layers: 2\n")
    cfg = cfg_from("--config", str(path), "--num-layers", "8")
    assert cfg.model.num_layers == 8          # CLI wins
    assert cfg.model.hidden_size == 96        # YAML over default
    assert cfg.mtp.mtp_num_layers == 2
    assert cfg.model.num_attention_heads == 4  # default


def test_unknown_flag_suggests_the_closest():
    msg = rejects("--mtp-num-layer", "--mtp-num-layer", "1")
    assert "--mtp-num-layers" in msg


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layer: 6\n")
    with pytest.raises(ConfigError) as err:
        cfg_from("--config", str(path))
    assert "model.num_layer" in str(err.value) and "model.num_layers" in str(err.value)


def test_unknown_yaml_section_and_misplaced_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  num_layers: 6\n")
    with pytest.raises(ConfigError, match="'model'"):
        cfg_from("--config", str(path))
    path.write_text("model:\n  mtp_num_layers: 2\n")
    with pytest.raises(ConfigError, match="under mtp"):
        cfg_from("--config", str(path))


def test_missing_config_file_names_the_path(tmp_path):
    msg = rejects("--config", "--config", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = cfg_from("--mtp-num-layers", "2", "--tensor-model-parallel-size", "2", world=2)
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, str(path))
    again = build_config(yaml.safe_load(path.read_text()), None, None)
    assert again == cfg


def test_every_megatron_flag_from_the_issue_exists():
    names = """--num-layers --hidden-size --num-attention-heads --ffn-hidden-size --seq-length
    --max-position-embeddings --vocab-size --position-embedding-type --normalization --swiglu
    --untie-embeddings-and-output-weights --micro-batch-size --global-batch-size --train-iters
    --lr --min-lr --lr-warmup-iters --lr-decay-style --weight-decay --clip-grad --seed --bf16
    --fp16 --fp8-format --fp8-recipe --transformer-impl --tensor-model-parallel-size
    --pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage
    --context-parallel-size --sequence-parallel --use-distributed-optimizer --mtp-num-layers
    --mtp-loss-scaling-factor --log-interval --tensorboard-dir --mock-data --dry-run""".split()
    missing = set(names) - set(cli_flags())
    assert not missing


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))))
def test_every_example_parses_and_validates(path):
    data = read_yaml(path)
    cfg = build_config(data, None, None)
    assert cfg.model.num_layers >= 1


# --- YAML numbers, duplicates, integer bounds (issue 11, item 8) -----------------------

def test_yaml_float_in_exponent_notation_is_a_number(tmp_path):
    """Regression: PyYAML reads 1e-3 as a string; the error said "'1e-3' is not allowed"."""
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1e-3\n  min_lr: '1e-5'\n  micro_batch_size: '2'\n"
                    "  global_batch_size: 4\n")
    cfg = cfg_from("--config", str(path))
    assert (cfg.training.lr, cfg.training.min_lr) == (0.001, 1e-5)
    assert cfg.training.micro_batch_size == 2  # an integer string, as on the command line
    path.write_text("training:\n  lr: fast\n")
    rejects("--lr='fast' is not allowed", "--config", str(path))


def test_yaml_integer_in_float_notation_names_the_flag_and_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  train_iters: 1e5\n")
    msg = rejects("--train-iters='1e5' is not allowed", "--config", str(path))
    assert "write 100000" in msg


@pytest.mark.parametrize("text,where", [
    ("model:\n  num_layers: 6\nmodel:\n  hidden_size: 96\n", "'model' is given on line 1 "
     "and again on line 3"),
    ("training:\n  lr: 0.01\n  lr: 0.02\n", "'lr' is given on line 2 and again on line 3"),
])
def test_duplicate_yaml_keys_and_sections_are_errors(tmp_path, text, where):
    """Regression: a second ``model:`` silently reset num_layers to its default."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_yaml(str(path))
    assert where in str(err.value) and str(path) in str(err.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model: &m\n  num_layers: 6\nmtp:\n  mtp_num_layers: 1\n")
    assert read_yaml(str(path))["model"] == {"num_layers": 6}
    path.write_text("x: &base {num_layers: 6, hidden_size: 96}\n")  # anchors still load
    from mtp_megatron.config.loader import _yaml_load_unique
    with open(path) as fh:
        assert _yaml_load_unique(fh, str(path)) == {"x": {"num_layers": 6, "hidden_size": 96}}
    path.write_text("a: &base {num_layers: 6}\nb:\n  <<: *base\n  num_layers: 8\n")
    with open(path) as fh:
        assert _yaml_load_unique(fh, str(path))["b"] == {"num_layers": 8}


@pytest.mark.parametrize("argv,flag", [
    (["--train-iters", str(10**30)], "--train-iters"),  # used to be accepted, then hang
    (["--train-iters", str(10**8 + 1)], "--train-iters"),
    (["--eval-interval", str(10**9)], "--eval-interval"),
    (["--hidden-size", str(2**31)], "--hidden-size"),
    (["--seed", str(2**40)], "--seed"),
])
def test_huge_integers_are_rejected_naming_the_flag(argv, flag):
    msg = rejects(f"{flag}=", *argv)
    assert "too large" in msg


def test_largest_allowed_iteration_count_is_accepted():
    assert cfg_from("--train-iters", str(10**8)).training.train_iters == 10**8
