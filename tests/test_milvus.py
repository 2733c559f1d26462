"""Retrieval on Milvus (real milvus-lite): ingest formats, idempotent and resumable ingest, bad files, served
retrieval through Milvus, dead URLs falling back, and a Milvus server going down and coming back."""

from __future__ import annotations

import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gill.components import LocalComponents
from gill.errors import InputError
from gill.events import ImageResult, Notice
from gill.fetch import FetchPolicy, ImageFetcher
from gill.images import png_bytes
from gill.milvus import DB_FILE, Corpus, MilvusRetriever, connect, disconnect, ingest, read_corpus
from gill.options import GenerationOptions
from gill.pipeline import Pipeline
from gill.retrieval import ExactRetriever, Hit, ImageStore, RetrievalFailed, RetrievalUnavailable
from gill.serving.server import free_port
from gill.tiny import shape_image


@pytest.fixture(scope="module")
def official(tiny_dir):
    return tiny_dir / "cc3m_embeddings_urls.npy"


def _unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _count(uri, collection="gill_cc3m"):
    client = connect(uri)
    try:
        rows = client.query(collection, filter="id >= 0", output_fields=["id"], limit=16384)
        return len(rows), len({r["id"] for r in rows})
    finally:
        disconnect(client, uri)


def test_the_official_pickle_ingests_and_searches_like_the_reference(official, tmp_path):
    uri = str(tmp_path / DB_FILE)
    corpus = read_corpus(official)
    assert corpus.captions[0] and corpus.urls[0].startswith("retrieval_images/")  # captions from the json beside it
    report = ingest(corpus, uri, progress=False)
    assert (report.rows, report.written, report.total, report.index) == (len(corpus), len(corpus), len(corpus), "FLAT")
    exact = ExactRetriever(corpus.vectors, corpus.urls, 2.0)
    milvus = MilvusRetriever(uri, logit_scale=2.0)
    try:
        queries = _unit(corpus.vectors[:4] + 0.01)
        for got, expected in zip(milvus.search(queries, 3, frozenset({1})), exact.search(queries, 3, frozenset({1}))):
            assert [h.id for h in got] == [h.id for h in expected]
            assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-4)
            assert 1 not in [h.id for h in got] and got[0].caption
    finally:
        milvus.close()


