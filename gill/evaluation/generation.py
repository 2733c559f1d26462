"""What every image-generation eval shares: the reference's forced generation, the in-process and served
generators, and the per-setting scoring of generated images against their targets (CLIP similarity, LPIPS).

Forced generation is the reference's ``num_words=2, gen_scale_factor=1e5`` (``evals/generate_vist_images.py``,
``evals/generate_visdial_images.py``): the ``[IMG0]`` logit is scaled so far up that it is always chosen, and the
image is generated whatever the decision head says (the reference evaluates without retrieval embeddings, so it
always generates; here retrieval is switched off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from gill.errors import GillError
from gill.options import GenerationOptions

# parts, options -> the generated image or None (no image came back)
Generate = Callable[[list[str | Image.Image], GenerationOptions], Image.Image | None]


def forced_generation_options(seed: int, guidance_scale: float, num_inference_steps: int, scheduler: str
                              ) -> GenerationOptions:
    """The options of one forced generation (``max_new_tokens=2``, ``gen_scale_factor=1e5``, retrieval off);
    raises :class:`~gill.errors.InputError` on a bad value."""
    return GenerationOptions(max_new_tokens=2, gen_scale_factor=1e5, max_images=1, allow_retrieval=False,
                             seed=seed, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                             scheduler=scheduler)


def pipeline_generator(pipeline) -> Generate:
    """In-process generation with a :class:`gill.pipeline.Pipeline`: the first generated image of the turn."""
    from gill.events import ImageResult

    def generate(parts: list[str | Image.Image], options: GenerationOptions) -> Image.Image | None:
        for event in pipeline.stream(parts, options):
            if isinstance(event, ImageResult) and event.source == "generated":
                return event.image
        return None

    return generate


class ServedModelError(GillError):
    """The served model could not be reached, refused the API key, or failed a turn of an eval run."""


class ServedGenerator:
    """Generation through a served model with the typed client (``gill eval ... --url``); call it as a
    :data:`Generate`. Close it (or use it in a ``with`` block) to close the connection.

    Each call sends the parts (text and PIL images, the latter PNG-encoded) as one user message with
    ``raw_text`` set, so the server builds the same interleaved prompt as :func:`pipeline_generator` does in-process,
    and every wire option taken from ``options`` (the same values as in-process; unset ones only where ``options``
    has None). Returns the first generated image of the turn, or None when none came back. Raises
    :class:`ServedModelError` when the server is unreachable, not ready, refuses the API key, or fails a turn.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0,
                 ready_timeout: float = 10.0) -> None:
        from gill_client import GillClient, GillClientError

        self.url = url
        try:
            self._client = GillClient(url, api_key=api_key, timeout=timeout)
        except ValueError as error:  # a malformed URL
            raise ServedModelError(f"--url {url!r}: {error}") from None
        try:
            ready = self._client.ready(timeout=ready_timeout)
        except GillClientError as error:  # for example a missing or wrong API key
            self._client.close()
            raise ServedModelError(f"GILL server at {url}: {error}") from None
        if not ready:
            self._client.close()
            raise ServedModelError(f"no GILL server ready at {url} (gRPC host:port; checked for {ready_timeout:g} s): "
                                   f"start one with `gill serve`, or check the address and port")

    def __call__(self, parts: list[str | Image.Image], options: GenerationOptions) -> Image.Image | None:
        from gill_client import ChatOptions, GillClientError, ImageEvent, user

        wire = ChatOptions(raw_text=True, **{name: getattr(options, name) for name in _wire_options()})
        try:
            for event in self._client.chat(user(*parts), wire):
                if isinstance(event, ImageEvent) and event.source == "generated":
                    return event.pil()
        except GillClientError as error:
            raise ServedModelError(f"GILL server at {self.url}: {error}") from None
        return None

    def identity(self) -> dict[str, Any]:
        """What the run was served by, for the result header: ``url``, the dialogue ``model``, the ``client``'s
        version, and ``server`` (Triton's name and version, the model's versions and its ``checkpoint``
        parameter, as the server reports them) or ``server_error`` when it could not be asked."""
        import gill_client

        identity: dict[str, Any] = {"served": True, "url": self.url, "model": self._client.model,
                                    "client": {"gill_client": gill_client.__version__}}
        try:
            identity["server"] = _server_metadata(self._client)
        except Exception as error:  # noqa: BLE001 - the identity is a record, never a reason to fail the run
            identity["server_error"] = f"{type(error).__name__}: {error}"
        return identity

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServedGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client_generator(url: str, api_key: str | None = None, timeout: float = 600.0) -> ServedGenerator:
    """Generation through the served model at ``url`` (``host:port`` or ``grpcs://host:port``, the gRPC port);
    see :class:`ServedGenerator`. Raises :class:`ServedModelError` when no ready server answers there."""
    return ServedGenerator(url, api_key, timeout)


