"""The public wire contract, version 1: code generated from ``protos/gill/v1/*.proto``.

``dialogue_pb2`` holds :class:`ChatRequest` (in) and :class:`ChatEvent` (streamed out). Regenerate with
``python protos/generate.py``; :mod:`gill.protocol` converts between these messages and the library's types.
"""
