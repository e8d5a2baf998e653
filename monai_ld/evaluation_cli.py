"""``monai-ld evaluate`` and ``monai-ld sweep-drift``: a bundle's ``configs/evaluate.json`` from the command line.

Both read ``<bundle>/configs/evaluate.json`` over ``configs/common.json`` (so the command line and
``python -m monai.bundle run`` share one set of defaults), override what the options name, and evaluate its
``evaluate`` / ``sweep_drift`` item (:func:`~monai_ld.jobs.run_evaluation` / :func:`~monai_ld.jobs.run_sweep`). Without
``--manifest`` they use the bundle's own phantoms (its config regenerates the held-out set when it is missing).
Each writes ``report.json`` (+ ``report.md`` and PNGs) into ``--output-dir``. Bad input (no bundle, no model, a
manifest without the needed columns) is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .bundle_cli import add_set_option
from .settings import EditSettings

CONFIG = "configs/evaluate.json"
_SETTINGS = ("num_inference_steps", "strength", "guidance_scale", "seed")  # what evaluate.json's settings name


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle name (brain, cxr) or folder (holds configs/evaluate.json and models/model.pt)")
    p.add_argument("--manifest", default=None, help="CSV manifest (default: the bundle's phantoms, generated when absent)")
    p.add_argument("--output-dir", required=True, help="where report.json, report.md and the PNGs go")
    p.add_argument("--split", default=None, help="split whose images are edited (evaluate: test; sweep-drift: val)")
    p.add_argument("--max-subjects", type=int, default=None, help="at most this many factual images")
    EditSettings.add_arguments(p, only=_SETTINGS)
    p.add_argument("--drifts", default=None,
                   help="δ values: comma list (evaluate also takes 'searched', e.g. 0,searched) or a grid a:b:step")
    p.add_argument("--oracle", default=None, help="attribute oracle checkpoint (default: <bundle>/models/oracle.pt)")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: <bundle>/models/model.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the bundle's choice)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_set_option(p)


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate",
        help="evaluate a bundle's counterfactuals on held-out ground-truth pairs (report.json / .md / PNG)",
        description="Edit held-out factual images towards their ground-truth partner's attributes for each δ "
        "(default: 0 and the searched δ) and report ground-truth error, similarity, effectiveness, composition, "
        "reversibility, minimality and realism (FID/KID/MMD on oracle features).",
    )
    _add_common(ev)
    ev.add_argument("--axiom-subjects", type=int, default=None,
                    help="how many subjects also get the composition / reversibility edits")
    ev.add_argument("--composition-steps", default=None, help="k values of the null-intervention test, e.g. 1,2")
    ev.add_argument("--main-drift", default=None, help="δ of the top-level metrics (default: the searched δ)")
    ev.add_argument("--sweep-report", default=None, help="report.json of a sweep-drift run ('searched' reads its best_drift)")
    ev.add_argument("--sweep-subjects", type=int, default=None, help="images in the δ sweep run when no --sweep-report")
    ev.add_argument("--sweep-drifts", default=None, help="grid of that sweep (default -0.2:0.2:0.05)")
    ev.set_defaults(func=run_evaluate)

    sw = subparsers.add_parser(
        "sweep-drift",
        help="grid-search the Latent Drifting δ on held-out images (report.json with best_drift and curve)",
        description="Edit held-out images (seeded one-attribute interventions) for every δ of a grid and pick the δ "
        "minimising the counterfactual objective (oracle loss + proximity) or a distribution distance.",
    )
    _add_common(sw)
    sw.add_argument("--objective", choices=("counterfactual", "distribution"), default=None)
    sw.add_argument("--distance", choices=("l1_mean", "mmd", "fid", "kid"), default=None,
                    help="distance of the distribution objective")
    sw.add_argument("--lam", type=float, default=None, help="λ weighting the oracle loss")
    sw.set_defaults(func=run_sweep)


def _unwrap(e: BaseException) -> BaseException:
    """MONAI's config parser wraps errors raised inside ``$`` expressions in ``RuntimeError('Failed to evaluate …')``."""
    while isinstance(e, RuntimeError) and e.__cause__ is not None and "Failed to evaluate" in str(e):
        e = e.__cause__
    return e


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} takes comma-separated integers, got {text!r}") from None


