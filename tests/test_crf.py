"""The BIO-constrained CRF (``compactnlu.model.BIOCRF``), its transition mask and ``pack_words``.

Likelihoods and Viterbi paths are checked against brute-force enumeration of every
tag sequence, computed in float64 from the module's own parameters and penalties, and the
vectorised Viterbi against the row-by-row decoder it replaced (``reference_decode``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compactnlu.model import FORBIDDEN, BIOCRF, bio_transition_mask, pack_words, viterbi_order

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
    """BIO in MASSIVE's one-label-per-word sense: an I-x continues a span of type x, and a
    word of type x right after one is I-x (two adjacent spans of one type are one span)."""
    previous = "O"
    for tag in tags:
        continues = previous != "O" and previous[2:] == tag[2:]
        if tag.startswith("I-") and not continues or tag.startswith("B-") and continues:
            return False
        previous = tag
    return True


def valid_paths(tags, length):
    return [p for p in all_paths(len(tags), length) if is_bio([tags[i] for i in p])]


def lengths_to_mask(lengths, width) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@torch.no_grad()
def reference_decode(crf: BIOCRF, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """``BIOCRF.decode`` as it was before it was vectorised: the backtrace row by row in Python."""
    trans, start = crf._scores()
    emissions = emissions.float()
    score = start + emissions[:, 0]
    history = []
    for t in range(1, emissions.shape[1]):
        best, idx = (score.unsqueeze(2) + trans.unsqueeze(0)).max(dim=1)
        nxt = best + emissions[:, t]
        on = mask[:, t].unsqueeze(1)
        score = torch.where(on, nxt, score)
        history.append(torch.where(on, idx, torch.arange(score.shape[1], device=score.device)))
    score = score + crf.end_transitions
    best_last = score.argmax(1)
    lengths = mask.sum(1).tolist()
    paths = [[int(b)] for b in best_last]
    for idx in reversed(history):  # steps past a row's end point back to the same tag
        prev = idx.gather(1, torch.tensor([p[-1] for p in paths], device=idx.device).unsqueeze(1)).squeeze(1)
        for row, tag in enumerate(prev.tolist()):
            paths[row].append(tag)
    return [list(reversed(p))[:n] for p, n in zip(paths, lengths)]


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


def test_nll_stays_exact_when_the_exp_space_product_underflows():
    # I-a's only way in (B-a) is 200 below the best at word 0, so exp(-200) underflows in float32;
    # a large emission on I-a at word 1 must not then count as if I-a had been reachable at -87
    crf = BIOCRF(TAGS3)
    emissions = torch.zeros(1, 2, 3)
    emissions[0, 0, 1], emissions[0, 1, 2] = -200.0, 120.0
    gold, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
    expected = brute_log_partition(crf, emissions[0], 2) - path_score(crf, emissions[0], [0, 0])
    assert crf.nll(emissions, gold, mask).item() == pytest.approx(expected, abs=1e-4)


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


@pytest.mark.parametrize("seed", range(6))
def test_decode_is_the_best_bio_path_by_enumeration(seed):
    """Tiny random cases: the decoded path is the best of the BIO-valid paths, found by
    enumerating them all (the penalties keep every invalid path far below)."""
    g = torch.Generator().manual_seed(60 + seed)
    tags = (TAGS3, TAGS5)[seed % 2]
    crf = random_crf(tags, 60 + seed, scale=2.0)
    lengths = torch.randint(1, 5, (6,), generator=g).tolist()
    width = max(lengths)
    emissions = torch.randn(len(lengths), width, len(tags), generator=g) * 3

    paths = crf.decode(emissions, lengths_to_mask(lengths, width))

    for row, n in enumerate(lengths):
        best = max(valid_paths(tags, n), key=lambda p: path_score(crf, emissions[row], p))
        assert paths[row] == list(best), (row, n)


@pytest.mark.parametrize("batch,width,seed", [(1, 1, 0), (7, 1, 1), (33, 6, 2), (64, 17, 3), (5, 40, 4)])
def test_decode_equals_the_row_by_row_decoder(batch, width, seed):
    tags = TAGS11
    crf = random_crf(tags, 70 + seed, scale=3.0)
    g = torch.Generator().manual_seed(70 + seed)
    lengths = torch.randint(0, width + 1, (batch,), generator=g)
    lengths[0] = width  # at least one row fills the width, as pack_words guarantees
    emissions = torch.randn(batch, width, len(tags), generator=g) * 4
    mask = lengths_to_mask(lengths.tolist(), width)

    paths = crf.decode(emissions, mask)

    assert isinstance(paths, list) and all(isinstance(p, list) for p in paths)
    assert all(isinstance(tag, int) for p in paths for tag in p)
    assert [len(p) for p in paths] == lengths.tolist()
    assert paths == reference_decode(crf, emissions, mask)


TAGS11 = ("O",) + tuple(f"{p}-{s}" for s in ("a", "b", "c", "date", "date_time") for p in ("B", "I"))


@pytest.mark.parametrize("tags", [TAGS5, TAGS11])
@pytest.mark.parametrize("seed", range(3))
def test_decode_breaks_ties_like_the_row_by_row_decoder(tags, seed):
    """Whole-number scores tie often; both decoders must take the first best tag."""
    crf = BIOCRF(tags)
    g = torch.Generator().manual_seed(80 + seed)
    with torch.no_grad():
        crf.transitions.copy_(torch.randint(-1, 2, crf.transitions.shape, generator=g).float())
    lengths = torch.randint(1, 7, (50,), generator=g).tolist()
    emissions = torch.randint(0, 3, (50, 6, len(tags)), generator=g).float()
    mask = lengths_to_mask(lengths, 6)
    assert crf.decode(emissions, mask) == reference_decode(crf, emissions, mask)


def test_viterbi_order_puts_each_i_n_places_after_its_b():
    order = viterbi_order(TAGS11)
    tags = [TAGS11[j] for j in order]
    assert sorted(order.tolist()) == list(range(len(TAGS11)))
    assert tags[0] == "O" and all(t.startswith("B-") for t in tags[1:6])
    assert [t[2:] for t in tags[6:]] == [t[2:] for t in tags[1:6]] and all(t.startswith("I-") for t in tags[6:])


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


def test_decode_never_puts_two_spans_of_one_type_side_by_side():
    """Emissions shout B-a B-a and I-a B-a; the official scoring would read either as one
    span, so the CRF must continue the span (or end it) instead."""
    crf = BIOCRF(TAGS5)
    idx = {t: i for i, t in enumerate(TAGS5)}
    wanted = [["B-a", "B-a", "O"], ["B-a", "I-a", "B-a"], ["B-b", "B-b", "B-b"]]
    emissions = torch.zeros(len(wanted), 3, len(TAGS5))
    emissions[:, :, idx["O"]] = 1.0  # second choice everywhere, so O beats any I- that was not asked for
    for r, row in enumerate(wanted):
        for t, tag in enumerate(row):
            emissions[r, t, idx[tag]] = 100.0 - t  # earlier wishes weigh more: no ties
    paths = crf.decode(emissions, torch.ones(len(wanted), 3, dtype=torch.bool))
    names = [[TAGS5[i] for i in path] for path in paths]
    assert names == [["B-a", "O", "O"], ["B-a", "I-a", "O"], ["B-b", "O", "B-b"]]
    assert all(is_bio(row) for row in names)


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
        [T, F, T, T, F],  # B-a
        [T, F, T, T, F],  # I-a
        [T, T, F, F, T],  # B-b
        [T, T, F, F, T],  # I-b
    ])
    assert allowed.dtype == torch.bool and start.dtype == torch.bool
    assert torch.equal(allowed, expected)
    assert start.tolist() == [T, T, F, T, F]


def test_bio_transition_mask_does_not_confuse_prefix_sharing_types():
    tags = ("O", "B-date", "I-date", "B-date_time", "I-date_time")
    allowed, start = bio_transition_mask(tags)
    assert not allowed[1, 4] and not allowed[3, 2]  # B-date -> I-date_time, B-date_time -> I-date
    assert allowed[1, 2] and allowed[3, 4]
    assert allowed[1, 3] and allowed[4, 1]  # B-date -> B-date_time, I-date_time -> B-date
    assert not allowed[1, 1] and not allowed[2, 1]  # B-date -> B-date, I-date -> B-date
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