def test_the_open_format_keeps_ids_urls_and_captions(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([10, 20, 30, 40])
    np.savez(tmp_path / "corpus.npz", ids=ids, urls=np.array([f"https://example.com/{i}.jpg" for i in ids]),
             captions=np.array(["a", "b", "c", "d"]), vectors=rng.standard_normal((4, 8)).astype(np.float32))
    corpus = read_corpus(tmp_path / "corpus.npz")
    uri = str(tmp_path / DB_FILE)
    ingest(corpus, uri, collection="open", progress=False)
    milvus = MilvusRetriever(uri, "open")
    try:
        [hits] = milvus.search(_unit(corpus.vectors[2:3]), 2)
    finally:
        milvus.close()
    assert hits[0] == Hit(30, "https://example.com/30.jpg", pytest.approx(1.0, abs=1e-5), "c")


def test_a_rerun_writes_nothing_and_an_interrupted_ingest_resumes(official, tmp_path, monkeypatch):
    from pymilvus import MilvusClient

    corpus = read_corpus(official)
    uri = str(tmp_path / DB_FILE)
    calls = {"n": 0}
    real_insert = MilvusClient.insert

    def failing_insert(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("the network went away")
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(MilvusClient, "insert", failing_insert)
    with pytest.raises(ConnectionError):
        ingest(corpus, uri, batch_bytes=4096, progress=False)  # 3 rows a batch: stops after 6 rows
    monkeypatch.undo()
    resumed = ingest(corpus, uri, batch_bytes=4096, progress=False)
    assert resumed.skipped == 6 and resumed.written == len(corpus) - 6
    again = ingest(corpus, uri, batch_bytes=4096, progress=False)
    assert again.written == 0 and again.skipped == len(corpus)
    assert _count(uri) == (len(corpus), len(corpus))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bad_files(tmp_path):
    urls = np.array(["a.png", "b.png"])
    good = np.ones((2, 4), dtype=np.float32)
    nan = good.copy()
    nan[1, 2] = np.nan
    zero = good.copy()
    zero[0] = 0
    evil = tmp_path / "evil.npy"
    evil.write_bytes(pickle.dumps({"paths": ["a"], "embeddings": __import__("os").system}))
    return [
        (_npz(tmp_path / "nan.npz", urls=urls, vectors=nan), "NaN or infinity (first at row 1)"),
        (_npz(tmp_path / "zero.npz", urls=urls, vectors=zero), "all zeros (first at row 0)"),
        (_npz(tmp_path / "short.npz", urls=urls[:1], vectors=good), "expected [1, D]"),
        (_npz(tmp_path / "novectors.npz", urls=urls), "needs 'vectors'"),
        (_npz(tmp_path / "dupes.npz", urls=urls, vectors=good, ids=np.array([3, 3])), "unique"),
        (_npz(tmp_path / "objects.npz", urls=np.array(["a", None], dtype=object), vectors=good), "plain-array"),
        (evil, "refused to load global"),
        (tmp_path / "corpus.csv", "unknown corpus format"),
        (tmp_path / "missing.npz", "no such file"),
    ]


def test_bad_files_are_refused_with_the_reason(tmp_path):
    (tmp_path / "corpus.csv").write_text("id,url\n")
    for path, message in _bad_files(tmp_path):
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            read_corpus(path)


def test_a_collection_of_another_dimension_is_refused(tmp_path):
    uri = str(tmp_path / DB_FILE)
    ingest(Corpus(np.arange(2), ["a", "b"], ["", ""], np.eye(2, 4, dtype=np.float32)), uri, progress=False)
    with pytest.raises(InputError, match="holds 4-d vectors; this corpus is 8-d"):
        ingest(Corpus(np.arange(2), ["a", "b"], ["", ""], np.eye(2, 8, dtype=np.float32)), uri, progress=False)


def test_the_served_retrieval_model_searches_milvus(server, served_dir):
    log = server.log_path.read_text()
    assert f"retrieval: milvus {served_dir / DB_FILE} collection gill_cc3m" in log


class _Images(BaseHTTPRequestHandler):
    png = png_bytes(shape_image("red", "circle", "white", 32))

    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path.startswith("/good"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _store():
    return ImageStore(None, ImageFetcher(FetchPolicy(timeout_s=2, allow_private=True)))


def test_a_dead_url_falls_back_to_the_next_hit(image_server):
    hits = [Hit(1, f"{image_server}/dead.png", 9.0), Hit(2, f"{image_server}/good.png", 8.0)]
    hit, image = _store().first(hits)
    assert hit.id == 2 and image.size == (32, 32)
    with pytest.raises(RetrievalFailed, match="HTTP 404.*HTTP 404"):
        _store().first([Hit(1, f"{image_server}/dead.png", 9.0), Hit(3, f"{image_server}/gone.png", 8.0)])
    blocked = ImageStore(None, ImageFetcher(FetchPolicy(timeout_s=2)))  # the default refuses loopback
    with pytest.raises(RetrievalFailed, match="loopback"):
        blocked.first(hits)


class _FixedHits:
    """A retriever whose search always answers these hits (the fetching under test is real)."""

    def __init__(self, hits):
        self.hits = hits

    def search(self, vectors, k, exclude=frozenset()):
        return [self.hits[:k]]


def _turn(pipeline, retriever, store):
    components = pipeline.components
    local = Pipeline(LocalComponents(components.model, retriever, components.generator, store))
    options = GenerationOptions(ret_scale_factor=1e5, max_new_tokens=1, num_inference_steps=2, seed=0)
    return local.run(["find a photo of a cat"], options)


def test_when_every_url_is_dead_the_turn_generates_and_says_so(pipeline, decision_bias, image_server):
    decision_bias("ret")
    dead = _FixedHits([Hit(1, f"{image_server}/dead.png", 9.0), Hit(2, f"{image_server}/gone.png", 8.0)])
    result = _turn(pipeline, dead, _store())
    [notice] = [e for e in result.events if isinstance(e, Notice)]
    assert notice.code == "retrieval_failed" and "HTTP 404" in notice.message and "generating instead" in notice.message
    assert [i.source for i in result.images] == ["generated"] and result.images[0].decision == "ret"
    alive = _turn(pipeline, _FixedHits([Hit(1, f"{image_server}/dead.png", 9.0),
                                        Hit(2, f"{image_server}/good.png", 8.0)]), _store())
    assert [(i.source, i.url) for i in alive.images] == [("retrieved", f"{image_server}/good.png")]


def _milvus_server(db, port):
    from milvus_lite.server import Server

    server = Server(str(db), f"127.0.0.1:{port}")
    assert server.init() and server.start(), "milvus-lite did not start"
    return server


def test_milvus_down_and_back(official, tmp_path, pipeline, decision_bias):
    db = tmp_path / "cc3m.db"
    ingest(read_corpus(official), str(db), progress=False)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _milvus_server(db, port)
    retriever = MilvusRetriever(uri, logit_scale=1.0)
    query = _unit(read_corpus(official).vectors[:1])
    try:
        deadline = time.monotonic() + 30
        while True:  # the server takes a moment to listen
            try:
                assert retriever.search(query, 1)[0][0].id == 0
                break
            except RetrievalUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        server.stop()
        started = time.monotonic()
        with pytest.raises(RetrievalUnavailable, match=f"Milvus at {uri}"):
            retriever.search(query, 1)
        assert time.monotonic() - started < 30
        # A turn that wants retrieval still completes, with generation and a notice.
        decision_bias("ret")
        result = _turn(pipeline, retriever, ImageStore(official.parent))
        assert [e.code for e in result.events if isinstance(e, Notice)] == ["retrieval_unavailable"]
        assert [i.source for i in result.images] == ["generated"]
        server = _milvus_server(db, port)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert retriever.search(query, 1)[0][0].id == 0
                break
            except RetrievalUnavailable:
                assert time.monotonic() < deadline, "retrieval never recovered after Milvus came back"
                time.sleep(0.5)
        result = _turn(pipeline, retriever, ImageStore(official.parent))
        assert [i.source for i in result.images] == ["retrieved"] and isinstance(result.images[0], ImageResult)
    finally:
        retriever.close()
        server.stop()
