"""Train the CIFAR-10 energy-based model with short-run Langevin chains from uniform noise.

    python -m training.train_ebm --max-minutes 60 --resume

Each iteration starts fresh chains from noise and runs exactly the Langevin settings that
serving uses (stored in the served config), so served samples match what training saw.
Loss: E(x+) - E(x-) + alpha * (E(x+)^2 + E(x-)^2), which keeps energies from drifting.
Watch `gap` (E- minus E+) and `neg_std` (per-image pixel std of samples: near 0 means flat colours).
"""
from __future__ import annotations

import torch

from generators.checkpoint import save_checkpoint
from generators.ebm import EnergyNet, EnergyNetConfig, LangevinConfig, initial_noise, langevin
from training.common import TrainingRun, base_parser, clip_and_step, setup, stamp
from training.data import ImageDataset

parser = base_parser(__doc__, "ebm", "cifar10", batch_size=64, lr=1e-4, sample_every=200, save_every=100)
parser.add_argument("--n-f", type=int, default=32, help="base width of the energy network")
parser.add_argument("--langevin-steps", type=int, default=30)
parser.add_argument("--step-size", type=float, default=10.0)
parser.add_argument("--noise-scale", type=float, default=0.01)
parser.add_argument("--move-clip", type=float, default=0.1, help="per-pixel bound on one step's gradient move")
parser.add_argument("--alpha", type=float, default=1.0, help="weight of the energy-magnitude penalty")
parser.add_argument("--data-noise", type=float, default=0.03, help="std of Gaussian noise added to real images")
parser.add_argument("--grad-clip", type=float, default=1.0)


def main() -> None:
    args = parser.parse_args()
    device = setup(args)
    data = ImageDataset(args.data)
    net_config = EnergyNetConfig(image_size=data.image_shape[1], channels=data.image_shape[0], n_f=args.n_f)
    chain = LangevinConfig(steps=args.langevin_steps, step_size=args.step_size, noise_scale=args.noise_scale,
                           grad_clip=args.move_clip)
    energy = EnergyNet(net_config).to(device)
    optimizer = torch.optim.Adam(energy.parameters(), lr=args.lr, betas=(0.0, 0.999))
    run = TrainingRun(args, {"energy": energy, "optimizer": optimizer})
    if args.resume:
        run.resume(args.out, [energy])
    print(f"EnergyNet {sum(p.numel() for p in energy.parameters()) / 1e6:.2f}M on {device}, step {run.step}")

    def export() -> None:
        run.save_state()
        served = stamp({"model_type": "ebm", "energy_net": net_config.to_dict(), "langevin": chain.to_dict(),
                        "class_names": data.class_names}, run, data.sha256, alpha=args.alpha, data_noise=args.data_noise)
        save_checkpoint(args.out, energy.state_dict(), served)

    while not run.done():
        real, _ = data.batch(args.batch_size, run.generator, hflip=True)
        real = (real + args.data_noise * torch.randn(real.shape, generator=run.generator)).to(device)
        energy.requires_grad_(False)
        fake = langevin(energy, initial_noise(args.batch_size, net_config, run.generator).to(device), chain, run.generator)
        energy.requires_grad_(True)
        e_pos, e_neg = energy(real), energy(fake)
        loss = e_pos.mean() - e_neg.mean() + args.alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        grad_norm = clip_and_step(energy, optimizer, loss, args.grad_clip)
        run.progress(loss=loss.item(), gap=(e_neg.mean() - e_pos.mean()).item(), e_pos=e_pos.mean().item(),
                     neg_std=fake.flatten(1).std(dim=1).mean().item(), grad_norm=grad_norm)
        if run.due(args.save_every):
            export()
        if run.due(args.sample_every):
            print(f"samples: {run.save_samples(fake[:64])}")
    export()
    run.close()
    print(f"saved {args.out} at step {run.step}")


if __name__ == "__main__":
    main()
