"""`monai-ld demo | counterfactual | train | finetune`: the common jobs on top of the bundles."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .bundles import config_value, parse_overrides, resolve_bundle
from .settings import EditSettings


def _sample(bundle: Path) -> dict:
    f = bundle / "sample_data" / "sample.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: this bundle ships no sample input")
    s = json.loads(f.read_text())
    s["input"] = str(bundle / "sample_data" / s["input"])
    return s


def _checkpoint(bundle: Path, name: str = "model.pt") -> Path:
    ckpt = bundle / "models" / name
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} not found: train it with `monai-ld train --bundle {bundle}`")
    return ckpt


def _print_outputs(outputs: dict, record_path: str) -> None:
    rec = json.loads(Path(record_path).read_text())
    print(f"counterfactual of {rec['input']}")
    print(f"  source: {rec['source'] or 'null (unconditional abduction)'}")
    if rec.get("source_estimate"):
        est = rec["source_estimate"]
        conf = ", ".join(f"{k} p={v:.2f}" for k, v in est["confidence"].items() if v is not None)
        print(f"  source estimated by the attribute predictor: {est['values']} ({conf}); given values kept: "
              f"{est['given'] or 'none'}")
        if est.get("clipped"):
            print(f"  estimate outside the attributes' range, clipped to it (raw: {est['clipped']})")
    print(f"  target: {rec['target']}")
    print("  " + " ".join(f"{k}={rec[k]}" for k in ("drift", "strength", "guidance_scale", "seed", "num_inference_steps",
                                                   "samples")) + f" ({rec['seconds']} s)")
    if rec.get("output_space") == "native":
        reg = rec["region"]
        where = "everywhere in the model's field of view" if reg["region_voxels"] is None else \
            f"inside the edit region ({reg['region_voxels']} voxels, {100 * reg['region_fraction']:.2f} %)"
        print(f"  native output space: input + change {where}; {rec['changed_voxels']} voxels differ from the input")
    for k, v in outputs.items():
        print(f"  {k:<20} {v}")


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from .bundle_support import load_pipeline
    from .pipeline import parse_attribute_args

    bundle = resolve_bundle(args.bundle)
    auto = any(s.strip().lower() == "auto" for s in args.source or [])
    target = parse_attribute_args(args.target)
    source = parse_attribute_args([s for s in args.source or [] if s.strip().lower() != "auto"])
    if args.input_list and (args.edit_mask or args.keep_mask):
        raise ValueError("with --input-list give masks per row (CSV columns edit_mask / keep_mask), not --edit-mask/--keep-mask")
    pipe = load_pipeline(_checkpoint(bundle), device=args.device)
    if args.input_list:
        from .cohort import run_cohort

        results, failed = run_cohort(pipe, args.input_list, args.output_dir, target, source or None, overwrite=args.overwrite,
                                     batch_size=args.batch_size, estimate_source=auto, **EditSettings.from_args(args))
        counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped (done)", "failed")}
        print(f"{len(results)} rows: {counts['done']} done, {counts['skipped (done)']} skipped (finished before), "
              f"{failed} failed; summary: {Path(args.output_dir) / 'summary.csv'}")
        return 1 if failed else 0
    outputs = pipe.run_to_dir(args.input, args.output_dir, target=target, source=source or None,
                              overwrite=args.overwrite, edit_mask=args.edit_mask, keep_mask=args.keep_mask,
                              estimate_source=auto, **EditSettings.from_args(args))
    _print_outputs(outputs, outputs["record"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bundle_support import load_pipeline

    bundle = resolve_bundle(args.bundle)
    sample = _sample(bundle)
    pipe = load_pipeline(_checkpoint(bundle), device=args.device)
    print(f"bundle {bundle.name}: {sample.get('description', '')}")
    outputs = pipe.run_to_dir(sample["input"], args.output_dir, target=sample["target"], source=sample.get("source"),
                              overwrite=args.overwrite, **EditSettings.from_args(args))
    _print_outputs(outputs, outputs["record"])
    print(f"open {outputs['figure']} to see input / counterfactual / difference")
    return 0


def _job_overrides(args: argparse.Namespace, named: dict) -> dict:
    """The config keys a train / finetune run overrides: ``--set KEY=VALUE`` items, then ``--manifest`` /
    ``--checkpoint`` and the named options (which win over a ``--set`` of the same key)."""
    out = parse_overrides(args.set)
    for key, path in (("manifest", args.manifest), ("checkpoint", getattr(args, "checkpoint", None))):
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{key} '{path}' does not exist")
            out[key] = str(Path(path).resolve())
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def _bundle_run(bundle: Path, configs: list[str], overrides: dict, nproc: int = 1) -> int:
    """``python -m monai.bundle run`` of ``configs`` over the bundle's ``common.json`` with ``overrides`` (strings go as
    typed, as ``--KEY VALUE`` on MONAI's command line; other values as JSON)."""
    from .bundle_support import config_files

    # configs/common.json first (the bundle's shared settings), then the job's configs, as model-zoo bundles merge them
    files = config_files(bundle, *configs, *(["multi_gpu_train.json"] if nproc > 1 else []))
    cmd = ["-m", "monai.bundle", "run", "--config_file", str(files) if len(files) > 1 else files[0],
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf")]
    for k, v in overrides.items():
        if v is not None:
            cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd
    else:
        cmd = [sys.executable] + cmd
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env={**os.environ})


