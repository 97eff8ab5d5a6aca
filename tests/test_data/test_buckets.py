import numpy as np
import pytest

from pgv25.data.buckets import bucket_probabilities, make_buckets, merge_small, nearest_buckets


def test_1024_buckets_are_multiples_of_64_near_the_area_from_1_4_to_4_1():
    sizes = make_buckets(1024)
    assert (1024, 1024) in sizes and (1152, 896) in sizes and (896, 1152) in sizes
    assert (512, 2048) in sizes and (2048, 512) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024
        assert w * h >= 0.9 * 1024 * 1024 or min(w, h) <= 640  # the extreme ratios lose a little area to rounding
        assert 0.25 <= w / h <= 4
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios) and len(set(sizes)) == len(sizes)


def test_tiny_buckets():
    assert make_buckets(64, 16) == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    with pytest.raises(ValueError, match="not a multiple"):
        make_buckets(100, 64)


def test_nearest_bucket_by_log_ratio():
    sizes = [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    widths, heights = np.array([100, 100, 300, 10, 101]), np.array([100, 160, 100, 100, 99])
    assert nearest_buckets(widths, heights, sizes).tolist() == [2, 1, 4, 0, 2]


def test_small_buckets_merge_into_the_nearest_big_one():
    sizes = [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    assignment = np.array([0, 1, 2, 2, 2, 2, 3, 3, 3, 4])
    assert merge_small(assignment, sizes, 3).tolist() == [2, 2, 2, 2, 2, 2, 3, 3, 3, 3]
    assert merge_small(assignment, sizes, 1).tolist() == assignment.tolist()
    assert merge_small(assignment, sizes, 100).tolist() == [2] * 10  # none big enough: all to the largest


def test_bucket_probabilities_temperature():
    counts = np.array([90, 10, 0])
    assert np.allclose(bucket_probabilities(counts, "proportional"), [0.9, 0.1, 0])
    assert np.allclose(bucket_probabilities(counts, "uniform"), [0.5, 0.5, 0])
    assert np.allclose(bucket_probabilities(counts, 0.5), [0.75, 0.25, 0])
    for bad in (1.5, -1, "often"):
        with pytest.raises(ValueError, match="weighting"):
            bucket_probabilities(counts, bad)


def test_explicit_bucket_sizes_replace_the_generated_ones():
    from pgv25.data.buckets import bucket_sizes

    assert bucket_sizes(64, dict(enabled=True, step=16, sizes=[[64, 64], [96, 48], [48, 96]])) == [(48, 96), (64, 64), (96, 48)]
    assert bucket_sizes(64, dict(enabled=True, step=16)) == make_buckets(64, 16)
    assert bucket_sizes(64, dict(enabled=False, sizes=[[96, 48]])) == [(64, 64)]
    with pytest.raises(ValueError, match="100x48 are not positive multiples of the bucket step 16"):
        bucket_sizes(64, dict(step=16, sizes=[[64, 64], [100, 48]]))
    with pytest.raises(ValueError, match="list of \\[width, height\\] pairs"):
        bucket_sizes(64, dict(step=16, sizes=[64, 64]))
