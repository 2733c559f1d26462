"""Start NVIDIA Triton Inference Server on ``model_repository/`` with a GILL checkpoint.

The ``tritonserver`` binary, the Python backend and a backend stub per Python version come from the
``nvidia-pytriton`` wheel. As measured on these machines (DESIGN.md): the stub for the running Python sits
beside ``libtriton_python.so``; ``LD_LIBRARY_PATH`` starts with the interpreter's own ``LIBDIR`` (else the
stub links the system's ``libpython`` and stdlib extensions fail), then the wheel's libraries. The stub
ignores ``PYTHONPATH``, so the backend folder (on every stub's path) gets a ``gill_environment`` module that
adds the project's environment, and each ``model.py`` imports it when present. In Kubernetes the same
repository runs in NVIDIA's Triton image instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

from gill.errors import GillError
from gill.serving.progress import DEFAULT_STALL_S
from gill.serving.watchdog import StubWatchdog, http_control

# The environment variable that hands the server's API key to its stubs (for the gill model's gRPC transport).
API_KEY_ENV = "GILL_API_KEY"

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
# The dialogue model needs every other one; the ensemble is for Triton's own tools.
ALL_MODELS = ("clip", "llm", "mapper", "retrieval", "diffusion", "tokenize", "gill", "text_to_image")
# Every gRPC protocol and HTTP API but health: liveness and readiness probes stay open, all else needs the key.
RESTRICTED = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
API_KEY_HEADER = "x-api-key"
_API_KEY = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")


def set_parameter(config: str, key: str, value: str) -> str:
    """A ``config.pbtxt`` text with parameter ``key`` set to ``value``; raises :class:`ServeError` when the model
    has no such parameter (a typo must not be ignored)."""
    pattern = re.compile(r'(key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*)"[^"]*"')
    if not pattern.search(config):
        raise ServeError(f"the model has no parameter {key!r}")
    return pattern.sub(lambda m: m.group(1) + json.dumps(value), config)


class ServeError(GillError):
    """The server could not start, or a model failed to load; the message carries the log excerpt."""


def parse_parameters(assignments: list[str]) -> dict[str, dict[str, str]]:
    """``MODEL.KEY=VALUE`` assignments (``gill serve --parameter``) as ``{model: {key: value}}``; the key must be
    one of the model's config parameters, which :func:`prepare_repository` checks."""
    parameters: dict[str, dict[str, str]] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        model, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise ServeError(f"--parameter {assignment!r}: expected MODEL.KEY=VALUE, for example llm.max_batch=4")
        if model not in ALL_MODELS:
            raise ServeError(f"--parameter {assignment!r}: no model {model!r} (models: {', '.join(ALL_MODELS)})")
        parameters.setdefault(model, {})[key] = value
    return parameters


