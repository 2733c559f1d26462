"""gill-client as a package: its own wheel in a fresh environment without torch, the README example as
written, strict typing, documented public names, and the pieces that need no server."""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from PIL import Image
from wire import API_KEY

import gill_client
from gill_client import ChatOptions, Done, ImageEvent, RetryPolicy, TextDelta, assistant, user
from gill_client._transport import TLS, parse_url
from gill_client.errors import Internal, InvalidArgument, Unknown, error_for
from gill_client.messages import build_request
from gill_client.reply import ReplyBuilder
from gill_client.v1 import dialogue_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "client"


def test_chat_options_mirror_the_wire_options():
    assert [f.name for f in dataclasses.fields(ChatOptions)] == [f.name for f in pb.Options.DESCRIPTOR.fields]
    wire = ChatOptions(temperature=0.5, seed=7, allow_retrieval=False).to_proto()
    assert [f.name for f, _ in wire.ListFields()] == ["temperature", "seed", "allow_retrieval"]
    merged = ChatOptions(seed=1, top_p=0.9).merged(ChatOptions(seed=2))
    assert (merged.seed, merged.top_p) == (2, 0.9)


@pytest.mark.parametrize("url, target, tls", [
    ("localhost:8001", "localhost:8001", False),
    ("grpc://10.0.0.1:9000", "10.0.0.1:9000", False),
    ("grpcs://gill.example.com:443", "gill.example.com:443", True),
    ("gill.internal", "gill.internal:8001", False),
    ("[::1]:8001", "[::1]:8001", False),
])
def test_urls(url, target, tls):
    got, settings = parse_url(url, False)
    assert got == target and (settings is not None) == tls
    assert parse_url(url, True)[1] == TLS()


def test_http_urls_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="gRPC port"):
        parse_url("http://localhost:8000", False)


def test_retry_backoff_grows_to_its_cap():
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.5, max_backoff_s=3, multiplier=2)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_error_codes_map_to_exception_types():
    assert isinstance(error_for("ERROR_CODE_INVALID_ARGUMENT", "x"), InvalidArgument)
    assert isinstance(error_for("internal", "x"), Internal)
    error = error_for("SOMETHING_NEW", "what happened", "req-1")
    assert isinstance(error, Unknown) and error.request_id == "req-1" and str(error) == "UNKNOWN: what happened"


def test_requests_carry_text_and_every_kind_of_image(tmp_path):
    picture = Image.new("RGB", (4, 4), "red")
    path = tmp_path / "photo.jpg"
    picture.save(path)
    request = build_request([user(path, b"\x89PNG raw", picture, "what are these?"), assistant("three images."),
                             user("thanks")], ChatOptions(max_new_tokens=4), request_id="r1")
    first = request.messages[0]
    assert [m.role for m in request.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert first.parts[0].image.mime_type == "image/jpeg" and first.parts[0].image.data == path.read_bytes()
    assert first.parts[1].image.data == b"\x89PNG raw" and first.parts[1].image.mime_type == ""
    assert Image.open(io.BytesIO(first.parts[2].image.data)).size == (4, 4)
    assert first.parts[3].text == "what are these?"
    assert request.options.max_new_tokens == 4 and request.request_id == "r1"
    assert build_request("hi").messages[0].parts[0].text == "hi"
    with pytest.raises(TypeError, match="a part is text"):
        user(3)  # type: ignore[arg-type]


def test_a_reply_becomes_the_assistant_message_in_stream_order():
    builder = ReplyBuilder()
    image = ImageEvent(0, "generated", b"png-bytes")
    for event in (TextDelta(" here is"), TextDelta(" one:"), image, TextDelta(" done."),
                  Done(" here is one: done.", 5, 6, "eos")):
        builder.add(event)
    reply = builder.reply()
    assert reply.images == (image,) and reply.parts == (" here is one:", image, " done.")
    assert reply.as_message() == assistant("here is one:", image, "done.")
    retrieved = ImageEvent(1, "retrieved", b"png", corpus_id=42)
    wire = build_request([user("show"), assistant(retrieved), user("another")]).messages[1].parts[0].image
    assert (wire.data, wire.mime_type, wire.corpus_id) == (b"png", "image/png", 42)
    assert not build_request([assistant(image), user("x")]).messages[0].parts[0].image.HasField("corpus_id")


def _public_callables():
    for name in gill_client.__all__:
        item = getattr(gill_client, name)
        if inspect.isclass(item) or inspect.isfunction(item):
            yield name, item
        if inspect.isclass(item):
            for attribute, member in vars(item).items():
                if not attribute.startswith("_") or attribute in ("__iter__", "__aiter__", "__enter__", "__aenter__"):
                    if inspect.isfunction(member) or isinstance(member, classmethod):
                        yield f"{name}.{attribute}", getattr(item, attribute)


def test_every_public_name_has_a_docstring_that_says_what_it_returns():
    missing, silent = [], []
    for name, item in _public_callables():
        doc = inspect.getdoc(item) or ""
        if not doc or (inspect.isfunction(item) or inspect.ismethod(item)) and doc == inspect.getdoc(object):
            missing.append(name)
            continue
        if inspect.isfunction(item) or inspect.ismethod(item):
            returns = inspect.signature(item).return_annotation
            if returns not in (None, "None", inspect.Signature.empty) and not re.search(r"\b(returns?|yields?)\b",
                                                                                          doc, re.IGNORECASE):
                silent.append(name)
    assert missing == [] and silent == [], f"no docstring: {missing}; does not say what it returns: {silent}"


def test_the_client_type_checks_under_mypy_strict():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict"], cwd=CLIENT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def _readme_example() -> str:
    text = (CLIENT / "README.md").read_text()
    marker = text.index("tested as written by tests/test_client_package.py")
    return re.search(r"```python\n(.*?)```", text[marker:], re.DOTALL).group(1)


def test_the_wheel_installs_alone_without_torch_and_runs_the_readme_example(server, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(CLIENT)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("gill_client-*.whl")
    environment = tmp_path / "env"
    venv.create(environment, with_pip=True)  # fresh: none of the project's packages
    python = environment / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr
    check = ("import importlib.util, sys, gill_client\n"
             "heavy = [m for m in ('torch', 'transformers', 'diffusers') if importlib.util.find_spec(m)]\n"
             "assert heavy == [], heavy\n"
             "assert not any(m.startswith('gill.') or m == 'gill' for m in sys.modules)\n"
             "print(gill_client.__version__)\n")
    result = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == gill_client.__version__, result.stderr
    assert subprocess.run([str(environment / "bin" / "gill-chat"), "--help"], capture_output=True,
                          timeout=60).returncode == 0

    example = tmp_path / "example.py"
    example.write_text(_readme_example())
    env = {**os.environ, "GILL_URL": server.endpoints.grpc, "GILL_API_KEY": API_KEY}
    ran = subprocess.run([str(python), str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert ran.returncode == 0, ran.stderr
    assert re.search(r"\d+ tokens, stop: \w+", ran.stdout), ran.stdout
