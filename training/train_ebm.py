"""Train the class-conditional CIFAR-10 energy-based model by denoising score matching on dE/dx.

    python -m training.train_ebm --max-minutes 120 --resume
    python -m training.train_ebm --init-from checkpoints/diffusion --max-minutes 120   # first run

The energy E(x, t, y) (generators/ebm.py) is trained so that sigma_t * dE/dx predicts the noise
in x_t, with the diffusion model's schedule, Min-SNR weighting and label dropout; the loss
differentiates a gradient, so each step runs a double backward (about 2.4x a diffusion step).
No sampling chain runs during training. --init-from starts the energy's UNet from the diffusion
model's weights (its features transfer; the output layer is negated, since near t = 0 the
energy's UNet output plays the role of minus the predicted noise).
"""
from __future__ import annotations

from pathlib import Path

import torch

from generators.checkpoint import load_checkpoint, save_checkpoint
from generators.ebm import EnergyModel, LangevinConfig, annealed_langevin
from generators.gaussian_diffusion import GaussianDiffusion, ScheduleConfig
from generators.unet import UNetConfig
from training.common import EMA, TrainingRun, base_parser, setup, stamp
from training.data import ImageDataset
from training.denoising import add_denoising_options, train_denoiser
from training.train_diffusion import unet_config_from_args

parser = base_parser(__doc__, "ebm", "cifar10", batch_size=64, lr=2e-4, ema_decay=0.999, warmup_steps=500,
                     sample_every=500, save_every=100)
add_denoising_options(parser, serve_spacing="trailing")
parser.add_argument("--sigma-data", type=float, default=0.5, help="data std in the energy's preconditioning")
parser.add_argument("--init-from", type=Path, default=None,
                    help="diffusion checkpoint whose UNet starts the energy (ignored when resuming)")
parser.add_argument("--serve-levels", type=int, default=20, help="noise levels of the served Langevin sampler")
parser.add_argument("--serve-corrector-steps", type=int, default=1)
parser.add_argument("--serve-snr", type=float, default=0.25, help="chosen by the snr x guidance sweep (README)")
parser.add_argument("--serve-guidance", type=float, default=4.0)
parser.add_argument("--score-timestep", type=int, default=0,
                    help="noise level at which the served model scores posted images")


def warm_start(model: EnergyModel, diffusion_dir: Path) -> None:
    weights, config = load_checkpoint(diffusion_dir)
    if config.get("model_type") != "diffusion":
        raise SystemExit(f"--init-from {diffusion_dir}: not a diffusion checkpoint")
    model.unet.load_state_dict(weights)
    with torch.no_grad():
        model.unet.head[-1].weight.neg_()
        model.unet.head[-1].bias.neg_()


def main() -> None:
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # denormals in the double backward cost more than they are worth
    device = setup(args)
    data = ImageDataset(args.data).to(device)
    schedule = ScheduleConfig(schedule=args.schedule, min_snr_gamma=args.min_snr_gamma)
    diffusion = GaussianDiffusion(schedule)
    unet_config = (UNetConfig.from_dict(load_checkpoint(args.init_from)[1]["unet"]) if args.init_from
                   else unet_config_from_args(args, data))
    model = EnergyModel(unet_config, diffusion.alphas_cumprod, args.sigma_data)
    if args.init_from and not (args.resume and (args.state_dir / TrainingRun.STATE_NAME).exists()):
        warm_start(model, args.init_from)
        print(f"energy UNet initialised from {args.init_from}")
    model.to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = TrainingRun(args, {"model": model, "ema": ema, "optimizer": optimizer})
    if args.resume:
        run.resume(args.out, [model, ema])
    print(f"energy UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
          f"step {run.step}")
    sampling = LangevinConfig(levels=args.serve_levels, corrector_steps=args.serve_corrector_steps,
                              snr=args.serve_snr, guidance_scale=args.serve_guidance,
                              timestep_spacing=args.serve_spacing)

    def export() -> None:
        run.save_state()
        config = {"model_type": "ebm", "unet": unet_config.to_dict(), "schedule": schedule.to_dict(),
                  "sigma_data": args.sigma_data, "langevin": sampling.to_dict(),
                  "scoring": {"timestep": args.score_timestep}, "class_names": data.class_names}
        save_checkpoint(args.out, ema.state_dict(), stamp(config, run, data.sha256, ema_decay=args.ema_decay,
                                                          label_dropout=args.label_dropout,
                                                          cooldown_steps=args.cooldown_steps,
                                                          init_from=str(args.init_from) if args.init_from else None))

    def sample(ema_model: EnergyModel, labels: torch.Tensor) -> torch.Tensor:
        return annealed_langevin(ema_model, len(labels), labels, sampling, torch.Generator().manual_seed(0))

    train_denoiser(args, model, ema, optimizer, run, diffusion, data, device, export, sample)


if __name__ == "__main__":
    main()
