"""The BIO-constrained CRF (``compactnlu.model.BIOCRF``), its transition mask and ``pack_words``.

Likelihoods and Viterbi paths are checked against brute-force enumeration of every
tag sequence, computed in float64 from the module's own parameters and penalties.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compactnlu.model import FORBIDDEN, BIOCRF, bio_transition_mask, pack_words

TAGS3 = ("O", "B-a", "I-a")
TAGS5 = ("O", "B-a", "I-a", "B-b", "I-b")



def random_crf(tags, seed: int, scale: float = 1.0) -> BIOCRF:
    crf = BIOCRF(tags)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        crf.transitions.copy_(torch.randn(crf.transitions.shape, generator=g) * scale)
        crf.start_transitions.copy_(torch.randn(crf.start_transitions.shape, generator=g) * scale)
        crf.end_transitions.copy_(torch.randn(crf.end_transitions.shape, generator=g) * scale)
    return crf


@torch.no_grad()
def path_score(crf: BIOCRF, emissions_row: torch.Tensor, path) -> float:
    """score = start + start_penalty of the first tag + emissions + (transitions + penalty) + end of the last."""
    start = (crf.start_transitions + crf.start_penalty).double()
    trans = (crf.transitions + crf.transition_penalty).double()
    end = crf.end_transitions.double()
    em = emissions_row.double()
    s = start[path[0]] + em[0, path[0]]
    for t in range(1, len(path)):
        s = s + trans[path[t - 1], path[t]] + em[t, path[t]]
    return float(s + end[path[-1]])


def all_paths(n_tags: int, length: int):
    return list(itertools.product(range(n_tags), repeat=length))


def brute_log_partition(crf, emissions_row, length) -> float:
    scores = [path_score(crf, emissions_row, p) for p in all_paths(emissions_row.shape[1], length)]
    top = max(scores)
    return top + math.log(sum(math.exp(s - top) for s in scores))


def brute_best(crf, emissions_row, length) -> list[int]:
    paths = all_paths(emissions_row.shape[1], length)
    return list(max(paths, key=lambda p: path_score(crf, emissions_row, p)))


def is_bio(tags: list[str]) -> bool:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            return False
        previous = tag
    return True


def valid_paths(tags, length):
    return [p for p in all_paths(len(tags), length) if is_bio([tags[i] for i in p])]


def lengths_to_mask(lengths, width) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- likelihood

@pytest.mark.parametrize("tags,seed", [(TAGS3, 0), (TAGS3, 1), (TAGS5, 2)])
def test_nll_equals_brute_force(tags, seed):
    crf = random_crf(tags, seed)
    lengths = [4, 2, 3, 1]
    width = max(lengths)
    g = torch.Generator().manual_seed(100 + seed)
    emissions = torch.randn(len(lengths), width, len(tags), generator=g) * 2
    mask = lengths_to_mask(lengths, width)
    # Gold paths: BIO-valid within each row's length; garbage (any tag) in the padding.
    gold = torch.randint(0, len(tags), (len(lengths), width), generator=g)
    for row, n in enumerate(lengths):
        options = valid_paths(tags, n)
        gold[row, :n] = torch.tensor(options[int(torch.randint(len(options), (1,), generator=g))])

    nll = crf.nll(emissions, gold, mask)

    assert nll.shape == (len(lengths),)
    for row, n in enumerate(lengths):
        expected = brute_log_partition(crf, emissions[row], n) - path_score(crf, emissions[row], gold[row, :n].tolist())
        assert nll[row].item() == pytest.approx(expected, abs=1e-3, rel=1e-4), (row, n)
        assert nll[row].item() >= -1e-4  # a negative log-probability


def test_nll_ignores_the_padding():
    """The same row padded to a different width, with different junk beyond its end, has the same NLL."""
    crf = random_crf(TAGS5, 7)
    g = torch.Generator().manual_seed(7)
    emissions = torch.randn(1, 3, len(TAGS5), generator=g)
    gold = torch.tensor([[1, 2, 0]])
    short = crf.nll(emissions, gold, torch.ones(1, 3, dtype=torch.bool))
    padded_em = torch.cat([emissions, torch.randn(1, 2, len(TAGS5), generator=g) * 5], dim=1)
    padded_gold = torch.tensor([[1, 2, 0, 4, 2]])  # junk, even BIO-invalid, after the end
    mask = torch.tensor([[True, True, True, False, False]])
    long = crf.nll(padded_em, padded_gold, mask)
    assert long.item() == pytest.approx(short.item(), abs=1e-5)


@pytest.mark.parametrize("value", [100.0, -80.0])
def test_nll_is_exact_for_extreme_transition_scores(value):
    crf = BIOCRF(TAGS3)
    with torch.no_grad():
        crf.transitions[1, 2] = value  # B-a -> I-a
        crf.transitions[2, 2] = value  # I-a -> I-a
    emissions = torch.zeros(1, 3, len(TAGS3))
    emissions[0, 1:, :2] = -1e3  # only I-a is plausible after the first word
    gold = torch.tensor([[1, 2, 2]])
    expected = brute_log_partition(crf, emissions[0], 3) - path_score(crf, emissions[0], [1, 2, 2])
    nll = crf.nll(emissions, gold, torch.ones(1, 3, dtype=torch.bool))
    assert torch.isfinite(nll).all()
    assert nll.item() == pytest.approx(expected, abs=1e-3)


def test_probabilities_of_all_valid_paths_sum_to_one():
    crf = random_crf(TAGS3, 3)
    n = 4
    emissions = torch.randn(1, n, len(TAGS3), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, n, dtype=torch.bool)
    total = sum(math.exp(-crf.nll(emissions, torch.tensor([p]), mask).item()) for p in valid_paths(TAGS3, n))
    assert total == pytest.approx(1.0, abs=1e-4)


def test_invalid_gold_path_is_practically_impossible():
    crf = random_crf(TAGS3, 4)
    emissions = torch.randn(1, 3, len(TAGS3), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert crf.nll(emissions, torch.tensor([[0, 2, 2]]), mask).item() > 1e3  # O -> I-a
    assert crf.nll(emissions, torch.tensor([[2, 2, 0]]), mask).item() > 1e3  # starts with I-a


# ---------------------------------------------------------------- Viterbi

@pytest.mark.parametrize("tags,seed", [(TAGS3, 10), (TAGS3, 11), (TAGS5, 12), (TAGS5, 13)])
def test_decode_returns_the_brute_force_argmax(tags, seed):
    crf = random_crf(tags, seed)
    lengths = [4, 1, 3, 2, 4]
    width = max(lengths)
    emissions = torch.randn(len(lengths), width, len(tags), generator=torch.Generator().manual_seed(seed)) * 2
    mask = lengths_to_mask(lengths, width)

    paths = crf.decode(emissions, mask)

    assert len(paths) == len(lengths)
    for row, n in enumerate(lengths):
        assert len(paths[row]) == n
        assert paths[row] == brute_best(crf, emissions[row], n), row


def test_decode_row_does_not_depend_on_its_padding():
    crf = random_crf(TAGS5, 21)
    g = torch.Generator().manual_seed(21)
    emissions = torch.randn(1, 2, len(TAGS5), generator=g)
    alone = crf.decode(emissions, torch.ones(1, 2, dtype=torch.bool))
    padded = torch.cat([emissions, torch.full((1, 3, len(TAGS5)), 50.0)], dim=1)
    assert crf.decode(padded, torch.tensor([[True, True, False, False, False]])) == alone


def test_decode_is_bio_consistent_against_strong_emissions():
    """Emissions shout for I- tags at the start, after O and after the other type's B/I."""
    crf = BIOCRF(TAGS5)  # zero transitions: only the constraint stands in the way
    idx = {t: i for i, t in enumerate(TAGS5)}
    wanted = [
        ["I-a", "I-a", "O", "I-b"],
        ["O", "I-a", "B-b", "I-a"],
        ["B-a", "I-b", "I-b", "I-a"],
        ["I-b", "O", "I-b", "O"],
    ]
    emissions = torch.zeros(len(wanted), 4, len(TAGS5))
    for r, row in enumerate(wanted):
        for t, tag in enumerate(row):
            emissions[r, t, idx[tag]] = 100.0
    paths = crf.decode(emissions, torch.ones(len(wanted), 4, dtype=torch.bool))
    for path in paths:
        names = [TAGS5[i] for i in path]
        assert not names[0].startswith("I-"), names
        assert is_bio(names), names
    # And the constraint only bites where it must: a valid wish is granted.
    ok = torch.zeros(1, 3, len(TAGS5))
    for t, tag in enumerate(["B-a", "I-a", "I-a"]):
        ok[0, t, idx[tag]] = 100.0
    assert crf.decode(ok, torch.ones(1, 3, dtype=torch.bool)) == [[1, 2, 2]]


