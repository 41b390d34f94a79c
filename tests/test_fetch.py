"""Stage fetch against a real moto_server bucket laid out like s3://aft-vbi-pds."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from conftest import empty_params, FIXTURES, SOURCE_BUCKET, fixture_labels, make_config, public_read, seed_bucket, write_manifest

from bincounter.cli import main
from bincounter.errors import BincounterError
from bincounter.data.fetch import fetch, read_manifest
from bincounter.storage import s3_client


def s3_config(tmp_path, ids, **overrides):
    return make_config(tmp_path, **{"data.source": f"s3://{SOURCE_BUCKET}",
                                    "data.subset": str(write_manifest(tmp_path / "m.json", ids)), **overrides})


def raw_files(config) -> dict[str, Path]:
    raw = Path(config.data.raw_dir)
    return {p.name: p for p in list((raw / "bin-images").iterdir()) + list((raw / "metadata").iterdir())}


def test_fetch_downloads_every_bin_from_s3(aws, tmp_path):
    ids = seed_bucket()
    config = s3_config(tmp_path, ids)
    report = fetch(config.data)
    assert report.ids_with("ok") == ids
    assert report.downloaded_files == 2 * len(ids)
    for image_id in ids:
        assert (Path(config.data.raw_dir) / "bin-images" / f"{image_id}.jpg").read_bytes() == \
            (FIXTURES / "bin-images" / f"{image_id}.jpg").read_bytes()
    index = (Path(config.data.raw_dir) / "index.csv").read_text().splitlines()
    assert index[0] == "image_id,status,reason" and len(index) == len(ids) + 1


def test_rerun_downloads_only_what_is_missing(aws, tmp_path):
    ids = seed_bucket()
    config = s3_config(tmp_path, ids)
    fetch(config.data)
    before = {name: p.stat().st_mtime_ns for name, p in raw_files(config).items()}
    removed = [f"{i}.jpg" for i in ids[:3]]
    for name in removed:
        (Path(config.data.raw_dir) / "bin-images" / name).unlink()
    report = fetch(config.data)
    assert report.downloaded_files == 3
    after = {name: p.stat().st_mtime_ns for name, p in raw_files(config).items()}
    assert {n for n in after if after[n] != before.get(n)} == set(removed)


def test_string_ids_keep_leading_zeros(aws, tmp_path):
    client = s3_client()
    client.create_bucket(Bucket=SOURCE_BUCKET)
    public_read(client, SOURCE_BUCKET)
    a, b = list(fixture_labels())[:2]
    for image_id, source in (("523", a), ("00523", b)):
        client.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{image_id}.jpg",
                          Body=(FIXTURES / "bin-images" / f"{source}.jpg").read_bytes())
        client.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json",
                          Body=(FIXTURES / "metadata" / f"{source}.json").read_bytes())
    config = s3_config(tmp_path, ["523", "00523"])
    fetch(config.data)
    raw = Path(config.data.raw_dir) / "bin-images"
    assert (raw / "523.jpg").read_bytes() == (FIXTURES / "bin-images" / f"{a}.jpg").read_bytes()
    assert (raw / "00523.jpg").read_bytes() == (FIXTURES / "bin-images" / f"{b}.jpg").read_bytes()


def test_bad_objects_are_rejected_with_the_reason(aws, tmp_path):
    ids = seed_bucket()
    client = s3_client()
    good = (FIXTURES / "bin-images" / f"{ids[0]}.jpg").read_bytes()
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{ids[0]}.jpg", Body=good[: len(good) // 2])
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{ids[1]}.jpg", Body=b"\xff\xd8garbage" * 50)
    client.delete_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{ids[2]}.json")
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{ids[3]}.json", Body=b'{"EXPECTED_QUANTITY": ')
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{ids[4]}.json", Body=b'{"BIN_FCSKU_DATA": {}}')
    config = s3_config(tmp_path, ids + ["nosuchbin"])
    report = fetch(config.data)
    reasons = {i: r for i, (s, r) in report.statuses.items() if s == "rejected"}
    assert set(reasons) == {ids[0], ids[1], ids[2], ids[3], ids[4], "nosuchbin"}
    assert "corrupt JPEG" in reasons[ids[0]] and reasons[ids[1]] == "not an image"
    assert reasons[ids[2]] == f"missing from source: metadata/{ids[2]}.json"
    assert reasons[ids[3]] == "malformed metadata JSON"
    assert reasons[ids[4]] == "metadata has no EXPECTED_QUANTITY"
    raw = Path(config.data.raw_dir)
    assert not (raw / "bin-images" / f"{ids[0]}.jpg").exists()  # nothing broken is kept
    assert not list(raw.rglob("*.part"))


def test_manifest_formats_and_errors(tmp_path):
    udacity = tmp_path / "file_list.json"
    udacity.write_text(json.dumps({"1": ["data/metadata/00523.json", "data/metadata/523.json"], "2": []}))
    assert read_manifest(udacity) == ["00523", "523"]
    text = tmp_path / "ids.csv"
    text.write_text("image_id\n007\n7\n")
    assert read_manifest(text) == ["007", "7"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"1": [')
    with pytest.raises(BincounterError, match="not valid JSON"):
        read_manifest(broken)


def test_cli_reports_a_bad_manifest_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    code = main(["fetch", "--params", empty_params(tmp_path), "--set", f"data.subset={broken}",
                 "--set", f"data.raw_dir={tmp_path / 'raw'}", "--set", f"data.source={FIXTURES}"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: manifest") and "not valid JSON" in err and "\n" not in err


def test_balanced_sampling_finds_per_class(aws, tmp_path):
    seed_bucket()
    config = make_config(tmp_path, **{"data.source": f"s3://{SOURCE_BUCKET}", "data.subset": "balanced",
                                      "data.per_class": 3, "data.max_count": 5})
    report = fetch(config.data)
    labels = fixture_labels()
    chosen = report.ids_with("ok")
    assert sorted(labels[i] for i in chosen) == sorted(list(range(6)) * 3)
    manifest = json.loads((Path(config.data.raw_dir) / "manifest.json").read_text())
    assert manifest["ids"] == list(report.statuses)


class CuttingProxy:
    """A TCP proxy to the emulator that dies for good after passing `limit` bytes back: the endpoint
    going away in the middle of a download."""

    def __init__(self, upstream_port: int, limit: int):
        self.limit, self.sent, self.dead = limit, 0, False
        self.upstream_port = upstream_port
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.dead:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, counted):
        try:
            while not self.dead:
                data = src.recv(65536)
                if not data:
                    break
                if counted:
                    with self.lock:
                        self.sent += len(data)
                        if self.sent > self.limit:
                            self.kill()
                            dst.sendall(data[: len(data) // 2])  # half a response, then nothing
                            return
                dst.sendall(data)
        except OSError:
            pass

    def kill(self):
        self.dead = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_endpoint_going_away_mid_fetch_then_resume(aws, tmp_path, monkeypatch):
    ids = seed_bucket()
    total = sum((FIXTURES / "bin-images" / f"{i}.jpg").stat().st_size for i in ids)
    proxy = CuttingProxy(aws.port, limit=total // 3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    config = s3_config(tmp_path, ids, **{"data.workers": 4})
    with pytest.raises(BincounterError, match="rerun to resume"):
        fetch(config.data)
    raw = Path(config.data.raw_dir)
    assert not list(raw.rglob("*.part"))
    kept = {p.name: p.stat().st_mtime_ns for p in (raw / "bin-images").iterdir()}
    assert 0 < len(kept) < len(ids)
    for name in kept:  # whatever survived is whole
        assert (raw / "bin-images" / name).read_bytes() == (FIXTURES / "bin-images" / name).read_bytes()
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    report = fetch(config.data)
    assert report.ids_with("ok") == ids
    images_fetched = len(ids) - len(kept)
    assert report.downloaded_files >= images_fetched
    assert {p.name: p.stat().st_mtime_ns for p in (raw / "bin-images").iterdir() if p.name in kept} == kept
