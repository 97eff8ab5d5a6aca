import itertools
from collections import Counter

import numpy as np
import pytest

from pgv25.data.sampler import CHUNK, BucketBatchSampler

BUCKETS = np.array([0] * 50 + [1] * 30 + [2] * 8)  # a common, a medium and a rare aspect ratio


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_every_rank_draws_the_same_bucket_and_disjoint_images_each_step():
    ranks = [take(BucketBatchSampler(BUCKETS, 2, 0.5, seed=1, rank=r, world_size=2), 200) for r in range(2)]
    for batch0, batch1 in zip(*ranks):
        positions = [k[2] for k in batch0 + batch1]
        assert len({BUCKETS[p] for p in positions}) == 1, "one bucket per step on all ranks"
        assert len(set(positions)) == 4 and {k[0] for k in batch0 + batch1} == {batch0[0][0]}
        assert [k[1] for k in batch0] == [0, 1] and [k[1] for k in batch1] == [2, 3]


def test_each_bucket_pass_is_a_permutation_of_its_images():
    sampler = BucketBatchSampler(BUCKETS, 2, "proportional", seed=0)
    by_bucket = {}
    for batch in take(sampler, 400):
        for _, _, p in batch:
            by_bucket.setdefault(int(BUCKETS[p]), []).append(p)
    for bucket, drawn in by_bucket.items():
        members = set(np.flatnonzero(BUCKETS == bucket).tolist())
        size = len(members)
        for start in range(0, len(drawn) - size + 1, size):
            assert set(drawn[start:start + size]) == members


@pytest.mark.parametrize("start", [0, 7, CHUNK + 3])
def test_resume_at_any_step_continues_the_stream(start):
    full = take(BucketBatchSampler(BUCKETS, 3, 0.3, seed=5, rank=1, world_size=2), start + 20)
    assert take(BucketBatchSampler(BUCKETS, 3, 0.3, seed=5, rank=1, world_size=2, start=start), 20) == full[start:]


@pytest.mark.parametrize("weighting, expected", [("proportional", [50 / 88, 30 / 88, 8 / 88]), ("uniform", [1 / 3] * 3)])
def test_bucket_frequencies_follow_the_weighting(weighting, expected):
    steps = take(BucketBatchSampler(BUCKETS, 1, weighting, seed=2), 6000)
    counts = Counter(int(BUCKETS[batch[0][2]]) for batch in steps)
    assert np.allclose([counts[b] / 6000 for b in range(3)], expected, atol=0.025)


def test_seed_changes_the_order():
    assert take(BucketBatchSampler(BUCKETS, 2, seed=0), 5) != take(BucketBatchSampler(BUCKETS, 2, seed=1), 5)


def test_fewer_images_than_a_global_batch():
    with pytest.raises(ValueError, match="3 usable images are fewer than one batch of 2 × 2 processes"):
        BucketBatchSampler(np.zeros(3, int), 2, world_size=2)


def test_companions_pair_every_batch_from_the_same_bucket_and_resume():
    """DreamBooth's class images: never drawn alone, batch_size of them in every batch, from its bucket."""
    buckets = np.array([0] * 6 + [1] * 4 + [0] * 5 + [1] * 3)  # 10 instance images, then 8 class images
    companion = np.arange(len(buckets)) >= 10
    ranks = [take(BucketBatchSampler(buckets, 2, 0.5, seed=2, rank=r, world_size=2, companion=companion), 60) for r in range(2)]
    for batches in zip(*ranks):
        keys = [key for batch in batches for key in batch]
        own = [p for _, slot, p in keys if slot < 4]
        paired = [p for _, slot, p in keys if slot >= 4]
        assert len(own) == len(paired) == 4 and len({slot for _, slot, _ in keys}) == 8  # distinct slots per step
        assert not companion[own].any() and companion[paired].all()
        assert len(set(buckets[own + paired])) == 1  # one bucket, one tensor shape
    drawn = {p for batches in ranks for batch in batches for _, slot, p in batch if slot >= 4}
    assert drawn == set(np.flatnonzero(companion))  # every class image is used
    resumed = take(BucketBatchSampler(buckets, 2, 0.5, seed=2, rank=1, world_size=2, start=37, companion=companion), 23)
    assert resumed == ranks[1][37:]
    with pytest.raises(ValueError, match="1 bucket\\(s\\) have images but no class images"):
        BucketBatchSampler(np.array([0, 0, 1, 1, 0]), 1, companion=np.array([False, False, False, False, True]))
