"""A minimal streaming call of the ``gill`` model over Triton gRPC (the typed client library builds on this).

``stream_turn`` sends one serialized ``gill.v1.ChatRequest`` on a bidirectional stream and yields the
``gill.v1.ChatEvent`` messages as they arrive; leaving the loop, or :meth:`TurnStream.cancel`, cancels the
request on the server.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator

import numpy as np
import tritonclient.grpc as grpcclient

from gill.errors import GillError
from gill.v1 import dialogue_pb2 as pb

_END = object()


class TurnError(GillError):
    """The server answered with a transport-level error (not a typed error event)."""


class TurnStream:
    """One dialogue turn in flight; iterate it for events."""

    def __init__(self, url: str, request: pb.ChatRequest, timeout: float = 120.0, model: str = "gill") -> None:
        self._queue: queue.Queue = queue.Queue()
        self._timeout = timeout
        self._client = grpcclient.InferenceServerClient(url)
        self._client.start_stream(callback=self._on_response)
        data = grpcclient.InferInput("REQUEST", [1], "BYTES")
        data.set_data_from_numpy(np.array([request.SerializeToString()], dtype=np.object_))
        self._client.async_stream_infer(model, [data], request_id=request.request_id or uuid.uuid4().hex,
                                        enable_empty_final_response=True)
        self._closed = False

    def _on_response(self, result, error) -> None:
        if error is not None:
            self._queue.put(TurnError(str(error)))
            self._queue.put(_END)
            return
        response = result.get_response()
        output = result.as_numpy("EVENT")
        if output is not None:
            self._queue.put(pb.ChatEvent.FromString(bytes(output.reshape(-1)[0])))
        if response.parameters["triton_final_response"].bool_param:
            self._queue.put(_END)

    def __iter__(self) -> Iterator[pb.ChatEvent]:
        try:
            while True:
                item = self._queue.get(timeout=self._timeout)
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        except queue.Empty as error:
            raise TurnError(f"no event for {self._timeout:.0f} s") from error
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Cancel the request on the server (a no-op once the turn ended) and close the stream."""
        if not self._closed:
            self._closed = True
            self._client.stop_stream(cancel_requests=True)
            self._client.close()


def stream_turn(url: str, request: pb.ChatRequest, timeout: float = 120.0) -> TurnStream:
    return TurnStream(url, request, timeout)
