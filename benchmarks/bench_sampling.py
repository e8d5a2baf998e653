"""Does Latent Drifting cost anything at sampling time?

Times MONAI's stock ``LatentDiffusionInferer.sample`` and ``LatentDriftInferer.sample`` with δ≠0 on the SAME
networks, noise and scheduler settings, interleaved (A B A B ...) so machine noise hits both alike, and prints
medians and their ratio (target ≤ 1.01).

    python benchmarks/bench_sampling.py --spatial-dims 2 --size small --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.inferers import LatentDiffusionInferer

from monai_ld import AttributeEncoder, CategoricalAttribute, ContinuousAttribute, LatentDriftInferer
from monai_ld.networks import autoencoder_config, build_autoencoder, build_scheduler, build_unet, scheduler_config, unet_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3))
    p.add_argument("--size", default="small", choices=("tiny", "small", "large"))
    p.add_argument("--image-size", type=int, default=None, help="default: 128 (2D) / 64 (3D)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--drift", type=float, default=0.1)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sd = a.spatial_dims
    size = a.image_size or (128 if sd == 2 else 64)
    enc = AttributeEncoder([ContinuousAttribute("age", 40, 95), CategoricalAttribute("sex", ("F", "M"))])
    ae = build_autoencoder(autoencoder_config(sd, a.size)).eval()
    unet = build_unet(unet_config(sd, 3, enc.dim, a.size)).eval()
    down = 2 ** (len(autoencoder_config(sd, a.size)["channels"]) - 1)
    noise = torch.randn((1, 3) + (size // down,) * sd)
    cond = enc.context({"age": 70, "sex": "F"})
    kw = dict(autoencoder_model=ae, diffusion_model=unet, conditioning=cond, verbose=False, cfg=a.cfg)
    stock = LatentDiffusionInferer(build_scheduler(scheduler_config(num_inference_steps=a.steps)), scale_factor=1.0)
    drift = LatentDriftInferer(build_scheduler(scheduler_config(num_inference_steps=a.steps)), scale_factor=1.0, drift=a.drift)
    runs = {"stock": [], "drift": []}
    stock.sample(noise, **kw), drift.sample(noise, **kw)  # warm-up
    for _ in range(a.repeats):
        for name, inf in (("stock", stock), ("drift", drift)):
            t0 = time.perf_counter()
            inf.sample(noise, **kw)
            runs[name].append(time.perf_counter() - t0)
    m_s, m_d = statistics.median(runs["stock"]), statistics.median(runs["drift"])
    print(f"{sd}D {a.size} {size}^{sd} -> latent {noise.shape[2:]}, DDIM {a.steps} steps, cfg={a.cfg}, "
          f"{a.threads} threads, {a.repeats} interleaved repeats")
    print(f"stock LatentDiffusionInferer.sample  median {m_s * 1000:8.1f} ms  (min {min(runs['stock']) * 1000:.1f})")
    print(f"LatentDriftInferer.sample δ={a.drift:<5}  median {m_d * 1000:8.1f} ms  (min {min(runs['drift']) * 1000:.1f})")
    print(f"ratio drift/stock (medians): {m_d / m_s:.4f}   (target <= 1.01)")


if __name__ == "__main__":
    main()
