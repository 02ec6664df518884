"""The acceptance stage's pieces that need no process group: its flags, the loss per
depth on hand-built logits, and the resume rule (``--freeze-main-model`` decides which
parameters the optimizer state covers)."""

import math

import pytest
import torch

from mtp_megatron.checkpoint import CheckpointError, check_compatible
from mtp_megatron.config import CheckpointConfig, ConfigError, build_config, save_config
from mtp_megatron.training.self_distill import depth_loss

BASE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "micro_batch_size": 2, "global_batch_size": 8, "mtp_num_layers": 2}


def test_flags_name_what_they_need():
    with pytest.raises(ConfigError, match="--freeze-main-model=True .*--mtp-num-layers"):
        build_config(None, {"freeze_main_model": True}, 1)
    with pytest.raises(ConfigError, match="--mtp-self-distill='greedy' .*--freeze-main-model"):
        build_config(None, dict(BASE, mtp_self_distill="greedy"), 1)
    with pytest.raises(ConfigError, match="--mtp-self-distill"):
        build_config(None, dict(BASE, mtp_self_distill="soft", freeze_main_model=True), 1)
    with pytest.raises(ConfigError, match="--mtp-self-distill-temperature"):
        build_config(None, dict(BASE, mtp_self_distill="kl", freeze_main_model=True,
                                mtp_self_distill_temperature=0.0), 1)
    with pytest.raises(ConfigError, match="--calculate-per-token-loss"):
        build_config(None, dict(BASE, mtp_self_distill="kl", freeze_main_model=True,
                                calculate_per_token_loss=True), 1)
    cfg = build_config(None, dict(BASE, mtp_self_distill="kl", freeze_main_model=True), 1)
    assert cfg.mtp.mtp_self_distill == "kl"


def _logits(rows):
    """[s, b=1, V] logits with the given per-position probabilities."""
    return torch.log(torch.tensor(rows, dtype=torch.float)).unsqueeze(1)


def test_greedy_loss_targets_the_main_models_argmax_k_ahead():
    teacher = _logits([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    student = _logits([[0.6, 0.3, 0.1], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1], [1 / 3] * 3])
    mask = torch.ones(1, 4)
    loss, agree, count = depth_loss(student, teacher, mask, 1, mode="greedy", vocab_size=3)
    # depth 1 at j predicts the main model's argmax at j + 1: tokens 1, 2, 0 for j = 0..2
    expected = -(math.log(0.3) + math.log(0.4) + math.log(0.2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert (agree.item(), count.item()) == (1.0, 3.0)  # only j = 1 (argmax 2) agrees
    mask[0, 2] = 0  # position 2's token is not scored: depth 1 at j = 1 drops out
    loss, agree, count = depth_loss(student, teacher, mask, 1, mode="greedy", vocab_size=3)
    assert loss.item() == pytest.approx(-(math.log(0.3) + math.log(0.2)) / 2, rel=1e-5)
    assert (agree.item(), count.item()) == (0.0, 2.0)
    _, _, count = depth_loss(student, teacher, torch.ones(1, 4), 2, mode="greedy", vocab_size=3)
    assert count.item() == 2.0  # depth 2: positions 0 and 1 only


def test_kl_loss_is_zero_on_the_teacher_and_ignores_padding_columns():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    teacher = _logits(probs)
    padded = torch.cat([teacher, torch.full((3, 1, 2), -30.0)], dim=-1)  # 2 padding columns
    student = torch.roll(padded, shifts=-1, dims=0)  # depth 1 sees position j + 1's law
    loss, _, _ = depth_loss(student, padded, torch.ones(1, 3), 1, mode="kl", vocab_size=3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(3, 1, 5)
    loss, _, _ = depth_loss(flat, padded, torch.ones(1, 3), 1, mode="kl", vocab_size=3)
    p = torch.tensor(probs[1:])
    expected = (p * (p.log() + math.log(5))).sum(-1).mean().item()  # KL(p || uniform on 5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    hot, _, _ = depth_loss(flat, padded, torch.ones(1, 3), 1, mode="kl", temperature=0.01,
                           vocab_size=3)
    assert hot.item() == pytest.approx(math.log(5), rel=1e-4)  # teacher one-hot at T -> 0


def test_loading_a_pretraining_optimizer_into_the_stage_needs_finetune(tmp_path):
    directory = tmp_path / "iter_0000002"
    directory.mkdir()
    save_config(build_config(None, BASE, 1), str(directory / "run_config.yaml"))
    stage = build_config(None, dict(BASE, freeze_main_model=True), 1)
    with pytest.raises(CheckpointError, match="--freeze-main-model=True.*--finetune"):
        check_compatible(str(directory), stage, checkpoint=stage.checkpoint)
    check_compatible(str(directory), stage, checkpoint=CheckpointConfig(finetune=True))
