"""Does Latent Drifting cost anything at sampling time?

Times stock sampling and LD sampling (δ≠0) on the SAME networks, noise and scheduler settings, interleaved
(A B A B ...) so machine noise hits both alike, and prints medians and their ratio (target ≤ 1.02). Paths:

- ``monai``: MONAI's ``LatentDiffusionInferer.sample`` (DDIM) vs ``LatentDriftInferer.sample``;
- ``rflow``: the same with MONAI's ``RFlowScheduler`` (LD via ``DriftedScheduler``, next timestep looked up);
- ``diffusers``: a diffusers denoising loop (``UNet2DConditionModel``) with ``DDIMScheduler`` and
  ``FlowMatchEulerDiscreteScheduler``, stock vs ``monai_ld.diffusers.DriftedScheduler``.

    python benchmarks/bench_sampling.py --path all --spatial-dims 2 --size small --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from monai.inferers import LatentDiffusionInferer

from monai_ld import AttributeEncoder, CategoricalAttribute, ContinuousAttribute, LatentDriftInferer
from monai_ld.networks import autoencoder_config, build_autoencoder, build_scheduler, build_unet, scheduler_config, unet_config


def interleaved(stock: Callable[[], object], drift: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians (s) of ``repeats`` interleaved timings of two callables, after one warm-up each."""
    stock(), drift()
    runs: dict[str, list[float]] = {"stock": [], "drift": []}
    for _ in range(repeats):
        for name, fn in (("stock", stock), ("drift", drift)):
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return statistics.median(runs["stock"]), statistics.median(runs["drift"])


def report(label: str, m_s: float, m_d: float) -> None:
    print(f"{label:<44} stock {m_s * 1000:8.1f} ms   LD {m_d * 1000:8.1f} ms   ratio {m_d / m_s:.4f}  (target <= 1.02)")


def bench_monai(a: argparse.Namespace, name: str) -> None:
    sd = a.spatial_dims
    size = a.image_size or (128 if sd == 2 else 64)
    enc = AttributeEncoder([ContinuousAttribute("age", 40, 95), CategoricalAttribute("sex", ("F", "M"))])
    ae = build_autoencoder(autoencoder_config(sd, a.size)).eval()
    unet = build_unet(unet_config(sd, 3, enc.dim, a.size)).eval()
    down = 2 ** (len(autoencoder_config(sd, a.size)["channels"]) - 1)
    noise = torch.randn((1, 3) + (size // down,) * sd)
    kw = dict(autoencoder_model=ae, diffusion_model=unet, conditioning=enc.context({"age": 70, "sex": "F"}), verbose=False, cfg=a.cfg)
    sched = lambda: build_scheduler(scheduler_config(name, num_inference_steps=a.steps))  # noqa: E731
    stock = LatentDiffusionInferer(sched(), scale_factor=1.0)
    drift = LatentDriftInferer(sched(), scale_factor=1.0, drift=a.drift)
    m_s, m_d = interleaved(lambda: stock.sample(noise, **kw), lambda: drift.sample(noise, **kw), a.repeats)
    report(f"MONAI {name} {sd}D {a.size} latent {tuple(noise.shape[2:])}, {a.steps} steps", m_s, m_d)


def bench_diffusers(a: argparse.Namespace) -> None:
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from monai_ld.diffusers import DriftedScheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=16, cross_attention_dim=16, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    cond, noise = torch.randn(1, 1, 16), torch.randn(1, 4, 32, 32)

    def loop(scheduler) -> Callable[[], torch.Tensor]:
        @torch.no_grad()
        def run() -> torch.Tensor:
            scheduler.set_timesteps(a.steps)
            z = noise
            for t in scheduler.timesteps:
                z = scheduler.step(unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
            return z

        return run

    for cls in (DDIMScheduler, FlowMatchEulerDiscreteScheduler):
        m_s, m_d = interleaved(loop(cls()), loop(DriftedScheduler(cls(), a.drift)), a.repeats)
        report(f"diffusers {cls.__name__} UNet2DCondition latent 32x32, {a.steps} steps", m_s, m_d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="all", choices=("monai", "rflow", "diffusers", "all"))
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
    print(f"{a.threads} threads, {a.repeats} interleaved repeats, δ={a.drift}, cfg={a.cfg}")
    if a.path in ("monai", "all"):
        bench_monai(a, "DDIM")
    if a.path in ("rflow", "all"):
        bench_monai(a, "RFlow")
    if a.path in ("diffusers", "all"):
        bench_diffusers(a)


if __name__ == "__main__":
    main()
