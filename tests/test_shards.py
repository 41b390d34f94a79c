"""The shard layer: deterministic tar shards, the loader's two decode paths, and the DDP shard sampler."""

from __future__ import annotations


import pytest
import torch

from bincounter.data import shards
from bincounter.errors import BincounterError
from bincounter.model import eval_transform
from bincounter.training.dataset import ShardDataset, ShardSampler


def test_a_shard_is_deterministic_and_readable_member_by_member(tmp_path):
    members = [(f"{i}.jpg", bytes([i]) * (100 + i)) for i in range(5)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    written = shards.write_shard(a, members, {"bins": {"0": 1}})
    shards.write_shard(b, members, {"bins": {"0": 1}})
    assert a.read_bytes() == b.read_bytes()  # same bins, same bytes: the same DVC hash
    assert shards.read_index(a) == {"bins": {"0": 1}}
    where = shards.locate(a)
    assert written == where  # what the writer reports is where the reader finds each member
    with open(a, "rb") as handle:
        for name, data in members:
            offset, size = where[name]
            handle.seek(offset)
            assert handle.read(size) == data
    assert shards.is_complete(a, {name for name, _ in members})
    a.write_bytes(a.read_bytes()[:1200])  # cut short
    assert not shards.is_complete(a, {name for name, _ in members})


def test_decoding_on_the_device_gives_the_batch_the_workers_would(prepared):
    """The GPU path (JPEG bytes collated as a list, decoded and transformed by batch_to on the device) gives
    the same model input as decoding in the loader workers; run here with the CPU as the device."""
    split = prepared / "data/prepared/val"
    transform = eval_transform(64)
    on_cpu = ShardDataset(split, transform)
    on_device = ShardDataset(split, transform, on_device=True)
    picks = range(min(6, len(on_cpu)))
    expected, counts = on_cpu.collate([on_cpu[k] for k in picks])
    images, same_counts = on_device.collate([on_device[k] for k in picks])
    assert isinstance(images, list) and images[0].dtype == torch.uint8 and images[0].dim() == 1  # still JPEG
    assert torch.equal(on_device.batch_to(images, torch.device("cpu")), expected)
    assert torch.equal(same_counts, counts)


def test_ddp_ranks_read_distinct_whole_shards_and_an_epoch_covers_every_bin():
    shard_of = [f"s{k // 10}" for k in range(95)]  # 10 shards: nine of 10 bins, one of 5
    for world in (2, 3):
        samplers = [ShardSampler(shard_of, world, rank, seed=7) for rank in range(world)]
        for epoch in (0, 1):
            for sampler in samplers:
                sampler.set_epoch(epoch)
            drawn = [list(s) for s in samplers]
            assert len({len(d) for d in drawn}) == 1 and len(drawn[0]) == len(samplers[0])  # equal steps
            read = [{shard_of[i] for i in d} for d in drawn]
            assert all(not (read[a] & read[b]) for a in range(world) for b in range(a + 1, world))
            assert set().union(*map(set, drawn)) == set(range(95))  # every bin, at least once
        samplers[0].set_epoch(0)
        first = list(samplers[0])
        samplers[0].set_epoch(1)
        assert list(samplers[0]) != first  # reshuffled each epoch


def test_more_ranks_than_shards_is_one_line():
    with pytest.raises(BincounterError, match="2 training shards cannot feed 4 ranks"):
        ShardSampler(["a", "a", "b"], world=4, rank=0, seed=0)
