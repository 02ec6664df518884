"""Resuming with changed settings: ``check_compatible`` names the field and the way out.

Pure Python: a checkpoint directory here is only its run_config.yaml (plus the common
state's vocabulary sizes passed in), which is all ``check_compatible`` reads.
"""

import pytest

from mtp_megatron.checkpoint import CheckpointError, check_compatible
from mtp_megatron.config import CheckpointConfig, build_config, save_config

BASE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "micro_batch_size": 2, "global_batch_size": 8}


def _saved(tmp_path, **cli):
    directory = tmp_path / "iter_0000002"
    directory.mkdir(parents=True)
    save_config(build_config(None, dict(BASE, **cli), 1), str(directory / "run_config.yaml"))
    return str(directory)


def _error(directory, checkpoint=None, common=None, vocab=None, padded=None, **cli):
    cfg = build_config(None, dict(BASE, **cli), 1)
    with pytest.raises(CheckpointError) as err:
        check_compatible(directory, cfg, checkpoint=checkpoint, common=common,
                         vocab_size=vocab, padded_vocab_size=padded)
    return str(err.value)


def _ok(directory, checkpoint=None, **cli):
    return check_compatible(directory, build_config(None, dict(BASE, **cli), 1),
                            checkpoint=checkpoint)


def test_precision_switch_names_the_precision_and_the_weights_only_flags(tmp_path):
    ck = _saved(tmp_path, bf16=True)
    msg = _error(ck)
    assert "bf16" in msg and "fp32" in msg and "--no-load-optim" in msg and "--finetune" in msg
    assert "--bf16" in msg  # or resume with the checkpoint's precision
    assert "fp16" in _error(ck, fp16=True)
    _ok(ck, bf16=True)
    _ok(ck, checkpoint=CheckpointConfig(no_load_optim=True))  # weights only: allowed
    _ok(ck, checkpoint=CheckpointConfig(finetune=True), fp16=True)


def test_distributed_optimizer_switch_names_the_flag(tmp_path):
    ck = _saved(tmp_path)
    msg = _error(ck, use_distributed_optimizer=True)
    assert "--use-distributed-optimizer=True" in msg and "--no-load-optim" in msg
    _ok(ck, checkpoint=CheckpointConfig(no_load_optim=True), use_distributed_optimizer=True)


def test_vocab_size_change_is_refused(tmp_path):
    ck = _saved(tmp_path, vocab_size=256)
    common = {"vocab": {"vocab_size": 256, "padded_vocab_size": 256}, "layout": {"tp": 1}}
    msg = _error(ck, common=common, vocab=300, padded=384, vocab_size=300)
    assert "256" in msg and "300" in msg and "--vocab-size" in msg
    # a model built with other rows than the checkpoint's (not by vocab_rows): refused
    msg = _error(ck, common=common, vocab=256, padded=512, vocab_size=256,
                 make_vocab_size_divisible_by=512)
    assert "256 embedding rows" in msg and "512" in msg


def test_padding_flag_may_differ_when_the_checkpoint_records_its_rows(tmp_path):
    """Issue 19 item 1: ``--make-vocab-size-divisible-by 64`` at TP 2 keeps a TP 1 run's
    384 rows; it was refused as "the weights have other shapes"."""
    ck = _saved(tmp_path, vocab_size=258)
    common = {"vocab": {"vocab_size": 258, "padded_vocab_size": 384}, "layout": {"tp": 1}}
    cfg = build_config(None, dict(BASE, vocab_size=258, tensor_model_parallel_size=2,
                                  make_vocab_size_divisible_by=64), 2)
    check_compatible(ck, cfg, common=common, vocab_size=258, padded_vocab_size=384)
    # a checkpoint without the record (older): the flag itself is compared
    assert "make_vocab_size_divisible_by" in _error(ck, make_vocab_size_divisible_by=64,
                                                    vocab_size=258)


