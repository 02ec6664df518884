"""Speculative sampling is lossless in distribution: statistical tests with fixed seeds.

* the acceptance rule alone, on hand-made distributions (the draft even misses tokens
  the target can emit): the committed token is distributed as the target;
* end to end on a tiny random model with a 6-token vocabulary: the joint distribution of
  4 sampled tokens (top-k 2, or top-p) under MTP speculative sampling (2 drafts per
  step, batch of 1000) against the exact distribution from full forwards, chi-square;
  the same test rejects a sampler that accepts every draft (it has the power to fail).

Seeds are fixed, so each test is deterministic; the thresholds are p-values.
"""

import itertools
import math

import pytest
import torch

from mtp_megatron.inference import KVCachedRunner, Sampling, decoding, generate_batch
from mtp_megatron.inference.loading import build_for_generation, single_rank
from mtp_megatron.inference.sampling import accept_sampled
from tests.tiny_decoders import VOCAB, full_logits, tiny_config

SMALL_VOCAB = 6
PROMPT = [1, 4, 2]


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom (the upper
    regularized gamma function, by its series / continued fraction)."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for the lower function
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= z / (a + n)
            total += term
        return max(0.0, 1.0 - math.exp(log_front) * total)
    tiny = 1e-300  # Lentz's continued fraction for the upper function
    b, c, d = z + 1 - a, 1 / tiny, 1 / (z + 1 - a)
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi_square(counts: dict, probs: dict, total: int) -> tuple:
    """(statistic, degrees of freedom, p-value); cells expecting < 5 are pooled."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for key, p in probs.items():
        expected = p * total
        if expected < 5:
            pooled_obs += counts.get(key, 0)
            pooled_exp += expected
        else:
            cells.append((counts.get(key, 0), expected))
    outside = total - sum(counts.get(key, 0) for key in probs)  # samples the law forbids
    pooled_obs += outside
    if pooled_exp > 0 or pooled_obs:
        cells.append((pooled_obs, max(pooled_exp, 1e-9)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return stat, len(cells) - 1, chi2_sf(stat, len(cells) - 1)


def test_chi2_sf_known_values():
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(59.703, 30) == pytest.approx(0.001, abs=1e-4)


# -- the acceptance rule on hand-made distributions -------------------------------------
def test_accepted_or_resampled_token_follows_the_target():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.3, 0.0]])  # never drafts token 3, which p can emit
    rows = 20000
    sampling = Sampling(temperature=1.0, seed=7)
    drafts = torch.multinomial(q.expand(rows, -1), 1, replacement=True,
                               generator=torch.Generator().manual_seed(3))
    accepted, tokens = accept_sampled(drafts, q.expand(rows, 1, 4),
                                      p.expand(rows, 2, 4), sampling)
    first = tokens[:, 0].tolist()
    counts = {(t,): first.count(t) for t in range(4)}
    _, _, pvalue = chi_square(counts, {(t,): float(p[0, t]) for t in range(4)}, rows)
    assert pvalue > 1e-3, counts
    # acceptance is sum_x min(p, q) = 0.1 + 0.3 + 0.15 = 0.55
    assert sum(accepted) / rows == pytest.approx(0.55, abs=0.02)


def test_same_draft_and_target_accepts_everything():
    p = torch.softmax(torch.randn(50, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    drafts = torch.multinomial(p[:, :2].reshape(-1, 5), 1).view(50, 2)
    accepted, _ = accept_sampled(drafts, p[:, :2], p, Sampling(temperature=1.0, seed=1))
    assert accepted == [2] * 50


def test_probabilities_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    top2 = Sampling(temperature=1.0, top_k=2).probabilities(logits)
    assert top2.tolist()[0] == pytest.approx([4 / 7, 3 / 7, 0, 0])
    nucleus = Sampling(temperature=1.0, top_p=0.65).probabilities(logits)  # 0.4 + 0.3 >= .65
    assert nucleus.tolist()[0] == pytest.approx([4 / 7, 3 / 7, 0, 0])
    cold = Sampling(temperature=0.5).probabilities(logits)
    assert cold.tolist()[0] == pytest.approx([16 / 30, 9 / 30, 4 / 30, 1 / 30])
    with pytest.raises(ValueError, match="--top-p 0"):
        Sampling(top_p=0)


# -- end to end on a tiny model -----------------------------------------------------------
@pytest.fixture(scope="module")
def runner():
    with single_rank(seed=1234) as device:
        torch.manual_seed(5)
        yield KVCachedRunner(build_for_generation(tiny_config(), VOCAB, device), SMALL_VOCAB)


def exact_joint(model, sampling: Sampling, steps: int) -> dict:
    """P(x_1 .. x_steps | PROMPT) under plain sampling, from full forwards."""
    law = {(): 1.0}
    for _ in range(steps):
        nxt = {}
        for prefix, mass in law.items():
            logits = full_logits(model, PROMPT + list(prefix))[-1:, :SMALL_VOCAB]
            for token, p in enumerate(sampling.probabilities(logits)[0].tolist()):
                if p > 0:
                    nxt[prefix + (token,)] = mass * p
        law = nxt
    return law


def sampled_joint(runner, sampling: Sampling, steps: int, rows=1000, batches=4) -> dict:
    counts = {}
    for b in range(batches):
        sampling.seed, sampling.generator = 100 + b, None
        gens, stats = generate_batch(runner, [PROMPT] * rows, max_new_tokens=steps,
                                     draft_depth=2, sampling=sampling)
        assert stats.drafted[1] > 0  # the second depth drafted
        for gen in gens:
            key = tuple(gen.tokens)
            counts[key] = counts.get(key, 0) + 1
    return counts


SETTINGS = {"top-k": dict(temperature=0.5, top_k=2), "top-p": dict(temperature=0.4, top_p=0.8)}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_speculative_sampling_matches_plain_sampling(runner, name):
    sampling = Sampling(**SETTINGS[name])
    law = exact_joint(runner.model, sampling, 4)
    counts = sampled_joint(runner, sampling, 4)
    stat, dof, pvalue = chi_square(counts, law, sum(counts.values()))
    assert dof >= 8, law  # the law is spread over enough cells to test something
    assert pvalue > 1e-3, (stat, dof)


def test_accepting_every_draft_fails_the_test(runner, monkeypatch):
    def accept_all(drafts, q, p, sampling):
        batch, k = drafts.shape
        last = sampling.sample(p[:, k])
        return [k] * batch, torch.cat([drafts, last.unsqueeze(1)], dim=1)

    monkeypatch.setattr(decoding, "accept_sampled", accept_all)
    sampling = Sampling(**SETTINGS["top-k"])
    law = exact_joint(runner.model, sampling, 4)
    counts = sampled_joint(runner, sampling, 4)
    _, _, pvalue = chi_square(counts, law, sum(counts.values()))
    assert pvalue < 1e-6


def test_all_tokens_sampled_are_allowed(runner):
    """top-k 1 is greedy: sampling at any temperature gives the greedy tokens."""
    gens, _ = generate_batch(runner, [PROMPT] * 3, max_new_tokens=6, draft_depth=2,
                             sampling=Sampling(temperature=2.0, top_k=1, seed=3))
    greedy, _ = generate_batch(runner, [PROMPT], max_new_tokens=6, draft_depth=0)
    assert [g.tokens for g in gens] == [greedy[0].tokens] * 3
    assert set(itertools.chain(*(g.tokens for g in gens))) <= set(range(SMALL_VOCAB))
