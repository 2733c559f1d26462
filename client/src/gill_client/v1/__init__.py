"""The public wire contract, version 1: code generated from ``protos/gill/v1/*.proto`` (proto package ``gill.v1``).

``dialogue_pb2`` holds ``ChatRequest`` (in) and ``ChatEvent`` (streamed out). Regenerate with
``python protos/generate.py``. The server (``gill.protocol``) and this client both use this one copy.
"""
