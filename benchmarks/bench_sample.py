"""Images/s of the test-set sampler (CFG, per-image seeds, decode, PNG conversion) with random-initialised parts.

    python benchmarks/bench_sample.py --device cuda --size full      # hw6 scale: 1,063 prompts, 4x32x32 SD latents
    python benchmarks/bench_sample.py --size tiny                    # CPU smoke figures
    python benchmarks/bench_sample.py --size demo                    # the demo profile's U-Net, 16 px pixel space

Prints one markdown row per (scheduler, steps) for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from helpers.autoencoder import IdentityAutoencoder, VaeAutoencoder, tiny_vae
from helpers.config import profile_config
from helpers.model import TextToImage, noise_scheduler
from helpers.sample import sample_images, to_output_pils
from helpers.setting import Setting
from helpers.text import TextEncoder, load_text_encoder, minilm_path
from helpers.unet import build_unet, count_params

SIZES = {  # profile for the schedule, prompts, batch
    "tiny": ("tiny", 64, 32),
    "demo": ("demo", 240, 64),
    "full": ("hw6", 1063, 64),
}


def build_model(size: str, device: str, dtype: torch.dtype) -> TextToImage:
    cfg = profile_config(SIZES[size][0])
    if size == "full":
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=256)
        # CLIP's tokenizer is not available offline; MiniLM's ids are all inside CLIP's vocabulary.
        text = TextEncoder("random-clip", AutoTokenizer.from_pretrained(minilm_path()), CLIPTextModel(CLIPTextConfig()),
                           77, use_attention_mask=False)
        ae, unet = VaeAutoencoder("random-sd-vae", vae), build_unet("hw6-base", 4, 512, 32)
    elif size == "demo":
        text = load_text_encoder("minilm", cfg.max_tokens)
        ae, unet = IdentityAutoencoder(), build_unet("demo", 3, text.hidden_size, 16)
    else:
        text = load_text_encoder("tiny", 16)
        ae, unet = VaeAutoencoder("tiny", tiny_vae()), build_unet("tiny", 4, 32, 8)
    # Casting the weights themselves (not only autocast) halves memory traffic; the sampler casts inputs to match.
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    text.to(device)
    ae.to(device, dtype)
    return TextToImage(cfg, unet, text, ae, dict(noise_scheduler(cfg).config))


def run(model, prompts, scheduler: str, steps: int, batch: int, guidance: float = 3.0) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = sample_images(model, prompts, range(len(prompts)), Setting(guidance=guidance, steps=steps,
                                                                         scheduler=scheduler), batch_size=batch)
    to_output_pils(images, 256)
    return time.perf_counter() - start  # sample_images returns CPU tensors, so the GPU work is done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--prompts", type=int, help="number of prompts (default: 64 tiny, 240 demo, 1063 full)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--schedulers", default="dpm++2m-karras,unipc,ddim,euler-a")
    ap.add_argument("--steps", default="25")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help="weights' dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net (first run pays compilation)")
    args = ap.parse_args()

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    torch.manual_seed(0)
    model = build_model(args.size, args.device, dtype)
    if args.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if args.compile:
        model.unet = torch.compile(model.unet)
    n = args.prompts or SIZES[args.size][1]
    batch = args.batch_size or SIZES[args.size][2]
    prompts = [f"a monster number {i} with {i % 3 + 1} eyes. The monster is attacking." for i in range(n)]
    print(f"# {args.size}: U-Net {count_params(model.unet) / 1e6:.1f} M params, latents {model.latent_shape}, "
          f"{n} prompts, batch {batch}, {dtype}, device {args.device}, threads {torch.get_num_threads()}")
    run(model, prompts[:batch], args.schedulers.split(",")[0], 2, batch)  # warm-up (kernels, compile)
    print("| size | scheduler | steps | images | seconds | images/s |")
    print("|---|---|---|---|---|---|")
    for scheduler in args.schedulers.split(","):
        for steps in map(int, args.steps.split(",")):
            seconds = run(model, prompts, scheduler, steps, batch)
            print(f"| {args.size} | {scheduler} | {steps} | {n} | {seconds:.1f} | {n / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