def test_rows_added_for_tp_load_only_when_masked(tmp_path):
    ck = _saved(tmp_path, vocab_size=257, make_vocab_size_divisible_by=1)
    common = {"vocab": {"vocab_size": 257, "padded_vocab_size": 257}, "layout": {"tp": 1}}
    cfg = build_config(None, dict(BASE, vocab_size=257, make_vocab_size_divisible_by=1,
                                  tensor_model_parallel_size=2), 2)
    check_compatible(ck, cfg, common=common, vocab_size=257, padded_vocab_size=258,
                     live_rows=257)  # row 257 masked: takes no probability mass
    with pytest.raises(CheckpointError, match="257 embedding rows"):
        check_compatible(ck, cfg, common=common, vocab_size=257, padded_vocab_size=258,
                         live_rows=258)  # a fresh row that would score


def test_learned_positions_name_max_position_embeddings(tmp_path):
    ck = _saved(tmp_path, position_embedding_type="learned_absolute")
    msg = _error(ck, position_embedding_type="learned_absolute", seq_length=64)
    assert "--max-position-embeddings 32" in msg and "corrupt" not in msg
    # a shorter sequence with the saved table size loads
    _ok(ck, position_embedding_type="learned_absolute", seq_length=16,
        max_position_embeddings=32)


def test_rope_sequence_length_may_change(tmp_path):
    _ok(_saved(tmp_path), seq_length=64)


def test_defaults_resolved_before_comparing(tmp_path):
    ck = _saved(tmp_path)  # ffn_hidden_size and num_query_groups left to their defaults
    _ok(ck, ffn_hidden_size=64, num_query_groups=4)  # SwiGLU at h=32: int(8*32/3/64)*64
    assert "ffn_hidden_size" in _error(ck, ffn_hidden_size=128)
    gelu = _saved(tmp_path / "gelu", swiglu=False)  # the GELU default is 4h
    _ok(gelu, swiglu=False, ffn_hidden_size=128)


def test_changed_mtp_objective_is_allowed_and_announced(tmp_path, caplog):
    """The factor, its schedule and the depth weights may change on resume (a deliberate
    change of the objective): one warning per changed flag, naming both values."""
    mtp = {"mtp_num_layers": 2, "mtp_loss_scaling_factor": 0.3}
    ck = _saved(tmp_path, **mtp)
    with caplog.at_level("WARNING", logger="mtp_megatron"):
        _ok(ck, **mtp, mtp_depth_weights="1.0,1")  # the same weights, another spelling
        _ok(ck, **mtp)
    assert "changed MTP objective" not in caplog.text
    with caplog.at_level("WARNING", logger="mtp_megatron"):
        _ok(ck, mtp_num_layers=2, mtp_loss_scaling_factor=0.1, mtp_depth_weights="linear",
            mtp_loss_scaling_factor_warmup_iters=1, mtp_loss_scaling_factor_final=0.05,
            mtp_loss_scaling_factor_decay_style="step", mtp_loss_scaling_factor_decay_iters=3)
    for change in ("--mtp-loss-scaling-factor: 0.3 -> 0.1",
                   "--mtp-depth-weights: 'uniform' -> 'linear'",
                   "--mtp-loss-scaling-factor-warmup-iters: 0 -> 1",
                   "--mtp-loss-scaling-factor-final: None -> 0.05",
                   "--mtp-loss-scaling-factor-decay-style: 'constant' -> 'step'",
                   "--mtp-loss-scaling-factor-decay-iters: None -> 3"):
        assert caplog.text.count(change) == 1, change
    assert ck in caplog.text


def test_a_checkpoint_from_before_the_weighting_flags_had_their_defaults(tmp_path, caplog):
    import yaml

    ck = _saved(tmp_path, mtp_num_layers=2)
    path = tmp_path / "iter_0000002" / "run_config.yaml"
    saved = yaml.safe_load(path.read_text())
    saved["mtp"] = {"mtp_num_layers": 2, "mtp_loss_scaling_factor": 0.1}
    path.write_text(yaml.safe_dump(saved))
    with caplog.at_level("WARNING", logger="mtp_megatron"):
        _ok(ck, mtp_num_layers=2)
        assert "changed MTP objective" not in caplog.text
        _ok(ck, mtp_num_layers=2, mtp_depth_weights="exponential")
    assert "--mtp-depth-weights: 'uniform' -> 'exponential'" in caplog.text
