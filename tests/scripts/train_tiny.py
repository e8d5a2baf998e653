"""Train a tiny 2D model end to end (used by tests under plain python and under torchrun).

usage: python train_tiny.py OUT_DIR AE_ITERS DIFF_ITERS CHECKPOINT_EVERY
"""

import sys
from pathlib import Path

import torch

from monai_ld import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
from monai_ld.engines import train_autoencoder, train_diffusion

torch.set_num_threads(1)
out, ae_iters, diff_iters, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
enc = AttributeEncoder([ContinuousAttribute("age", 40, 95), CategoricalAttribute("sex", ("F", "M"))])
g = torch.Generator().manual_seed(0)
samples = [{"image": torch.rand(1, 16, 16, generator=g), "condition": enc.encode({"age": 40 + 3 * i, "sex": i % 2}).reshape(1, -1)}
           for i in range(16)]
ae = out / "ae.pt"
if not ae.exists():
    train_autoencoder(samples, ae, 2, "tiny", max_iterations=ae_iters, batch_size=4, checkpoint_every=every, progress=False)
train_diffusion(samples, ae, out / "model.pt", enc, size="tiny", max_iterations=diff_iters, batch_size=4,
                checkpoint_every=every, drift=0.05, progress=False, scheduler=None)
print("DONE", flush=True)
