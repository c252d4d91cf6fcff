"""Model definitions shared by the training scripts and the TorchServe handler.

One module per concern: networks (`unet`, `ebm`, `gan`), the diffusion process
(`gaussian_diffusion`), step schedulers (`schedulers`), weights on disk
(`checkpoint`), request parameters (`params`) and the per-model pipelines that
turn validated parameters into images (`pipelines`).
"""
