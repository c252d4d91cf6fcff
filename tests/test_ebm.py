"""The energy model: its gradient is the gradient of its energy, it trains through the double backward,
and its sampler is deterministic for a seed."""
import torch

from generators.ebm import EnergyModel, LangevinConfig, annealed_langevin, guided_noise
from generators.gaussian_diffusion import GaussianDiffusion, ScheduleConfig, alphas_cumprod
from generators.unet import UNetConfig

TINY = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), dropout=0.0, num_classes=10)


def tiny_energy(zero_head: bool = False) -> EnergyModel:
    torch.manual_seed(0)
    model = EnergyModel(TINY, alphas_cumprod(ScheduleConfig())).double()
    if not zero_head:  # a trained model's output layer is not zero
        torch.nn.init.normal_(model.unet.head[-1].weight, std=0.05)
    return model.eval()


def test_energy_gradient_matches_a_finite_difference():
    model = tiny_energy()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    t, labels = torch.tensor([30, 600]), torch.tensor([3, model.null_class])
    _, grad = model.energy_grad(x, t, labels)
    direction = torch.randn_like(x)
    h = 1e-5
    with torch.no_grad():
        numeric = (model.energy(x + h * direction, t, labels) - model.energy(x - h * direction, t, labels)) / (2 * h)
    analytic = (grad * direction).flatten(1).sum(1)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-6), (analytic, numeric)


def test_predicted_noise_is_sigma_times_the_energy_gradient():
    model = tiny_energy()
    x, t = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([100, 900])
    _, grad = model.energy_grad(x, t)
    sigma = (1 - model.alphas_cumprod[t]).sqrt()[:, None, None, None]
    assert torch.allclose(model(x, t), sigma * grad)


def test_guidance_combines_the_energies_linearly():
    model = tiny_energy()
    x, t, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([200, 200]), torch.tensor([1, 7])
    null = torch.full_like(labels, model.null_class)
    expected = model(x, t, null) + 3.0 * (model(x, t, labels) - model(x, t, null))
    assert torch.allclose(guided_noise(model, x, t, labels, 3.0), expected)


def test_training_reaches_every_parameter_even_with_a_zero_output_layer():
    # the pitfall of an energy 0.5 |F|^2: a zero-initialised last layer gives it no gradient at all
    model = tiny_energy(zero_head=True).float().train()
    diffusion = GaussianDiffusion(ScheduleConfig())
    loss = diffusion.training_loss(model, torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 10]))
    loss.backward()
    head = model.unet.head[-1].weight.grad
    assert head is not None and head.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sampler_is_deterministic_for_a_seed_and_stays_in_range():
    model = tiny_energy().float()
    settings = LangevinConfig(levels=3, corrector_steps=1, guidance_scale=2.0)
    labels = torch.tensor([0, 5])
    a = annealed_langevin(model, 2, labels, settings, torch.Generator().manual_seed(7))
    b = annealed_langevin(model, 2, labels, settings, torch.Generator().manual_seed(7))
    c = annealed_langevin(model, 2, labels, settings, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_auroc_counts_ordered_pairs_and_half_ties():
    from training.ebm_ood import auroc, digits_as_cifar
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == 0.375  # (0.5 + 0 + 1 + 0) / 4
    digits = digits_as_cifar(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert digits.shape == (2, 3, 32, 32) and digits[:, :, 0].max() == 0 and digits[:, :, 2:30, 2:30].min() == 255
