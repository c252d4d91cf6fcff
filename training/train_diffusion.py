"""Train the class-conditional CIFAR-10 diffusion model (epsilon prediction, cosine schedule, Min-SNR).

    python -m training.train_diffusion --max-minutes 120 --resume

Writes full training state to --state-dir and the served EMA weights to --out
(safetensors + config.json, including the sampler defaults serving starts from).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from generators.checkpoint import save_checkpoint
from generators.gaussian_diffusion import GaussianDiffusion, ScheduleConfig
from generators.pipelines import sample_diffusion
from generators.unet import UNet, UNetConfig
from training.common import EMA, TrainingRun, base_parser, clip_and_step, setup, stamp
from training.data import ImageDataset

parser = base_parser(__doc__, "diffusion", "cifar10", batch_size=64, lr=5e-4, ema_decay=0.999)
parser.add_argument("--base-channels", type=int, default=32)
parser.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2, 2])
parser.add_argument("--num-res-blocks", type=int, default=1)
parser.add_argument("--attention-resolutions", type=int, nargs="*", default=[8])
parser.add_argument("--dropout", type=float, default=0.1)
parser.add_argument("--label-dropout", type=float, default=0.1, help="fraction of labels replaced by 'no class'")
parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
parser.add_argument("--min-snr-gamma", type=float, default=5.0)
parser.add_argument("--warmup-steps", type=int, default=500)
parser.add_argument("--cooldown-steps", type=int, default=0,
                    help="with --max-steps: decay the lr linearly to 0 over this many last steps (a run resumed "
                         "later with a higher --max-steps goes back to the full lr)")
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--val-every", type=int, default=1000,
                    help="log the EMA model's noise-prediction MSE on fixed held-out test images this often")
parser.add_argument("--val-images", type=int, default=512)
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the training forward pass (compiling takes minutes on a CPU)")
parser.add_argument("--serve-sampler", default="ddim", help="sampler default written to the served config")
parser.add_argument("--serve-steps", type=int, default=50)
parser.add_argument("--serve-guidance", type=float, default=8.0)


def served_config(args, unet_config: UNetConfig, schedule: ScheduleConfig, data: ImageDataset, run: TrainingRun) -> dict:
    config = {
        "model_type": "diffusion",
        "unet": unet_config.to_dict(),
        "schedule": schedule.to_dict(),
        "sampling": {"sampler": args.serve_sampler, "steps": args.serve_steps, "guidance_scale": args.serve_guidance},
        "class_names": data.class_names,
    }
    return stamp(config, run, data.sha256, ema_decay=args.ema_decay, label_dropout=args.label_dropout,
                 cooldown_steps=args.cooldown_steps)


@torch.no_grad()
def validation_losses(model: UNet, diffusion: GaussianDiffusion, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Unweighted noise-prediction MSE of an eval-mode model on a fixed held-out batch (fixed t and noise, so
    comparable across steps), with the true labels and with the 'no class' label: their gap shows how much the
    class is used."""
    def mse(labels: torch.Tensor) -> float:
        chunks = zip(*(v.split(256) for v in (batch["x0"], labels, batch["t"], batch["noise"])))
        return torch.cat([diffusion.eps_mse(model, *chunk) for chunk in chunks]).mean().item()

    return {"val_loss": mse(batch["labels"]),
            "val_loss_unconditional": mse(torch.full_like(batch["labels"], model.null_class))}


def held_out_batch(data: Path, n_images: int, diffusion: GaussianDiffusion,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """n_images test images with their labels, timesteps and noise, the same for every call."""
    generator = torch.Generator().manual_seed(0)
    x0, labels = ImageDataset(data, split="test").batch(n_images, generator)
    t = torch.randint(0, diffusion.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return {"x0": x0.to(device), "labels": labels.to(device), "t": t.to(device), "noise": noise.to(device)}


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """The lr of update `step` (0-based): linear warm-up, constant, then an optional linear cooldown before
    --max-steps. Decaying only at the end lets a run be extended session by session and still end annealed."""
    factor = min(1.0, (step + 1) / args.warmup_steps)
    if args.cooldown_steps:
        factor = min(factor, (args.max_steps - step) / args.cooldown_steps)
    return args.lr * factor


def main() -> None:
    args = parser.parse_args()
    if args.cooldown_steps and args.max_steps is None:
        parser.error("--cooldown-steps needs --max-steps (the step the lr reaches 0 at)")
    device = setup(args)
    data = ImageDataset(args.data)
    unet_config = UNetConfig(image_size=data.image_shape[1], in_channels=data.image_shape[0],
                             base_channels=args.base_channels, channel_mults=tuple(args.channel_mults),
                             num_res_blocks=args.num_res_blocks, attention_resolutions=tuple(args.attention_resolutions),
                             dropout=args.dropout, num_classes=len(data.class_names))
    schedule = ScheduleConfig(schedule=args.schedule, min_snr_gamma=args.min_snr_gamma)
    diffusion = GaussianDiffusion(schedule)
    model = UNet(unet_config).to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = TrainingRun(args, {"model": model, "ema": ema, "optimizer": optimizer})
    if args.resume:
        run.resume(args.out, [model, ema])
    print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, step {run.step}")
    validation = held_out_batch(args.data, args.val_images, diffusion, device)
    forward = torch.compile(model) if args.compile else model  # shares model's parameters; state is saved from model

    def export() -> None:
        run.save_state()
        save_checkpoint(args.out, ema.state_dict(), served_config(args, unet_config, schedule, data, run))

    model.train()
    while not run.done():
        x, labels = data.batch(args.batch_size, run.generator, hflip=True)
        x, labels = x.to(device), labels.to(device)
        drop = torch.rand(len(labels), generator=run.generator).to(device) < args.label_dropout
        labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
        lr = learning_rate(args, run.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = diffusion.training_loss(forward, x, labels)
        grad_norm = clip_and_step(model, optimizer, loss, args.grad_clip)
        ema.update(model, run.step)
        run.progress(loss=loss.item(), grad_norm=grad_norm, lr=lr)
        if run.due(args.val_every):
            run.log(**validation_losses(ema.model, diffusion, validation))
        if run.due(args.save_every):
            export()
        if run.due(args.sample_every):
            labels = torch.arange(unet_config.num_classes).repeat(4)  # one class per column
            images = sample_diffusion(ema.model, diffusion.alphas_cumprod, args.serve_sampler, args.serve_steps,
                                      len(labels), labels, args.serve_guidance, torch.Generator().manual_seed(0))
            print(f"samples: {run.save_samples(images, columns=unet_config.num_classes)}")
    export()
    run.close()
    print(f"saved {args.out} at step {run.step}")


if __name__ == "__main__":
    main()
