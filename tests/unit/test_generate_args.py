"""``python -m mtp_megatron.generate``'s new flags, checked before anything is loaded:
``--draft-depth auto`` (the default), sampling and batch size, each bad value one line
naming the flag."""

import pytest

from mtp_megatron.generate import UsageError, build_parser, check_args, check_sampling


def _args(*argv):
    return build_parser().parse_args(["--load", "x", "--prompt", "p", *argv])


def test_draft_depth_defaults_to_auto_and_is_checked_against_the_checkpoint():
    assert check_args(_args(), 2) == "auto"
    assert check_args(_args("--draft-depth", "1"), 2) == 1
    assert check_args(_args("--mode", "greedy"), 2) == 0
    with pytest.raises(UsageError, match="--draft-depth 3: .*--mtp-num-layers=2"):
        check_args(_args("--draft-depth", "3"), 2)
    with pytest.raises(UsageError, match="--draft-depth two: must be 'auto' or a number"):
        check_args(_args("--draft-depth", "two"), 2)
    with pytest.raises(UsageError, match="no MTP layers"):
        check_args(_args(), 0)


def test_sampling_flags():
    sampling = check_sampling(_args("--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
                                    "--seed", "3"))
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed) == \
        (0.7, 5, 0.9, 3)
    assert check_sampling(_args()).greedy
    for flag, value in (("--temperature", "-1"), ("--top-k", "-2"), ("--top-p", "0"),
                        ("--top-p", "1.5"), ("--batch-size", "0")):
        with pytest.raises(UsageError, match=f"{flag} {value}"):
            check_sampling(_args(flag, value))


def test_multi_latent_attention_decodes_one_row_at_a_time():
    from mtp_megatron.inference.runner import check_batch_size

    check_batch_size(4, False)
    check_batch_size(1, True)
    with pytest.raises(ValueError, match="--batch-size 4: a --multi-latent-attention"):
        check_batch_size(4, True)
