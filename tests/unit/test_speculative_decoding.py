"""Greedy and MTP self-speculative decoding on tiny CPU models, in this process.

Two models with D = 2 MTP layers (``tests/tiny_decoders.py``): a random one (drafts
rarely match) and one trained for a few seconds on "count up" sequences, where every
MTP depth learns its offset, so drafts match and the bookkeeping has known answers.
"""

import random

import pytest
import torch

from mtp_megatron.inference import DecodeStats, KVCachedRunner, Sampling, decoding, generate
from mtp_megatron.inference.loading import build_for_generation, single_rank
from mtp_megatron.inference.report import decode_prompts, format_report
from tests.tiny_decoders import (
    EOD,
    TEXT_VOCAB,
    VOCAB,
    random_prompts,
    reference_greedy,
    tiny_config,
    train_count_up,
)


@pytest.fixture(scope="module")
def device():
    with single_rank(seed=1234) as dev:
        yield dev


@pytest.fixture(scope="module")
def random_runner(device):
    torch.manual_seed(0)
    return KVCachedRunner(build_for_generation(tiny_config(), VOCAB, device), TEXT_VOCAB)


@pytest.fixture(scope="module")
def trained_runner(device):
    torch.manual_seed(1)
    model = build_for_generation(tiny_config(), VOCAB, device)
    lm_loss, mtp_losses = train_count_up(model)
    assert lm_loss < 0.5, f"the tiny model did not learn to count (loss {lm_loss:.3f})"
    return KVCachedRunner(model.eval(), TEXT_VOCAB)


# -- losslessness --------------------------------------------------------------------
def test_kv_cached_greedy_matches_full_recompute(random_runner):
    for prompt in random_prompts(3, 4):
        got = generate(random_runner, prompt, max_new_tokens=10).tokens
        assert got == reference_greedy(random_runner.model, prompt, 10)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("which", ["random", "trained"])
def test_speculative_equals_greedy(which, k, random_runner, trained_runner):
    runner = random_runner if which == "random" else trained_runner
    rng = random.Random(k)
    total = DecodeStats(draft_depth=k)
    for prompt in random_prompts(10 + k, 12):
        budget = rng.randint(1, 20)
        greedy = generate(runner, prompt, max_new_tokens=budget)
        spec = generate(runner, prompt, max_new_tokens=budget, draft_depth=k)
        assert spec.tokens == greedy.tokens, (prompt, budget)
        assert len(spec.tokens) == budget
        total.merge(spec.stats)
    if which == "random":  # drafts from untrained MTP layers rarely match
        assert total.acceptance[0] < 0.3
    else:
        assert total.acceptance[0] > 0.5


def test_drafts_are_the_full_mtp_forward(random_runner, monkeypatch):
    """With cached MTP depths, draft d equals megatron-core's MTP block over the sequence."""
    model, seen = random_runner.model, []
    original = decoding._MTPDrafter.draft

    def recording(self, committed, k, sampling, stats):
        drafts, q = original(self, committed, k, sampling, stats)
        seen.append((list(committed[0]), drafts[0].tolist()))
        return drafts, q

    monkeypatch.setattr(decoding._MTPDrafter, "draft", recording)
    generate(random_runner, [5, 17, 3, 90, 44], max_new_tokens=12, draft_depth=2)
    assert len(seen) >= 5
    with torch.no_grad():
        for committed, drafts in seen:
            n = len(committed) - 1
            seq = committed + drafts[:-1]
            ids = torch.tensor([seq])
            positions = torch.arange(len(seq)).unsqueeze(0)
            rope = model.rotary_pos_emb(len(seq))
            hidden = model.decoder(hidden_states=model.embedding(ids, positions),
                                   attention_mask=None, rotary_pos_emb=rope)
            depths = model.mtp(input_ids=ids, position_ids=positions, hidden_states=hidden,
                               attention_mask=None, rotary_pos_emb=rope,
                               embedding=model.embedding).chunk(3)
            expected = [random_runner.argmax(depths[d][n - 1: n])[0] for d in (1, 2)]
            assert drafts == expected[: len(drafts)], (committed, drafts, expected)


