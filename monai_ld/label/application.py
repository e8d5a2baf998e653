"""The MONAI Label app: one :class:`~monai_ld.label.infer.CounterfactualInferTask` per bundle, named after it.

App config (``monailabel start_server ... --conf KEY VALUE``; ``monai-ld label-server`` sets them from its options):

- ``bundles``: folder of bundle folders (default: the repository's ``bundles/``; see :mod:`monai_ld.label.models`);
- ``models``: ``name=path[,name=path]`` (bundle folder or ``.pt``) instead of scanning ``bundles``;
- ``outputs``: where each run's counterfactual, difference map, figure and record are kept
  (default ``<studies>/counterfactuals``, outside MONAI Label's image list which only looks at the top level);
- ``device``: torch device (default ``cpu``, or ``cuda`` when available).

Errors a client can fix answer 4xx with the reason: unknown model or image id (404), bad params (422 / 400).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException

from .models import discover_models, parse_models_conf
from .params import RequestError

__all__ = ["CounterfactualLabelApp"]

logger = logging.getLogger(__name__)


class CounterfactualLabelApp(MONAILabelApp):
    """Serves the counterfactual bundles (see the module docstring for the config keys)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = dict(conf or {})
        import torch

        self.device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        models = parse_models_conf(conf["models"]) if conf.get("models") else None
        self.model_paths = discover_models(conf.get("bundles") or None, models)
        self.outputs_dir = Path(conf.get("outputs") or Path(studies) / "counterfactuals")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai_ld counterfactuals",
            description="Latent Drifting counterfactual images (monai_ld): the image under other attributes, "
                        "and the difference map",
            version="1",
        )

    def init_infers(self) -> dict[str, Any]:
        from .infer import CounterfactualInferTask

        infers = {}
        for name, ckpt in self.model_paths.items():
            try:
                infers[name] = CounterfactualInferTask(name, ckpt, self.outputs_dir, device=self.device)
                logger.info("serving model %s from %s", name, ckpt)
            except Exception as e:  # a broken checkpoint must not take the other models down
                logger.error("model %s (%s) cannot be loaded, not served: %s", name, ckpt, e)
        if not infers:
            logger.warning("no counterfactual model found (bundles without models/model.pt?)")
        return infers

    def init_trainers(self) -> dict[str, Any]:
        return {}  # training runs through the bundles' train configs, not through MONAI Label

    def init_strategies(self) -> dict[str, Any]:
        return super().init_strategies()

    def _is_upload(self, image: str) -> bool:
        """An image file MONAI Label itself wrote for an uploaded ``file`` (a temporary file)."""
        try:
            return Path(image).resolve().parent == Path(os.path.realpath(__import__("tempfile").gettempdir()))
        except OSError:
            return False

    def infer(self, request, datastore=None):
        """MONAI Label's infer with client errors answered as 4xx (``HTTPException``) instead of 500s."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; served: "
                                                        f"{', '.join(sorted(self._infers)) or 'none'}")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="no image given: use ?image=<id> (see /datastore/) or upload a file")
        request = dict(request)
        if not self._is_upload(image):
            ds = datastore if datastore else self.datastore()
            if not ds.get_image_uri(image):
                ids = sorted(ds.list_images())
                shown = ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else "")
                raise HTTPException(status_code=404, detail=f"unknown image id {image!r}; images in the datastore: "
                                                            f"{shown or 'none'}")
            request["image_id"] = image
        else:
            request["image_id"] = Path(image).name.split(".")[0]
        try:
            return super().infer(request, datastore)
        except RequestError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
        except MONAILabelException as e:
            raise HTTPException(status_code=422, detail=f"{e.error.value}: {e.msg}") from None
        except HTTPException:
            raise
        except Exception as e:
            logger.exception("infer %s on %s failed", model, image)
            raise HTTPException(status_code=500, detail=f"counterfactual failed: {type(e).__name__}: {e}") from None