def _campaign(bundle: Path, args: argparse.Namespace) -> int:
    cfg = bundle / "configs" / "campaign.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{bundle.name} has no training campaign (configs/campaign.json); bundles with one: "
                                f"brain_mri_counterfactual")
    if args.export:
        from monai.bundle import ConfigParser

        from .bundle_support import config_files
        from .campaign import export_model

        parser = ConfigParser()
        parser.read_config(config_files(bundle, cfg.name))  # over configs/common.json, as the campaign runs
        parser["bundle_root"] = str(bundle)
        for key, value in parse_overrides(args.set).items():  # --set campaign_dir=... exports that campaign
            parser[key] = config_value(value)
        out = export_model(parser.get_parsed_content("campaign_dir"), args.export, parser.get_parsed_content("attributes"),
                           parser.get_parsed_content("preprocessing_spec"), parser.get_parsed_content("defaults"))
        print(f"exported the campaign's model to {out}")
        return 0
    ignored = [f for f, v in (("--max-iterations", args.max_iterations), ("--drift", args.drift)) if v is not None]
    if ignored or args.nproc != 1:
        raise ValueError(f"{', '.join(ignored + (['--nproc'] if args.nproc != 1 else []))} do(es) not apply to --campaign: "
                         f"the plan is in {cfg} (override its keys with python -m monai.bundle run)")
    return _bundle_run(bundle, ["campaign.json"], _job_overrides(args, {
        "stage": args.stage, "budget_min": args.budget_min, "seed": args.seed, "threads": args.threads,
        "save_every_min": args.save_every_min, "device": args.device}))


def cmd_train(args: argparse.Namespace) -> int:
    bundle = resolve_bundle(args.bundle)
    if args.campaign or args.export:
        return _campaign(bundle, args)
    if args.budget_min is not None or args.threads is not None or args.save_every_min is not None or args.device:
        raise ValueError("--budget-min, --threads, --save-every-min and --device apply to --campaign runs")
    if args.stage == "decoder":
        raise ValueError("--stage decoder is a campaign stage (the decoder fine-tuned on a frozen encoder): add --campaign")
    stages = {"autoencoder": ["train_autoencoder.json"], "diffusion": ["train_diffusion.json"],
              "all": ["train_autoencoder.json", "train_diffusion.json"]}[args.stage]
    for cfg in stages:
        rc = _bundle_run(bundle, [cfg], _job_overrides(args, {
            "max_iterations": args.max_iterations, "seed": args.seed,
            "drift": args.drift if cfg == "train_diffusion.json" else None}), args.nproc)
        if rc:
            return rc
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    bundle = resolve_bundle(args.bundle)
    return _bundle_run(bundle, ["finetune.json"], _job_overrides(args, {
        "scheme": args.scheme, "drift": args.drift, "lora_rank": args.lora_rank, "max_iterations": args.max_iterations,
        "output": str(Path(args.output).resolve()) if args.output else None, "seed": args.seed}), args.nproc)


def _edit_options(p: argparse.ArgumentParser) -> None:
    EditSettings.add_arguments(p.add_argument_group("edit settings (default: the bundle's)"))
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --output-dir (never the input)")


def _config_options(p: argparse.ArgumentParser, checkpoint: bool = False) -> None:
    p.add_argument("--manifest", help="CSV manifest: path, subject_id, split (train / val / test) and the bundle's "
                                      "attribute columns (default: the bundle's phantoms, generated when absent)")
    if checkpoint:
        p.add_argument("--checkpoint", help="the model to fine-tune (default: <bundle>/models/model.pt)")
    add_set_option(p)


