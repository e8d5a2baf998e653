"""MONAI Label's own FastAPI app (``monailabel.app:app``) with two serving fixes, for ``--uvicorn_app``.

``monai-ld label-server`` starts the real ``monailabel start_server`` with ``--uvicorn_app monai_ld.label.server:app``:

- MONAI Label 0.8.5 declares ``POST /infer/{model}`` as ``async def`` yet runs the model inside it, which blocks the
  event loop: while one counterfactual is computed, nothing else (``/info/``, ``/datastore/``, other clients) is
  answered. Here the same handler (MONAI Label's ``run_inference``) is registered as a plain ``def``, which FastAPI
  runs in its thread pool; requests then run concurrently (only two for the same run folder wait for each other).
- a ``params`` form field that is not JSON answers 400 with the reason (MONAI Label answers 500), and MONAI Label's
  own ``MONAILabelException`` answers 422 with its message instead of a bare 500.

Everything else (routes, datastore, auth) is MONAI Label's, unchanged. Plain
``monailabel start_server --app monai_ld/label/app`` works too, without these two fixes.
"""

from __future__ import annotations

import json
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints import infer as _infer
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelException

__all__ = ["app"]

# Swap the handler on MONAI Label's infer router *before* ``monailabel.app`` includes it (so this works whether FastAPI
# copies routes at include time or resolves them lazily).
_infer.router.routes[:] = [r for r in _infer.router.routes
                           if not (isinstance(r, APIRoute) and r.path == "/infer/{model}" and "POST" in r.methods)]


@_infer.router.post("/{model}", summary=f"{RBAC_USER}Run Inference for supported model")
def api_run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[_infer.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """MONAI Label's ``run_inference``, run in FastAPI's thread pool (a plain ``def``), after checking ``params``."""
    try:
        parsed = json.loads(params) if params else {}
    except json.JSONDecodeError as e:
        raise HTTPException(status_code=400, detail=f"params must be a JSON object: {e}") from None
    if not isinstance(parsed, dict):
        raise HTTPException(status_code=400, detail=f"params must be a JSON object, got {type(parsed).__name__}")
    return _infer.run_inference(background_tasks, model, image, session_id, params, file, label, output)


from monailabel.app import app  # noqa: E402  (after the swap above)


@app.exception_handler(MONAILabelException)
def _monailabel_exception(request, exc: MONAILabelException):
    return JSONResponse(status_code=422, content={"detail": f"{exc.error.value}: {exc.msg}"})
