"""MONAI Label app folder of monai_ld: ``monailabel start_server --app <this folder> --studies <images>``.

MONAI Label loads this file and instantiates the ``MONAILabelApp`` subclass it finds here. The app itself lives in
:mod:`monai_ld.label.application` (so it is importable and tested like the rest of the package); ``monai-ld
label-server`` copies this folder to a writable place because the server writes ``logs/``, ``model/`` ... into it.
"""

from monai_ld.label.application import CounterfactualLabelApp  # noqa: F401  (found by MONAI Label)
