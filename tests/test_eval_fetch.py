"""`gill eval fetch-vist` against a real loopback HTTP server (127.0.0.1, a free port, daemon threads) serving the
synthetic VIST fixture's photos, a 404, a slow URL, an oversized file, a truncated body, a flaky 503 and garbage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from loopback_http import LoopbackServer, QuietHandler, serving
from PIL import Image
from typer.testing import CliRunner

from gill.cli import app
from gill.errors import InputError
from gill.evaluation import fetch_vist as fetch_vist_module
from gill.evaluation.datasets import ImageFolder, read_vist_sis, squash, write_vist_fixture
from gill.evaluation.fetch_vist import FetchSettings, fetch_vist_photos

MAX_BYTES = 200_000
TIMEOUT_S = 1.0  # per URL: ample for a loopback PNG on a busy machine
SLOW_S = 6.0  # far beyond it


class Server(LoopbackServer):
    def __init__(self, photos: Path) -> None:
        super().__init__(Handler)
        self.photos = photos


class Handler(QuietHandler):
    server: Server

    def do_GET(self) -> None:
        hits = self.server.count(self.path)
        route, _, name = self.path.strip("/").partition("/")
        if route == "photo":
            self.reply(200, "image/png", (self.server.photos / name).read_bytes())
        elif route == "slow":
            self.server.stop.wait(SLOW_S)
            self.reply(200, "image/png", (self.server.photos / name).read_bytes())
        elif route == "big":
            self.reply(200, "image/png", b"\0" * (MAX_BYTES + 100_000))
        elif route == "truncated":  # promises 50 kB, sends 100 bytes and hangs up
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "50000")
            self.end_headers()
            self.wfile.write((self.server.photos / name).read_bytes()[:100])
            self.wfile.flush()
            self.close_connection = True
        elif route == "flaky":  # 503 the first time, the photo after
            if hits == 1:
                self.reply(503, "text/plain", b"busy")
            else:
                self.reply(200, "image/png", (self.server.photos / name).read_bytes())
        elif route == "garbage":
            self.reply(200, "image/png", b"this is not a PNG" * 10)
        else:
            self.reply(404, "text/plain", b"no such file")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The fixture split (2 stories, 10 photos, all on disk): the server's photos."""
    return write_vist_fixture(tmp_path_factory.mktemp("vist-source"), stories=2, missing=0)


@pytest.fixture
def server(source):
    with serving(Server(source.parent / "val_images")) as httpd:
        yield httpd


# Photo index in the split -> (kind, URL fields): what each photo's images entry points at.
PLAN = {0: "fallback", 1: "missing", 2: "slow", 3: "big", 4: "truncated", 5: "flaky", 6: "garbage", 7: "no-url",
        8: "photo", 9: "photo"}
FETCHED = {0, 5, 8, 9}


def served_split(source: Path, server: Server, directory: Path) -> tuple[Path, list[str]]:
    """The fixture's JSON with each photo's URLs pointed at the loopback server as PLAN says."""
    data = json.loads(source.read_text())
    ids = [image["id"] for image in data["images"]]
    for index, image in enumerate(data["images"]):
        kind, name = PLAN[index], f"{image['id']}.png"
        del image["url_o"]
        if kind == "fallback":  # url_o is dead, url_m answers
            image["url_o"], image["url_m"] = server.url(f"/missing/{name}"), server.url(f"/photo/{name}")
        elif kind != "no-url":
            image["url_o"] = server.url(f"/{kind}/{name}")
    path = directory / "val.story-in-sequence.json"
    path.write_text(json.dumps(data))
    return path, ids


def fetch_command(sis: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["eval", "fetch-vist", str(sis), "--out", str(out), "--timeout", str(TIMEOUT_S),
                                    "--retries", "1", "--max-bytes", str(MAX_BYTES), "--workers", "4", "--quiet",
                                    *extra])


