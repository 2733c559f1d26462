"""gill.download against a tiny manifest: a local mirror and a loopback HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gill import download as dl
from gill.config import GILLArgs, resolve_source
from gill.errors import DownloadError, InputError

REPO_MODEL_ARGS = Path(__file__).resolve().parent.parent / "checkpoints" / "gill_opt" / "model_args.json"
WEIGHTS = bytes(range(256)) * 1024  # 256 KiB
CONFIG = b'{"hidden_size": 8}\n'
EMBEDDINGS = b"embeddings" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# name -> (repo, repo_type, path in repo, local path, content)
FILES = {
    "weights": ("org/model", "model", "weights.bin", "model/weights.bin", WEIGHTS),
    "config": ("org/model", "model", "sub/config.json", "model/sub/config.json", CONFIG),
    "embeddings": ("org/space", "space", "emb.npy", "emb.npy", EMBEDDINGS),
}


def write_manifest(tmp_path: Path, *, hashes: dict[str, str | None] | None = None, model_args: bool = False) -> Path:
    """A manifest of FILES (the embeddings behind the option), sha256 from ``hashes`` (default: the true ones)."""
    files = []
    for name, (repo, repo_type, path, local, content) in FILES.items():
        files.append({"repo": repo, "repo_type": repo_type, "revision": "main", "path": path, "local_path": local,
                      "sha256": (hashes or {}).get(name, sha(content)),
                      "option": "embeddings" if name == "embeddings" else None})
    data: dict = {"format": 1, "files": files}
    if model_args:
        files.append({"repo": "org/gill", "path": "model_args.json", "local_path": "model_args.official.json",
                      "sha256": sha(REPO_MODEL_ARGS.read_bytes())})
        data["model_args"] = {"source": "model_args.official.json",
                              "folders": {"opt_version": "model", "visual_encoder": "clip", "sd_version": "sd"}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def make_mirror(root: Path) -> Path:
    for repo, repo_type, path, _, content in FILES.values():
        target = root.joinpath(*(["spaces"] if repo_type == "space" else []), repo, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return root


class Server:
    """Serves FILES at hub URLs; records (method, path, Range) of every request."""

    def __init__(self) -> None:
        self.content = {}
        for repo, repo_type, path, _, content in FILES.values():
            self.content[f"/{'spaces/' if repo_type == 'space' else ''}{repo}/resolve/main/{path}"] = content
        self.honor_range = True
        self.linked_etag: dict[str, str] = {}  # URL path -> X-Linked-Etag, sent on a 302 to /cdn/..., like the hub
        self.fail_first: set[str] = set()  # URL paths answered 503 once
        self.cut_first: set[str] = set()  # URL paths whose first answer breaks off after half the body
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.respond(body=False)

            def do_GET(self) -> None:
                self.respond(body=True)

            def respond(self, body: bool) -> None:
                path = self.path
                server.requests.append((self.command, path, self.headers.get("Range"),
                                        self.headers.get("Authorization")))
                if path in server.fail_first:
                    server.fail_first.discard(path)
                    self.send_error(503)
                    return
                if path in server.linked_etag:
                    self.send_response(302)
                    self.send_header("Location", "/cdn" + path)
                    self.send_header("X-Linked-Etag", f'"{server.linked_etag[path]}"')
                    self.send_header("X-Repo-Commit", "0" * 40)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                content = server.content.get(path.removeprefix("/cdn"))
                if content is None:
                    self.send_error(404)
                    return
                if path in server.cut_first:
                    server.cut_first.discard(path)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content[:len(content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                start = 0
                if server.honor_range and self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(content) - start))
                self.end_headers()
                if body:
                    self.wfile.write(content[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url_path(self, name: str) -> str:
        repo, repo_type, path, _, _ = FILES[name]
        return f"/{'spaces/' if repo_type == 'space' else ''}{repo}/resolve/main/{path}"

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of a file."""
        return [r for method, path, r, _ in self.requests if method == "GET" and path == self.url_path(name)]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    running = Server()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)


def check_files(directory: Path, names=("weights", "config")) -> None:
    for name in names:
        _, _, _, local, content = FILES[name]
        assert sha(directory.joinpath(local).read_bytes()) == sha(content)
    assert not list(directory.rglob("*.part"))


def test_download_from_a_local_mirror(tmp_path):
    mirror = make_mirror(tmp_path / "mirror")
    target = tmp_path / "out"
    paths = dl.download(target, manifest=write_manifest(tmp_path), source_dir=mirror, quiet=True)
    assert paths == [target / "model/weights.bin", target / "model/sub/config.json"]
    check_files(target)
    assert not (target / "emb.npy").exists()  # the embeddings are behind an option
    lock = json.loads((target / dl.LOCK_FILE).read_text())["files"]
    assert lock["model/weights.bin"]["sha256"] == sha(WEIGHTS)
    assert lock["model/weights.bin"]["verified_by"] == "manifest"

    dl.download(target, manifest=write_manifest(tmp_path), source_dir=mirror, include_embeddings=True, quiet=True)
    check_files(target, names=("weights", "config", "embeddings"))


