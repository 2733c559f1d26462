"""Bounded, safe fetching of corpus images by URL (the CC3M release lists image URLs; many are dead).

:class:`ImageFetcher` fetches one URL (:meth:`~ImageFetcher.fetch`) or the best-ranked of several that answers
(:meth:`~ImageFetcher.first`), under a :class:`FetchPolicy`:

* only ``http`` and ``https``; the host is resolved and refused when any of its addresses is private, loopback,
  link-local, reserved, multicast, unspecified or otherwise not globally routable (IPv4 embedded in IPv6
  included), unless ``allow_private``; redirects are followed here, each hop checked again, at most
  ``max_redirects``;
* the answer must be ``200`` with a ``Content-Type`` of ``image/*`` and a body of at most ``max_bytes`` (refused
  from ``Content-Length`` before reading, and while streaming when there is none or it lies);
* ``timeout_s`` bounds the whole URL (connect, every read, every redirect) as one deadline;
* successful bodies are kept in an LRU cache bounded by their total size.

Known limits:

* DNS rebinding: the host is resolved and checked here, then ``requests`` resolves it again to connect, so a
  name server that answers with a public address first and a private one a moment later gets through. Closing
  that window needs connecting to the checked address itself (with the host name kept for TLS), which
  ``requests`` does not offer.
* Name resolution (``getaddrinfo``, here and inside ``requests``) cannot be interrupted: a resolver that hangs
  is bounded by its own timeouts, not by ``timeout_s``. So is a server that accepts the connection and never
  sends headers while :meth:`~ImageFetcher.first` is cancelling it: it stops at its deadline, not at once.
* Bodies are not decoded or checked as images here: :func:`gill.images.load_image` does that.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from cachetools import LRUCache
from requests.adapters import HTTPAdapter

from gill.errors import GillError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# Images are compressed already; asking for no transfer encoding keeps what we count equal to what arrives.
_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "gill-fetch/1"}
# Errors a broken, hostile or interrupted transfer can raise out of requests / urllib3 / http.client.
_TRANSFER_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
                    ValueError)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one :class:`ImageFetcher`; every field is checked on construction (``ValueError``)."""

    timeout_s: float = 5.0  # wall-clock bound for one URL: connect + all reads + redirects
    max_bytes: int = 16 * 1024 * 1024  # larger bodies are refused (by Content-Length up front, and while streaming)
    allow_private: bool = False  # allow private, loopback, link-local, reserved, multicast, unspecified addresses
    max_redirects: int = 3
    concurrency: int = 4  # URLs fetched at once by `first`
    cache_bytes: int = 64 * 1024 * 1024  # LRU cache of successful bodies, bounded by total bytes (0: no cache)

    def __post_init__(self) -> None:
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout!r}")
        if not isinstance(self.allow_private, bool):
            raise ValueError(f"allow_private must be True or False, got {self.allow_private!r}")
        for name, minimum in (("max_bytes", 1), ("max_redirects", 0), ("concurrency", 1), ("cache_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class FetchError(GillError):
    """A URL gave no image: ``.url`` is the URL asked for, ``.reason`` a short phrase saying why.

    Reasons look like ``'timed out after 5 s'``, ``'body over 16777216 bytes'``, ``'not an image (text/html)'``,
    ``'blocked address 127.0.0.1 (loopback)'``, ``'HTTP 404'``, ``'unsupported scheme ftp'``.
    """

    def __init__(self, url: str, reason: str) -> None:
        shown = url if len(url) <= 200 else url[:200] + "..."
        super().__init__(f"cannot fetch image {shown}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class FetchResult:
    """What :meth:`ImageFetcher.first` found."""

    index: int  # position in the URL list of the image returned
    url: str
    data: bytes
    failures: tuple[tuple[str, str], ...]  # (url, reason) of the better-ranked URLs that failed


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4, Teredo), or None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:  # in an IPv6-only cluster 64:ff9b::a00:1 reaches 10.0.0.1 through the NAT64 gateway
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _blocked_reason(address: str) -> str | None:
    """Why ``address`` (an IP literal, maybe with an IPv6 ``%scope``) is refused, or None when it is public."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # Python 3.11 classifies ::ffff:127.0.0.1 as neither loopback nor private: judge the IPv4 inside.
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = _blocked_reason(str(embedded))
            if reason is not None:
                return reason
    for reason, flag in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if flag:
            return reason
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT, also used inside clouds)
        return "not globally routable"
    return None


class _Abort:
    """Wakes a fetch blocked on its socket at its deadline, or at once when cancelled.

    A flag cannot interrupt a blocked read, and a server that sends one byte every few seconds keeps every single
    read under the socket timeout while a chunk never fills; shutting the socket down from another thread makes
    the blocked read return. Only a response's socket can be reached (not one still connecting or waiting for
    headers): those phases are bounded by the socket timeouts given to requests instead.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cancelled = False
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def watch(self, response: requests.Response) -> None:
        """Shut ``response``'s socket down at the deadline or on :meth:`cancel`, until :meth:`release`."""
        connection = getattr(response.raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if not isinstance(sock, socket.socket):  # e.g. a TLS-in-TLS proxy tunnel: only the deadline checks remain
            return
        with self._lock:
            self._sock = sock
            if self.cancelled:
                self._shutdown()
                return
            self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def release(self) -> None:
        """Stop watching (before the connection may go back to the pool and serve another request)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._sock = None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        # Caller holds the lock. A body that ends exactly at the deadline may already have put its connection back
        # in the pool; shutting that down only makes urllib3 see a dropped connection and open a new one.
        if self._sock is not None:
            try:
                # The plain socket's shutdown: ssl.SSLSocket.shutdown would also drop its TLS state under the
                # reading thread.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock = None


class _Cancellation:
    """The fetches one :meth:`ImageFetcher.first` call started; cancelling aborts them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aborts: set[_Abort] = set()
        self.cancelled = False

    def add(self, abort: _Abort) -> None:
        with self._lock:
            self._aborts.add(abort)
            if self.cancelled:
                abort.cancel()

    def discard(self, abort: _Abort) -> None:
        with self._lock:
            self._aborts.discard(abort)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for abort in self._aborts:
                abort.cancel()


class ImageFetcher:
    """Fetches corpus images under a :class:`FetchPolicy`; thread-safe. Close it (or use ``with``) when done.

    ``session`` is used as given and left open by :meth:`close`; without one the fetcher makes its own, with a
    connection pool as large as ``policy.concurrency``.
    """

    def __init__(self, policy: FetchPolicy | None = None, session: requests.Session | None = None) -> None:
        self.policy = policy or FetchPolicy()
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_maxsize=max(10, self.policy.concurrency))
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self._cache: LRUCache[str, bytes] = LRUCache(maxsize=self.policy.cache_bytes, getsizeof=len)
        self._cache_lock = threading.Lock()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Empty the cache and close the session if this fetcher made it."""
        with self._cache_lock:
            self._cache.clear()
        if self._owns_session:
            self.session.close()

    @property
    def cached_bytes(self) -> int:
        """Total size of the bodies in the cache (at most ``policy.cache_bytes``)."""
        with self._cache_lock:
            return int(self._cache.currsize)

    def fetch(self, url: str) -> bytes:
        """The body of the image at ``url``, from the cache when there; raises :class:`FetchError`.

        The body is what the server sent, at most ``policy.max_bytes``, not checked as an image beyond its
        ``Content-Type``; only successes are cached, so a dead URL is asked again next time.
        """
        return self._fetch(url, None)

    def first(self, urls: Sequence[str], failures: list[tuple[str, str]] | None = None) -> FetchResult | None:
        """The best-ranked (lowest index) of ``urls`` that gives an image, or None when none does (then
        ``failures``, when given, receives every (url, reason) in rank order).

        Up to ``policy.concurrency`` URLs are fetched at once. This returns as soon as one URL succeeded and all
        ranked before it failed, without waiting for the worse-ranked ones (those still running are cancelled).
        ``failures`` lists the (url, reason) of the better-ranked URLs, in order.
        """
        urls = list(urls)
        if not urls:
            return None
        bodies: dict[int, bytes] = {}
        errors: dict[int, FetchError] = {}
        cancellation = _Cancellation()
        pool = ThreadPoolExecutor(max_workers=min(self.policy.concurrency, len(urls)),
                                  thread_name_prefix="gill-fetch")
        try:
            pending: dict[Future[bytes], int] = {pool.submit(self._fetch, url, cancellation): index
                                                 for index, url in enumerate(urls)}
            best = 0  # every URL ranked before this one has failed
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    try:
                        bodies[index] = future.result()
                    except FetchError as error:
                        errors[index] = error
                while best in errors:
                    best += 1
                if best in bodies:
                    return FetchResult(best, urls[best], bodies[best],
                                       tuple((urls[i], errors[i].reason) for i in range(best)))
            if failures is not None:
                failures.extend((urls[i], errors[i].reason) for i in range(len(urls)))
            return None
        finally:
            cancellation.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, url: str, cancellation: _Cancellation | None) -> bytes:
        with self._cache_lock:
            cached = self._cache.get(url)
        if cached is not None:
            return cached
        abort = _Abort(time.monotonic() + self.policy.timeout_s)
        if cancellation is not None:
            cancellation.add(abort)
        try:
            data = self._download(url, abort)
        finally:
            if cancellation is not None:
                cancellation.discard(abort)
        if len(data) <= self.policy.cache_bytes:
            with self._cache_lock:
                self._cache[url] = data  # evicts least recently used bodies until the total fits
        return data

    def _download(self, url: str, abort: _Abort) -> bytes:
        current = url
        for _ in range(self.policy.max_redirects + 1):  # the first request, then one per redirect allowed
            target = self._check_url(url, current, abort)
            response = self._get(url, target, abort)
            try:
                if response.status_code in _REDIRECTS and response.headers.get("Location"):
                    current = urljoin(target, response.headers["Location"])
                    continue
                return self._read_body(url, response, abort)
            finally:
                abort.release()
                response.close()
        raise FetchError(url, f"more than {self.policy.max_redirects} redirects")

    def _check_url(self, url: str, current: str, abort: _Abort) -> str:
        """``current`` as requests will send it, once its scheme and every address of its host are allowed."""
        try:
            scheme = urlsplit(current).scheme.lower()
        except ValueError as error:
            raise FetchError(url, f"malformed URL ({error})") from error
        if scheme not in ("http", "https"):
            raise FetchError(url, f"unsupported scheme {scheme or '(none)'}")
        # Check the host exactly as requests will connect to it (IDNA-encoded, normalised), not as written.
        prepared = requests.PreparedRequest()
        try:
            prepared.prepare_url(current, None)
            parts = urlsplit(prepared.url or "")
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except (requests.RequestException, ValueError) as error:
            raise FetchError(url, f"malformed URL ({error})") from error
        if not host:
            raise FetchError(url, "no host in URL")
        if not self.policy.allow_private:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as error:
                raise FetchError(url, f"cannot resolve {host}") from error
            # Any private address is enough to refuse: the connection may use any of them. Known limit (DNS
            # rebinding): requests resolves the name again to connect, and may get a different answer than this.
            for info in infos:
                address = str(info[4][0])
                reason = _blocked_reason(address)
                if reason is not None:
                    raise FetchError(url, f"blocked address {address} ({reason})")
        self._check_time(url, abort)
        return parts.geturl()

    def _get(self, url: str, target: str, abort: _Abort) -> requests.Response:
        remaining = self._check_time(url, abort)
        # urllib3's `total` makes connect + waiting for the headers share one budget (a plain number would give
        # each socket operation the whole of it); the body is bounded by `abort` and the checks in _read_body.
        timeout = urllib3.Timeout(total=remaining, connect=remaining, read=remaining)
        try:
            response = self.session.get(target, headers=_HEADERS, stream=True, allow_redirects=False,
                                        timeout=timeout)  # type: ignore[arg-type]  # requests takes a urllib3 Timeout
        except requests.Timeout as error:
            raise FetchError(url, self._timed_out()) from error
        except _TRANSFER_ERRORS as error:
            if time.monotonic() >= abort.deadline:
                raise FetchError(url, self._timed_out()) from error
            raise FetchError(url, f"connection failed ({type(error).__name__})") from error
        abort.watch(response)
        return response

    def _read_body(self, url: str, response: requests.Response, abort: _Abort) -> bytes:
        limit = self.policy.max_bytes
        if response.status_code != 200:
            raise FetchError(url, f"HTTP {response.status_code}")
        content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if not content_type.startswith("image/"):
            raise FetchError(url, f"not an image ({content_type or 'no Content-Type'})")
        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > limit:
            raise FetchError(url, f"body over {limit} bytes")
        body = bytearray()
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise FetchError(url, f"body over {limit} bytes")
                self._check_time(url, abort)
        except _TRANSFER_ERRORS as error:
            # A socket shut down by `abort` surfaces as a broken or short read: say why it was shut.
            if abort.cancelled:
                raise FetchError(url, "cancelled") from error
            if abort.expired or time.monotonic() >= abort.deadline:
                raise FetchError(url, self._timed_out()) from error
            raise FetchError(url, f"transfer failed ({type(error).__name__})") from error
        self._check_time(url, abort)  # a read that returned because the socket was shut down ends the body early
        if not body:
            raise FetchError(url, "empty body")
        return bytes(body)

    def _check_time(self, url: str, abort: _Abort) -> float:
        """Seconds left before the deadline; raises :class:`FetchError` when none are or the fetch was cancelled."""
        if abort.cancelled:
            raise FetchError(url, "cancelled")
        remaining = abort.deadline - time.monotonic()
        if remaining <= 0 or abort.expired:
            raise FetchError(url, self._timed_out())
        return remaining

    def _timed_out(self) -> str:
        return f"timed out after {self.policy.timeout_s:g} s"
