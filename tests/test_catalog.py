"""Stage catalog: one Parquet row per bin, read from a local folder or a real moto_server bucket laid out like
s3://aft-vbi-pds, resumable by ETag; and `select`, the subset as a query on it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, SOURCE_BUCKET, fixture_labels, make_config, seed_bucket, write_manifest

from bincounter.data import source as source_module
from bincounter.data.catalog import build_catalog, read_catalog, select
from bincounter.errors import BincounterError
from bincounter.storage import s3_client

LABELS = fixture_labels()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def config(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_config(tmp_path, **{"data.catalog": str(tmp_path / "catalog.parquet"), **overrides}).data


def s3_config(tmp_path, **overrides):
    return config(tmp_path, **{"data.source": f"s3://{SOURCE_BUCKET}", **overrides})


def rows(cfg) -> dict[str, dict]:
    return {row["image_id"]: row for row in read_catalog(cfg.catalog).to_pylist()}


def metadata(image_id: str) -> dict:
    return json.loads((FIXTURES / "metadata" / f"{image_id}.json").read_text())


def put(image_id: str, body: bytes) -> None:
    s3_client().put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json", Body=body)


# ------------------------------------------------------------------ building it


def test_a_local_folder_is_catalogued_bin_by_bin(tmp_path, capsys):
    cfg = config(tmp_path, **{"data.subset": "all", "data.max_candidates": 0})
    summary = build_catalog(cfg)
    assert summary["bins"] == summary["read"] == len(LABELS) and summary["kept"] == summary["rejected"] == 0
    assert capsys.readouterr().out.strip().startswith("catalog: 48 bins (48 read, 0 kept from the last run, "
                                                      "0 rejected) in ")
    table = pq.read_table(cfg.catalog)
    assert table.schema.names == ["image_id", "count", "distinct", "width", "height", "metadata_key", "image_key",
                                  "etag", "status", "reason"]
    assert [table.schema.field(n).type for n in ("image_id", "count", "distinct", "width", "etag")] == \
        [pa.string(), pa.int32(), pa.int32(), pa.int32(), pa.string()]
    assert table["image_id"].to_pylist() == sorted(LABELS)  # sorted: the same bins give the same file
    for image_id, row in rows(cfg).items():
        meta = metadata(image_id)
        assert row["count"] == LABELS[image_id] == meta["EXPECTED_QUANTITY"]
        assert row["etag"] == md5_of(FIXTURES / "metadata" / f"{image_id}.json")
        assert (row["metadata_key"], row["image_key"]) == (f"metadata/{image_id}.json", f"bin-images/{image_id}.jpg")
        assert (row["status"], row["reason"], row["width"], row["height"]) == ("ok", "", None, None)
        items = meta["BIN_FCSKU_DATA"]
        # an empty item list of a non-empty bin is quantity-only metadata: unknown, not 0 distinct items
        assert row["distinct"] == (len(items) if items or row["count"] == 0 else None)
    assert any(r["distinct"] for r in rows(cfg).values())  # real item lists are counted


def test_an_emulator_bucket_with_a_manifest_keeps_ids_as_strings(aws, tmp_path):
    ids = seed_bucket()
    a, b = ids[0], next(i for i in ids if LABELS[i] != LABELS[ids[0]])
    put("523", (FIXTURES / "metadata" / f"{a}.json").read_bytes())
    put("00523", (FIXTURES / "metadata" / f"{b}.json").read_bytes())
    cfg = s3_config(tmp_path, **{"data.subset": str(write_manifest(tmp_path / "m.json", ids + ["523", "00523"]))})
    assert build_catalog(cfg)["read"] == len(ids) + 2
    catalog = rows(cfg)
    assert set(catalog) == set(ids) | {"523", "00523"}
    assert (catalog["523"]["count"], catalog["00523"]["count"]) == (LABELS[a], LABELS[b])  # two bins, not one
    client = s3_client()
    for image_id, row in catalog.items():
        body = client.get_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json")["Body"].read()
        assert row["etag"] == hashlib.md5(body).hexdigest() and row["status"] == "ok"
    for image_id in ids:
        assert catalog[image_id]["count"] == LABELS[image_id]


def test_all_and_balanced_list_the_bucket_in_a_seeded_order(aws, tmp_path):
    ids = seed_bucket()
    client = s3_client()
    for stray in ("metadata/..json", "metadata/sub/1.json", "metadata/a b.json", "metadata/notes.txt"):
        client.put_object(Bucket=SOURCE_BUCKET, Key=stray, Body=b'{"EXPECTED_QUANTITY": 1}')
    whole = s3_config(tmp_path / "whole", **{"data.subset": "all", "data.max_candidates": 0})
    build_catalog(whole)
    assert sorted(rows(whole)) == sorted(ids)  # objects that are not metadata/<safe id>.json are never bins

    def sample(name, subset, seed):
        cfg = s3_config(tmp_path / name, **{"data.subset": subset, "data.max_candidates": 10, "data.seed": seed})
        build_catalog(cfg)
        return sorted(rows(cfg))

    first = sample("a", "all", 0)
    assert len(first) == 10 and set(first) <= set(ids)
    assert sample("b", "balanced", 0) == first  # the catalog reads candidates; per_class is select's business
    assert sample("c", "all", 1) != first


# ------------------------------------------------------------------ resuming


def test_a_rerun_reads_only_what_changed(aws, tmp_path):
    ids = seed_bucket()
    cfg = s3_config(tmp_path, **{"data.subset": "all", "data.max_candidates": 0})
    assert build_catalog(cfg)["read"] == len(ids)
    before = rows(cfg)
    again = build_catalog(cfg)
    assert (again["read"], again["kept"], again["bins"]) == (0, len(ids), len(ids))
    assert rows(cfg) == before
    changed = ids[0]
    put(changed, json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 4}).encode())  # a new ETag
    s3_client().delete_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{ids[1]}.json")
    third = build_catalog(cfg)
    assert (third["read"], third["kept"]) == (1, len(ids) - 2)
    after = rows(cfg)
    assert after[changed]["count"] == 4 and after[changed]["etag"] != before[changed]["etag"]
    assert ids[1] not in after  # gone from the bucket, gone from the catalog
    assert {i: r for i, r in after.items() if i != changed} == {i: r for i, r in before.items() if i not in ids[:2]}


def test_a_manifest_rerun_keeps_ok_rows_and_retries_rejected_ones(aws, tmp_path):
    ids = seed_bucket()
    cfg = s3_config(tmp_path, **{"data.subset": str(write_manifest(tmp_path / "m.json", ids + ["77777"]))})
    build_catalog(cfg)
    assert rows(cfg)["77777"]["reason"] == "missing from source: metadata/77777.json"
    put("77777", (FIXTURES / "metadata" / f"{ids[0]}.json").read_bytes())
    again = build_catalog(cfg)
    assert (again["read"], again["kept"]) == (1, len(ids))
    assert rows(cfg)["77777"]["status"] == "ok"


def test_a_catalog_larger_than_a_row_group_is_written_sorted_a_group_at_a_time(tmp_path, monkeypatch):
    import bincounter.data.catalog as catalog

    monkeypatch.setattr(catalog, "ROW_GROUP", 7)  # 48 bins: 7 groups, the last one short
    monkeypatch.setattr(catalog, "CHECKPOINT", 10)  # and several checkpoints, each a whole rewrite
    cfg = config(tmp_path, **{"data.subset": "all", "data.max_candidates": 0, "data.workers": 4})
    build_catalog(cfg)
    parquet = pq.ParquetFile(cfg.catalog)
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == [7] * 6 + [6]
    table = parquet.read()
    assert table["image_id"].to_pylist() == sorted(LABELS)  # read in a shuffled order, stored sorted
    assert dict(zip(table["image_id"].to_pylist(), table["count"].to_pylist())) == LABELS
    assert build_catalog(cfg)["kept"] == len(LABELS)  # and read back whole by the rerun
    monkeypatch.setattr(catalog, "ROW_GROUP", 3)  # a file written with larger groups is read in slices of 3
    assert [len(batch) for batch in catalog.stored_batches(cfg.catalog)] == [3, 3, 1] * 6 + [3, 3]


def test_a_killed_run_keeps_what_it_read_and_the_rerun_reads_the_rest(tmp_path):
    folder = tmp_path / "bucket" / "metadata"
    folder.mkdir(parents=True)
    labels = list(LABELS)
    total = 4000
    for n in range(total):
        (folder / f"{n:06d}.json").symlink_to(FIXTURES / "metadata" / f"{labels[n % len(labels)]}.json")
    catalog = tmp_path / "catalog.parquet"
    overrides = {"data.source": str(folder.parent), "data.subset": "all", "data.max_candidates": 0,
                 "data.workers": 1, "data.catalog": str(catalog)}
    script = textwrap.dedent(f"""
        import bincounter.data.catalog as catalog
        from bincounter.config import build_config
        catalog.CHECKPOINT = 50
        catalog.build_catalog(build_config({{}}, {overrides!r}).data)
    """)
    stage = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not catalog.exists() and stage.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(stage.pid, signal.SIGKILL)
    stage.wait()
    kept = read_catalog(str(catalog))  # whole: never half a Parquet file under the final name
    assert 0 < kept.num_rows < total
    resumed = build_catalog(make_config(tmp_path, **overrides).data)
    assert (resumed["kept"], resumed["read"], resumed["bins"]) == (kept.num_rows, total - kept.num_rows, total)
    assert not list(tmp_path.glob(".*.part"))  # the killed writer's temp file is cleaned up


def test_the_same_rows_give_the_same_file_whatever_checkpoints_and_reruns_made_it(tmp_path, monkeypatch):
    import bincounter.data.catalog as catalog

    folder = tmp_path / "bucket" / "metadata"
    folder.mkdir(parents=True)
    for image_id in LABELS:
        (folder / f"{image_id}.json").symlink_to(FIXTURES / "metadata" / f"{image_id}.json")
    monkeypatch.setattr(catalog, "ROW_GROUP", 7)
    settings = {"data.source": str(folder.parent), "data.subset": "all", "data.max_candidates": 0}
    one_pass = config(tmp_path / "one", **settings)
    build_catalog(one_pass)

    changed = sorted(LABELS)[::3]  # 16 bins, spread over every row group
    for image_id in changed:
        (folder / f"{image_id}.json").unlink()
        (folder / f"{image_id}.json").write_text('{"EXPECTED_QUANTITY": 9}')
    for n in range(20):  # bins that are gone by the rerun, between and after the others
        (folder / f"{sorted(LABELS)[n]}x.json").write_text('{"EXPECTED_QUANTITY": 1}')
    monkeypatch.setattr(catalog, "CHECKPOINT", 5)
    stepwise = config(tmp_path / "steps", **settings)
    assert build_catalog(stepwise)["bins"] == len(LABELS) + 20
    for image_id in changed:
        (folder / f"{image_id}.json").unlink()
        (folder / f"{image_id}.json").symlink_to(FIXTURES / "metadata" / f"{image_id}.json")
    for stray in folder.glob("*x.json"):
        stray.unlink()
    rerun = build_catalog(stepwise)  # 16 read again in 4 checkpoints, 20 dropped, 32 kept
    assert (rerun["read"], rerun["kept"], rerun["bins"]) == (len(changed), len(LABELS) - len(changed), len(LABELS))
    assert Path(stepwise.catalog).read_bytes() == Path(one_pass.catalog).read_bytes()


def test_a_listing_longer_than_a_run_is_sorted_on_disk_into_the_same_catalog_and_sample(tmp_path, monkeypatch):
    import tempfile

    from bincounter.data import listing

    spills = tmp_path / "spills"
    spills.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spills))
    built = {}
    for run_rows in (1000, 5):  # one run in memory; ten runs of 5 (the fixture folder lists in no order) merged
        monkeypatch.setattr(listing, "RUN_ROWS", run_rows)
        for name, candidates in (("all", 0), ("sample", 20)):
            cfg = config(tmp_path / f"{name}-{run_rows}", **{"data.subset": "all", "data.max_candidates": candidates,
                                                             "data.seed": 3})
            build_catalog(cfg)
            built[name, run_rows] = Path(cfg.catalog).read_bytes()
            assert build_catalog(cfg)["kept"] == (candidates or len(LABELS))  # the rerun walks the same order
    assert built["all", 5] == built["all", 1000]
    assert built["sample", 5] == built["sample", 1000]
    assert len(read_catalog(str(tmp_path / "sample-5" / "catalog.parquet"))) == 20
    assert not list(spills.iterdir())  # the spilled runs are gone


def test_a_catalog_not_sorted_by_id_is_refused_in_one_line(tmp_path):
    cfg = config(tmp_path)
    build_catalog(cfg)
    table = read_catalog(cfg.catalog)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), cfg.catalog)
    with pytest.raises(BincounterError, match=r"is not sorted by image_id: delete it and run `dvc repro catalog`"):
        build_catalog(cfg)


def test_a_damaged_or_foreign_catalog_is_refused_in_one_line_and_left_alone(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(BincounterError, match=r"catalog .* not found: run `dvc repro catalog`"):
        read_catalog(cfg.catalog)
    build_catalog(cfg)
    data = Path(cfg.catalog).read_bytes()
    Path(cfg.catalog).write_bytes(data[: len(data) // 2])
    for attempt in (lambda: read_catalog(cfg.catalog), lambda: build_catalog(cfg), lambda: select(cfg)):
        with pytest.raises(BincounterError, match="is damaged or not Parquet") as caught:
            attempt()
        assert "\n" not in str(caught.value) and "delete it" in str(caught.value)
    assert Path(cfg.catalog).read_bytes() == data[: len(data) // 2]  # never trusted, never overwritten
    pq.write_table(pa.table({"image_id": ["1"], "count": [1]}), cfg.catalog)
    with pytest.raises(BincounterError, match="is not a bincounter catalog"):
        build_catalog(cfg)


# ------------------------------------------------------------------ what cannot be read


def test_unreadable_metadata_becomes_rejected_rows_with_the_reason(aws, tmp_path, capsys):
    ids = seed_bucket()
    put(ids[0], b'{"EXPECTED_QUANTITY": ')
    put(ids[1], b'{"BIN_FCSKU_DATA": {}}')
    put(ids[2], b'{"EXPECTED_QUANTITY": 99999999999}')
    s3_client().delete_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{ids[3]}.json")
    manifest = write_manifest(tmp_path / "m.json", ids + ["../x", "..", "nosuchbin"])
    cfg = s3_config(tmp_path, **{"data.subset": str(manifest)})
    summary = build_catalog(cfg)
    assert summary["rejected"] == 7 and summary["bins"] == len(ids) + 3
    catalog = rows(cfg)
    reasons = {i: r["reason"] for i, r in catalog.items() if r["status"] == "rejected"}
    assert reasons.pop(ids[0]) == "malformed metadata JSON"
    assert reasons.pop(ids[1]) == "metadata has no EXPECTED_QUANTITY"
    assert "implausibly large" in reasons.pop(ids[2])
    assert reasons.pop(ids[3]) == f"missing from source: metadata/{ids[3]}.json"
    assert reasons.pop("nosuchbin") == "missing from source: metadata/nosuchbin.json"
    assert reasons.pop("../x").startswith("unsafe id '../x'") and reasons.pop("..").startswith("unsafe id")
    assert not reasons
    assert catalog["../x"]["metadata_key"] is None and catalog["../x"]["count"] is None  # never a key or a path
    assert catalog[ids[0]]["etag"] and catalog[ids[0]]["count"] is None
    shown = capsys.readouterr()
    assert "rejected: '../x': unsafe id" in shown.out + shown.err


def test_transient_failures_are_not_rows_and_the_rerun_retries_them(aws, tmp_path, monkeypatch):
    ids = seed_bucket()
    cfg = s3_config(tmp_path, **{"data.subset": str(write_manifest(tmp_path / "m.json", ids))})
    real = source_module.S3Source.get_with_etag

    def flaky(self, key):
        if key in (f"metadata/{ids[5]}.json", f"metadata/{ids[6]}.json"):
            raise source_module.Unreachable(f"ReadTimeoutError reading {key}")
        return real(self, key)

    monkeypatch.setattr(source_module.S3Source, "get_with_etag", flaky)
    with pytest.raises(BincounterError, match=r"^2 bins could not be read \(e\.g\. .*\); rerun"):
        build_catalog(cfg)
    assert set(rows(cfg)) == set(ids) - {ids[5], ids[6]}
    monkeypatch.setattr(source_module.S3Source, "get_with_etag", real)
    assert build_catalog(cfg)["read"] == 2 and set(rows(cfg)) == set(ids)


def test_an_unreachable_source_stops_early_and_keeps_what_was_read(aws, tmp_path, monkeypatch):
    ids = seed_bucket()
    first = s3_config(tmp_path, **{"data.subset": str(write_manifest(tmp_path / "m.json", ids[:5]))})
    build_catalog(first)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    many = [f"{n:05d}" for n in range(400)]
    cfg = s3_config(tmp_path, **{"data.subset": str(write_manifest(tmp_path / "m.json", ids[:5] + many)),
                                 "data.workers": 40})
    started = time.perf_counter()
    with pytest.raises(BincounterError, match="cannot reach the data source s3://aft-vbi-pds/ at "
                                              "http://127.0.0.1:9 .* rerun to resume") as caught:
        build_catalog(cfg)
    assert "\n" not in str(caught.value) and time.perf_counter() - started < 30
    assert set(rows(cfg)) == set(ids[:5])  # no failed read became a row; the earlier rows stay


# ------------------------------------------------------------------ select


@pytest.fixture(scope="module")
def catalogued(tmp_path_factory):
    """A catalog of the 48 fixture bins plus a non-numeric id, '523' and '00523', from a local folder."""
    root = tmp_path_factory.mktemp("catalogued")
    folder = root / "bucket" / "metadata"
    folder.mkdir(parents=True)
    for image_id in LABELS:
        (folder / f"{image_id}.json").symlink_to(FIXTURES / "metadata" / f"{image_id}.json")
    for image_id in ("abc", "523", "00523"):
        (folder / f"{image_id}.json").write_text('{"EXPECTED_QUANTITY": 2}')
    (folder / "broken.json").write_text("{")
    cfg = config(root, **{"data.source": str(folder.parent), "data.subset": "all"})
    build_catalog(cfg)
    return root, read_catalog(cfg.catalog)


def query(catalogued, **overrides):
    root, table = catalogued
    return select(config(root, **{"data.subset": "all", **overrides}), table)


def test_select_keeps_ok_bins_within_the_count_range_sorted_by_id(catalogued):
    counts = {**LABELS, "abc": 2, "523": 2, "00523": 2}
    everything = query(catalogued)
    assert everything == sorted((i, c) for i, c in counts.items() if c <= 5)  # 'broken' is rejected
    assert query(catalogued, **{"data.min_count": 2, "data.max_count": 3}) == \
        sorted((i, c) for i, c in counts.items() if 2 <= c <= 3)
    assert query(catalogued, **{"data.max_count": 20}) == sorted(counts.items())


def test_select_by_id_range_takes_numeric_ids_only(catalogued):
    chosen = dict(query(catalogued, **{"data.id_range": "500-9999"}))
    assert set(chosen) == {i for i in LABELS if 500 <= int(i) <= 9999 and LABELS[i] <= 5} | {"523", "00523"}
    assert "abc" not in dict(query(catalogued, **{"data.id_range": "0-999999999"}))


def test_select_by_manifest_membership(catalogued, tmp_path):
    wanted = ["00523", "abc", "101210", "00052", "not-catalogued", "../x"]
    manifest = write_manifest(tmp_path / "m.json", wanted)
    assert query(catalogued, **{"data.subset": str(manifest)}) == [("00523", 2), ("101210", 4), ("abc", 2)]


def test_select_balanced_fills_per_class_quotas_and_warns_when_short(catalogued, capsys):
    chosen = query(catalogued, **{"data.subset": "balanced", "data.per_class": 3})
    counts = [c for _, c in chosen]
    assert sorted(counts) == sorted(list(range(6)) * 3) and chosen == sorted(chosen)
    assert query(catalogued, **{"data.subset": "balanced", "data.per_class": 3}) == chosen
    assert query(catalogued, **{"data.subset": "balanced", "data.per_class": 3, "data.seed": 5}) != chosen
    capsys.readouterr()
    more = query(catalogued, **{"data.subset": "balanced", "data.per_class": 6})
    assert [c for _, c in more].count(0) == 5 and [c for _, c in more].count(1) == 6
    assert "fewer than 6 bins of some counts (count: bins): 0: 5" in capsys.readouterr().out


def test_max_bins_is_a_seeded_sorted_sample_of_the_query(catalogued):
    whole = query(catalogued)
    sample = query(catalogued, **{"data.max_bins": 10})
    assert len(sample) == 10 and sample == sorted(sample) and set(sample) <= set(whole)
    assert query(catalogued, **{"data.max_bins": 10}) == sample
    assert query(catalogued, **{"data.max_bins": 10, "data.seed": 3}) != sample
    assert query(catalogued, **{"data.max_bins": 1000}) == whole


def test_a_query_streamed_from_the_file_a_row_group_at_a_time_is_the_whole_tables(tmp_path, monkeypatch):
    import bincounter.data.catalog as catalog

    monkeypatch.setattr(catalog, "ROW_GROUP", 5)
    base = {"data.subset": "all", "data.max_candidates": 0}
    build_catalog(config(tmp_path, **base))
    assert pq.ParquetFile(tmp_path / "catalog.parquet").num_row_groups == 10
    some = sorted(LABELS)[::4]
    manifest = str(write_manifest(tmp_path / "m.json", some + ["nosuch", "../x"]))
    for overrides, wanted in (({}, LABELS), ({"data.max_count": 2}, LABELS), ({"data.subset": manifest}, some),
                              ({"data.subset": "balanced", "data.per_class": 2}, None)):
        cfg = config(tmp_path, **{**base, **overrides})
        streamed = select(cfg)
        assert streamed == select(cfg, read_catalog(cfg.catalog))
        if wanted is not None:
            assert streamed == sorted((i, LABELS[i]) for i in wanted if LABELS[i] <= cfg.max_count)
        else:
            assert sorted(Counter(c for _, c in streamed).values()) == [2] * 6


def test_an_empty_query_is_one_line(catalogued):
    with pytest.raises(BincounterError, match="no bin of catalog .* matches"):
        query(catalogued, **{"data.id_range": "1-2"})