def test_fetch_counts_files_report_and_resume(tmp_path, source, server):
    sis, ids = served_split(source, server, tmp_path)
    out = tmp_path / "images"
    out.mkdir()
    (out / f"{ids[8]}.png.part").write_bytes(b"half a photo from an interrupted run")  # must not count as done

    first = fetch_command(sis, out, "--allow-private-addresses")
    assert first.exit_code == 0, first.output
    assert "10 photos: 0 already present, 4 fetched, 6 failed (1 without a URL); 3 retries; 1 from a smaller" \
        in first.stdout

    # Files: the fetched photos, squashed to 224x224 as the reference, pixel for pixel; nothing else.
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{ids[i]}.png" for i in FETCHED] + ["missing.json"])
    for index in FETCHED:
        original = Image.open(source.parent / "val_images" / f"{ids[index]}.png")
        saved = Image.open(out / f"{ids[index]}.png")
        assert saved.size == (224, 224)
        assert np.array_equal(np.asarray(saved), np.asarray(squash(original)))
    folder = ImageFolder(out)  # what the eval commands read
    assert [folder.load(image_id) is not None for image_id in ids] == [i in FETCHED for i in range(10)]

    report = json.loads((out / "missing.json").read_text())
    reasons = {entry["id"]: entry["reason"] for entry in report["missing"]}
    assert report["photos"] == 10 and report["failed"] == 6 and list(reasons) == [ids[i] for i in (1, 2, 3, 4, 6, 7)]
    assert reasons[ids[1]].endswith("HTTP 404")
    assert reasons[ids[2]].endswith(f"timed out after {TIMEOUT_S:g} s")
    assert reasons[ids[3]].endswith(f"body over {MAX_BYTES} bytes")
    assert "transfer failed" in reasons[ids[4]] or "timed out" in reasons[ids[4]]
    assert "not a decodable image" in reasons[ids[6]]
    assert reasons[ids[7]].startswith("no URL in the split")
    # Retried only what may pass: the slow and truncated URLs twice, the 404 once; the flaky one got its photo.
    hits = server.hits
    assert hits[f"/slow/{ids[2]}.png"] == 2 and hits[f"/truncated/{ids[4]}.png"] == 2
    assert hits[f"/missing/{ids[1]}.png"] == 1 and hits[f"/big/{ids[3]}.png"] == 1
    assert hits[f"/flaky/{ids[5]}.png"] == 2

    # Resume: what is there is skipped (no request for it); the failures are tried again and still fail.
    before = Counter(hits)
    second = fetch_command(sis, out, "--allow-private-addresses")
    assert second.exit_code == 0, second.output
    assert "10 photos: 4 already present, 0 fetched, 6 failed" in second.stdout
    assert all(hits[f"/photo/{ids[i]}.png"] == before[f"/photo/{ids[i]}.png"] for i in (0, 8, 9))
    assert hits[f"/flaky/{ids[5]}.png"] == before[f"/flaky/{ids[5]}.png"]


def test_private_addresses_are_refused_by_default(tmp_path, source, server):
    sis, ids = served_split(source, server, tmp_path)
    out = tmp_path / "images"
    result = fetch_command(sis, out, "--max-photos", "2")
    assert result.exit_code == 1 and "no photo could be fetched" in result.output
    report = json.loads((out / "missing.json").read_text())
    assert [entry["id"] for entry in report["missing"]] == ids[:2]
    assert all("blocked address 127.0.0.1 (loopback)" in entry["reason"] for entry in report["missing"])
    assert sum(server.hits.values()) == 0 and not list(out.glob("*.png"))


def test_an_interrupted_write_leaves_no_photo(tmp_path, source, server, monkeypatch):
    sis, ids = served_split(source, server, tmp_path)
    split, out = read_vist_sis(sis), tmp_path / "images"
    settings = FetchSettings(workers=2, timeout_s=TIMEOUT_S, max_photos=9, allow_private=True, backoff_s=0.0)
    original_save = Image.Image.save

    def save_half_then_fail(image, target, *args, **kwargs):
        original_save(image, target, *args, **kwargs)
        Path(target).write_bytes(Path(target).read_bytes()[:50])  # half written when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        fetch_vist_photos(split, out, settings, progress=False)
    assert not list(out.glob("*.png")) and not list(out.glob("*.part"))  # neither as done nor as debris
    monkeypatch.setattr(Image.Image, "save", original_save)
    summary = fetch_vist_photos(split, out, settings, progress=False)
    assert (summary.fetched, summary.present) == (3, 0)  # photos 0, 5, 8 of the first nine
    assert len(list(out.glob("*.png"))) == 3


def test_bad_settings_and_unsafe_ids(tmp_path, source):
    for bad in ({"workers": 0}, {"timeout_s": 0}, {"retries": -1}, {"max_bytes": 0}, {"max_photos": 0},
                {"size": -1}):
        with pytest.raises(InputError):
            FetchSettings(**bad)
    data = json.loads(source.read_text())
    data["annotations"][0][0]["photo_flickr_id"] = "../../escape"
    data["images"][0]["id"] = "../../escape"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    summary = fetch_vist_photos(read_vist_sis(tmp_path / "bad.json"), tmp_path / "images",
                                FetchSettings(max_photos=1), progress=False)
    assert summary.failed == 1 and summary.missing[0]["reason"] == "photo id is not a safe file name"
    assert not (tmp_path / "escape.png").exists()
    bad = CliRunner().invoke(app, ["eval", "fetch-vist", str(tmp_path / "absent.json"), "--quiet"])
    assert bad.exit_code == 2 and "no such file" in bad.output
    assert fetch_vist_module.MISSING_FILE == "missing.json"
