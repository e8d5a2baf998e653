"""Known-answer tests for monai_ld.evaluation (tiny images, tiny oracles; CPU)."""

from __future__ import annotations

import json
import math
import os

import matplotlib.image as mpimg
import pytest
import torch

from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
from monai_ld.evaluation import (
    AttributeOracle,
    EvaluationError,
    composition,
    downstream_auc,
    drift_grid,
    effectiveness,
    effectiveness_from_images,
    extract_features,
    fid,
    ground_truth_error,
    image_mmd,
    kid,
    l1,
    macro_f1,
    minimality,
    mmd,
    ms_ssim,
    ms_ssim_config,
    psnr,
    realism_metrics,
    reversibility,
    roc_auc,
    search_drift_counterfactual,
    search_drift_distribution,
    similarity_metrics,
    ssim,
    train_oracle,
    write_json,
    write_report,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _squares(n, bright, seed=0, size=16, spatial_dims=2):
    """Noisy background + a square (cube) that is bright (label 1) or dark (label 0)."""
    g = _gen(seed)
    x = 0.1 * torch.rand(n, 1, *([size] * spatial_dims), generator=g)
    level = torch.where(bright.bool(), 0.8, 0.3).view(-1, 1, *([1] * spatial_dims))
    sl = (slice(None), slice(None)) + (slice(4, 12),) * spatial_dims
    x[sl] += level
    return x


ENC = AttributeEncoder([CategoricalAttribute("finding", ("dark", "bright")), ContinuousAttribute("age", 40, 90, "years")])


# ---------------------------------------------------------------------------------------------------------------
# realism
# ---------------------------------------------------------------------------------------------------------------
def test_realism_identical_vs_shifted():
    f = torch.randn(300, 6, generator=_gen(1))
    shifted = f + 1.0
    assert abs(fid(f, f)) < 1e-6
    # FID of a pure shift: covariances equal, so FID = |shift|^2 exactly
    assert fid(f, shifted) == pytest.approx(6.0, rel=1e-5)
    k_same, _ = kid(f, f, subsets=10, subset_size=100)
    k_shift, k_std = kid(f, shifted, subsets=10, subset_size=100)
    assert abs(k_same) < 0.02 * k_shift and k_shift > 0 and k_std >= 0
    m_same, m_shift = mmd(f, f), mmd(f, shifted)
    assert abs(m_same) < 0.02 * m_shift and m_shift > 0
    # independent samples of the same distribution: small vs a shift
    g = torch.randn(300, 6, generator=_gen(2))
    assert mmd(f, g) < 0.1 * m_shift and fid(f, g) < 0.1 * 6.0
    imgs = torch.rand(8, 1, 8, 8, generator=_gen(3))
    assert image_mmd(imgs, imgs + 0.5) > image_mmd(imgs, torch.rand(8, 1, 8, 8, generator=_gen(4))) + 0.1
    rep = realism_metrics(f, shifted, "test-features", kid_subsets=5, kid_subset_size=50)
    assert rep["feature_network"] == "test-features" and rep["fid"] == pytest.approx(6.0, rel=1e-5)
    assert rep["kid_mean"] > 0 and rep["mmd_rbf"] > 0 and rep["notes"] == {}
    few = realism_metrics(f[:4], shifted[:4], "test-features", kid_subsets=2)
    assert "fid" in few["notes"] and "kid" in few["notes"]  # rank-deficient FID warned, KID subset shrunk


def test_realism_errors():
    f = torch.randn(10, 4)
    with pytest.raises(EvaluationError, match=r"\(N, F\)"):
        fid(torch.randn(10, 1, 4, 4), f)
    with pytest.raises(EvaluationError, match="same network"):
        kid(f, torch.randn(10, 5))
    with pytest.raises(EvaluationError, match="at least 2"):
        mmd(f, torch.randn(1, 4))
    with pytest.raises(EvaluationError, match="NaN"):
        fid(f, torch.full((10, 4), float("nan")))
    with pytest.raises(EvaluationError, match="bandwidth"):
        mmd(f, f, bandwidth=-1.0)
    with pytest.raises(EvaluationError, match="same shape"):
        image_mmd(torch.rand(4, 1, 8, 8), torch.rand(3, 1, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_similarity_known_answers(spatial_dims):
    x = torch.rand(3, 1, *([16] * spatial_dims), generator=_gen(5)) * 0.8
    assert l1(x, x) == 0.0
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert math.isinf(psnr(x, x))
    y = x + 0.1
    assert l1(x, y) == pytest.approx(0.1, abs=1e-6)
    assert psnr(x, y) == pytest.approx(20.0, abs=1e-3)  # MSE = 0.01
    noisy = (x + 0.2 * torch.randn(x.shape, generator=_gen(6))).clamp(0, 1)
    assert ssim(x, noisy) < 0.9 and ms_ssim(x, noisy) < 0.95
    per = ssim(x, noisy, reduction="none")
    assert per.shape == (3,)
    # a full mask reproduces MONAI's unmasked values
    ones = torch.ones(*([16] * spatial_dims))
    assert ssim(x, noisy, mask=ones) == pytest.approx(ssim(x, noisy), abs=1e-5)
    assert ms_ssim(x, noisy, mask=ones) == pytest.approx(ms_ssim(x, noisy), abs=1e-5)
    assert psnr(x, noisy, mask=ones) == pytest.approx(psnr(x, noisy), abs=1e-4)
    # a change confined to a region: zero outside, known inside
    mask = torch.zeros(*([16] * spatial_dims))
    mask[(slice(4, 12),) * spatial_dims] = 1
    z = x + 0.1 * mask
    assert l1(x, z, mask=mask, region="outside") == pytest.approx(0.0, abs=1e-7)
    assert l1(x, z, mask=mask, region="inside") == pytest.approx(0.1, abs=1e-6)
    rep = similarity_metrics(x, z, mask=mask)
    assert rep["outside"]["l1"] == pytest.approx(0.0, abs=1e-7) and rep["inside"]["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert rep["ms_ssim_config"]["scales"] == 2


def test_ms_ssim_config_fits_small_images():
    assert ms_ssim_config((64, 64, 64)) == (ms_ssim_config((64, 64, 64))[0], 11)
    assert len(ms_ssim_config((64, 64, 64))[0]) == 3
    w, k = ms_ssim_config((128, 128))
    assert len(w) == 4 and k == 11 and sum(w) == pytest.approx(1.0)
    w, k = ms_ssim_config((192, 192))
    assert len(w) == 5 and k == 11
    assert ms_ssim_config((16, 16))[1] == 7
    x = torch.rand(2, 1, 64, 64, 64, generator=_gen(7))
    assert ms_ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(EvaluationError, match="too small"):
        ms_ssim_config((5, 5))


def test_similarity_errors():
    with pytest.raises(EvaluationError, match="same shape"):
        l1(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9))
    with pytest.raises(EvaluationError, match=r"\(B, C, H, W\)"):
        ssim(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(EvaluationError, match="mask"):
        l1(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), mask=torch.ones(4, 4))


# ---------------------------------------------------------------------------------------------------------------
# axioms
# ---------------------------------------------------------------------------------------------------------------
def test_composition_and_reversibility():
    x = torch.rand(4, 1, 8, 8, 8, generator=_gen(8))
    rows = [{"finding": "dark", "age": 60}] * 4
    ident = lambda im, s, t: im.clone()  # noqa: E731
    comp = composition(ident, x, rows)
    assert comp["steps"] == {"1": 0.0, "10": 0.0}
    drift = lambda im, s, t: im + 0.01  # noqa: E731
    comp = composition(drift, x, rows, steps=(1, 10))
    assert comp["steps"]["1"] == pytest.approx(0.01, abs=1e-6) and comp["steps"]["10"] == pytest.approx(0.1, abs=1e-5)
    rev = reversibility(ident, x, rows, [{"age": 80}] * 4, cycles=(1, 3))
    assert rev["cycles"] == {"1": 0.0, "3": 0.0}

    # an exactly invertible edit: shift intensity by the age change -> reversible
    def age_edit(im, src, tgt):
        d = torch.tensor([(t["age"] - s["age"]) / 100 for s, t in zip(src, tgt)]).view(-1, 1, 1, 1, 1)
        return im + d

    assert reversibility(age_edit, x, rows, [{"age": 80}] * 4)["cycles"]["1"] == pytest.approx(0.0, abs=1e-6)

    # a lossy edit (clipping) is not
    def lossy(im, src, tgt):
        return (age_edit(im, src, tgt)).clamp(0, 0.9)

    assert reversibility(lossy, x, rows, [{"age": 80}] * 4)["cycles"]["1"] > 1e-3
    with pytest.raises(EvaluationError, match="shape"):
        composition(lambda im, s, t: im[:, :, :4], x, rows)
    with pytest.raises(EvaluationError, match="rows"):
        composition(ident, x, rows[:2])


def test_effectiveness():
    targets = [{"finding": "bright", "age": 70}, {"finding": "dark", "age": 50}, {"finding": "bright", "age": 80}]
    perfect = {"finding": torch.tensor([1, 0, 1]), "age": torch.tensor([70.0, 50.0, 80.0])}
    eff = effectiveness(perfect, targets, ENC)
    assert eff["finding"]["accuracy"] == 1.0 and eff["finding"]["macro_f1"] == 1.0
    assert eff["age"]["mae"] == 0.0
    wrong = {"finding": ["dark", "dark", "bright"], "age": torch.tensor([75.0, 50.0, 80.0])}
    eff = effectiveness(wrong, targets, ENC)
    assert eff["finding"]["accuracy"] == pytest.approx(2 / 3)
    # class bright: tp1 fp0 fn1 -> 2/3; class dark: tp1 fp1 fn0 -> 2/3
    assert eff["finding"]["macro_f1"] == pytest.approx(2 / 3)
    assert eff["age"]["mae"] == pytest.approx(5 / 3) and eff["age"]["mae_normalised"] == pytest.approx(5 / 3 / 50)
    assert macro_f1(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0])) == pytest.approx((2 * 2 / (4 + 2) + 0) / 2)
    with pytest.raises(EvaluationError, match="target rows"):
        effectiveness(perfect, targets[:2], ENC)


def test_minimality_known_answer():
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    ref_vals = ["dark", "dark", "bright", "bright"]
    attr = ENC["finding"]
    f = torch.tensor([[0.0], [0.0]])
    cf = torch.tensor([[1.5], [2.5]])
    out = minimality(f, cf, ref, ["dark", "dark"], ["bright", "bright"], ref_vals, attribute=attr)
    # cf 1: d=1.5: P1 = #{2,3 <= 1.5}/2 = 0; P2 = #{0,1 >= 1.5}/2 = 0 -> log(1) = 0
    # cf 2: d=2.5: P1 = 1/2, P2 = 0 -> log(0.8 e^0.5 + 0.2)
    assert out["per_sample"]["p1"] == [0.0, 0.5] and out["per_sample"]["p2"] == [0.0, 0.0]
    assert out["per_sample"]["score"][0] == pytest.approx(0.0)
    assert out["per_sample"]["score"][1] == pytest.approx(math.log(0.8 * math.exp(0.5) + 0.2))
    assert out["reference_point"] == "factual"
    # continuous attribute, binned over its declared range (2 bins: [40, 65), [65, 90])
    ages = [45.0, 50.0, 70.0, 85.0]
    out = minimality(f[:1], cf[:1] + 1.0, ref, [42.0], [88.0], ages, attribute=ENC["age"], bins=2)
    assert out["per_sample"]["p1"] == [0.5] and out["per_sample"]["p2"] == [0.0]
    # no reference sample in the target group -> skipped with a note
    out = minimality(f[:1], cf[:1], ref[:2], ["dark"], ["bright"], ref_vals[:2], attribute=attr)
    assert out["score"] is None and out["skipped"] == 1 and out["notes"]
    with pytest.raises(EvaluationError, match="do not match"):
        minimality(f, cf[:1], ref, ["dark"] * 2, ["bright"] * 2, ref_vals, attribute=attr)


def test_ground_truth_error():
    x = torch.rand(3, 1, 16, 16, generator=_gen(9)) * 0.5
    gt = x + 0.2
    out = ground_truth_error(gt.clone(), gt, x)
    assert out["counterfactual"]["l1"] == 0.0 and out["counterfactual"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["input"]["l1"] == pytest.approx(0.2, abs=1e-6)
    assert out["fraction_closer_than_input"] == 1.0 and out["l1_improvement"] == pytest.approx(0.2, abs=1e-6)
    bad = ground_truth_error(x - 0.1, gt, x)  # worse than doing nothing
    assert bad["fraction_closer_than_input"] == 0.0 and bad["l1_improvement"] < 0


# ---------------------------------------------------------------------------------------------------------------
# oracle, downstream
# ---------------------------------------------------------------------------------------------------------------
def test_oracle_learns_separable_task_and_roundtrips(tmp_path):
    lab = torch.arange(48) % 2
    x = _squares(48, lab, seed=10)
    rows = [{"finding": int(v), "age": 45.0 + 40.0 * float(v)} for v in lab]
    oracle = train_oracle(x, rows, ENC, epochs=12, batch_size=16, seed=0, channels=(4, 8, 16, 32))
    test_lab = (torch.arange(32) + 1) % 2
    xt = _squares(32, test_lab, seed=11)
    pred = oracle.predict(xt)
    assert float((pred["finding"] == test_lab).float().mean()) >= 0.95
    eff = effectiveness_from_images(oracle, xt, [{"finding": int(v), "age": 45.0 + 40.0 * float(v)} for v in test_lab], ENC)
    assert eff["finding"]["accuracy"] >= 0.95 and eff["age"]["mae"] < 10.0
    feats = oracle.features(xt)
    assert feats.shape == (32, oracle.feature_dim)
    assert oracle.history[-1]["loss"] < oracle.history[0]["loss"]
    path = oracle.save(tmp_path / "oracle.pt")
    loaded = AttributeOracle.load(path)
    assert torch.allclose(loaded.features(xt), feats) and loaded.config() == oracle.config()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # determinism: same seed -> same weights
    again = train_oracle(x[:8], rows[:8], ENC, epochs=1, seed=3)
    again2 = train_oracle(x[:8], rows[:8], ENC, epochs=1, seed=3)
    assert torch.equal(again.features(xt[:2]), again2.features(xt[:2]))
    with pytest.raises(EvaluationError, match="spatial dims"):
        oracle.predict(torch.rand(2, 1, 8, 8, 8))
    with pytest.raises(EvaluationError, match="rows"):
        train_oracle(x, rows[:3], ENC, epochs=1)


def test_oracle_3d_and_user_feature_extractor():
    lab = torch.tensor([0, 1, 0, 1])
    x = _squares(4, lab, seed=12, spatial_dims=3)
    oracle = train_oracle(x, [{"finding": int(v)} for v in lab], ENC, epochs=1, channels=(4, 8, 8, 16))
    assert oracle.features(x).shape == (4, 16)
    assert set(oracle.predict_rows(x)[0]) == {"finding", "age"}
    stats = lambda im: torch.stack([im.mean(dim=(1, 2, 3, 4)), im.std(dim=(1, 2, 3, 4))], dim=1)  # noqa: E731
    assert extract_features(stats, x, batch_size=3).shape == (4, 2)
    with pytest.raises(EvaluationError, match=r"expected \(B, F\)"):
        extract_features(lambda im: im, x)


def test_roc_auc_and_downstream():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 0, 1, 1])) == 1.0
    with pytest.raises(EvaluationError, match="both 0 and 1"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    syn_lab = torch.arange(32) % 2
    syn = _squares(32, syn_lab, seed=13)
    real_lab = (torch.arange(24) + 1) % 2
    real = _squares(24, real_lab, seed=14)
    test_lab = torch.arange(24) % 2
    test = _squares(24, test_lab, seed=15)
    out = downstream_auc(syn, syn_lab, test, test_lab, real, real_lab, epochs=8, seed=0, channels=(4, 8, 8, 16))
    assert out["auc_synthetic"] > 0.9 and out["auc_real"] > 0.9 and out["auc_combined"] is None
    assert out["n_synthetic"] == 32 and "auc_combined" in out["notes"]
    with pytest.raises(EvaluationError, match="0/1"):
        downstream_auc(syn, syn_lab + 2, test, test_lab)


# ---------------------------------------------------------------------------------------------------------------
# drift search
# ---------------------------------------------------------------------------------------------------------------
def test_drift_grid():
    grid = drift_grid()
    assert grid == [-0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2]
    assert all(repr(d) in {"-0.2", "-0.15", "-0.1", "-0.05", "0.0", "0.05", "0.1", "0.15", "0.2"} for d in grid)
    with pytest.raises(EvaluationError):
        drift_grid(0.1, -0.1, 0.05)


def test_drift_search_distribution_finds_known_best():
    base = torch.rand(16, 1, 16, 16, generator=_gen(16))
    real = base + 0.05
    res = search_drift_distribution(lambda d: base + d, real)
    assert res["best_drift"] == 0.05 and res["objective"] == "l1_mean"
    assert len(res["curve"]) == 9 and res["curve"][0] == {"drift": -0.2, "objective": pytest.approx(0.25, abs=1e-6)}
    stats = lambda im: torch.stack([im.mean(dim=(1, 2, 3)), im.std(dim=(1, 2, 3))], dim=1)  # noqa: E731
    for dist in ("mmd", "fid"):
        res = search_drift_distribution(lambda d: base + d, real, distance=dist, feature_fn=stats)
        assert res["best_drift"] == 0.05, dist
    with pytest.raises(EvaluationError, match="feature_fn"):
        search_drift_distribution(lambda d: base + d, real, distance="kid")


def test_drift_search_counterfactual_objective():
    x = torch.rand(6, 1, 12, 12, generator=_gen(17)) * 0.5
    enc = AttributeEncoder([ContinuousAttribute("brightness", 0, 1)])
    targets = [{"brightness": float(v) + 0.1} for v in x.mean(dim=(1, 2, 3))]

    def oracle(im):  # exact "anti-causal predictor" of the mean intensity, normalised units
        return {"brightness": im.mean(dim=(1, 2, 3))}

    # objective = 2·|δ - 0.1| + |δ|: minimum at δ = 0.1
    res = search_drift_counterfactual(lambda d: x + d, x, targets, oracle, enc, lam=2.0)
    assert res["best_drift"] == 0.1
    best = [e for e in res["curve"] if e["drift"] == 0.1][0]
    assert best["oracle_loss"] == pytest.approx(0.0, abs=1e-6) and best["proximity"] == pytest.approx(0.1, abs=1e-6)
    # with λ small, proximity wins: δ = 0
    assert search_drift_counterfactual(lambda d: x + d, x, targets, oracle, enc, lam=0.5)["best_drift"] == 0.0
    # categorical target with a trained-oracle-like callable (CE / log K)
    enc2 = AttributeEncoder([CategoricalAttribute("finding", ("dark", "bright"))])

    def oracle2(im):
        p_bright = torch.sigmoid(40 * (im.mean(dim=(1, 2, 3)) - 0.35))
        return {"finding": torch.stack([1 - p_bright, p_bright], dim=1)}

    res = search_drift_counterfactual(lambda d: x + d, x, [{"finding": "bright"}] * 6, oracle2, enc2, proximity="ssim", lam=1.0)
    assert res["best_drift"] > 0 and res["curve"][0]["oracle_loss/finding"] > res["curve"][-1]["oracle_loss/finding"]
    with pytest.raises(EvaluationError, match="shape"):
        search_drift_counterfactual(lambda d: x[:, :, :6] + d, x, targets, oracle, enc)


# ---------------------------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------------------------
def test_report_files(tmp_path):
    base = torch.rand(4, 1, 16, 16, 16, generator=_gen(18))
    drift_res = search_drift_distribution(lambda d: base + d, base + 0.05)
    cf = base.clone()
    cf[:, :, 4:12, 4:12, 4:12] += 0.3
    results = {
        "similarity": similarity_metrics(base, cf),
        "composition": composition(lambda im, s, t: im, base, [{"finding": "dark"}] * 4),
        "fid": float("nan"),
        "notes": {"kid": "not computed: fewer than 2 samples"},
    }
    paths = write_report(tmp_path / "rep", results, drift_res, base, cf, ground_truth=cf)
    data = json.load(open(paths["json"]))
    assert data["fid"] is None and "fid" in data["notes"] and data["notes"]["kid"].startswith("not computed")
    assert data["drift_search"]["best_drift"] == 0.05
    md = open(paths["markdown"]).read()
    assert "| similarity.all.l1 |" in md and "| drift_search.best_drift | 0.05 |" in md
    for key in ("drift_curve", "grid"):
        img = mpimg.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not [p for p in os.listdir(tmp_path / "rep") if p.endswith(".tmp")]
    write_json(tmp_path / "x.json", {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)})
    assert json.load(open(tmp_path / "x.json"))["a"] == [1.0, 2.0]