def test_decode_is_bio_consistent_for_random_large_scores():
    crf = random_crf(TAGS5, 30, scale=20.0)
    g = torch.Generator().manual_seed(30)
    lengths = torch.randint(1, 9, (64,), generator=g).tolist()
    emissions = torch.randn(64, 8, len(TAGS5), generator=g) * 50
    emissions[..., 2] += 40  # I-a
    emissions[..., 4] += 40  # I-b
    paths = crf.decode(emissions, lengths_to_mask(lengths, 8))
    assert [len(p) for p in paths] == lengths
    for path in paths:
        assert is_bio([TAGS5[i] for i in path])


# ---------------------------------------------------------------- gradients

def test_gradients_reach_transitions_and_emissions():
    crf = random_crf(TAGS5, 40)
    g = torch.Generator().manual_seed(40)
    emissions = torch.randn(3, 4, len(TAGS5), generator=g).requires_grad_(True)
    gold = torch.tensor([[1, 2, 0, 3], [3, 4, 4, 0], [0, 0, 1, 0]])
    mask = lengths_to_mask([4, 3, 2], 4)
    crf.nll(emissions, gold, mask).sum().backward()

    for p in (crf.transitions, crf.start_transitions, crf.end_transitions, emissions):
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    # Padded positions get no gradient; forbidden transitions carry no probability mass.
    assert emissions.grad[1, 3].abs().max() == 0
    assert emissions.grad[2, 2:].abs().max() == 0
    allowed, start = bio_transition_mask(TAGS5)
    assert crf.transitions.grad[~allowed].abs().max() < 1e-6
    assert crf.start_transitions.grad[~start].abs().max() < 1e-6