def test_mirror_missing_file_says_where_it_looked(tmp_path):
    mirror = make_mirror(tmp_path / "mirror")
    (mirror / "org/model/weights.bin").unlink()
    with pytest.raises(DownloadError, match=r"model/weights.bin.*not found.*<repo_id>/<path>"):
        dl.download(tmp_path / "out", manifest=write_manifest(tmp_path), source_dir=mirror, quiet=True)
    with pytest.raises(InputError):
        dl.download(tmp_path / "out", manifest=write_manifest(tmp_path), source_dir=mirror, endpoint="http://x")


def test_interrupted_download_resumes_with_range(tmp_path, server):
    target = tmp_path / "out"
    half = len(WEIGHTS) // 2
    (target / "model").mkdir(parents=True)
    (target / "model/weights.bin.part").write_bytes(WEIGHTS[:half])
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=False)
    check_files(target)
    assert server.gets("weights") == [f"bytes={half}-"]
    assert server.gets("config") == [None]


def test_connection_lost_mid_file_is_resumed(tmp_path, server, monkeypatch):
    monkeypatch.setattr(dl, "_CHUNK", 16 * 1024)  # what arrived in whole chunks before the cut is kept
    server.cut_first.add(server.url_path("weights"))
    target = tmp_path / "out"
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=True)
    check_files(target)
    first, second = server.gets("weights")
    assert first is None and second.startswith("bytes=")
    assert 0 < int(second.removeprefix("bytes=").rstrip("-")) <= len(WEIGHTS) // 2


def test_server_that_ignores_range_restarts_the_file(tmp_path, server):
    server.honor_range = False
    target = tmp_path / "out"
    (target / "model").mkdir(parents=True)
    (target / "model/weights.bin.part").write_bytes(b"garbage that must not stay in front")
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=True)
    check_files(target)
    assert server.gets("weights") == ["bytes=35-"]  # asked to resume, got 200 with the whole file


def test_wrong_sha256_raises_and_leaves_no_file(tmp_path, server):
    wrong = "ab" * 32
    target = tmp_path / "out"
    with pytest.raises(DownloadError) as caught:
        dl.download(target, manifest=write_manifest(tmp_path, hashes={"weights": wrong}), endpoint=server.endpoint,
                    quiet=True)
    message = str(caught.value)
    assert "model/weights.bin" in message and wrong in message and sha(WEIGHTS) in message
    assert not (target / "model/weights.bin").exists()
    assert not (target / "model/weights.bin.part").exists()


def test_null_sha256_taken_from_x_linked_etag(tmp_path, server):
    server.linked_etag[server.url_path("weights")] = sha(WEIGHTS)
    target = tmp_path / "out"
    manifest = write_manifest(tmp_path, hashes={"weights": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hash from the server is no first use
        dl.download(target, manifest=manifest, endpoint=server.endpoint, quiet=True)
    check_files(target)
    record = json.loads((target / dl.LOCK_FILE).read_text())["files"]["model/weights.bin"]
    assert record["verified_by"] == "x-linked-etag" and record["commit"] == "0" * 40

    server.linked_etag[server.url_path("weights")] = "cd" * 32
    other = tmp_path / "other"
    with pytest.raises(DownloadError, match=r"model/weights.bin.*expected sha256 (cd)+ \(from the x-linked-etag\)"):
        dl.download(other, manifest=manifest, endpoint=server.endpoint, quiet=True)
    assert not (other / "model/weights.bin").exists()


def test_null_sha256_without_header_is_trusted_on_first_use_then_enforced(tmp_path, server):
    target = tmp_path / "out"
    manifest = write_manifest(tmp_path, hashes={"weights": None})
    with pytest.warns(dl.UnverifiedDownloadWarning, match="model/weights.bin"):
        dl.download(target, manifest=manifest, endpoint=server.endpoint, quiet=True)
    record = json.loads((target / dl.LOCK_FILE).read_text())["files"]["model/weights.bin"]
    assert record["sha256"] == sha(WEIGHTS) and record["verified_by"] == "first-use"

    server.requests.clear()
    dl.download(target, manifest=manifest, endpoint=server.endpoint, quiet=True)  # verified against the lock
    assert server.requests == []

    (target / "model/weights.bin").write_bytes(b"damaged")  # the local copy is damaged, the upstream file changed
    server.content[server.url_path("weights")] = b"changed upstream"
    with pytest.raises(DownloadError, match=r"model/weights.bin.*from the lock"):
        dl.download(target, manifest=manifest, endpoint=server.endpoint, quiet=True)
    assert not (target / "model/weights.bin.part").exists()


def test_rerun_skips_files_already_present(tmp_path, server):
    target = tmp_path / "out"
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=True)
    server.requests.clear()
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=False)
    assert server.requests == []
    (target / "model/sub/config.json").write_bytes(b"edited")
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=True)
    assert server.gets("config") == [None] and server.gets("weights") == []
    check_files(target)


