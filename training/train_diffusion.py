"""Train the class-conditional CIFAR-10 diffusion model (epsilon prediction, cosine schedule, Min-SNR).

    python -m training.train_diffusion --max-minutes 120 --resume

Writes full training state to --state-dir and the served EMA weights to --out
(safetensors + config.json, including the sampler defaults serving starts from).
"""
from __future__ import annotations

import torch

from generators.checkpoint import save_checkpoint
from generators.gaussian_diffusion import GaussianDiffusion, ScheduleConfig
from generators.guidance import Guidance
from generators.pipelines import sample_diffusion
from generators.unet import UNet, UNetConfig
from training.common import EMA, TrainingRun, base_parser, setup, stamp
from training.data import ImageDataset
from training.denoising import add_denoising_options, train_denoiser

parser = base_parser(__doc__, "diffusion", "cifar10", batch_size=64, lr=5e-4, ema_decay=0.999, warmup_steps=500)
add_denoising_options(parser, serve_spacing="linspace")
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the training forward pass (compiling takes minutes on a CPU)")
parser.add_argument("--serve-sampler", default="dpm++2m",
                    help="sampler default written to the served config (chosen by scripts/nfe_curve.py)")
parser.add_argument("--serve-steps", type=int, default=20)
parser.add_argument("--serve-guidance", type=float, default=4.5)
parser.add_argument("--serve-guidance-t-max", type=int, default=882,
                    help="served guidance acts only at timesteps <= this (README, section 5)")


def unet_config_from_args(args, data: ImageDataset) -> UNetConfig:
    return UNetConfig(image_size=data.image_shape[1], in_channels=data.image_shape[0],
                      base_channels=args.base_channels, channel_mults=tuple(args.channel_mults),
                      num_res_blocks=args.num_res_blocks, attention_resolutions=tuple(args.attention_resolutions),
                      dropout=args.dropout, num_classes=len(data.class_names))


def main() -> None:
    args = parser.parse_args()
    device = setup(args)
    data = ImageDataset(args.data).to(device)
    unet_config = unet_config_from_args(args, data)
    schedule = ScheduleConfig(schedule=args.schedule, min_snr_gamma=args.min_snr_gamma)
    diffusion = GaussianDiffusion(schedule)
    model = UNet(unet_config).to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = TrainingRun(args, {"model": model, "ema": ema, "optimizer": optimizer})
    if args.resume:
        run.resume(args.out, [model, ema])
    print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, step {run.step}")

    def export() -> None:
        run.save_state()
        config = {"model_type": "diffusion", "unet": unet_config.to_dict(), "schedule": schedule.to_dict(),
                  "sampling": {"sampler": args.serve_sampler, "steps": args.serve_steps,
                               "timestep_spacing": args.serve_spacing, "guidance_scale": args.serve_guidance,
                               "guidance_t_max": args.serve_guidance_t_max},
                  "class_names": data.class_names}
        save_checkpoint(args.out, ema.state_dict(), stamp(config, run, data.sha256, ema_decay=args.ema_decay,
                                                          label_dropout=args.label_dropout,
                                                          cooldown_steps=args.cooldown_steps))

    def sample(ema_model: UNet, labels: torch.Tensor) -> torch.Tensor:
        return sample_diffusion(ema_model, diffusion.alphas_cumprod, args.serve_sampler, args.serve_steps,
                                len(labels), labels, Guidance(args.serve_guidance, t_max=args.serve_guidance_t_max),
                                torch.Generator().manual_seed(0),
                                timestep_spacing=args.serve_spacing)

    forward = torch.compile(model) if args.compile else model  # shares model's parameters; state is saved from model
    train_denoiser(args, model, ema, optimizer, run, diffusion, data, device, export, sample, forward)


if __name__ == "__main__":
    main()
