"""Serving GILL with NVIDIA Triton Inference Server.

``model_repository/*/1/model.py`` are thin adapters; what they share lives in :mod:`gill.serving.backend`
(importable only inside Triton's Python backend), the orchestrator's remote stages in
:mod:`gill.serving.remote`, and starting a server in :mod:`gill.serving.server`.
"""