def _parser(args: argparse.Namespace):
    from monai.bundle import ConfigParser

    from .bundle_support import config_files
    from .bundles import config_value, parse_overrides, resolve_bundle

    bundle = resolve_bundle(args.bundle, needs=CONFIG)
    parser = ConfigParser()
    parser.read_config(config_files(bundle, Path(CONFIG).name))  # configs/common.json + configs/evaluate.json
    parser["bundle_root"] = str(bundle.resolve())
    parser["output_dir"] = str(Path(args.output_dir))
    for key, text in parse_overrides(args.set).items():  # first: the named options below win
        parser[key] = config_value(text)
    if args.manifest is not None:
        m = Path(args.manifest)
        if not m.is_file():
            raise FileNotFoundError(f"manifest '{m}' does not exist")
        parser["manifest"] = str(m.resolve())
    if args.checkpoint is not None:
        parser["checkpoint"] = str(Path(args.checkpoint).resolve())
    if args.oracle is not None:
        parser["oracle"] = str(Path(args.oracle).resolve())
    if args.device is not None:
        parser["device"] = args.device
    if args.threads is not None:
        parser["num_threads"] = args.threads
    parser["progress"] = not args.quiet
    for key, value in EditSettings.from_args(args).items():
        parser[f"settings#{key}"] = value
    return parser


def _evaluate(parser, item: str) -> dict:
    try:
        ckpt = parser.get_parsed_content("checkpoint")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"model checkpoint '{ckpt}' does not exist (train the bundle first)")
        return parser.get_parsed_content(item)
    except RuntimeError as e:
        raise _unwrap(e) from None


def _set(parser, args: argparse.Namespace, options: dict) -> None:
    """``parser[key] = convert(value)`` for each ``option: (key, convert)`` the command line gave."""
    for option, (key, convert) in options.items():
        value = getattr(args, option)
        if value is not None:
            parser[key] = convert(value)


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"sweep report '{path}' does not exist")
    return str(Path(path).resolve())


def _drifts(text: str):
    from .evaluation import parse_drifts

    return parse_drifts(text)


def _grid(text: str):
    grid = _drifts(text)
    if "searched" in grid:
        raise ValueError("sweep-drift --drifts takes numbers only")
    return grid


def _same(v):
    return v


EVALUATE_OPTIONS = {"split": ("split", _same), "max_subjects": ("max_subjects", _same),
                    "axiom_subjects": ("axiom_subjects", _same), "drifts": ("drifts", _drifts),
                    "composition_steps": ("composition_steps", lambda t: _ints(t, "--composition-steps")),
                    "main_drift": ("main_drift", _same), "sweep_report": ("sweep_report", _existing),
                    "sweep_subjects": ("sweep#max_subjects", _same), "sweep_drifts": ("sweep#drifts", _same)}
SWEEP_OPTIONS = {"split": ("sweep#split", _same), "max_subjects": ("sweep#max_subjects", _same),
                 "drifts": ("sweep#drifts", _grid), "objective": ("sweep#objective", _same),
                 "distance": ("sweep#distance", _same), "lam": ("sweep#lam", _same)}


def run_evaluate(args: argparse.Namespace) -> int:
    parser = _parser(args)
    _set(parser, args, EVALUATE_OPTIONS)
    report = _evaluate(parser, "evaluate")
    out = Path(args.output_dir)
    m = report["metrics"]
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} (main δ = {report['main_drift']:g}, {m['n_subjects']} subjects)")
    keys = ("gt_l1", "gt_ssim", "ssim", "psnr", "effectiveness", "composition", "reversibility", "minimality", "fid", "kid", "mmd")
    print(json.dumps({k: m.get(k) for k in keys}, indent=1))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    parser = _parser(args)
    _set(parser, args, SWEEP_OPTIONS)
    report = _evaluate(parser, "sweep_drift")
    print(f"wrote {Path(args.output_dir) / 'report.json'}: best δ = {report['best_drift']:g} ({report['objective']})")
    return 0
