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


def test_training_streams_the_synced_shards_from_s3(sm):
    """train.data_dir = the sync stage's s3:// prefix: the loader reads each photo with a ranged GET, the
    same bytes as the local shards, and a whole run trains and records where its data came from."""
    import json

    import mlflow

    from bincounter.storage import S3Folder
    from bincounter.training.run import data_dirs_for, run_training

    uri = sm.make().sync.s3_uri
    config = sm.make(**{"train.data_dir": uri, "train.backend": "local", "train.epochs": 1,
                        "train.profile_steps": 0, "mlflow.model_name": "bin-counter-s3"})
    dirs = data_dirs_for(config)
    assert dirs == {"train": f"{uri}/train", "val": f"{uri}/validation", "test": f"{uri}/test"}
    local = ShardDataset(sm.prepared / "data/prepared/val", eval_transform(64), on_device=True)
    remote = ShardDataset(dirs["val"], eval_transform(64), on_device=True)
    assert isinstance(remote.folder, S3Folder)
    assert remote.ids == local.ids and remote.counts.tolist() == local.counts.tolist()
    batch = remote.__getitems__(list(range(len(remote))))  # the DataLoader's batched, concurrent read
    assert [bytes(data.numpy()) for data, _ in batch] == [bytes(local.jpeg(i).numpy()) for i in range(len(local))]

    outcome = run_training(config, dirs)
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    inputs = mlflow.get_run(outcome.run_id).inputs.dataset_inputs
    assert sorted(json.loads(i.dataset.source)["uri"] for i in inputs) == sorted(dirs.values())
    assert 0 <= outcome.test_metrics["accuracy"] <= 1


def test_a_shard_cut_short_on_s3_is_refused_before_training(sm):
    from bincounter.training.run import data_dirs_for

    uri = sm.make().sync.s3_uri
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    listed = sm.s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/train/")["Contents"]
    shard = next(o["Key"] for o in listed if o["Key"].endswith(".tar"))
    body = sm.s3.get_object(Bucket=bucket, Key=shard)["Body"].read()
    sm.s3.put_object(Bucket=bucket, Key=shard, Body=body[: len(body) // 2])
    config = sm.make(**{"train.data_dir": uri})
    with pytest.raises(BincounterError, match="is damaged .cut short"):
        ShardDataset(data_dirs_for(config)["train"], eval_transform(64))
