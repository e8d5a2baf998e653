"""The counterfactual evaluator (ignite/MONAI engine), the evaluation jobs and `monai-ld evaluate|sweep-drift`.

Tiny stand-in model (32³, tiny AE/UNet with a non-zero output layer) and a 12-subject phantom set; the bundle is a
temporary folder holding the brain bundle's REAL configs/common.json + configs/evaluate.json, so the config and the
CLI are tested together.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomise_output
from PIL import Image

from monai_ld.cli import main
from monai_ld.evaluation import (
    AttributeOracle,
    CounterfactualEvaluator,
    PipelineEditor,
    counterfactual_metrics,
    intervention_targets,
    load_counterfactual_pairs,
    reversibility,
    train_oracle,
)
from monai_ld.evaluation.pairs import add_latent_oracle, load_reference, make_batches
from monai_ld.evaluation.set_metrics import FLAT_METRICS
from monai_ld.evaluation.similarity import l1, ssim

REPO = Path(__file__).resolve().parents[1]
BRAIN_EVAL_CONFIG = REPO / "bundles" / "brain_mri_counterfactual" / "configs" / "evaluate.json"
BRAIN_COMMON_CONFIG = BRAIN_EVAL_CONFIG.with_name("common.json")  # evaluate.json merges over it
PREP = {"chain": "brain_mri", "spatial_size": [32, 32, 32], "pixdim": [5.75] * 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small 3D convs on a shared 2-core machine: 2 OpenMP threads spin against the other jobs (measured 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    from monai_ld import ConditionalLDM
    from monai_ld.data.phantoms import brain_attribute_encoder
    from monai_ld.data.phantoms.writer import write_phantom_dataset
    from monai_ld.networks import autoencoder_config, unet_config

    root = tmp_path_factory.mktemp("evalbundle")
    manifest = write_phantom_dataset("brain", root / "phantoms", n=12, size=32, seed=0)
    enc = brain_attribute_encoder()
    torch.manual_seed(0)
    model = ConditionalLDM(autoencoder_config(3, "tiny"), unet_config(3, 3, enc.dim, "tiny"), enc,
                           meta={"preprocessing": PREP, "defaults": {"num_inference_steps": 3}})
    randomise_output(model.unet)
    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    shutil.copy(BRAIN_EVAL_CONFIG, bundle / "configs" / "evaluate.json")
    shutil.copy(BRAIN_COMMON_CONFIG, bundle / "configs" / "common.json")
    model.save(bundle / "models" / "model.pt")
    images, rows, _ = load_reference(manifest, PREP, enc, "train")
    oracle = train_oracle(images, rows, enc, epochs=2, batch_size=4, channels=(4, 8, 8, 16))
    oracle.save(bundle / "models" / "oracle.pt")
    return {"root": root, "bundle": bundle, "manifest": Path(manifest), "encoder": enc, "model": model}


def _pipe(setup):
    from monai_ld.pipeline import CounterfactualPipeline

    return CounterfactualPipeline.from_checkpoint(setup["bundle"] / "models" / "model.pt")


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def test_pairs_follow_the_manifest(setup):
    import csv

    rows = list(csv.DictReader(open(setup["manifest"])))
    cf_rows = [r for r in rows if r["counterfactual_of"]]
    pairs = load_counterfactual_pairs(setup["manifest"], PREP, setup["encoder"], "test")
    assert len(pairs) == len(cf_rows) >= 2
    for p, r in zip(pairs, cf_rows):
        assert p["image_id"] == r["counterfactual_of"] and p["gt_id"] == r["image_id"]
        assert p["image"].shape == p["ground_truth"].shape == (1, 32, 32, 32)
        assert len(p["intervened"]) == 1  # the phantom writer intervenes on one attribute
        n = p["intervened"][0]
        assert str(p["target"][n]) in (r[n], str(float(r[n])) if n == "age" else r[n])
        assert all(p["source"][k] == p["target"][k] for k in p["source"] if k != n)
        # same identity, one mechanism changed: the images are close but not equal
        assert 0 < l1(p["image"][None], p["ground_truth"][None]) < 0.05
    assert len(load_counterfactual_pairs(setup["manifest"], PREP, setup["encoder"], "test", max_subjects=1)) == 1


def test_intervention_targets_change_one_attribute_in_range(setup):
    enc = setup["encoder"]
    _, rows, _ = load_reference(setup["manifest"], PREP, enc, "train")
    t1, t2 = intervention_targets(rows, enc, seed=3), intervention_targets(rows, enc, seed=3)
    assert t1 == t2
    for r, t in zip(rows, t1):
        changed = [k for k in enc.names if r[k] != t[k]]
        assert len(changed) == 1
        enc.validate(t)  # in range / known class
        if changed[0] == "age":
            assert abs(t["age"] - r["age"]) >= 0.25 * 55 - 0.1


# ---------------------------------------------------------------------------------------------------------------
# the engine, with an analytic editor (known answers)
# ---------------------------------------------------------------------------------------------------------------
def _known_batches(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.rand(1, 16, 16, 16, generator=g)
        src = {"age": 50.0 + i, "sex": "F", "diagnosis": "CN"}
        tgt = {**src, "age": 80.0}
        out.append({"image": x, "ground_truth": x + 0.02, "source": src, "target": tgt, "intervened": ["age"],
                    "image_id": f"s{i}", "gt_id": f"s{i}_cf"})
    return out


@pytest.mark.parametrize("kind", ["shift", "shrink"])
def test_engine_known_answers(setup, kind):
    """shift: x + (age_t - age_s)/1000 — invertible and null-preserving (composition = reversibility = 0);
    shrink: 0.9·x whatever the rows — composition k = mean|x - 0.9^k x|, reversibility = mean|x - 0.81 x|."""
    def edit(x, src, tgt):
        if kind == "shrink":
            return 0.9 * x
        d = torch.tensor([(t["age"] - s["age"]) / 1000 for s, t in zip(src, tgt)]).view(-1, 1, 1, 1, 1)
        return x + d

    pairs = _known_batches()
    enc = setup["encoder"]
    key, extra = counterfactual_metrics((16, 16, 16), enc)
    engine = CounterfactualEvaluator("cpu", make_batches(pairs, 2), edit, composition_steps=(1, 3), axiom_subjects=2,
                                     key_val_metric=key, additional_metrics=extra)
    engine.run()
    m = engine.state.metrics
    x = torch.stack([p["image"] for p in pairs])
    gt = torch.stack([p["ground_truth"] for p in pairs])
    cf = edit(x, [p["source"] for p in pairs], [p["target"] for p in pairs])
    assert m["gt_l1"] == pytest.approx(l1(cf, gt), rel=1e-5)
    assert m["gt_ssim"] == pytest.approx(ssim(cf, gt), rel=1e-4)
    assert m["gt_l1_input"] == pytest.approx(0.02, rel=1e-4)
    assert m["l1"] == pytest.approx(l1(cf, x), rel=1e-5)
    s = m["set_metrics"]
    assert s["ground_truth"]["counterfactual"]["l1"] == pytest.approx(m["gt_l1"], rel=1e-5)  # library == MONAI handler
    comp, rev = s["composition"], s["reversibility"]
    assert comp["1"]["n"] == rev["n"] == 2 and comp["1"]["per_sample"][2] is None  # axiom budget: first 2 samples
    xa = x[:2]
    if kind == "shift":
        assert comp["1"]["mean"] == pytest.approx(0, abs=1e-7) and comp["3"]["mean"] == pytest.approx(0, abs=1e-7)
        assert rev["mean"] == pytest.approx(0, abs=1e-6)
    else:
        assert comp["1"]["mean"] == pytest.approx(float((0.1 * xa).abs().mean()), rel=1e-5)
        assert comp["3"]["mean"] == pytest.approx(float(((1 - 0.9**3) * xa).abs().mean()), rel=1e-5)
        assert rev["mean"] == pytest.approx(float(((1 - 0.81) * xa).abs().mean()), rel=1e-5)
    # no oracle: the oracle parts are absent with a reason
    assert s["effectiveness"] is None and s["realism"] is None and "oracle" in s["notes"]


def test_engine_reversibility_matches_library_on_pipeline(setup):
    pipe = _pipe(setup)
    pairs = load_counterfactual_pairs(setup["manifest"], PREP, setup["encoder"], "test", max_subjects=1)
    for p in pairs:  # a 16³ crop keeps this test fast (the tiny networks accept it)
        p["image"], p["ground_truth"] = p["image"][:, 8:24, 8:24, 8:24], p["ground_truth"][:, 8:24, 8:24, 8:24]
    editor = PipelineEditor(pipe, drift=0.0, num_inference_steps=3)
    key, extra = counterfactual_metrics((16, 16, 16), setup["encoder"], latent_oracle=True)
    engine = CounterfactualEvaluator("cpu", add_latent_oracle(make_batches(pairs), editor.autoencode), editor,
                                     composition_steps=(), key_val_metric=key, additional_metrics=extra)
    engine.run()
    p = pairs[0]
    lib = reversibility(editor, p["image"][None], [p["source"]], [p["target"]], cycles=(1,))
    assert engine.state.metrics["set_metrics"]["reversibility"]["mean"] == pytest.approx(lib["cycles"]["1"], rel=1e-5)
    assert lib["cycles"]["1"] > 0
    # the latent-oracle ceiling: x + D(E(gt)) - D(E(x)) against the ground truth
    ae = pipe.model.autoencoder
    with torch.no_grad():
        x, gt = p["image"][None], p["ground_truth"][None]
        ceiling = x + ae.decode(ae.encode(gt)[0]) - ae.decode(ae.encode(x)[0])  # posterior means: deterministic
    assert engine.state.metrics["gt_l1_latent_oracle"] == pytest.approx(l1(ceiling, gt), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _check_png(path: Path):
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_evaluate_cli_report(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--bundle", str(setup["bundle"]), "--manifest", str(setup["manifest"]), "--output-dir", str(out),
               "--steps", "3", "--axiom-subjects", "1", "--composition-steps", "1,2", "--sweep-subjects", "2",
               "--sweep-drifts=-0.1,0.1", "--threads", "1", "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    m, notes = rep["metrics"], rep["notes"]
    assert m["gt_l1_latent_oracle"] > 0  # the pipeline's autoencoder gives the ceiling
    for k in FLAT_METRICS + ("gt_l1_input", "gt_ssim_input", "composition_k2", "fid_reference", "effectiveness_input",
                             "gt_l1_latent_oracle"):
        assert k in m, k
        v = m[k]
        assert (isinstance(v, (int, float)) and math.isfinite(v)) or (v is None and f"metrics.{k}" in notes), (k, v)
    assert m["n_subjects"] == rep["data"]["n_pairs"] >= 2 and m["n_axiom_subjects"] == 1
    # an oracle was there: the oracle-based metrics are numbers
    for k in ("effectiveness", "minimality", "fid", "kid", "mmd"):
        assert m[k] is not None, k
    assert 0 <= m["effectiveness"] <= 1 and -1 <= m["gt_ssim"] <= 1
    # δ = 0 and the searched δ, the latter the argmin of the sweep's curve
    ds = rep["drift_search"]
    assert [e["drift"] for e in ds["curve"]] == [-0.1, 0.1]
    best = min(ds["curve"], key=lambda e: (e["objective"], abs(e["drift"])))
    assert ds["best_drift"] == best["drift"] == rep["main_drift"] == m["drift"]
    assert set(rep["by_drift"]) == {"0.0", str(best["drift"])}
    assert rep["by_drift"]["0.0"]["metrics"]["drift"] == 0.0
    # the do-nothing baseline is independent of δ, and equals the library's value on the same pairs
    pairs = load_counterfactual_pairs(setup["manifest"], PREP, setup["encoder"], "test")
    x, gt = torch.stack([p["image"] for p in pairs]), torch.stack([p["ground_truth"] for p in pairs])
    for d in rep["by_drift"].values():
        assert d["metrics"]["gt_l1_input"] == pytest.approx(l1(x, gt), rel=1e-5)
    md = (out / "report.md").read_text()
    assert "| gt_l1 |" in md and "δ=0" in md
    for name in ("counterfactuals.png", "counterfactuals_drift_0.png", "drift_curve.png", "sweep/report.json"):
        if name.endswith(".png"):
            _check_png(out / name)
        else:
            assert (out / name).is_file()
    assert "best" not in capsys.readouterr().err  # --quiet


def test_evaluate_without_oracle_reports_nulls_with_notes(setup, tmp_path):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--bundle", str(setup["bundle"]), "--manifest", str(setup["manifest"]), "--output-dir", str(out),
               "--steps", "2", "--drifts", "0", "--axiom-subjects", "0", "--max-subjects", "2",
               "--oracle", str(tmp_path / "absent.pt"), "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    m, notes = rep["metrics"], rep["notes"]
    for k in ("fid", "kid", "mmd", "effectiveness", "minimality", "composition", "reversibility"):
        assert m[k] is None and notes[f"metrics.{k}"], k
    assert "absent.pt" in notes["oracle"]
    for k in ("gt_l1", "gt_ssim", "ssim", "psnr"):
        assert isinstance(m[k], float)
    assert rep["drift_search"] is None and list(rep["by_drift"]) == ["0.0"]
    assert not (out / "drift_curve.png").exists()


def test_sweep_drift_cli(setup, tmp_path):
    out = tmp_path / "sweep"
    rc = main(["sweep-drift", "--bundle", str(setup["bundle"]), "--manifest", str(setup["manifest"]), "--output-dir", str(out),
               "--steps", "2", "--max-subjects", "2", "--drifts=-0.2,0,0.2", "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert [e["drift"] for e in rep["curve"]] == [-0.2, 0.0, 0.2]
    objs = [e["objective"] for e in rep["curve"]]
    assert all(isinstance(o, float) for o in objs)
    assert rep["best_drift"] == rep["curve"][objs.index(min(objs))]["drift"]
    assert all(e["oracle_loss"] >= 0 and e["proximity"] > 0 for e in rep["curve"])
    assert rep["data"]["split"] == "val" and rep["data"]["n_images"] == 2
    _check_png(out / "drift_curve.png")
    assert "best δ" in (out / "report.md").read_text()


def test_cli_bad_inputs(setup, tmp_path, capsys):
    b, m = str(setup["bundle"]), str(setup["manifest"])
    assert main(["evaluate", "--bundle", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    lines = setup["manifest"].read_text().splitlines()
    header = lines[0].split(",")

    def without(column):
        j = header.index(column)
        path = tmp_path / f"no_{column}.csv"
        path.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != j) for line in lines))
        return str(path)

    for cmd in ("evaluate", "sweep-drift"):
        assert main([cmd, "--bundle", b, "--manifest", without("path"), "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "lacks column(s) path" in err and f"monai-ld {cmd}: error" in err
    assert main(["evaluate", "--bundle", b, "--manifest", without("counterfactual_of"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "counterfactual_of" in capsys.readouterr().err
    assert main(["sweep-drift", "--bundle", b, "--manifest", str(tmp_path / "missing.csv"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    empty = tmp_path / "emptybundle"
    (empty / "configs").mkdir(parents=True)
    shutil.copy(BRAIN_EVAL_CONFIG, empty / "configs" / "evaluate.json")
    shutil.copy(BRAIN_COMMON_CONFIG, empty / "configs" / "common.json")
    assert main(["evaluate", "--bundle", str(empty), "--manifest", m, "--output-dir", str(tmp_path / "o")]) == 2
    assert "model.pt" in capsys.readouterr().err
    assert main(["evaluate", "--bundle", b, "--manifest", m, "--output-dir", str(tmp_path / "o"), "--drifts", "0,lots"]) == 2
    assert "lots" in capsys.readouterr().err


def test_fit_oracle_learns_with_augmentation():
    """A known task: class = bright blob on top or bottom half (vertical flips would destroy it; left-right flips
    must not), age = blob intensity. Held-out accuracy / MAE must beat chance / the mean predictor by far."""
    from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
    from monai_ld.evaluation.oracle_training import Augmentation, OracleTraining, fit_oracle

    enc = AttributeEncoder([ContinuousAttribute("age", 40, 95), CategoricalAttribute("side", ("top", "bottom"))])
    g = torch.Generator().manual_seed(0)

    def make(n):
        x = torch.rand(n, 1, 16, 16, generator=g) * 0.1
        rows = []
        for i in range(n):
            age = 40 + 55 * float(torch.rand(1, generator=g))
            side = i % 2
            x[i, 0, 4:12, (0 if side == 0 else 8):(8 if side == 0 else 16)] += (age - 40) / 55 * 0.8 + 0.2
            rows.append({"age": age, "side": ("top", "bottom")[side]})
        return x, rows

    xt, rt = make(64)
    xv, rv = make(32)
    augmentation = Augmentation(flip_axes=(0,), max_shift=1, intensity=0.05)
    aug = augmentation(xt[:4], torch.Generator().manual_seed(1))
    assert aug.shape == xt[:4].shape and not torch.equal(aug, xt[:4])
    training = OracleTraining(epochs=30, batch_size=16, lr=3e-3, loss_weights={"age": 10}, augmentation=augmentation)
    o = fit_oracle(xt, rt, enc, training, channels=(4, 8, 8, 16), conv1_stride=1, no_max_pool=True)
    pred = o.predict(xv)
    acc = float((pred["side"] == torch.tensor([enc["side"].validate(r["side"]) for r in rv])).float().mean())
    mae = float((pred["age"] - torch.tensor([r["age"] for r in rv])).abs().mean())
    base = float((torch.tensor([r["age"] for r in rv]) - 67.5).abs().mean())
    assert acc >= 0.9 and mae < 0.5 * base, (acc, mae, base)
    assert len(o.history) == 30 and o.history[-1]["loss"] < o.history[0]["loss"]


def test_oracle_job_trains_on_extra_manifests(tmp_path):
    """``extra_manifests`` adds every factual row of other sets (other identities) to the training images; validation
    stays on the main manifest's split."""
    from monai_ld.data.phantoms.brain import brain_attribute_encoder
    from monai_ld.data.phantoms.writer import write_phantom_dataset
    from monai_ld.evaluation.oracle_training import train_oracle_from_manifest

    main_m = write_phantom_dataset("brain", tmp_path / "main", n=6, size=16, seed=0)
    extra = write_phantom_dataset("brain", tmp_path / "extra", n=4, size=16, seed=1)
    prep = {"chain": "brain_mri", "spatial_size": [16, 16, 16], "pixdim": [11.5] * 3}
    attrs = brain_attribute_encoder().to_config()
    kw = dict(epochs=1, batch_size=4, channels=(4, 8, 8, 16), progress=False)
    alone = train_oracle_from_manifest(main_m, tmp_path / "a.pt", attrs, prep, **kw)
    both = train_oracle_from_manifest(main_m, tmp_path / "b.pt", attrs, prep, extra_manifests=[extra], **kw)
    assert both["n_train"] == alone["n_train"] + 4 and both["n_val"] == alone["n_val"]
    assert both["extra_manifests"] == ["extra"]
    assert set(AttributeOracle.load(tmp_path / "b.pt").predict(torch.zeros(1, 1, 16, 16, 16))) == {"age", "sex", "diagnosis"}
