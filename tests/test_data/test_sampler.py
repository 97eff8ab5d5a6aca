import itertools

import pytest

from pgv25.data.sampler import ResumableSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = ResumableSampler(10, seed=0)
    items = take(s, 20)
    first, second = [i for e, i in items if e == 0], [i for e, i in items if e == 1]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second


def test_start_resumes_the_same_stream():
    full = take(ResumableSampler(10, seed=3), 27)
    assert take(ResumableSampler(10, seed=3, start=13), 14) == full[13:]


def test_ranks_get_disjoint_equal_shares():
    shares = [take(ResumableSampler(11, seed=1, rank=r, world_size=3), 3) for r in range(3)]
    indices = [i for share in shares for _, i in share]
    assert len(set(indices)) == 9 and all(len(s) == 3 for s in shares)


def test_too_small_dataset_is_rejected():
    with pytest.raises(ValueError):
        ResumableSampler(1, world_size=2)
