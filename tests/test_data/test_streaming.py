import io
import itertools

import pytest
import torch
from PIL import Image

from pgv25.data.streaming import StreamingBucketDataset, check_streaming
from pgv25.errors import UserError


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a shuffled stream's reader threads shut down (an Arrow
    workaround): harmless once per epoch of a real dataset, most of the time of these tiny ones."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def parquet_dataset(folder, n=24):
    """A local dataset folder of parquet shards (what a hub dataset repo holds), images of three shapes + bad rows."""
    import datasets

    folder.mkdir()
    images, texts = [], []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", [(64, 32), (32, 64), (40, 40)][i % 3], (i * 10, 0, 0)).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": f"{i}.png"})
        texts.append(f"caption {i}")
    images.append({"bytes": b"not an image", "path": "bad.png"})
    texts.append("bad")
    images.append({"bytes": images[0]["bytes"], "path": "nocaption.png"})
    texts.append("")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)
    for shard in range(2):
        data.shard(2, shard, contiguous=True).to_parquet(str(folder / f"train-{shard:05d}.parquet"))
    return folder


def cfg(folder, **extra):
    return {"type": "hub", "path": str(folder), "streaming": True, "resolution": 64, "buckets": {"step": 16}, **extra}


def test_streams_one_bucket_per_batch_and_counts_bad_rows(tmp_path):
    dataset = StreamingBucketDataset(cfg(parquet_dataset(tmp_path / "d")), batch_size=2, seed=0)
    batches = list(itertools.islice(iter(dataset), 24))  # 2 passes over 24 good rows
    shapes = {tuple(b["pixels"].shape[2:]) for b in batches}
    assert shapes == {(48, 80), (80, 48), (64, 64)}
    reasons = sorted(r for b in batches for _, r in b["problems"])
    assert reasons.count("not an image") >= 1 and reasons.count("empty caption") >= 1
    assert all(b["size"] == 2 for b in batches)


def test_resume_skips_the_rows_already_read(tmp_path):
    folder = parquet_dataset(tmp_path / "d")
    first = list(itertools.islice(iter(StreamingBucketDataset(cfg(folder), 2, seed=1)), 5))
    worker, epoch, read = first[2]["stream_position"]
    resumed = StreamingBucketDataset(cfg(folder), 2, seed=1, resume={str(worker): (epoch, read)})
    after = next(iter(resumed))
    seen_before = {c for b in first[:3] for c in b["caption"]}
    assert not seen_before & set(after["caption"])  # nothing read before the checkpoint comes again
    assert after["stream_position"][2] > read


def test_workers_and_ranks_read_disjoint_rows(tmp_path):
    folder = parquet_dataset(tmp_path / "d")
    captions = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(StreamingBucketDataset(cfg(folder), 1, seed=0, rank=rank, world_size=2),
                                             batch_size=None, num_workers=2)
        captions.append({c for b in itertools.islice(iter(loader), 6) for c in b["caption"]})
    assert not captions[0] & captions[1]


def test_streaming_mistakes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="streaming applies to type='hub'"):
        check_streaming({"type": "folder", "streaming": True})
    with pytest.raises(UserError, match="cache needs the whole dataset scanned"):
        check_streaming({"type": "hub", "streaming": True, "cache": {"enabled": True}})
    with pytest.raises(UserError, match="no column 'caption'"):
        StreamingBucketDataset(cfg(parquet_dataset(tmp_path / "d"), caption_column="caption"), 2)
