"""MONAI Label integration: serve the counterfactual bundles to 3D Slicer (or any MONAI Label client).

- :mod:`monai_ld.label.params`: request parameters -> validated counterfactual request (no MONAI Label needed);
- :mod:`monai_ld.label.models`: which models the app serves (bundle folders named after the bundles);
- :mod:`monai_ld.label.infer`: :class:`~monai_ld.label.infer.CounterfactualInferTask`, a MONAI Label ``InferTask``;
- :mod:`monai_ld.label.application`: :class:`~monai_ld.label.application.CounterfactualLabelApp`, the ``MONAILabelApp``;
- ``monai_ld/label/app/``: the app folder ``monailabel start_server --app`` takes (its ``main.py`` imports the app);
- :mod:`monai_ld.label.server`: MONAI Label's FastAPI app with infer run off the event loop and 4xx for bad JSON;
- :mod:`monai_ld.label.cli`: ``monai-ld label-server --studies DIR``.

Only the last four import ``monailabel`` (install it with ``bash scripts/install.sh test,label``; see
``docs/monai_label.md``).
"""