def test_endpoint_and_token_from_the_environment_and_spaces_urls(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", "secret")
    target = tmp_path / "out"
    dl.download(target, manifest=write_manifest(tmp_path), include_embeddings=True, quiet=True)
    check_files(target, names=("weights", "config", "embeddings"))
    assert server.gets("embeddings") == [None]  # fetched from /spaces/org/space/resolve/main/emb.npy
    assert {auth for *_, auth in server.requests} == {"Bearer secret"}


def test_transient_errors_are_retried_and_missing_files_explained(tmp_path, server):
    server.fail_first.add(server.url_path("weights"))
    target = tmp_path / "out"
    dl.download(target, manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=True)
    check_files(target)
    assert server.gets("weights") == [None, None]

    del server.content[server.url_path("config")]
    with pytest.raises(DownloadError, match=r"HTTP 404.*manifest"):
        dl.download(tmp_path / "again", manifest=write_manifest(tmp_path), endpoint=server.endpoint, quiet=True)


def test_real_manifest_parses_and_covers_the_release():
    manifest = dl.load_manifest()
    assert dl.MANIFEST_PATH.parts[-3:] == ("gill", "data", "manifest.json")
    for entry in manifest.files:
        assert entry.repo and entry.path and entry.local_path and entry.revision
        assert entry.repo_type in dl.REPO_TYPES
        assert not Path(entry.local_path).is_absolute() and ".." not in Path(entry.local_path).parts
    repos = {entry.repo for entry in manifest.files}
    assert repos == {"facebook/opt-6.7b", "openai/clip-vit-large-patch14",
                     "stable-diffusion-v1-5/stable-diffusion-v1-5", "jykoh/gill"}
    locals_ = {entry.local_path: entry for entry in manifest.files}
    for name in ("pretrained_ckpt.pth.tar", "decision_model.pth.tar", "model_args.official.json"):
        assert locals_[name].repo == "jykoh/gill" and locals_[name].repo_type == "model"
    embeddings = locals_["cc3m_embeddings_urls.npy"]
    assert (embeddings.repo_type, embeddings.option) == ("space", "embeddings")
    safety = {e.local_path for e in manifest.files if e.option == "safety_checker"}
    assert safety and all(p.startswith("sd-v1-5/safety_checker/") for p in safety)
    default = dl.selected_entries(manifest)
    assert all(e.option is None for e in default)
    assert "sd-v1-5/unet/diffusion_pytorch_model.fp16.safetensors" in {e.local_path for e in default}
    assert all(e.path.endswith((".json", ".txt", ".safetensors", ".pth.tar", ".npy")) for e in manifest.files)
    folders = dict(manifest.model_args.folders)
    assert folders == {"opt_version": "opt-6.7b", "visual_encoder": "clip-vit-large-patch14", "sd_version": "sd-v1-5"}
    for folder in folders.values():
        assert any(p.startswith(folder + "/") for p in locals_)
    assert dl.hub_url(embeddings) == "https://huggingface.co/spaces/jykoh/gill/resolve/main/cc3m_embeddings_urls.npy"


def test_bad_manifests_are_refused(tmp_path):
    path = tmp_path / "bad.json"
    entry = {"repo": "org/model", "path": "a.bin", "local_path": "../escape.bin"}
    path.write_text(json.dumps({"format": 1, "files": [entry]}))
    with pytest.raises(DownloadError, match=r"files\[0\].*local_path"):
        dl.load_manifest(path)
    path.write_text(json.dumps({"format": 1, "files": [{**entry, "local_path": "a.bin", "option": "typo"}]}))
    with pytest.raises(DownloadError, match="option"):
        dl.load_manifest(path)


def test_model_args_points_at_the_downloaded_folders(tmp_path):
    mirror = make_mirror(tmp_path / "mirror")
    official = mirror / "org/gill/model_args.json"
    official.parent.mkdir(parents=True)
    official.write_bytes(REPO_MODEL_ARGS.read_bytes())
    target = tmp_path / "out"
    paths = dl.download(target, manifest=write_manifest(tmp_path, model_args=True), source_dir=mirror, quiet=True)
    assert paths[-1] == target / "model_args.json"
    args = GILLArgs.load(target)
    assert (args.opt_version, args.visual_encoder, args.sd_version) == ("model", "clip", "sd")
    reference = GILLArgs.load(REPO_MODEL_ARGS)
    assert args.gen_token_idx == reference.gen_token_idx and args.ret_emb_dim == reference.ret_emb_dim
    assert resolve_source(args.opt_version, target) == str(target / "model")
    assert (target / "model_args.official.json").read_bytes() == REPO_MODEL_ARGS.read_bytes()
