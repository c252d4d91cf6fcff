"""The quality measurement: classifier training, the measures on known inputs, and evaluate.py end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generators.checkpoint import load_checkpoint
from generators.pipelines import load_pipeline
from tests.synthetic import CIFAR_CLASSES, tiny_checkpoint, write_npz
from training import evaluate
from training.classifiers import classify, load_classifier
from training.evaluate import blur, describe_sampling

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"cifar10": (32, 32, 3), "mnist": (28, 28)}
TINY = ["--stem", "4", "--widths", "8", "16", "--residual", "0", "1"]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, "--threads", "1", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_classifier(dataset: str, directory: Path, *extra: str) -> subprocess.CompletedProcess:
    data = directory / "data.npz"
    if not data.exists():
        write_npz(data, SHAPES[dataset], classes=CIFAR_CLASSES if dataset == "cifar10" else None)
    return run("training.train_classifier", "--dataset", dataset, "--data", str(data), "--out", str(directory / "clf"),
               "--state-dir", str(directory / "state"), "--epochs", "1", "--batch-size", "8", "--log-every", "1",
               *TINY, *extra)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """A tiny classifier per data set, trained for one epoch on 64 synthetic images."""
    dirs = {}
    for dataset in SHAPES:
        dirs[dataset] = tmp_path_factory.mktemp(dataset)
        train_classifier(dataset, dirs[dataset])
    return dirs


@pytest.mark.parametrize("dataset", sorted(SHAPES))
def test_train_classifier_writes_loadable_checkpoint(classifiers, dataset):
    directory = classifiers[dataset]
    _, config = load_checkpoint(directory / "clf")
    assert config["model_type"] == "classifier" and config["dataset"] == dataset
    assert config["epochs"] == 1.0 and config["training"]["steps"] == 8  # 64 images / batch 8
    assert 0.0 <= config["test_accuracy"] <= 1.0 and len(config["training"]["data_sha256"]) == 64
    model, _ = load_classifier(directory / "clf")
    channels = 3 if dataset == "cifar10" else 1
    images = torch.randint(0, 256, (5, channels, *SHAPES[dataset][:2]), dtype=torch.uint8)
    features, logits = classify(model, images, 2, torch.device("cpu"))
    assert features.shape == (5, 16) and logits.shape == (5, 10)
    assert torch.allclose(logits, model(images.float() / 127.5 - 1), atol=1e-5)


def test_train_classifier_resumes_from_state(tmp_path):
    train_classifier("mnist", tmp_path)
    result = train_classifier("mnist", tmp_path, "--resume")
    assert "step 8" in result.stdout  # the finished state was loaded: nothing left to train
    steps = [json.loads(line)["step"] for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_blur_keeps_flat_colour_and_removes_fine_detail():
    flat = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    assert torch.equal(blur(flat), flat)
    checkerboard = ((torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 255).to(torch.uint8)
    blurred = blur(checkerboard.expand(1, 1, 28, 28))
    assert blurred.shape == (1, 1, 28, 28) and blurred.dtype == torch.uint8
    assert int(blurred.max()) - int(blurred.min()) <= 2  # 2x2 detail averages out to grey


@pytest.mark.parametrize("factor", [2, 4])
def test_blur_is_pils_bilinear_resize_down_and_up(factor):
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(factor), dtype=torch.uint8)
    small = 32 // factor
    pil = torch.from_numpy(np.stack([
        np.asarray(Image.fromarray(image).resize((small, small), Image.BILINEAR).resize((32, 32), Image.BILINEAR))
        for image in images.permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)
    difference = (blur(images, factor).int() - pil.int()).abs()
    assert difference.float().mean() < 0.5 and difference.max() <= 2  # PIL rounds in fixed point


@pytest.mark.parametrize("model, dataset", [("gan", "mnist"), ("ebm", "cifar10"), ("diffusion", "cifar10")])
def test_evaluate_writes_quality_json(classifiers, tmp_path, model, dataset):
    checkpoint = tiny_checkpoint(tmp_path / model, model)
    result = run("training.evaluate", "--model", model, "--checkpoint", str(checkpoint),
                 "--classifier", str(classifiers[dataset] / "clf"), "--data", str(classifiers[dataset] / "data.npz"),
                 "--n-samples", "20", "--reference-size", "16", "--batch-size", "10",
                 "--fid-cache", str(tmp_path / "cache"))
    report = json.loads((checkpoint / "quality.json").read_text())
    assert report["fid"] > 0 and abs(report["kid"]) < 10 and report["n_samples"] == 20
    assert report["reference"]["n"] == 16 and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert report["precision_recall"] == {"n": 16, "k": 3}  # equal sets: 16 of the 20 samples against 16 real
    assert 0 <= report["pixel_std"] <= 1 and 0 <= report["clipped_fraction"] <= 1
    assert set(report["real_pixels"]) == {"pixel_std", "clipped_fraction"}
    assert 0.0 <= report["class_accuracy"] <= 1.0 and len(report["per_class_accuracy"]) == 10
    assert (report["fid_m"] is not None) == (dataset == "mnist")
    assert 0 <= report["within_class_spread"] <= 1 and 0 < report["real_within_class_spread"] <= 1
    _, config = load_checkpoint(checkpoint)
    assert report["generator"] == {"checkpoint": str(checkpoint), "steps": 0, "weights_sha256": config["weights_sha256"]}
    assert report["classifier"]["dataset"] == dataset and report["machine"]["cpu_count"] >= 1
    assert "n_images" not in report["sampling_params"] and report["wall_seconds"] >= 0
    assert result.stdout.strip().splitlines()[-1].startswith(f"| {model} | 0 | ")


def test_reference_split_test_compares_with_test_images(classifiers, tmp_path):
    """--reference-split test takes the real figures from the test images (their own cached features), and the
    row says so; the same samples score another FID than against training images."""
    checkpoint = tiny_checkpoint(tmp_path / "diffusion", "diffusion")
    reports = {}
    for split in ("train", "test"):
        result = run("training.evaluate", "--model", "diffusion", "--checkpoint", str(checkpoint),
                     "--classifier", str(classifiers["cifar10"] / "clf"),
                     "--data", str(classifiers["cifar10"] / "data.npz"), "--n-samples", "20", "--reference-size", "16",
                     "--batch-size", "10", "--fid-cache", str(tmp_path / "cache"), "--reference-split", split,
                     "--out", str(tmp_path / f"{split}.json"))
        reports[split] = json.loads((tmp_path / f"{split}.json").read_text())
        assert reports[split]["reference"]["split"] == split
        assert ("| 20 vs 16 test |" in result.stdout) == (split == "test")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert reports["train"]["fid"] != reports["test"]["fid"]
    assert reports["train"]["real_pixels"] != reports["test"]["real_pixels"]


def test_evaluate_without_fid_gives_the_same_class_figures(classifiers, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "gan", "gan")
    common = ["--model", "gan", "--checkpoint", str(checkpoint), "--classifier", str(classifiers["mnist"] / "clf"),
              "--data", str(classifiers["mnist"] / "data.npz"), "--n-samples", "20", "--reference-size", "16",
              "--batch-size", "10", "--fid-cache", str(tmp_path / "cache")]
    run("training.evaluate", *common, "--out", str(tmp_path / "full.json"))
    quick = run("training.evaluate", *common, "--no-fid", "--out", str(tmp_path / "quick.json"))
    full, report = (json.loads((tmp_path / name).read_text()) for name in ("full.json", "quick.json"))
    assert report["fid"] is None and report["kid"] is None and report["precision"] is None and full["fid"] > 0
    for key in ("class_accuracy", "per_class_accuracy", "fid_m", "pixel_std", "clipped_fraction", "within_class_spread"):
        assert report[key] == full[key], key
    assert "| — | — | — |" in quick.stdout.strip().splitlines()[-1]


def test_evaluate_refuses_params_it_sets_itself(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", "gan", "--params", '{"digit": 3}'])
    with pytest.raises(SystemExit, match="--params"):
        evaluate.main()


def test_interrupted_sampling_resumes_with_the_same_images(tmp_path, monkeypatch):
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / "diffusion", "diffusion"))
    body = {"steps": 2}
    whole, whole_labels = evaluate.sample(pipeline, body, "class_label", 10, 30, 2, seed=3)
    progress = tmp_path / "progress" / "run"
    real_sample, calls = pipeline.sample, []

    def killed_at_the_fifth_batch(params, generator):
        calls.append(params["class_label"])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_sample(params, generator)

    monkeypatch.setattr(pipeline, "sample", killed_at_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate.sample(pipeline, body, "class_label", 10, 30, 2, 3, progress)
    monkeypatch.undo()
    resumed_calls = []
    monkeypatch.setattr(pipeline, "sample", lambda *args: resumed_calls.append(1) or real_sample(*args))
    resumed, resumed_labels = evaluate.sample(pipeline, body, "class_label", 10, 30, 2, 3, progress)
    assert len(resumed_calls) == 20 - 4  # 10 classes x batches of 2 and 1; the 4 saved ones are not drawn again
    assert torch.equal(resumed, whole) and torch.equal(resumed_labels, whole_labels)
    assert whole.shape == (30, 3, 32, 32) and whole_labels.tolist() == [k for k in range(10) for _ in range(3)]


def test_samples_drawn_elsewhere_are_measured_as_if_drawn_here(classifiers, tmp_path):
    """--sample-only needs no data and no FID network (a GPU machine may lack both); the run that measures its
    samples later gives the figures of a run that drew them itself, and names the machine that drew them."""
    checkpoint = tiny_checkpoint(tmp_path / "ebm", "ebm")
    common = ["--model", "ebm", "--checkpoint", str(checkpoint), "--classifier", str(classifiers["cifar10"] / "clf"),
              "--n-samples", "20", "--reference-size", "16", "--batch-size", "10",
              "--fid-cache", str(tmp_path / "cache")]
    data = str(classifiers["cifar10"] / "data.npz")
    drawn = run("training.evaluate", *common, "--data", str(tmp_path / "absent.npz"), "--sample-only",
                "--progress-dir", str(tmp_path / "elsewhere"))
    assert "run again without --sample-only" in drawn.stdout and not (checkpoint / "quality.json").exists()
    run("training.evaluate", *common, "--data", data, "--progress-dir", str(tmp_path / "elsewhere"),
        "--out", str(tmp_path / "later.json"))
    run("training.evaluate", *common, "--data", data, "--progress-dir", str(tmp_path / "here"),
        "--out", str(tmp_path / "direct.json"))
    later, direct = (json.loads((tmp_path / name).read_text()) for name in ("later.json", "direct.json"))
    for key in ("fid", "kid", "pixel_std", "class_accuracy", "within_class_spread"):
        assert later[key] == direct[key], key
    assert later["sampling_machine"]["cpu"] == later["machine"]["cpu"] and later["sampling_machine"]["device"] == "cpu"
    assert list((tmp_path / "elsewhere").iterdir()) == []  # measured samples are not kept


def test_describe_sampling_names_a_guidance_interval_rescale_and_parallel_weight():
    served = {"sampler": "dpm++2m", "steps": 20, "guidance_scale": 4.0, "guidance_t_min": 0, "guidance_t_max": 999,
              "guidance_rescale": 0.0}
    assert describe_sampling(served, True) == "DPM++2M 20 trailing steps, guidance 4"  # measured before the choice
    limited = {**served, "guidance_t_min": 167, "guidance_t_max": 882, "guidance_rescale": 0.7,
               "timestep_spacing": "linspace"}
    assert describe_sampling(limited, True) == "DPM++2M 20 linspace steps, guidance 4 at t 167-882, rescale 0.7"
    assert describe_sampling(limited, False) == "DPM++2M 20 linspace steps, unconditional"
    assert describe_sampling({**limited, "class_label": "random"}, True) == \
        "DPM++2M 20 linspace steps, random class per image, guidance 4 at t 167-882, rescale 0.7"
    assert describe_sampling({**served, "guidance_parallel": 1.0}, True) == "DPM++2M 20 trailing steps, guidance 4"
    assert describe_sampling({**served, "guidance_parallel": 0.0}, True) == \
        "DPM++2M 20 trailing steps, guidance 4, parallel 0"


def test_a_lever_is_measured_named_and_kept_apart(classifiers, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "diffusion", "diffusion")
    common = ["--model", "diffusion", "--checkpoint", str(checkpoint), "--classifier",
              str(classifiers["cifar10"] / "clf"), "--data", str(classifiers["cifar10"] / "data.npz"), "--n-samples",
              "20", "--reference-size", "16", "--batch-size", "10", "--no-fid", "--progress-dir",
              str(tmp_path / "progress")]
    result = run("training.sampling_levers", "--eps-scale", "1.5", *common, "--out", str(tmp_path / "lever.json"))
    report = json.loads((tmp_path / "lever.json").read_text())
    assert report["lever"] == "predicted noise / 1.5"
    assert "guidance 2; predicted noise / 1.5 |" in result.stdout.strip().splitlines()[-1]
    args = evaluate.parser.parse_args(common)
    lever = evaluate.Lever(report["lever"], lambda pipeline: None)
    assert evaluate.progress_path(args, "sha", {}, lever) != evaluate.progress_path(args, "sha", {})