# -- bookkeeping on a case with known answers ----------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_count_up_drafts_all_accepted(trained_runner, k):
    gen = generate(trained_runner, [10, 11, 12], max_new_tokens=60, draft_depth=k)
    assert gen.tokens == [(13 + i) % EOD for i in range(60)]
    stats = gen.stats
    assert stats.acceptance == [1.0] * k
    assert stats.generated == 60
    # prefill + ceil(59 / (k + 1)) verifications: tends to 1 / (k + 1) per token
    assert stats.main_forwards == 1 + -(-59 // (k + 1))
    assert stats.forwards_per_token == pytest.approx(1 / (k + 1), abs=0.03)
    assert stats.mean_accepted == pytest.approx(k, abs=0.1)
    assert stats.mtp_forwards == sum(max(0, min(k, 58 - (k + 1) * s)) for s in range(stats.steps))


def test_stats_record_step():
    stats = DecodeStats(draft_depth=3)
    stats.record_step(3, 3)  # all accepted
    stats.record_step(3, 1)  # second draft rejected, third never compared
    stats.record_step(2, 0)  # first rejected (a short tail step)
    assert stats.drafted == [3, 3, 2]
    assert stats.reached == [3, 2, 1]
    assert stats.accepted == [2, 1, 1]
    assert stats.acceptance == [2 / 3, 1 / 2, 1.0]
    assert stats.mean_accepted == pytest.approx(4 / 3)


# -- edge cases ----------------------------------------------------------------------
def test_prompt_shorter_than_draft_depth(trained_runner):
    for prompt in ([42], [42, 43]):
        greedy = generate(trained_runner, prompt, max_new_tokens=9).tokens
        spec = generate(trained_runner, prompt, max_new_tokens=9, draft_depth=2)
        assert spec.tokens == greedy == [prompt[-1] + 1 + i for i in range(9)]
        assert spec.stats.acceptance == [1.0, 1.0]


@pytest.mark.parametrize("budget", range(1, 8))
def test_max_tokens_inside_a_draft(trained_runner, budget):
    spec = generate(trained_runner, [30, 31], max_new_tokens=budget, draft_depth=2)
    assert spec.tokens == list(range(32, 32 + budget))
    assert spec.finish_reason == "length"


@pytest.mark.parametrize("eod", [36, 37, 38, 39])
def test_eod_inside_an_accepted_draft(trained_runner, eod):
    """Counting from 31 reaches the EOD id at every offset of a 3-token step."""
    greedy = generate(trained_runner, [30, 31], max_new_tokens=20, eod=eod)
    spec = generate(trained_runner, [30, 31], max_new_tokens=20, draft_depth=2, eod=eod)
    assert spec.tokens == greedy.tokens == list(range(32, eod + 1))
    assert spec.finish_reason == greedy.finish_reason == "eod"


def test_batch_of_prompts_of_different_lengths(trained_runner):
    prompts = [[7], [100, 101, 102, 103, 104, 105], [3, 9, 27, 81]]
    report = decode_prompts(trained_runner.model, prompts, vocab_size=TEXT_VOCAB,
                            max_new_tokens=12, draft_depth=2, eod=EOD)
    assert report["matches_greedy"] is True
    assert [o["prompt_tokens"] for o in report["outputs"]] == [1, 6, 4]
    assert report["outputs"][1]["tokens"] == list(range(106, 118))
    assert report["greedy"]["main_forwards_per_token"] == 1.0
    assert report["speculative_k2"]["main_forwards_per_token"] < 0.6
    assert report["speedup"] > 0
    text = format_report(report)  # what generate prints without --json
    assert text.splitlines()[-1].endswith("outputs identical to greedy: True")
    assert [line.split()[0] for line in text.splitlines()[-4:-1]] == \
        ["mode", "greedy", "speculative_k2"]


def test_the_printed_report_of_sampling(trained_runner):
    """Plain sampling's summary and the sampling parameters have their own keys."""
    sampled = Sampling(temperature=0.8, top_k=20, seed=3)
    report = decode_prompts(trained_runner.model, [[7, 8]], vocab_size=TEXT_VOCAB,
                            max_new_tokens=6, draft_depth="auto", eod=EOD, sampling=sampled)
    assert report["sampling_params"] == {"temperature": 0.8, "top_k": 20, "top_p": 1.0,
                                         "seed": 3}
    assert report["sampling"]["main_forwards_per_token"] == 1.0  # the plain run
    lines = format_report(report).splitlines()
    assert [line.split()[0] for line in lines[-3:-1]] == ["sampling", "speculative_auto"]
    assert "sampled" in lines[-1]


def test_draft_depth_beyond_the_mtp_layers(random_runner):
    with pytest.raises(ValueError, match="draft depth 3"):
        generate(random_runner, [1, 2], max_new_tokens=4, draft_depth=3)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(random_runner, [], max_new_tokens=4)
