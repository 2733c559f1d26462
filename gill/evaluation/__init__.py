"""Evaluation of GILL against the paper's tables (``gill eval ...``; see docs/evaluation.md).

- :mod:`gill.evaluation.metrics`: CLIP image-image similarity, LPIPS (AlexNet, 256x256), recall@k.
- :mod:`gill.evaluation.datasets`: the official VIST SIS reader and a synthetic fixture in the same format.
- :mod:`gill.evaluation.vist`: contextual image generation on VIST (Table 1 of the paper).
- :mod:`gill.evaluation.retrieval`: contextual image retrieval on VIST (Table 5).
- :mod:`gill.evaluation.decision`: the retrieve-or-generate head's macro-F1 on PartiPrompts labels.
- :mod:`gill.evaluation.report`: the result JSON (every setting recorded) and the markdown table.
"""