def test_nll_is_differentiable_through_a_linear_head():
    head = torch.nn.Linear(6, len(TAGS3))
    crf = BIOCRF(TAGS3)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(41))
    loss = crf.nll(head(x), torch.tensor([[1, 2, 0], [0, 1, 0]]), torch.ones(2, 3, dtype=torch.bool)).mean()
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- transition mask

def test_bio_transition_mask_small_tag_set():
    allowed, start = bio_transition_mask(TAGS5)
    T, F = True, False
    expected = torch.tensor([
        # to: O  B-a I-a B-b I-b        from:
        [T, T, F, T, F],  # O
        [T, T, T, T, F],  # B-a
        [T, T, T, T, F],  # I-a
        [T, T, F, T, T],  # B-b
        [T, T, F, T, T],  # I-b
    ])
    assert allowed.dtype == torch.bool and start.dtype == torch.bool
    assert torch.equal(allowed, expected)
    assert start.tolist() == [T, T, F, T, F]


def test_bio_transition_mask_does_not_confuse_prefix_sharing_types():
    tags = ("O", "B-date", "I-date", "B-date_time", "I-date_time")
    allowed, start = bio_transition_mask(tags)
    assert not allowed[1, 4] and not allowed[3, 2]  # B-date -> I-date_time, B-date_time -> I-date
    assert allowed[1, 2] and allowed[3, 4]
    assert start.tolist() == [True, True, False, True, False]


def test_crf_penalties_follow_the_mask():
    crf = BIOCRF(TAGS5)
    allowed, start = bio_transition_mask(TAGS5)
    assert torch.equal(crf.transition_penalty == FORBIDDEN, ~allowed)
    assert torch.equal(crf.transition_penalty == 0, allowed)
    assert torch.equal(crf.start_penalty == FORBIDDEN, ~start)
    # The penalties are fixed buffers, not saved parameters.
    assert set(crf.state_dict()) == {"transitions", "start_transitions", "end_transitions"}


# ---------------------------------------------------------------- pack_words

WORD_MASK = torch.tensor([
    [False, True, False, True, True, False],
    [False, False, True, False, False, False],
    [False, True, True, True, True, False],
])


def test_pack_words_2d():
    values = torch.arange(18).view(3, 6) * 10
    packed, mask = pack_words(values, WORD_MASK)
    assert packed.shape == (3, 4) and mask.shape == (3, 4)
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False], [True, True, True, True]]
    assert packed[0, :3].tolist() == [10, 30, 40]
    assert packed[1, :1].tolist() == [80]
    assert packed[2].tolist() == [130, 140, 150, 160]


def test_pack_words_3d_keeps_the_feature_vectors():
    values = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(50))
    packed, mask = pack_words(values, WORD_MASK)
    assert packed.shape == (3, 4, 5)
    for row in range(3):
        positions = torch.nonzero(WORD_MASK[row]).flatten()
        n = len(positions)
        assert mask[row].sum() == n and mask[row, :n].all()
        assert torch.equal(packed[row, :n], values[row, positions])


def test_pack_words_with_no_words_keeps_one_column():
    values = torch.arange(8).view(2, 4)
    packed, mask = pack_words(values, torch.zeros(2, 4, dtype=torch.bool))
    assert packed.shape == (2, 1)
    assert not mask.any()
