"""A real MONAI Label server (``monai-ld label-server`` -> ``monailabel start_server``) on 127.0.0.1, real HTTP, a
real NIfTI scan (nibabel's ``anatomical.nii``) in the studies folder.

The model is the repository's trained ``bundles/brain_mri_counterfactual`` when its ``models/model.pt`` exists, else a
tiny untrained stand-in with the same attributes (the server, the HTTP contract and the geometry checks are the same;
requests ask for 3 denoising steps to stay fast on CPU).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="MONAI Label not installed: bash scripts/install.sh test,label")
requests = pytest.importorskip("requests")
nib = pytest.importorskip("nibabel")

REPO = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO / "bundles" / "brain_mri_counterfactual"
MODEL = "brain_mri_counterfactual"
TARGET = {"age": 85, "sex": "F", "diagnosis": "AD"}
FAST = {"num_inference_steps": 3}
STARTUP_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stand_in_bundle(root: Path) -> Path:
    from monai_ld import ConditionalLDM
    from monai_ld.data.phantoms import brain_attribute_encoder
    from monai_ld.networks import autoencoder_config, unet_config

    enc = brain_attribute_encoder()
    m = ConditionalLDM(autoencoder_config(3, "tiny"), unet_config(3, 3, enc.dim, "tiny"), enc,
                       meta={"preprocessing": {"chain": "brain_mri", "spatial_size": [32, 32, 32], "pixdim": [3, 3, 3],
                                               "axcodes": "RAS"},
                             "defaults": {"num_inference_steps": 5}})
    bundle = root / MODEL
    m.save(bundle / "models" / "model.pt")
    # the brain bundle's inference components: the task builds its pipeline from them
    (bundle / "configs").mkdir()
    for name in ("common.json", "inference.json"):
        shutil.copyfile(REAL_BUNDLE / "configs" / name, bundle / "configs" / name)
    return bundle


class Server:
    def __init__(self, url: str, studies: Path, image: Path, proc: subprocess.Popen, log: Path, real: bool):
        self.url, self.studies, self.image, self.proc, self.log, self.real = url, studies, image, proc, log, real

    def infer(self, params, image="anatomical", model=MODEL, output="image", timeout=300):
        body = params if isinstance(params, str) else json.dumps(params)
        return requests.post(f"{self.url}/infer/{model}", params={"image": image, "output": output},
                             data={"params": body}, timeout=timeout)

    def log_tail(self, n=4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    image = studies / "anatomical.nii"
    shutil.copyfile(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii", image)
    real = (REAL_BUNDLE / "models" / "model.pt").is_file()
    bundle = REAL_BUNDLE if real else _stand_in_bundle(root / "bundles")
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    cmd = [sys.executable, "-m", "monai_ld.cli", "label-server", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--models", f"{MODEL}={bundle}", "--outputs", str(root / "outputs"),
           "--app-dir", str(root / "app"), "--device", "cpu", "--log-level", "warning"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env)
    srv = Server(f"http://127.0.0.1:{port}", studies, image, proc, log, real)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if requests.get(f"{srv.url}/info/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer /info/ within {STARTUP_TIMEOUT}s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _nifti(content: bytes):
    return nib.Nifti1Image.from_bytes(content) if content[:4] != b"\x1f\x8b\x08\x00" else \
        nib.Nifti1Image.from_bytes(__import__("gzip").decompress(content))


def test_info_lists_the_bundle_model(server):
    r = requests.get(f"{server.url}/info/", timeout=30)
    assert r.status_code == 200
    info = r.json()
    assert MODEL in info["models"], info["models"].keys()
    m = info["models"][MODEL]
    assert m["type"] == "others" and m["dimension"] == 3
    assert {a["name"] for a in m["attributes"]} == {"age", "sex", "diagnosis"}
    # the bundle's defaults, as Slicer's Options table shows them
    for key in ("drift", "strength", "guidance_scale", "seed", "num_inference_steps", "target_age", "target_diagnosis", "result"):
        assert key in m["config"], key
    assert info["datastore"]["total"] == 1


def test_infer_returns_counterfactual_in_input_geometry(server):
    src = nib.load(server.image)
    t0 = time.perf_counter()
    r = server.infer({"target": TARGET, "drift": 0.05, "strength": 0.6, "guidance": 3.0, "seed": 1, **FAST})
    seconds = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    cf = _nifti(r.content)
    assert cf.shape == src.shape
    np.testing.assert_allclose(cf.affine, src.affine, atol=1e-4)
    a = np.asarray(cf.dataobj, dtype=np.float32)
    assert np.isfinite(a).all()
    assert not np.allclose(a, np.asarray(src.dataobj, dtype=np.float32))
    print(f"\ninfer ({'real bundle' if server.real else 'stand-in'}): {seconds:.2f}s")

    # the same request again: the JSON result lists the outputs (difference map included); served from the run folder
    r = server.infer({"target": TARGET, "drift": 0.05, "strength": 0.6, "guidance": 3.0, "seed": 1, **FAST}, output="json")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["cached"] is True and res["target"] == {"age": 85.0, "sex": "F", "diagnosis": "AD"}
    assert res["settings"]["drift"] == pytest.approx(0.05)
    for key in ("counterfactual", "difference", "figure", "record"):
        assert Path(res["outputs"][key]).is_file(), key
    diff_file = nib.load(res["outputs"]["difference"])
    assert diff_file.shape == src.shape
    np.testing.assert_allclose(diff_file.affine, src.affine, atol=1e-4)

    # ... and the difference map itself over HTTP (params "result": "difference")
    r = server.infer({"target": TARGET, "drift": 0.05, "strength": 0.6, "guidance": 3.0, "seed": 1, "result": "difference",
                      **FAST})
    assert r.status_code == 200, r.text
    d = _nifti(r.content)
    assert d.shape == src.shape
    np.testing.assert_allclose(np.asarray(d.dataobj), np.asarray(diff_file.dataobj), atol=1e-6)


def test_segment_sent_with_the_request_is_the_edit_mask(server):
    """A Slicer segment uploaded as MONAI Label's ``label`` file: the counterfactual changes only inside it."""
    src = nib.load(server.image)
    seg = np.zeros(src.shape, np.uint8)
    seg[tuple(slice(s // 4, s // 2) for s in src.shape)] = 1
    r = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "anatomical", "output": "json"},
                      data={"params": json.dumps({"target": TARGET, "seed": 2, **FAST})},
                      files={"label": ("segment.nii", io.BytesIO(nib.Nifti1Image(seg, src.affine).to_bytes()))}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()
    diff = np.asarray(nib.load(res["outputs"]["difference"]).dataobj)
    assert np.count_nonzero(diff) > 0 and np.count_nonzero(diff[seg == 0]) == 0
    assert res["record"]["region"]["edit_mask"] is not None


def test_slicer_style_flat_params(server):
    """What 3D Slicer's Options table sends: the model's config back, drop-downs as lists with the choice first."""
    cfg = requests.get(f"{server.url}/info/", timeout=30).json()["models"][MODEL]["config"]
    cfg = dict(cfg, target_age="80", target_sex=["M", "(keep)", "F"], target_diagnosis=["MCI", "(keep)", "CN", "AD"],
               num_inference_steps=3, mask_threshold="0.5", client_id="user-xyz")
    r = server.infer(cfg, output="json")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["target"] == {"age": 80.0, "sex": "M", "diagnosis": "MCI"}
    # a localised edit typed into the table: the record says so and voxels outside the mask's region are unchanged
    assert res["settings"]["mask_threshold"] == pytest.approx(0.5)
    assert json.loads(Path(res["outputs"]["record"]).read_text())["mask_threshold"] == pytest.approx(0.5)
    diff = np.asarray(nib.load(res["outputs"]["difference"]).dataobj)
    assert 0 < np.count_nonzero(diff) < 0.9 * diff.size  # unmasked, this request changes 100 % of the voxels


def test_every_offered_setting_choice_is_accepted():
    """The drop-downs /info/ offers are exactly the enums the inferer implements (no server needed)."""
    from monai_ld.inferers import Abduction, Composition
    from monai_ld.label.params import parse_params, slicer_config

    class _Encoder:
        attributes = ()

    cfg = slicer_config(_Encoder(), {"composition": "paired", "abduction": "inversion"})
    assert cfg["composition"][0] == "paired" and sorted(cfg["composition"]) == sorted(c.value for c in Composition)
    assert sorted(cfg["abduction"]) == sorted(a.value for a in Abduction)
    for key in ("composition", "abduction"):
        for choice in cfg[key]:
            req = parse_params({"target_age": "80", key: [choice]}, ["age"])
            assert req.settings[key] == choice


def test_concurrent_same_seed_requests_agree(tmp_path, monkeypatch):
    """No process-wide lock: three requests (copies of one scan, so three run folders) compute at the same time (a
    barrier they all must reach inside the edit), each drawing from its own generators, and give the same volumes
    for the same seed; a repeat of each, sent alongside, waits for its folder and is served from the cache."""
    import threading

    from monai_ld.label.infer import CounterfactualInferTask

    bundle = _stand_in_bundle(tmp_path / "bundles")
    task = CounterfactualInferTask(MODEL, bundle / "models" / "model.pt", tmp_path / "outputs")
    scans = []
    for i in range(3):
        scans.append(tmp_path / f"scan{i}.nii")
        shutil.copyfile(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii", scans[-1])
    barrier, run_to_dir = threading.Barrier(len(scans), timeout=120), task.pipeline.run_to_dir

    def meet_then_run(*args, **kwargs):
        barrier.wait()  # raises BrokenBarrierError if the edits were serialised
        return run_to_dir(*args, **kwargs)

    monkeypatch.setattr(task.pipeline, "run_to_dir", meet_then_run)
    params = {"target": TARGET, "seed": 11, "abduction": "noising", "samples": 2,
              "output_space": "model", "result": "uncertainty", **FAST}
    with ThreadPoolExecutor(max_workers=2 * len(scans)) as pool:
        answers = list(pool.map(lambda p: task({"image": str(p), **params}), scans + scans))
    for scan in scans:
        cached = sorted(result["cached"] for _, result in answers if result["record"]["input"] == str(scan.resolve()))
        assert cached == [False, True]
    volumes = [np.asarray(nib.load(path).dataobj) for path, _ in answers]
    first = [np.asarray(nib.load(answers[0][1]["outputs"][k]).dataobj) for k in ("counterfactual", "uncertainty")]
    assert first[1].max() > 0  # the two samples differ: the noise matters
    for path, result in answers:
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), volumes[0])
        for k, ref in zip(("counterfactual", "uncertainty"), first):
            np.testing.assert_array_equal(np.asarray(nib.load(result["outputs"][k]).dataobj), ref)


def test_task_builds_the_bundle_inference_components(tmp_path):
    """The task's pipeline is the ``pipeline`` component of the bundle's configs/common.json + inference.json (here
    with the inferer's δ and the scheduler changed in the file), not one wired by the label app."""
    from monai_ld.inferers import LatentDriftInferer
    from monai_ld.label.infer import CounterfactualInferTask

    bundle = _stand_in_bundle(tmp_path / "bundles")
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["inferer"]["drift"] = 0.07
    cfg["scheduler"]["_target_"] = "monai.networks.schedulers.DDPMScheduler"
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    task = CounterfactualInferTask(MODEL, bundle / "models" / "model.pt", tmp_path / "outputs")
    assert isinstance(task.pipeline.inferer, LatentDriftInferer) and task.pipeline.scheduler_name == "DDPMScheduler"
    assert task.pipeline.preprocessing is not None and task.pipeline.checkpoint == bundle / "models" / "model.pt"
    assert task.info()["defaults"]["drift"] == 0.07 and task.info()["defaults"]["num_inference_steps"] == 5


@pytest.mark.parametrize("params,image,model,status,message", [
    ({"target": {"height": 180, "sex": "F", "diagnosis": "AD"}}, "anatomical", MODEL, 422, "unknown attribute"),
    ({"target": {"age": 150, "sex": "F", "diagnosis": "AD"}}, "anatomical", MODEL, 422, "out of range"),
    ({"target": {"age": 80, "sex": "X", "diagnosis": "AD"}}, "anatomical", MODEL, 422, "sex"),
    ({"target": {"age": 80}}, "anatomical", MODEL, 422, "missing"),
    ({"target": TARGET, "strength": 2}, "anatomical", MODEL, 422, "strength"),
    ({"target": TARGET, "mask_threshold": 1.5}, "anatomical", MODEL, 422, "mask_threshold"),
    ({"target": TARGET, "drfit": 0.1}, "anatomical", MODEL, 422, "unknown parameter"),
    ({"target": TARGET, "composition": "blend"}, "anatomical", MODEL, 422, "composition must be one of"),
    ({}, "anatomical", MODEL, 422, "no target"),
    ("{not json", "anatomical", MODEL, 400, "JSON"),
    ({"target": TARGET}, "no_such_image", MODEL, 404, "unknown image id"),
    ({"target": TARGET}, "anatomical", "no_such_model", 404, "unknown model"),
])
def test_bad_requests_get_4xx_with_a_message(server, params, image, model, status, message):
    r = server.infer(params, image=image, model=model, timeout=60)
    assert r.status_code == status, r.text
    assert message.lower() in r.json()["detail"].lower()
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    assert server.proc.poll() is None


def test_20_concurrent_requests_all_answer(server):
    src = nib.load(server.image)
    n = 20
    info_latency = []

    def one(i):
        t = time.perf_counter()
        r = server.infer({"target": {**TARGET, "age": 60 + i}, "seed": 100 + i, **FAST}, timeout=600)
        return r, time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        time.sleep(1.0)  # requests in flight: the server still answers other calls
        t = time.perf_counter()
        assert requests.get(f"{server.url}/info/", timeout=60).status_code == 200
        info_latency.append(time.perf_counter() - t)
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    for r, _ in results:
        assert r.status_code == 200, r.text
        cf = _nifti(r.content)
        assert cf.shape == src.shape
        np.testing.assert_allclose(cf.affine, src.affine, atol=1e-4)
    lat = sorted(s for _, s in results)
    print(f"\n{n} concurrent infers: wall {wall:.1f}s, latency min {lat[0]:.1f}s median {lat[n // 2]:.1f}s "
          f"max {lat[-1]:.1f}s; /info/ during them {info_latency[0]:.2f}s")
    assert info_latency[0] < 30
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    assert server.proc.poll() is None
