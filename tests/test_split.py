"""The leakage-safe split: neighbouring ids (often the same pod photographed moments apart) stay on one
side, and the split stays stratified by count. A property test over random ids and seeds."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bincounter.data.split import group_of, grouped_split
from bincounter.errors import BincounterError


def random_labels(rng: random.Random, n: int) -> dict[str, int]:
    """Ids as ABID spells them: numbers of 5 or 6 digits, some with leading zeros, clustered in pods."""
    labels = {}
    while len(labels) < n:
        pod = rng.randrange(0, 120_000)
        for offset in range(rng.randint(1, 8)):  # a pod: a run of neighbouring ids
            number = pod + offset
            image_id = f"{number:05d}" if rng.random() < 0.7 else str(number)
            labels[image_id] = min(5, int(rng.expovariate(0.4)))
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_grouped_split_keeps_blocks_whole_and_stays_stratified(seed):
    rng = random.Random(seed)
    labels = random_labels(rng, rng.randint(600, 1500))
    splits = grouped_split(labels, [0.6, 0.2, 0.2], seed=seed, group_size=100)
    assert sorted(i for ids in splits.values() for i in ids) == sorted(labels)  # a partition
    side = {group_of(i, 100): name for name, ids in splits.items() for i in ids}
    for name, ids in splits.items():
        assert all(side[group_of(i, 100)] == name for i in ids), "a block of neighbouring ids spans two splits"
    total = Counter(labels.values())
    for name, fraction in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
        assert abs(len(splits[name]) / len(labels) - fraction) < 0.08
        share = Counter(labels[i] for i in splits[name])
        for count in (0, 1, 2):  # the common counts: each split holds about its share of them
            assert abs(share[count] / total[count] - fraction) < 0.12, (name, count)


def test_ids_of_another_spelling_width_never_share_a_block():
    assert group_of("00523", 100) != group_of("523", 100)
    assert group_of("00523", 100) == group_of("00599", 100) != group_of("00600", 100)
    assert group_of("abc", 100) == "id:abc"


def test_grouped_split_is_seeded():
    labels = random_labels(random.Random(9), 800)
    assert grouped_split(labels, [0.6, 0.2, 0.2], 1, 100) == grouped_split(labels, [0.6, 0.2, 0.2], 1, 100)
    assert grouped_split(labels, [0.6, 0.2, 0.2], 1, 100) != grouped_split(labels, [0.6, 0.2, 0.2], 2, 100)


def test_too_few_blocks_is_one_line():
    labels = {f"{n:05d}": n % 3 for n in range(200)}  # two blocks of 100
    with pytest.raises(BincounterError, match="2 id blocks are too few .* use split.strategy: random"):
        grouped_split(labels, [0.6, 0.2, 0.2], 0, 100)
