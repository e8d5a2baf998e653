"""``monai-ld label-server``: the real MONAI Label server with the counterfactual app on a folder of studies."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["add_parser", "server_command", "prepare_app_dir"]

APP_SOURCE = Path(__file__).resolve().parent / "app"


def prepare_app_dir(app_dir: str | os.PathLike | None, port: int) -> Path:
    """A writable copy of the shipped app folder (MONAI Label writes ``logs/``, ``model/`` ... into its app folder)."""
    d = Path(app_dir) if app_dir else Path(tempfile.gettempdir()) / f"monai_ld_label_app_{port}"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_SOURCE / "main.py", d / "main.py")
    return d


def server_command(studies: str | os.PathLike, app_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                   bundles: str | None = None, models: str | None = None, outputs: str | None = None,
                   device: str | None = None, log_level: str = "info", python: str | None = None) -> list[str]:
    """The ``monailabel start_server`` command line (run with the venv's Python, as ``python -m monailabel.main``)."""
    cmd = [python or sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
           "--studies", str(studies), "--host", host, "--port", str(port),
           "--uvicorn_app", "monai_ld.label.server:app", "--log_level", log_level]
    for key, value in (("bundles", bundles), ("models", models), ("outputs", outputs), ("device", device)):
        if value:
            cmd += ["--conf", key, str(value)]
    return cmd


def _run(args: argparse.Namespace) -> int:
    try:
        import monailabel  # noqa: F401
    except ImportError:
        raise ValueError("MONAI Label is not installed: run `bash scripts/install.sh test,label` "
                         "(see docs/monai_label.md)") from None
    studies = Path(args.studies)
    if not studies.is_dir():
        raise FileNotFoundError(f"studies folder not found: {studies}")
    app_dir = prepare_app_dir(args.app_dir, args.port)
    cmd = server_command(studies.resolve(), app_dir, args.host, args.port, args.bundles, args.models, args.outputs,
                         args.device, args.log_level)
    print(f"monai-ld label-server: app folder {app_dir}; http://{args.host}:{args.port}/info/", flush=True)
    print(" ".join(cmd), flush=True)
    if os.name == "posix":  # become the server: signals (Ctrl-C, SIGTERM) reach it directly
        os.execv(cmd[0], cmd)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "label-server",
        help="serve the counterfactual bundles to 3D Slicer through a MONAI Label server",
        description="Start the real MONAI Label server (monailabel start_server) with the monai_ld app: one model per "
                    "bundle (brain_mri_counterfactual, chest_xray_counterfactual), images from --studies. "
                    "POST /infer/<model>?image=<id>&output=image with a params form field "
                    "(JSON: target, drift, strength, guidance_scale, seed, result) returns the counterfactual NIfTI. "
                    "See docs/monai_label.md.",
    )
    p.add_argument("--studies", required=True, help="folder of images (NIfTI...) MONAI Label serves as its datastore")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--bundles", default=None, help="folder of bundle folders (default: the repository's bundles/)")
    p.add_argument("--models", default=None, help="NAME=PATH[,NAME=PATH] (bundle folder or .pt) instead of --bundles")
    p.add_argument("--outputs", default=None,
                   help="where each run's counterfactual/difference/figure/record are kept "
                        "(default: STUDIES/counterfactuals)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--app-dir", default=None, help="writable app folder for MONAI Label (default: a temp folder)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run)