def _wire_options() -> list[str]:
    """The wire options (``gill.v1.Options``, as :class:`gill_client.ChatOptions`) that carry a
    :class:`GenerationOptions` value: all but the prompt's (``raw_text``, set by the generator)."""
    import dataclasses

    from gill.protocol import PROMPT_OPTIONS
    from gill_client import ChatOptions

    return [item.name for item in dataclasses.fields(ChatOptions) if item.name not in PROMPT_OPTIONS]


def _server_metadata(client, timeout: float = 5.0) -> dict[str, Any]:
    """Triton's server metadata and the dialogue model's metadata and ``checkpoint`` parameter, over the
    client's address, TLS settings and API key."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from gill_client import _transport as transport

    options = transport.channel_options(client._tls)
    channel = (grpc.secure_channel(client.target, transport.credentials(client._tls), options)
               if client._tls is not None else grpc.insecure_channel(client.target, options))
    with channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = {"timeout": timeout, "metadata": client._headers}
        server = stub.ServerMetadata(service_pb2.ServerMetadataRequest(), **call)
        model = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=client.model), **call)
        config = stub.ModelConfig(service_pb2.ModelConfigRequest(name=client.model), **call).config
    checkpoint = config.parameters["checkpoint"].string_value if "checkpoint" in config.parameters else None
    return {"name": server.name, "version": server.version, "model_versions": list(model.versions),
            "checkpoint": checkpoint}


class PairScores:
    """One setting's scores: each generated image against its target, by CLIP similarity and (optionally) LPIPS.

    ``clip`` is a :class:`~gill.evaluation.metrics.ClipSimilarity`, ``lpips`` an
    :class:`~gill.evaluation.metrics.Lpips` or None (not computed); generated images are saved as
    ``directory/<name>.png`` when ``directory`` is given.
    """

    def __init__(self, clip, lpips, directory: Path | None = None) -> None:
        self.clip, self.lpips, self.directory = clip, lpips, directory
        self.clip_values: list[float] = []
        self.lpips_values: list[float] = []
        self.no_image = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def add(self, record: dict[str, Any], name: str, generated: Image.Image | None, target: Image.Image
            ) -> dict[str, Any]:
        """Score one pair into ``record`` (``clip_similarity``, ``lpips``; or ``error`` when no image came back)
        and return it."""
        if generated is None:
            self.no_image += 1
            record["error"] = "no image generated"
            return record
        if self.directory is not None:
            generated.save(self.directory / f"{name}.png")
        record["clip_similarity"] = float(self.clip([generated], [target])[0])
        self.clip_values.append(record["clip_similarity"])
        if self.lpips is not None:
            record["lpips"] = float(self.lpips([generated], [target])[0])
            self.lpips_values.append(record["lpips"])
        return record

    def result(self) -> dict[str, Any]:
        """``clip_similarity`` and ``lpips`` summaries (mean, std, sem, n), ``scored`` and ``no_image`` counts."""
        from gill.evaluation.report import summary

        return {"clip_similarity": summary(self.clip_values),
                "lpips": summary(self.lpips_values) if self.lpips is not None else None,
                "scored": len(self.clip_values), "no_image": self.no_image}


def load_metrics(clip_directory: Path, lpips_alexnet: Path | None, device: str | None):
    """The CLIP similarity model and, when an AlexNet file is given, LPIPS (else None), from local weights."""
    from gill.evaluation.metrics import ClipSimilarity, Lpips

    clip = ClipSimilarity.from_directory(clip_directory, device)
    return clip, Lpips.from_alexnet(lpips_alexnet, device) if lpips_alexnet is not None else None


def metrics_section(clip, lpips) -> dict[str, Any]:
    """The result's ``metrics`` (each model's identity) and ``notes`` on what is not comparable to the paper."""
    notes = []
    if lpips is None:
        notes.append("LPIPS not computed: give --lpips-alexnet (torchvision's alexnet-owt-7be5be79.pth)")
    elif not lpips.describe()["alexnet_is_torchvision_imagenet"]:
        notes.append("LPIPS trunk is not torchvision's ImageNet AlexNet: LPIPS not comparable to the paper")
    return {"metrics": {"clip_similarity": clip.describe(), "lpips": lpips.describe() if lpips is not None else None},
            "notes": notes}
