"""Batched and adaptive speculative decoding on tiny CPU models, in this process.

Batches: every row of a batch (ragged prompts, per-row acceptance, rows leaving at EOD
or their budget) decodes exactly what it decodes alone. Adaptive draft count
(``draft_depth="auto"``): drafts little on a random model, deep on a trained one.
"""

import weakref

import pytest

from mtp_megatron.inference import KVCachedRunner, cache, decoding, generate, generate_batch
from mtp_megatron.inference.cache import UNUSED, RowCache
from mtp_megatron.inference.controller import MAX_PROBE, MIN_PROBE, DraftController
from mtp_megatron.inference.loading import build_for_generation, single_rank
from tests.tiny_decoders import (
    EOD,
    TEXT_VOCAB,
    VOCAB,
    random_prompts,
    tiny_config,
    train_count_up,
    with_noisy_heads,
)


@pytest.fixture(scope="module")
def runners():
    import torch

    with single_rank(seed=1234) as device:
        torch.manual_seed(0)
        random = KVCachedRunner(build_for_generation(tiny_config(), VOCAB, device), TEXT_VOCAB)
        torch.manual_seed(1)
        model = build_for_generation(tiny_config(), VOCAB, device)
        train_count_up(model)
        noisy = with_noisy_heads(model, lambda: build_for_generation(tiny_config(), VOCAB, device))
        yield {"random": random, "trained": KVCachedRunner(model.eval(), TEXT_VOCAB),
               "noisy": KVCachedRunner(noisy, TEXT_VOCAB)}


def mixed_prompts():
    """Counting prompts (drafts accepted) and random ones (rejected), ragged lengths."""
    return [[10, 11, 12], [7], [200, 3, 91, 5, 6, 17, 4], [40, 41, 42, 43, 44, 45],
            *random_prompts(5, 3)]


@pytest.mark.parametrize("depth", [0, 2, "auto"])
@pytest.mark.parametrize("which", ["random", "noisy"])
def test_batch_rows_equal_batch_of_one(runners, which, depth):
    runner = runners[which]
    prompts = mixed_prompts()
    alone = [generate(runner, p, max_new_tokens=14, draft_depth=depth, eod=EOD - 5).tokens
             for p in prompts]
    gens, stats = generate_batch(runner, prompts, max_new_tokens=14, draft_depth=depth,
                                 eod=EOD - 5)
    assert [g.tokens for g in gens] == alone
    assert stats.batch_size == len(prompts)
    assert stats.generated == sum(len(t) for t in alone)
    if depth == 2 and which == "noisy":  # rows accepted different counts
        assert 0.3 < stats.acceptance[0] < 1.0 and 0.2 < stats.acceptance[1] < 1.0


def test_rows_leave_at_eod_and_budget(runners):
    """Row 0 counts into the EOD id (40) after 2 tokens, row 1 runs to its budget."""
    runner = runners["trained"]
    gens, _ = generate_batch(runner, [[37, 38], [100, 101]], max_new_tokens=9,
                             draft_depth=2, eod=40)
    assert gens[0].tokens == [39, 40] and gens[0].finish_reason == "eod"
    assert gens[1].tokens == list(range(102, 111)) and gens[1].finish_reason == "length"


def test_compaction_keeps_every_row_exact(runners, monkeypatch):
    """Holes squeezed out after every rollback: same tokens as without compaction."""
    runner = runners["noisy"]
    prompts = mixed_prompts()
    before, _ = generate_batch(runner, prompts, max_new_tokens=20, draft_depth=2)
    calls = []
    original = RowCache.compact
    monkeypatch.setattr(cache, "COMPACT_AFTER", 1)
    monkeypatch.setattr(RowCache, "compact", lambda self: calls.append(
        self.offset - max(self.lengths())) or original(self))
    after, _ = generate_batch(runner, prompts, max_new_tokens=20, draft_depth=2)
    assert [g.tokens for g in after] == [g.tokens for g in before]
    assert sum(holes > 0 for holes in calls) > 5  # compactions that moved columns


def test_row_cache_positions_and_mask():
    import torch

    rc = RowCache(2, 16, torch.device("cpu"), rope=None)
    new = rc.append([3, 1], 3)
    assert new.tolist() == [[0, 1, 2], [0, UNUSED, UNUSED]]
    mask = rc.mask(new)
    assert mask[0, 0].tolist() == [[False, True, True], [False, False, True],
                                   [False, False, False]]
    assert mask[1, 0, 0].tolist() == [False, True, True]  # padding columns never seen
    rc.advance(3)
    rc.truncate([2, 1])
    assert rc.lengths() == [2, 1] and rc.offset == 2
    assert rc.append([1, 2], 2).tolist() == [[2, UNUSED], [1, 2]]
    rc.advance(2)
    assert rc.columns == [[0, 1, 2], [0, 2, 3]]
    rc.compact()
    assert rc.columns == [[0, 1, 2], [0, 1, 2]] and rc.offset == 3


# -- the adaptive draft count ----------------------------------------------------------
@pytest.fixture
def prior_costs(monkeypatch):
    """Decisions from acceptance alone: the controller keeps its prior costs (an MTP depth
    a quarter of a main forward) instead of timing this busy machine."""
    monkeypatch.setattr(DraftController, "timed", lambda self, kind, width, seconds: None)
    monkeypatch.setattr(decoding, "_AUTO", weakref.WeakKeyDictionary())  # nothing learned


def test_auto_stops_drafting_with_random_heads(runners, prior_costs):
    runner = runners["random"]
    fixed = generate(runner, [5, 6, 7], max_new_tokens=120, draft_depth=2).stats
    auto = generate(runner, [5, 6, 7], max_new_tokens=120, draft_depth="auto").stats
    assert fixed.mean_drafts == pytest.approx(2.0, abs=0.05)
    assert auto.mean_drafts < 0.25  # a few steps to learn, then sparse probes
    assert auto.forwards_per_token > 0.95
    again = generate(runner, [9, 8], max_new_tokens=120, draft_depth="auto").stats
    assert again.mean_drafts < auto.mean_drafts  # what it learned carries over


def test_auto_drafts_deep_when_drafts_are_right(runners, prior_costs):
    stats = generate(runners["trained"], [10, 11, 12], max_new_tokens=90,
                     draft_depth="auto").stats
    assert stats.chosen_depths[2] >= 0.7 * sum(stats.chosen_depths)
    assert stats.forwards_per_token < 0.45


def _fed(controller, steps, k_accept):
    for _ in range(steps):
        k = controller.choose()
        controller.timed("verify", k + 1, 1.0 + 0.05 * k)
        if k:
            controller.timed("draft", 1, 0.25)
        controller.record(k, [int(i <= k_accept) for i in range(k)],
                          [int(i < k_accept) for i in range(k)])


def test_controller_picks_the_best_depth():
    good = DraftController(2)
    _fed(good, 20, k_accept=2)
    assert good.best() == 2
    bad = DraftController(2)
    _fed(bad, 20, k_accept=0)
    assert bad.best() == 0
    shallow = DraftController(2)  # depth 1 right, depth 2 wrong: one draft pays most
    _fed(shallow, 40, k_accept=1)
    assert shallow.best() == 1
    assert DraftController(2, fixed=1).choose() == 1
    assert DraftController(2).choose(limit=0) == 0


def test_failed_probes_back_off():
    c = DraftController(1)
    _fed(c, 400, k_accept=0)
    assert c.probe_every == MAX_PROBE
    probes = c.chosen[1]
    assert probes < 15  # the first steps, then probes 8, 16, 32, 64, 128, ... steps apart
    assert MIN_PROBE < MAX_PROBE