def merge_parameters(*layers: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Model parameters of several sources; a later layer's value wins."""
    merged: dict[str, dict[str, str]] = {}
    for layer in layers:
        for model, values in layer.items():
            merged.setdefault(model, {}).update(values)
    return merged


def has_gpu() -> bool:
    """An NVIDIA driver is loaded (Triton's GPU metrics need one; without it they only log errors)."""
    return Path("/proc/driver/nvidia/version").exists()


@dataclass(frozen=True)
class Endpoints:
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a port free on ``host`` now (another process may still take it before it is bound)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Returns ``count`` distinct ports free on ``host`` now: each probe stays bound until all are chosen, so two
    calls in a row cannot return the same port to one server (Triton refuses to start on a shared port)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError as error:
        raise ServeError("the Triton server comes from the nvidia-pytriton package; install it") from error
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


_ENVIRONMENT_MODULE = '''"""Written by gill serve: the project's environment first on the stub's path."""
import site
import sys

_before = list(sys.path)
for _path in {paths!r}:
    site.addsitedir(_path)  # runs the .pth files too (the editable install of gill)
sys.path[:] = [p for p in sys.path if p not in _before] + _before
'''


def prepare_backend(target: Path) -> Path:
    """A Python-backend folder with the stub for this interpreter, and ``gill_environment.py`` beside it
    (the backend folder is on every stub's path); returns the backends directory."""
    source = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServeError(f"nvidia-pytriton ships no backend stub for Python {version}")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (source / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, python / item.name)
    shutil.copy2(stub, python / stub.name)
    paths = [p for p in sys.path if p.endswith("site-packages")] + [str(PROJECT_ROOT)]
    (python / "gill_environment.py").write_text(_ENVIRONMENT_MODULE.format(paths=list(dict.fromkeys(paths))))
    return target


def prepare_repository(target: Path, checkpoint: Path, models: tuple[str, ...] = ALL_MODELS,
                       source: Path = MODEL_REPOSITORY,
                       parameters: dict[str, dict[str, str]] | None = None,
                       progress_dir: Path | None = None) -> Path:
    """Copy the chosen models, with the ``checkpoint`` parameter of each set to ``checkpoint``, progress kept
    in ``progress_dir`` (one file per model: gill/serving/progress.py) when given, and
    ``parameters[model][key]`` set on the models named there."""
    if not source.is_dir():
        raise ServeError(f"{source}: model repository not found (run from a checkout of the project)")
    target.mkdir(parents=True, exist_ok=True)
    for name in models:
        shutil.copytree(source / name, target / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", ".gitkeep"))
        config = target / name / "config.pbtxt"
        text = config.read_text()
        if 'key: "checkpoint"' in text:
            text = set_parameter(text, "checkpoint", str(checkpoint.resolve()))
        if progress_dir is not None and 'key: "progress_file"' in text:
            text = set_parameter(text, "progress_file", str((progress_dir / name).resolve()))
        if progress_dir is not None and 'key: "progress_dir"' in text:
            text = set_parameter(text, "progress_dir", str(progress_dir.resolve()))
        for key, value in (parameters or {}).get(name, {}).items():
            try:
                text = set_parameter(text, key, value)
            except ServeError as error:
                raise ServeError(f"{name}: {error}") from None
        config.write_text(text)
    return target


def _environment(api_key: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The gill model's gRPC transport calls this server with its key (model_repository/gill/config.pbtxt).
    env.pop(API_KEY_ENV, None)
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    libs = _pytriton_dir().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class TritonServer:
    """``tritonserver`` on a prepared repository; a context manager that stops the server on exit."""

    def __init__(self, checkpoint: str | Path, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0,
                 metrics_port: int = 0, models: tuple[str, ...] = ALL_MODELS, work_dir: Path | None = None,
                 api_key: str | None = None, parameters: dict[str, dict[str, str]] | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, watchdog: bool = True,
                 verify: bool = True, stall_s: float = DEFAULT_STALL_S) -> None:
        if api_key is not None and not _API_KEY.fullmatch(api_key):
            raise ServeError("an API key must be 16 to 256 characters of letters, digits and . _ ~ + / - "
                             "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        self.checkpoint = Path(checkpoint)
        self.api_key = api_key
        self.parameters = parameters or {}
        if (tls_cert is None) != (tls_key is None):
            raise ServeError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        for path in (tls_cert, tls_key):
            if path is not None and not Path(path).is_file():
                raise ServeError(f"{path}: no such file (TLS certificate and key are PEM files)")
        self.tls = (Path(tls_cert).resolve(), Path(tls_key).resolve()) if tls_cert and tls_key else None
        spare = iter(free_ports(3, host))  # distinct from each other; a given port is used as given
        self.endpoints = Endpoints(host, grpc_port or next(spare), http_port or next(spare),
                                   metrics_port or next(spare))
        self.models = models
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="gill-serve-"))
        self.log_path = self.work_dir / "triton.log"
        self.process: subprocess.Popen | None = None
        # Names of the Python backend's shared-memory regions (files in /dev/shm): a server that dies leaves its
        # regions behind (they are RAM), and the prefix tells which are this server's to remove.
        self.shm_prefix = f"gill_{uuid.uuid4().hex[:12]}_"
        self.stopping = False  # set by request_stop/stop: an exit after that is asked for, not a crash
        self.restarts = 0
        self.verify = verify
        self._watch = watchdog
        self.watchdog: StubWatchdog | None = None
        self.stall_s = stall_s

    def command(self) -> list[str]:
        host = self.endpoints.host
        return [
            str(_pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.work_dir / 'models'}",
            f"--backend-directory={self.work_dir / 'backends'}",
            f"--grpc-address={host}", f"--grpc-port={self.endpoints.grpc_port}",
            f"--http-address={host}", f"--http-port={self.endpoints.http_port}",
            f"--metrics-address={host}", f"--metrics-port={self.endpoints.metrics_port}",
            "--allow-metrics=true", f"--allow-gpu-metrics={str(has_gpu()).lower()}",
            "--exit-timeout-secs=10",
            # Explicit control with every model loaded at start: the stub watchdog reloads one model whose
            # stub died (gill/serving/watchdog.py) without restarting the others.
            "--model-control-mode=explicit", "--load-model=*",
            # Model load includes torch imports and weights; the default 30 s is short on two cores.
            "--backend-config=python,stub-timeout-seconds=120",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self._restrictions(),
            *self._tls_options(),
        ]

    def _tls_options(self) -> list[str]:
        """gRPC over TLS with the given PEM certificate and key (HTTP stays on loopback-friendly plaintext)."""
        if self.tls is None:
            return []
        cert, key = self.tls
        return ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]

    def _restrictions(self) -> list[str]:
        """With an API key, every request but health checks must carry it in the ``x-api-key`` header."""
        if self.api_key is None:
            return []
        rule = f"{RESTRICTED}:{API_KEY_HEADER}={self.api_key}"
        return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]

    def start(self, timeout: float = 300.0) -> Endpoints:
        """Start and wait until every model is ready; raises :class:`ServeError` with the log excerpt.

        First, unless ``verify=False``, :func:`gill.integrity.verify_checkpoint` checks the checkpoint's files,
        sha256s and shapes and raises :class:`~gill.errors.CheckpointError` naming the file before any process starts.
        """
        if not self.checkpoint.is_dir():
            raise ServeError(f"{self.checkpoint}: checkpoint directory not found")
        if self.verify:
            from gill.integrity import verify_checkpoint

            verify_checkpoint(self.checkpoint)
        prepare_backend(self.work_dir / "backends")
        prepare_repository(self.work_dir / "models", self.checkpoint, self.models, parameters=self.model_parameters(),
                           progress_dir=self.work_dir / "progress")
        self._launch()
        self._wait_ready(timeout)
        return self.endpoints

    def restart(self, timeout: float = 300.0) -> Endpoints:
        """Start ``tritonserver`` again after it died: the same ports, repository and options. What the dead one
        left is cleared first: its model stubs (they stay in its process group), its shared-memory regions, its
        watchdog. Its log moves to ``triton.log.1`` (older ones to ``.2``, ``.3``). Raises :class:`ServeError`
        like :meth:`start`."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        self._reap()
        if self.stopping:
            raise ServeError("not restarted: the server was asked to stop")
        for older in range(3, 0, -1):
            source = self.log_path.with_name(f"{self.log_path.name}.{older - 1}" if older > 1 else self.log_path.name)
            if source.exists():
                source.replace(self.log_path.with_name(f"{self.log_path.name}.{older}"))
        self.restarts += 1
        self._launch()
        self._wait_ready(timeout)
        return self.endpoints

    def _launch(self) -> None:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=_environment(self.api_key), start_new_session=True)
        log.close()

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with code {self.process.returncode} while loading models:\n"
                                 + self.log_excerpt())
            if self.ready():
                self._start_watchdog()
                return
            time.sleep(0.5)
        self.stop()
        raise ServeError(f"models not ready after {timeout:.0f} s:\n{self.log_excerpt()}")

    def _reap(self, timeout: float = 10.0) -> None:
        """SIGKILL what is left of a dead (or hung) server's process group, wait until it is empty, and remove
        its shared-memory regions."""
        if self.process is not None:
            if self.process.poll() is None:
                self._kill()
                self.process.wait()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break  # the group is empty
                time.sleep(0.1)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def model_parameters(self) -> dict[str, dict[str, str]]:
        """The parameters written into the models' configs: this server's gRPC endpoint on loopback for the
        ``gill`` model's gRPC transport (and its certificate under TLS), then the caller's ``parameters``, which
        win (``--parameter gill.transport=bls`` chooses the BLS transport, for example)."""
        if "gill" not in self.models:
            return self.parameters
        host = self.endpoints.host
        loopback = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
        if ":" in loopback and not loopback.startswith("["):
            loopback = f"[{loopback}]"
        own = {"grpc_url": f"{loopback}:{self.endpoints.grpc_port}",
               "grpc_root_cert": str(self.tls[0]) if self.tls else ""}
        return merge_parameters({"gill": own}, self.parameters)

    def _start_watchdog(self) -> None:
        if not self._watch or self.process is None:
            return
        python_models = [name for name in self.models
                         if 'backend: "python"' in (self.work_dir / "models" / name / "config.pbtxt").read_text()]
        headers = {API_KEY_HEADER: self.api_key} if self.api_key else {}
        self.watchdog = StubWatchdog(self.process.pid, self.work_dir / "models", python_models,
                                     http_control(self.endpoints.http, headers, timeout=600),
                                     progress_dir=self.work_dir / "progress", stall_s=self.stall_s)
        self.watchdog.start()

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.endpoints.http}/v2/health/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def log_excerpt(self, lines: int = 25) -> str:
        """Why models failed (the failure lines of the server log), else the end of the log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        noise = ("CudaDriverHelper", "Failed to initialize NVML", "DCGM")
        # Model failures, error lines, and the reason a refused command line gives beside its usage text.
        reasons = ("cannot", "nrecognized", "nvalid")
        failures = [line for line in text if ("failed to load" in line or "UNAVAILABLE" in line or line.startswith("E")
                                              or (not line[:1].isspace() and any(r in line for r in reasons)))
                    and not any(n in line for n in noise)]
        # A crash: Triton's "Signal (11) received." and the stack it prints after it (not SIGINT's or SIGTERM's).
        crash = max((i for i, line in enumerate(text) if line.startswith("Signal (")
                     and not line.startswith(("Signal (2)", "Signal (15)"))), default=None)
        excerpt = failures[-lines:] or ([] if crash is not None else text[-lines:])
        if crash is not None:
            excerpt += text[crash:crash + lines]
        return "\n".join(dict.fromkeys(excerpt))

    def request_stop(self, grace: float = 30.0) -> None:
        """Ask Triton to shut down cleanly (SIGINT) without waiting; SIGKILL its group after ``grace`` seconds.

        Safe inside a signal handler while another thread (or the interrupted main thread) waits on it.
        """
        self.stopping = True
        if self.process is None or self.process.poll() is not None:
            return
        if self.watchdog is not None:
            self.watchdog.stop(wait=False)
        self.process.send_signal(signal.SIGINT)
        timer = threading.Timer(grace, self._kill)
        timer.daemon = True
        timer.start()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton's clean shutdown) and wait; SIGKILL the whole process group if it hangs. Then nothing of
        the server is left: no stub, no shared-memory region."""
        self.stopping = True
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and remove the work folder it made (one it was given stays)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
