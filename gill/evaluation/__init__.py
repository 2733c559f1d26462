"""Evaluation of GILL against the paper's tables (``gill eval ...``; see docs/evaluation.md).

- :mod:`gill.evaluation.metrics`: CLIP image-image similarity, LPIPS (AlexNet, 256x256), recall@k.
- :mod:`gill.evaluation.datasets`: the official VIST SIS reader and a synthetic fixture in the same format.
- :mod:`gill.evaluation.generation`: what the generation evals share (forced generation, scoring pairs).
- :mod:`gill.evaluation.vist`: contextual image generation on VIST (Table 1 of the paper).
- :mod:`gill.evaluation.visdial_data`: the official VisDial v1.0 reader, its image folder and a synthetic fixture.
- :mod:`gill.evaluation.visdial`: contextual image generation on VisDial (Table 2).
- :mod:`gill.evaluation.fid`: FID with clean-fid against cached reference statistics (MS-COCO zero-shot).
- :mod:`gill.evaluation.retrieval`: contextual image retrieval on VIST (Table 5).
- :mod:`gill.evaluation.fetch_vist`: bounded, resumable download of a VIST split's photos.
- :mod:`gill.evaluation.cc3m`: CC3M-val text<->image recall@1/5/10, with training validation's code.
- :mod:`gill.evaluation.plots`: the VIST run's ``grid.png`` (PIL only).
- :mod:`gill.evaluation.decision`: the retrieve-or-generate head's macro-F1 on PartiPrompts labels.
- :mod:`gill.evaluation.report`: the result JSON (every setting recorded) and the markdown table.
"""
