"""A synthetic ai-toolkit OmniGen2 job at full model size, for timing ``parity check`` end to end (issue 6).

    python benchmarks/scale_job.py --out /tmp/scale [--size 512 --checkpoints 10 --prompts 10 --steps 25]
    python -m parity check /tmp/scale/job --base-model /tmp/scale/base --device cuda --no-diagnose --out R1
    torchrun --nproc-per-node 2 -m parity check /tmp/scale/job --base-model /tmp/scale/base --device cuda \\
        --no-diagnose --out R2

Writes ``<out>/base``: a diffusers-layout OmniGen2 with the full-size transformer (``OmniGen2Config()``, random
bf16 weights as ``full_size.py`` draws them), a FLUX-shaped random VAE, and the fixtures' 2-layer Qwen2.5-VL
(hidden 2048, the transformer's text width) with its tokenizer; and ``<out>/job``: ``config.yaml``, one random
rank-16 LoRA checkpoint (float16, ai-toolkit's key names and module choice) every ``--every`` steps, and a
random JPEG q75 preview for every prompt at each checkpoint. Those previews are noise, so their verdicts are
FAIL (run ``--no-diagnose``). The step-0 previews (the base model alone) are real: what the base model makes with
torch 2.13's AVX2 draw and, on CUDA, ai-toolkit's default kernels, saved as ai-toolkit saves a preview, so that
``parity check`` chooses the noise draw and the kernels as on a real job (``--real-step0 N``: only the first N).
What is timed is the replays, which are real.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from full_size import build_transformer, build_vae, model_config  # noqa: E402

from pipelines.omnigen2.transformer import OmniGen2Config  # noqa: E402

NAME = "scale"
# ai-toolkit's OmniGen2 LoRA targets (as in the oracle's checkpoints): attention and MLP of every block but the
# reference refiner, and the modulation of the modulated ones.
TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "feed_forward.linear_1",
    "feed_forward.linear_2",
    "feed_forward.linear_3",
)


def write_base(root: Path, config: OmniGen2Config, device, seed: int = 0, tiny_vae: bool = False) -> None:
    from safetensors.torch import save_file

    from fixtures.tiny_model import SCHEDULER_CONFIG, _write_json, write_mllm, write_processor, write_vae

    model = build_transformer(config, device, torch.bfloat16, seed)
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    _write_json(root / "transformer" / "config.json", {**config.to_dict(), "_diffusers_version": "0.42.1"})
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(root / "transformer" / "diffusion_pytorch_model.safetensors"),
    )
    del model
    if tiny_vae:  # the fixtures' 16-channel VAE: a CPU decodes it in milliseconds
        write_vae(root / "vae", seed)
    else:
        build_vae(device, torch.bfloat16, seed).save_pretrained(root / "vae", safe_serialization=True)
    vocab = write_processor(root / "processor")
    write_mllm(root / "mllm", vocab, config.text_feat_dim, seed)
    (root / "scheduler").mkdir(exist_ok=True)
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)


def lora_tensors(config: OmniGen2Config, seed: int, rank: int = 16) -> dict[str, torch.Tensor]:
    from pipelines.omnigen2.transformer import OmniGen2Transformer

    with torch.device("meta"):
        model = OmniGen2Transformer(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith("ref_image_refiner"):
            continue
        family = name.split(".")[0]
        if family not in ("context_refiner", "noise_refiner", "layers"):
            continue
        if not (name.endswith(TARGETS) or (name.endswith("norm1.linear") and family != "context_refiner")):
            continue
        out_f, in_f = module.weight.shape
        out[f"diffusion_model.{name}.lora_A.weight"] = (
            torch.randn(rank, in_f, generator=g) * in_f**-0.5
        ).half()
        out[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.005).half()
    return out


def write_job(
    job: Path,
    base: Path,
    config: OmniGen2Config,
    size: int,
    checkpoints: int,
    prompts: int,
    steps: int,
    every: int,
) -> int:
    import yaml
    from PIL import Image
    from safetensors.torch import save_file

    job.mkdir(parents=True, exist_ok=True)
    (job / "samples").mkdir(exist_ok=True)
    last = checkpoints * every
    cfg = {
        "job": "extension",
        "config": {
            "name": NAME,
            "process": [
                {
                    "type": "sd_trainer",
                    "training_folder": str(job.parent),
                    "device": "cuda:0",
                    "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
                    "save": {
                        "dtype": "float16",
                        "save_every": every,
                        "max_step_saves_to_keep": checkpoints + 1,
                    },
                    "train": {
                        "batch_size": 1,
                        "steps": last,
                        "dtype": "bf16",
                        "noise_scheduler": "flowmatch",
                    },
                    "model": {
                        "name_or_path": str(base),
                        "arch": "omnigen2",
                        "quantize": False,
                        "quantize_te": False,
                    },
                    "sample": {
                        "sampler": "flowmatch",
                        "sample_every": every,
                        "sample_start_step": 0,
                        "width": size,
                        "height": size,
                        "prompts": [
                            f"a test picture number {i} of a small red house, sks style"
                            + " with extra words" * (i % 4)
                            for i in range(prompts)
                        ],
                        "neg": "",
                        "seed": 42,
                        "walk_seed": True,
                        "guidance_scale": 4,
                        "sample_steps": steps,
                    },
                }
            ],
        },
        "meta": {"name": NAME, "version": "1.0"},
    }
    (job / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for c in range(1, checkpoints + 1):
        step = c * every
        path = job / (f"{NAME}.safetensors" if step == last else f"{NAME}_{step:09d}.safetensors")
        metadata = {
            "name": NAME,
            "format": "pt",
            "training_info": json.dumps({"step": step, "epoch": 1}),
            "software": json.dumps({"name": "ai-toolkit", "version": "0.12.26"}),
        }
        save_file(lora_tensors(config, 100 + c), str(path), metadata=metadata)
    rng = np.random.default_rng(0)
    ms = 1795681192170
    count = 0
    for step in range(0, last + 1, every):
        for i in range(prompts):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(job / "samples" / f"{ms}__{step:09d}_{i}.jpg")
            ms += 537
            count += 1
    return count


REAL_DRAW = "torch2.13-avx2"  # the trainer's torch: 2.13 on an AVX2/AVX-512 CPU


def write_real_step0(job: Path, base: Path, count: int | None, device: str) -> None:
    """Overwrite the step-0 previews (the first ``count``; None: all) with what the base model makes for them:
    REAL_DRAW, the likeliest kernels (ai-toolkit's default GPU path on CUDA), saved by ai-toolkit's
    ``image.save(path)``: Pillow's JPEG q75."""
    from PIL import Image

    from parity.plan import build_plan
    from parity.replay import Replayer, ReplayOptions

    if count is not None and count <= 0:
        return
    plan = build_plan(job)
    replayer = Replayer(plan, ReplayOptions(base_model=str(base), device=device, noise_algorithm=REAL_DRAW))
    for item in [i for i in plan.items if i.step == 0][:count]:
        Image.fromarray(replayer.replay(item).pixels).save(job / "samples" / item.file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="a 2-layer transformer and a tiny VAE (tests on a CPU)")
    ap.add_argument("--real-step0", type=int, default=None, metavar="N",
                    help="real replays for only the first N step-0 previews (default: all of them)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    config = model_config(args.smoke)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    write_base(out / "base", config, device, tiny_vae=args.smoke)
    previews = write_job(
        out / "job", out / "base", config, args.size, args.checkpoints, args.prompts, args.steps, args.every
    )
    write_real_step0(out / "job", out / "base", args.real_step0, device.type)
    print(
        f"wrote {out}/base and {out}/job ({args.checkpoints} checkpoints, {previews} previews at {args.size}px) "
        f"in {time.perf_counter() - t:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
