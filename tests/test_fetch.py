"""gill.fetch against a real loopback HTTP server (127.0.0.1, an ephemeral port, a daemon thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from loopback_http import LoopbackServer, QuietHandler, serving
from PIL import Image

from gill import fetch as fetch_module
from gill.errors import GillError
from gill.fetch import FetchError, FetchPolicy, FetchResult, ImageFetcher
from gill.images import load_image, png_bytes

PNG = png_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))
# The loopback server is a private address: every test that talks to it has to allow that.
LOCAL = FetchPolicy(allow_private=True, timeout_s=2.0)


class Server(LoopbackServer):
    def __init__(self) -> None:
        super().__init__(Handler)
        self.drip_aborted = threading.Event()  # the client hung up on /drip


class Handler(QuietHandler):
    server: Server

    def do_GET(self) -> None:
        self.server.count(self.path)
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if "delay" in query:
            self.server.stop.wait(float(query["delay"]))
        route = parts.path.strip("/")
        if route == "png":
            self.reply(200, "image/png", PNG)
        elif route == "bytes":  # an "image" of n bytes, with its Content-Length
            self.reply(200, "image/png", b"\0" * int(query["n"]))
        elif route == "chunked":  # n bytes with no Content-Length
            self.chunked(int(query["n"]))
        elif route == "html":
            self.reply(200, "text/html; charset=utf-8", b"<html>not found, but 200</html>")
        elif route == "redirect":
            self.redirect(query["to"])
        elif route == "loop":  # n redirects, then the PNG
            n = int(query["n"])
            if n == 0:
                self.reply(200, "image/png", PNG)
            else:
                delay = f"&delay={query['delay']}" if "delay" in query else ""
                self.redirect(f"/loop?n={n - 1}{delay}&tag={query.get('tag', '')}")
        elif route == "drip":  # headers at once, then one byte every 0.1 s
            self.drip()
        else:
            self.reply(404, "text/plain", b"no such file")

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def chunked(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b"\1" * 16384
        sent = 0
        while sent < size:
            part = piece[: size - sent]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            sent += len(part)
        self.wfile.write(b"0\r\n\r\n")

    def drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                if self.server.stop.wait(0.1):
                    return
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:
            self.server.drip_aborted.set()
            raise


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serving(Server()) as httpd:
        yield httpd


@pytest.fixture
def fetcher() -> Iterator[ImageFetcher]:
    with ImageFetcher(LOCAL) as instance:
        yield instance


def reason_of(fetcher: ImageFetcher, url: str) -> str:
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(url)
    assert caught.value.url == url
    assert caught.value.reason in str(caught.value)
    return caught.value.reason


def test_fetches_a_png(server: Server, fetcher: ImageFetcher) -> None:
    data = fetcher.fetch(server.url("/png?tag=basic"))
    assert data == PNG
    assert load_image(data).size == (8, 8)
    assert issubclass(FetchError, GillError)


@pytest.mark.parametrize("path", ["/png?delay=10&tag=headers", "/drip?tag=body", "/loop?n=3&delay=0.4&tag=hops"],
                         ids=["slow-headers", "dripping-body", "slow-redirects"])
def test_the_deadline_covers_the_whole_url(server: Server, path: str) -> None:
    # Each socket read of the dripping body and each hop of the redirects is well within the timeout: only a
    # deadline for the whole URL stops them.
    with ImageFetcher(FetchPolicy(allow_private=True, timeout_s=1.0)) as fetcher:
        start = time.monotonic()
        assert reason_of(fetcher, server.url(path)) == "timed out after 1 s"
        assert 0.9 <= time.monotonic() - start < 2.0


def test_an_oversized_body_is_refused_from_its_content_length(server: Server) -> None:
    with ImageFetcher(FetchPolicy(allow_private=True, max_bytes=1000)) as fetcher:
        assert len(fetcher.fetch(server.url("/bytes?n=1000"))) == 1000
        assert reason_of(fetcher, server.url("/bytes?n=2000000")) == "body over 1000 bytes"


def test_an_oversized_chunked_body_is_refused_while_streaming(server: Server) -> None:
    with ImageFetcher(FetchPolicy(allow_private=True, max_bytes=100_000)) as fetcher:
        assert len(fetcher.fetch(server.url("/chunked?n=100000"))) == 100_000
        assert reason_of(fetcher, server.url("/chunked?n=5000000")) == "body over 100000 bytes"


def test_an_html_page_is_not_an_image(server: Server, fetcher: ImageFetcher) -> None:
    assert reason_of(fetcher, server.url("/html")) == "not an image (text/html)"


def test_a_missing_file_is_http_404(server: Server, fetcher: ImageFetcher) -> None:
    assert reason_of(fetcher, server.url("/gone.png")) == "HTTP 404"


def test_loopback_is_blocked_by_default(server: Server) -> None:
    url = server.url("/png?tag=blocked")
    with ImageFetcher() as fetcher:
        assert reason_of(fetcher, url) == "blocked address 127.0.0.1 (loopback)"
    assert server.hits["/png?tag=blocked"] == 0


@pytest.mark.parametrize(("url", "reason"), [
    ("http://10.0.0.1/a.png", "blocked address 10.0.0.1 (private)"),
    ("http://169.254.169.254/latest/meta-data/", "blocked address 169.254.169.254 (link-local)"),
    ("http://[::1]/a.png", "blocked address ::1 (loopback)"),
    ("http://0.0.0.0/a.png", "blocked address 0.0.0.0 (unspecified)"),
    ("https://[::ffff:127.0.0.1]:8443/a.png", "blocked address ::ffff:127.0.0.1 (loopback)"),
    ("http://[64:ff9b::a9fe:a9fe]/", "blocked address 64:ff9b::a9fe:a9fe (link-local)"),  # NAT64 of 169.254.169.254
    ("http://2130706433/a.png", "blocked address 127.0.0.1 (loopback)"),  # 127.0.0.1 written as one number
    ("http://224.0.0.1/a.png", "blocked address 224.0.0.1 (multicast)"),
    ("http://100.64.0.1/a.png", "blocked address 100.64.0.1 (not globally routable)"),
    ("ftp://example.com/a.png", "unsupported scheme ftp"),
    ("file:///etc/passwd", "unsupported scheme file"),
    ("example.com/a.png", "unsupported scheme (none)"),
])
def test_refused_before_any_connection(url: str, reason: str) -> None:
    with ImageFetcher() as fetcher:
        start = time.monotonic()
        assert reason_of(fetcher, url) == reason
        assert time.monotonic() - start < 0.5


@pytest.mark.parametrize(("target", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", "blocked address 169.254.169.254 (link-local)"),
    ("http://127.0.0.2:9/a.png", "blocked address 127.0.0.2 (loopback)"),
    ("//10.1.2.3/a.png", "blocked address 10.1.2.3 (private)"),  # scheme-relative
    ("ftp://example.com/a.png", "unsupported scheme ftp"),
])
def test_every_redirect_hop_is_checked(server: Server, monkeypatch: pytest.MonkeyPatch, target: str,
                                       reason: str) -> None:
    # The server itself is on loopback: let exactly 127.0.0.1 pass so that the first hop is allowed under the
    # default policy and the redirect is what gets refused.
    real = fetch_module._blocked_reason
    monkeypatch.setattr(fetch_module, "_blocked_reason", lambda address: None if address == "127.0.0.1"
                        else real(address))
    with ImageFetcher() as fetcher:
        assert fetcher.fetch(server.url("/png?tag=allowed-hop")) == PNG
        path = f"/redirect?to={quote(target, safe='')}"
        assert reason_of(fetcher, server.url(path)) == reason
    assert server.hits[path] == 1


def test_too_many_redirects_are_refused(server: Server) -> None:
    with ImageFetcher(FetchPolicy(allow_private=True, max_redirects=3)) as fetcher:
        assert fetcher.fetch(server.url("/loop?n=3&tag=ok")) == PNG
        assert reason_of(fetcher, server.url("/loop?n=4&tag=over")) == "more than 3 redirects"
    with ImageFetcher(FetchPolicy(allow_private=True, max_redirects=0)) as fetcher:
        assert reason_of(fetcher, server.url("/loop?n=1&tag=none")) == "more than 0 redirects"
    assert server.hits["/loop?n=0&tag=over"] == 0  # the fifth request was never made


def test_first_returns_the_best_ranked_success_and_the_failures_before_it(server: Server,
                                                                          fetcher: ImageFetcher) -> None:
    urls = [server.url("/missing.png"), "ftp://example.com/a.png", server.url("/html"),
            server.url("/png?tag=third"), server.url("/png?tag=fourth")]
    result = fetcher.first(urls)
    assert result == FetchResult(3, urls[3], PNG, ((urls[0], "HTTP 404"), (urls[1], "unsupported scheme ftp"),
                                                   (urls[2], "not an image (text/html)")))


def test_first_waits_for_a_slow_better_ranked_url(server: Server, fetcher: ImageFetcher) -> None:
    urls = [server.url("/png?delay=0.8&tag=slow-best"), server.url("/png?tag=fast-second")]
    start = time.monotonic()
    result = fetcher.first(urls)
    assert result is not None and (result.index, result.failures) == (0, ())
    assert time.monotonic() - start >= 0.7


def test_first_does_not_wait_for_worse_ranked_urls(server: Server, fetcher: ImageFetcher) -> None:
    server.drip_aborted.clear()
    urls = [server.url("/missing.png?tag=worse"), server.url("/png?tag=worse"), server.url("/drip?tag=worse"),
            server.url("/png?delay=10&tag=worse")]
    start = time.monotonic()
    result = fetcher.first(urls)
    assert result is not None and result.index == 1 and result.failures == ((urls[0], "HTTP 404"),)
    assert time.monotonic() - start < 1.0
    # The dripping body still being read is cut off rather than read to its 10 s end.
    assert server.drip_aborted.wait(2.0)


def test_first_without_a_success(server: Server, fetcher: ImageFetcher) -> None:
    assert fetcher.first([server.url("/missing.png"), server.url("/html")]) is None
    assert fetcher.first([]) is None


def test_the_cache_serves_a_second_fetch_and_keeps_only_successes(server: Server, fetcher: ImageFetcher) -> None:
    url = server.url("/png?tag=cached")
    assert fetcher.fetch(url) == fetcher.fetch(url) == PNG
    assert server.hits["/png?tag=cached"] == 1
    assert fetcher.first([url]) == FetchResult(0, url, PNG, ())
    assert server.hits["/png?tag=cached"] == 1
    for _ in range(2):
        reason_of(fetcher, server.url("/missing.png?tag=cached"))
    assert server.hits["/missing.png?tag=cached"] == 2


def test_the_cache_never_grows_past_its_bound(server: Server) -> None:
    with ImageFetcher(FetchPolicy(allow_private=True, cache_bytes=3000)) as fetcher:
        for tag in range(6):
            assert len(fetcher.fetch(server.url(f"/bytes?n=1000&tag={tag}"))) == 1000
            assert fetcher.cached_bytes <= 3000
        assert fetcher.cached_bytes == 3000
        fetcher.fetch(server.url("/bytes?n=5000&tag=huge"))  # larger than the whole cache: not kept
        assert fetcher.cached_bytes == 3000
        fetcher.fetch(server.url("/bytes?n=1000&tag=5"))  # most recent: still cached
        fetcher.fetch(server.url("/bytes?n=1000&tag=0"))  # least recent: evicted, fetched again
    assert server.hits["/bytes?n=1000&tag=5"] == 1
    assert server.hits["/bytes?n=1000&tag=0"] == 2


@pytest.mark.parametrize(("field", "value", "message"), [
    ("timeout_s", 0, "timeout_s must be a finite number of seconds > 0"),
    ("timeout_s", float("inf"), "timeout_s must be a finite number of seconds > 0"),
    ("max_bytes", 0, "max_bytes must be an integer >= 1"),
    ("max_redirects", -1, "max_redirects must be an integer >= 0"),
    ("concurrency", 0, "concurrency must be an integer >= 1"),
    ("concurrency", 2.5, "concurrency must be an integer >= 1"),
    ("cache_bytes", -1, "cache_bytes must be an integer >= 0"),
    ("allow_private", "yes", "allow_private must be True or False"),
])
def test_policy_is_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FetchPolicy(**{field: value})  # type: ignore[arg-type]
