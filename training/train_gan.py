"""Train the class-conditional MNIST GAN: hinge loss, spectral-norm projection discriminator, EMA generator.

    python -m training.train_gan --max-minutes 30 --resume

Writes full training state to --state-dir and the served (EMA) generator to --out. The served generator's
BatchNorm statistics are re-estimated on its own outputs at every export: the EMA copies the running statistics
of the live generator, whose weights differ from the averaged ones, and in eval mode that mismatch alone turned
digits into other digits.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tqdm import trange

from generators.checkpoint import save_checkpoint
from generators.gan import Discriminator, GANConfig, Generator
from training.common import EMA, TrainingRun, base_parser, learning_rate, set_learning_rate, setup, stamp
from training.data import ImageDataset

parser = base_parser(__doc__, "gan", "mnist", batch_size=128, lr=2e-4, ema_decay=0.999, sample_every=500)
parser.add_argument("--z-dim", type=int, default=64)
parser.add_argument("--g-channels", type=int, default=64)
parser.add_argument("--d-channels", type=int, default=64)
parser.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.9], help="Adam betas for G and D")
parser.add_argument("--diversity-weight", type=float, default=1.0,
                    help="weight of the mode-seeking term (Mao et al. 2019) that keeps codes of one digit apart; 0: off")
parser.add_argument("--bn-batches", type=int, default=50,
                    help="batches of --batch-size random codes that re-estimate the served generator's BatchNorm "
                         "statistics at export")
parser.add_argument("--d-warmup-steps", type=int, default=1000,
                    help="after a warm start (no training state), updates of the fresh discriminator alone before "
                         "the generator trains again: against an untrained D the generator's samples degrade")


@torch.no_grad()
def standing_statistics(generator: Generator, batches: int, batch_size: int, seed: int = 0) -> Generator:
    """A copy of `generator` whose BatchNorm running statistics are the plain average over `batches` batches of its
    own activations (random codes and digits drawn from `seed`), so eval mode matches these weights."""
    calibrated = copy.deepcopy(generator)
    norms = [m for m in calibrated.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    calibrated.train()
    for _ in range(batches):
        z = torch.randn(batch_size, generator.config.z_dim, generator=rng).to(device)
        calibrated(z, torch.randint(0, generator.config.num_classes, (batch_size,), generator=rng).to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return calibrated.eval()


def mode_seeking_penalty(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """1 / (image distance / code distance) between the batch's two halves, whose pairs share a digit (Mao et al.
    2019): small when two codes give two different images of the digit, large when the generator ignores its code
    and draws one image per digit (what hinge loss and the projection discriminator alone let it do here)."""
    first, second = fake.chunk(2)
    z_first, z_second = z.chunk(2)
    ratio = (first - second).abs().mean() / (z_first - z_second).abs().mean()
    return 1 / (ratio + 1e-5)


def main() -> None:
    args = parser.parse_args()
    device = setup(args)
    data = ImageDataset(args.data).to(device)
    config = GANConfig(z_dim=args.z_dim, num_classes=len(data.class_names), g_channels=args.g_channels,
                       d_channels=args.d_channels)
    gen, disc = Generator(config).to(device), Discriminator(config).to(device)
    ema = EMA(gen, args.ema_decay)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=tuple(args.betas))
    run = TrainingRun(args, {"generator": gen, "discriminator": disc, "ema": ema, "opt_g": opt_g, "opt_d": opt_d})
    warm_start = args.resume and run.resume(args.out, [gen, ema])
    print(f"G {sum(p.numel() for p in gen.parameters()) / 1e6:.2f}M, D {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M "
          f"on {device}, step {run.step}")

    def calibrated_ema() -> Generator:
        return standing_statistics(ema.model, args.bn_batches, args.batch_size, args.seed)

    def export(calibrated: Generator) -> None:
        run.save_state()
        served = stamp({"model_type": "gan", "gan": config.to_dict(), "class_names": data.class_names}, run,
                       data.sha256, ema_decay=args.ema_decay, diversity_weight=args.diversity_weight,
                       bn_batches=args.bn_batches, epochs=round(run.step * args.batch_size / len(data), 2))
        save_checkpoint(args.out, calibrated.state_dict(), served)

    fixed_z = torch.randn((80, config.z_dim), generator=torch.Generator().manual_seed(0)).to(device)
    fixed_labels = (torch.arange(80) % config.num_classes).to(device)

    def fake_and_d_update() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One discriminator update on a fresh batch; returns (fake, their codes, their digits, d_loss) for the
        generator's turn. The fakes' two halves ask for the same digits, pair by pair (mode_seeking_penalty)."""
        real, labels = data.batch(args.batch_size, run.generator)  # on the data's device
        fake_labels = labels[: len(labels) // 2].repeat(2)
        z = torch.randn(len(fake_labels), config.z_dim, device=device)
        fake = gen(z, fake_labels)
        d_loss = F.relu(1 - disc(real, labels)).mean() + F.relu(1 + disc(fake.detach(), fake_labels)).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        return fake, z, fake_labels, d_loss

    gen.train()
    if warm_start and args.d_warmup_steps:
        for _ in trange(args.d_warmup_steps, desc="discriminator warm-up", mininterval=5):
            fake_and_d_update()
    while not run.done():
        lr = learning_rate(args, run.step, run.optimizer_start)
        set_learning_rate([opt_g, opt_d], lr)
        fake, z, labels, d_loss = fake_and_d_update()
        adversarial = -disc(fake, labels).mean()
        diversity = mode_seeking_penalty(fake, z)
        opt_g.zero_grad(set_to_none=True)
        (adversarial + args.diversity_weight * diversity).backward()
        opt_g.step()
        ema.update(gen, run.step)

        run.progress(d_loss=d_loss.detach(), g_loss=adversarial.detach(), diversity=diversity.detach(), lr=lr)
        if run.due(args.save_every) or run.due(args.sample_every):
            calibrated = calibrated_ema()  # one re-estimation serves both
            if run.due(args.save_every):
                export(calibrated)
            if run.due(args.sample_every):
                with torch.no_grad():
                    print(f"samples: {run.save_samples(calibrated(fixed_z, fixed_labels))}")
    export(calibrated_ema())
    run.close()
    print(f"saved {args.out} at step {run.step}")


if __name__ == "__main__":
    main()
