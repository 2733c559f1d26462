"""GILL: a frozen OPT language model with a CLIP image encoder and small adapters that reads interleaved
images and text, writes text, and retrieves or generates images (Koh, Fried, Salakhutdinov 2023)."""

__version__ = "0.1.0"
