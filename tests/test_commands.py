"""Every ``monai-ld`` command, run for real on both bundles by their short names (``--bundle brain`` / ``--bundle cxr``)
as a user types them: the shipped models, tiny phantom sets in tmp, 1 training iteration, 2 sampling steps.

The walk also checks that it leaves the bundle's shipped files alone (models, configs, sample) and that no command
is left out of it (``label-server`` is served and walked by ``tests/test_label.py``: a real server over HTTP).
"""

import hashlib
import json

import pytest

from monai_ld.bundles import resolve_bundle
from monai_ld.cli import build_parser
from monai_ld.cli import main as cli_main

WALKED = ("phantoms", "demo", "counterfactual", "train", "finetune", "evaluate", "sweep-drift")
ELSEWHERE = {"label-server": "tests/test_label.py"}
# per bundle: phantom options, a target for the counterfactual, and the smallest training batch
CASES = {"brain": (["--n", "12", "--size", "32"], ["age=90", "diagnosis=AD"]),
         "cxr": (["--n", "12", "--size", "64"], ["pleural_effusion=1"])}


def _shipped(bundle):
    return {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("models", "configs", "sample_data") for p in sorted((bundle / d).rglob("*")) if p.is_file()}


def test_the_walk_covers_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(WALKED) | set(ELSEWHERE)


@pytest.mark.parametrize("alias", sorted(CASES))
def test_every_command_runs_on_the_bundle(alias, tmp_path, capsys):
    bundle = resolve_bundle(alias)
    before = _shipped(bundle)
    phantom_opts, target = CASES[alias]
    steps = ["--num-inference-steps", "2"]
    targets = [a for t in target for a in ("--target", t)]
    data, models, runs = tmp_path / "data", tmp_path / "models", tmp_path / "runs"
    manifest = data / "manifest.csv"

    def run(*argv):
        rc = cli_main([str(a) for a in argv])
        out = capsys.readouterr()
        assert rc == 0, (argv[0], out.err[-3000:])
        return out.out

    run("phantoms", alias, *phantom_opts, "--out", data, "--quiet")
    assert manifest.is_file()

    run("demo", "--bundle", alias, "--output-dir", tmp_path / "demo", *steps)
    assert json.loads((tmp_path / "demo" / "record.json").read_text())["num_inference_steps"] == 2

    image = next(r.split(",")[1] for r in manifest.read_text().splitlines()[1:])
    out = run("counterfactual", "--bundle", alias, "--input", data / image, "--source", "auto", *targets,
              "--output-dir", tmp_path / "cf", *steps)
    rec = json.loads((tmp_path / "cf" / "record.json").read_text())
    assert rec["source_estimate"]["predictor"].endswith("oracle.pt") and "source estimated" in out
    assert all(rec["target"][t.split("=")[0]] is not None for t in target)

    # the bundle's own train configs on the tmp manifest, writing into tmp (--set: any config key, as monai.bundle run)
    common = ["--manifest", manifest, "--max-iterations", "1", "--set", "batch_size=2", "--set", f"work_dir={runs}"]
    run("train", "--bundle", alias, *common, "--set", f"model_dir={models}", "--set", "checkpoint_every=1")
    assert (models / "autoencoder.pt").is_file() and (models / "model.pt").is_file()
    # both jobs shared one work dir: each resumed only its own checkpoints (the diffusion job used to load the
    # autoencoder's into the UNet)
    assert {p.name.split("_checkpoint")[0] for p in (runs / "checkpoints").iterdir()} == {"autoencoder", "diffusion"}
    run("finetune", "--bundle", alias, *common, "--checkpoint", models / "model.pt", "--output", models / "ft.pt",
        "--scheme", "lora", "--drift", "0.1")
    assert (models / "ft.pt").is_file()

    # evaluation of the shipped model on the tmp phantoms' held-out pairs
    run("evaluate", "--bundle", alias, "--manifest", manifest, "--output-dir", tmp_path / "ev", "--max-subjects", "1",
        "--drifts", "0", "--axiom-subjects", "0", "--quiet", *steps)
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["metrics"]["n_subjects"] == 1
    assert (report["volumes"] is None) == (alias == "cxr")  # regional volumes are a 3D brain measure
    run("sweep-drift", "--bundle", alias, "--manifest", manifest, "--output-dir", tmp_path / "sw", "--max-subjects", "1",
        "--drifts", "0,0.1", "--quiet", *steps)
    assert json.loads((tmp_path / "sw" / "report.json").read_text())["best_drift"] in (0.0, 0.1)

    assert _shipped(bundle) == before, "a command wrote into the bundle's shipped files"


@pytest.mark.parametrize("argv,message", [
    (["train", "--bundle", "cxr", "--set", "max_iterations"], "--set takes KEY=VALUE"),
    (["finetune", "--bundle", "cxr", "--checkpoint", "/nonexistent/model.pt"], "--checkpoint '/nonexistent/model.pt' does not exist"),
    (["train", "--bundle", "brain", "--manifest", "/nonexistent/m.csv"], "--manifest '/nonexistent/m.csv' does not exist"),
])
def test_bad_job_options_get_one_clear_error(argv, message, capsys):
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unreadable_input_gets_one_line_and_no_output(tmp_path, capsys):
    """A corrupt file given to ``counterfactual --input``: exit 2, one ``error:`` line naming the file and the accepted
    formats (no traceback), and no output folder."""
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    argv = ["counterfactual", "--bundle", "brain", "--input", str(bad), "--source", "age=75", "--source", "sex=F",
            "--source", "diagnosis=CN", "--target", "diagnosis=AD", "--output-dir", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and "broken.nii.gz" in err and "Accepted: NIfTI" in err
    assert not (tmp_path / "out").exists()
