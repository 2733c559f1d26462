"""Per-server limits on one request (gill/limits.py): configuration, messages, and the docs that list them
(fast: no model, no server)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gill import protocol
from gill.errors import ConfigError, InputError
from gill.limits import Limits, names
from gill.options import GenerationOptions
from gill.serving.server import prepare_repository
from gill_client.v1 import dialogue_pb2 as pb

REPO = Path(__file__).resolve().parents[1]


def _chat(**options) -> pb.ChatRequest:
    chat = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="hi")])])
    for key, value in options.items():
        setattr(chat.options, key, value)
    return chat


def test_defaults_are_the_documented_values():
    assert Limits() == Limits(max_request_bytes=64 * 1024 * 1024, max_messages=64, max_parts=256,
                              max_images_per_request=16, max_text_chars=100_000, max_new_tokens=1024,
                              max_images=8, max_denoising_steps=200)


def test_from_parameters_reads_limit_keys_and_leaves_empty_ones_default():
    limits = Limits.from_parameters({"checkpoint": "/x", "limit_max_new_tokens": "256", "limit_max_images": "0",
                                     "limit_max_parts": "", "stream_interval_ms": "50"})
    assert limits == dataclasses.replace(Limits(), max_new_tokens=256, max_images=0)
    assert Limits.from_parameters(Limits(max_messages=3).to_parameters()) == Limits(max_messages=3)


@pytest.mark.parametrize(("parameters", "message"), [
    ({"limit_max_new_token": "5"}, r"limit_max_new_token: no such limit \(known: max_request_bytes, "),
    ({"limit_max_new_tokens": "many"}, r"limit_max_new_tokens='many': not an integer"),
    ({"limit_max_new_tokens": "0"}, r"max_new_tokens=0 \(allowed: an integer >= 1\)"),
    ({"limit_max_images": "-1"}, r"max_images=-1 \(allowed: an integer >= 0\)"),
])
def test_bad_parameters_fail_naming_the_limit(parameters, message):
    with pytest.raises(ConfigError, match=message):
        Limits.from_parameters(parameters)


def test_assignments_as_gill_serve_takes_them():
    assert Limits.from_assignments(["max_new_tokens=256", "max_request_bytes=4_194_304", "max_new_tokens=300"]) \
        == dataclasses.replace(Limits(), max_new_tokens=300, max_request_bytes=4_194_304)
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        Limits.from_assignments(["max_new_tokens"])
    with pytest.raises(ConfigError, match="--limit tokens: no such limit"):
        Limits.from_assignments(["tokens=5"])


def test_gill_serve_rejects_a_bad_limit_before_loading_anything():
    result = subprocess.run([sys.executable, "-m", "gill.cli", "serve", "--limit", "max_new_tokns=5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "max_new_tokns: no such limit" in result.stderr and "Traceback" not in result.stderr


def test_request_limits_name_the_limit_and_say_it_is_this_servers():
    small = Limits(max_request_bytes=100, max_messages=2, max_parts=3, max_images_per_request=1, max_text_chars=10)
    with pytest.raises(InputError, match=r"request is 101 bytes; this server allows at most 100 "
                                         r"\(limit max_request_bytes; send fewer or smaller images\)"):
        protocol.request_from_bytes(b"\0" * 101, small)
    user = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="hi")])
    cases = [
        (pb.ChatRequest(messages=[user] * 3),
         "request has 3 messages; this server allows at most 2 (limit max_messages)"),
        (pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="a")] * 4)]), "limit max_parts"),
        (pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(image=pb.Image(data=b"x"))] * 2)]),
         "request has 2 images; this server allows at most 1 (limit max_images_per_request)"),
        (pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="0123456789x")])]),
         "request has 11 characters of text; this server allows at most 10 (limit max_text_chars"),
    ]
    for chat, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            protocol.parts_from_request(chat, small)
        protocol.parts_from_request(chat)  # within the default limits


def test_option_limits_name_every_option_over_them():
    limits = Limits(max_new_tokens=16, max_images=1, max_denoising_steps=10)
    chat = _chat(max_new_tokens=17, max_images=2, num_inference_steps=11)
    with pytest.raises(InputError, match=re.escape(
            "options over this server's limits: max_new_tokens=17 (this server allows at most 16, limit "
            "max_new_tokens); max_images=2 (this server allows at most 1, limit max_images); "
            "num_inference_steps=11 (this server allows at most 10, limit max_denoising_steps)")):
        protocol.options_from_request(chat, limits=limits)
    assert protocol.options_from_request(_chat(max_new_tokens=16), limits=limits).max_new_tokens == 16


def test_a_default_over_a_limit_is_lowered_to_it():
    limits = Limits(max_denoising_steps=20, max_images=0)
    options = protocol.options_from_request(_chat(max_new_tokens=4), limits=limits)
    assert (options.num_inference_steps, options.max_images, options.max_new_tokens) == (20, 0, 4)
    assert GenerationOptions().num_inference_steps == 50


def test_nonsense_is_generation_options_own_check_and_budgets_are_not():
    with pytest.raises(InputError, match="max_new_tokens=0"):
        GenerationOptions(max_new_tokens=0)
    assert GenerationOptions(max_new_tokens=5000, num_inference_steps=500).max_new_tokens == 5000  # no ceiling
    with pytest.raises(InputError, match="limit max_new_tokens"):
        Limits().check_options(GenerationOptions(max_new_tokens=5000))


def test_the_configs_declare_the_limits_and_prepare_repository_sets_them(tmp_path):
    config = (REPO / "model_repository" / "gill" / "config.pbtxt").read_text()
    declared = re.findall(r'key: "limit_(\w+)" value: \{ string_value: "" \}', config)
    assert declared == names()
    # As gill serve --limit does it: a model without the parameter would raise.
    prepared = prepare_repository(tmp_path, REPO / "checkpoints", models=("gill", "diffusion"),
                                  parameters=Limits(max_new_tokens=7, max_denoising_steps=9).model_parameters())
    text = (prepared / "gill" / "config.pbtxt").read_text()
    assert 'key: "limit_max_new_tokens" value: { string_value: "7" }' in text
    assert 'key: "limit_max_images" value: { string_value: "8" }' in text
    assert 'key: "limit_max_denoising_steps" value: { string_value: "9" }' in (
        prepared / "diffusion" / "config.pbtxt").read_text()


def test_the_model_repository_readme_documents_every_limit_with_its_default():
    readme = (REPO / "model_repository" / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\d_,]+|[\d.]+ MiB) \|", readme, flags=re.MULTILINE))
    for name in names():
        default = getattr(Limits(), name)
        assert name in rows, f"model_repository/README.md has no row for limit {name}"
        documented = rows[name]
        value = int(float(documented.split()[0]) * 1024 * 1024) if "MiB" in documented \
            else int(documented.replace(",", "").replace("_", ""))
        assert value == default, f"{name}: README says {documented}, the default is {default}"
