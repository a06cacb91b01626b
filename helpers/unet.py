"""U-Net presets on diffusers' `UNet2DConditionModel`, and what each one costs.

A preset fixes widths and depth; the input channels follow the autoencoder and the cross-attention
width follows the text encoder, so one preset serves every profile.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

PRESETS: dict[str, dict] = {
    # tests: seconds on a CPU
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # the offline demo: ~5 M parameters, trains at 16 px on two CPU cores in minutes
    "demo": dict(block_out_channels=(32, 64, 128), layers_per_block=1, attention_head_dim=8, norm_num_groups=16,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # the course: 4x32x32 SD latents
    "hw6-base": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "hw6-large": dict(block_out_channels=(256, 384, 512, 768), layers_per_block=2, attention_head_dim=8,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    # the best public course result (README "Where the hw6 defaults come from"): cross-attention in every
    # block. At 4x32x32 with 77 CLIP tokens of width 512: 296.40 M parameters, 89.22 GFLOP forward per
    # sample (attention products included; hw6-base: 139.68 M, 31.19 GFLOP). diffusers' attention_head_dim
    # is, despite its name, the number of heads: 8, as in the recipe.
    "hw6-recipe": dict(block_out_channels=(192, 384, 768), layers_per_block=3, attention_head_dim=8,
                       down_block_types=("CrossAttnDownBlock2D",) * 3,
                       up_block_types=("CrossAttnUpBlock2D",) * 3),
}


def build_unet(preset: str, in_channels: int, cross_attention_dim: int, sample_size: int, seed: int = 0):
    """A freshly initialised U-Net (same weights for the same seed)."""
    from diffusers import UNet2DConditionModel

    if preset not in PRESETS:
        raise ValueError(f"Unknown U-Net preset {preset!r}; choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                cross_attention_dim=cross_attention_dim, **PRESETS[preset])


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflops(unet, latent_size: int, tokens: int = 77, batch: int = 1) -> float:
    """GFLOP of one forward pass per sample (a training step costs about 3x this)."""
    cfg = unet.config
    p = next(unet.parameters())
    x = torch.zeros(batch, cfg.in_channels, latent_size, latent_size, device=p.device, dtype=p.dtype)
    ctx = torch.zeros(batch, tokens, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    # the math attention kernel runs as matmuls the counter sees; torch's fused CPU kernel counts as 0 FLOP,
    # which would leave out the attention products (3.4 of hw6-base's 31.2 GFLOP)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([500] * batch, device=p.device), encoder_hidden_states=ctx)
    return counter.get_total_flops() / batch / 1e9


def preset_table(in_channels: int, cross_attention_dim: int, latent_size: int, tokens: int) -> list[dict]:
    """Parameters and forward GFLOP of every preset for the given parts (built on the meta device: no memory)."""
    rows = []
    for name in PRESETS:
        with torch.device("meta"):
            unet = build_unet(name, in_channels, cross_attention_dim, latent_size)
        rows.append(dict(preset=name, params_M=round(count_params(unet) / 1e6, 2),
                         gflop_per_sample=round(forward_gflops(unet, latent_size, tokens), 2),
                         channels=PRESETS[name]["block_out_channels"]))
    return rows


def block_shapes(unet, sample: torch.Tensor, context: torch.Tensor) -> list[tuple[str, tuple]]:
    """(block name, output shape) down the U and back up: a shape check that reads like the architecture."""
    shapes, hooks = [], []
    blocks = [("conv_in", unet.conv_in)] + [(f"down[{i}] {type(b).__name__}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(f"mid {type(unet.mid_block).__name__}", unet.mid_block)]
    blocks += [(f"up[{i}] {type(b).__name__}", b) for i, b in enumerate(unet.up_blocks)] + [("conv_out", unet.conv_out)]
    for name, block in blocks:
        hooks.append(block.register_forward_hook(
            lambda m, i, out, name=name: shapes.append((name, tuple((out[0] if isinstance(out, tuple) else out).shape)))))
    try:
        with torch.no_grad():
            unet(sample, torch.zeros(len(sample), dtype=torch.long, device=sample.device), encoder_hidden_states=context)
    finally:
        for h in hooks:
            h.remove()
    return shapes