def add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of the bundle's configs, as `python -m monai.bundle run --KEY VALUE` does "
                        "(repeat; e.g. --set phantoms#n=12 --set model_dir=/tmp/models); named options win")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the bundled model on its bundled sample (offline) and write the outputs",
                       description="The main job in one command: the brain bundle's model edits its sample phantom scan "
                                   "(a held-out subject) to be older and have Alzheimer's disease.")
    p.add_argument("--output-dir", default="monai_ld_demo", help="where to write (default ./monai_ld_demo)")
    p.add_argument("--bundle", default="brain", help="brain (default), cxr, or a bundle folder")
    _edit_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("counterfactual", help="counterfactual of an image file under target attributes",
                       description="Writes counterfactual.nii.gz (and .png for 2D), difference.nii.gz (and .png), "
                                   "figure.png and record.json (uncertainty.nii.gz with --samples) into --output-dir, "
                                   "in the input's geometry; by default in its own resolution, units and dtype, "
                                   "unchanged outside the edit region.",
                       epilog="example: monai-ld counterfactual --bundle brain --input scan.nii.gz --source age=62 "
                              "--source sex=F --source diagnosis=CN --target age=85 --target diagnosis=AD --drift 0.05 "
                              "--output-dir out/")
    p.add_argument("--bundle", required=True, help="bundle folder or name (brain, cxr)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="NIfTI / NRRD / DICOM folder (3D) or PNG / JPEG / DICOM (2D)")
    src.add_argument("--input-list", dest="input_list", metavar="CSV_OR_FOLDER",
                     help="cohort: a CSV with a 'path' column (absolute or relative to the CSV) and optional attribute "
                          "columns (each row's source) and edit_mask / keep_mask columns, or a folder of images; one "
                          "output folder per row plus summary.csv; finished rows are skipped on a re-run; exit 1 if any "
                          "row failed")
    p.add_argument("--batch-size", type=int, default=4, dest="batch_size",
                   help="with --input-list: inputs edited together in one model batch (default 4)")
    p.add_argument("--target", action="append", metavar="NAME=VALUE", required=True,
                   help="target attribute (repeat); with --source only the changed ones are needed")
    p.add_argument("--source", action="append", metavar="NAME=VALUE",
                   help="the input's own attributes (repeat); 'auto': the bundle's attribute predictor estimates the "
                        "ones not given (recorded with their confidence); without --source the abduction runs under "
                        "the null condition")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--edit-mask", dest="edit_mask", metavar="FILE",
                   help="label image on the input's grid (NIfTI / NRRD / PNG, nonzero = in): change only here")
    p.add_argument("--keep-mask", dest="keep_mask", metavar="FILE",
                   help="label image on the input's grid (nonzero = in): never change here")
    _edit_options(p)
    p.set_defaults(func=cmd_counterfactual)

    p = sub.add_parser("train", help="train a bundle's autoencoder and/or diffusion model with its train configs")
    p.add_argument("--bundle", required=True)
    p.add_argument("--stage", choices=("autoencoder", "diffusion", "decoder", "all"), default="all")
    p.add_argument("--max-iterations", type=int)
    p.add_argument("--drift", type=float, help="train the diffusion model with LD forward drift δ")
    p.add_argument("--seed", type=int)
    p.add_argument("--nproc", type=int, default=1, help="processes under torchrun (DDP; gloo on CPU, NCCL on GPU)")
    g = p.add_argument_group("campaign (resumable training across sessions; configs/campaign.json)")
    g.add_argument("--campaign", action="store_true",
                   help="resume the bundle's campaign from <bundle>/campaign/*.state.pt and train until --budget-min")
    g.add_argument("--budget-min", type=float, dest="budget_min", help="wall-clock budget in minutes (default: the config's)")
    g.add_argument("--save-every-min", type=float, dest="save_every_min", help="checkpoint interval in minutes")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")
    g.add_argument("--export", metavar="FILE", help="write the campaign's autoencoder + diffusion model as one checkpoint")
    _config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a bundle's model (full / embedding / lora), with or without LD")
    p.add_argument("--bundle", required=True)
    p.add_argument("--scheme", choices=("full", "embedding", "lora"), default="full")
    p.add_argument("--drift", type=float, help="LD δ during fine-tuning (0 = plain)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--max-iterations", type=int)
    p.add_argument("--output", help="output checkpoint (default models/model_finetuned.pt)")
    p.add_argument("--seed", type=int)
    p.add_argument("--nproc", type=int, default=1)
    _config_options(p, checkpoint=True)
    p.set_defaults(func=cmd_finetune)
