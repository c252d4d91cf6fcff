"""A diffusion training stretch that must fit one command of a borrowed GPU machine, and the way back.

    # there, with the data's parts (training/pack_data.py) carried over and the results to come back in $OUT:
    python3 scripts/gpu_stretch.py run --minutes 7 --grow 2 --data runs/data_pack --out "$OUT"
    # here, with the files that came back:
    python scripts/gpu_stretch.py collect /path/to/returned/files --into runs/stretch

`run` warm-starts from --start (the served weights, optionally widened --grow times by training/grow_unet.py),
trains --probe-steps to measure the speed, then sizes a second run to end annealed (lr 0, as every served stretch
has) when --minutes are used up, keeping --sample-minutes for drawing the evaluation samples at the served default
(training/evaluate.py --sample-only, in batches of 500). Training state stays in --work; the checkpoint, the
training log and the samples go into --out as one tar split into parts of --part-mib, since such a machine hands
back a few files of limited size. `collect` joins and unpacks them; then measure the samples here with the same
evaluate command without --sample-only and --progress-dir runs/stretch/eval_progress (README section 4).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
commands = parser.add_subparsers(dest="command", required=True)
run_parser = commands.add_parser("run", help="train for a fixed time, end annealed, draw the samples, pack it all")
run_parser.add_argument("--minutes", type=float, required=True, help="wall time for everything, sampling included")
run_parser.add_argument("--data", type=Path, required=True, help="a pack_data folder or a Keras-layout .npz")
run_parser.add_argument("--out", type=Path, required=True, help="where the parts to take back are written")
run_parser.add_argument("--start", type=Path, default=ROOT / "checkpoints" / "diffusion")
run_parser.add_argument("--grow", type=int, default=1, help="widen the start checkpoint this many times first")
run_parser.add_argument("--work", type=Path, default=ROOT / "runs" / "stretch",
                        help="checkpoint (out/), training state (state/) and samples (eval_progress/)")
run_parser.add_argument("--batch-size", type=int, default=512)
run_parser.add_argument("--lr", type=float, default=4e-4)
run_parser.add_argument("--warmup-steps", type=int, default=500)
run_parser.add_argument("--probe-steps", type=int, default=600, help="steps of the speed-measuring first run")
run_parser.add_argument("--cooldown-fraction", type=float, default=0.45,
                        help="share of the second run's steps spent cooling the lr down to 0")
run_parser.add_argument("--samples", type=int, default=10000, help="evaluation samples at the served default")
run_parser.add_argument("--sample-batch-size", type=int, default=500)
run_parser.add_argument("--sample-minutes", type=float, default=1.5, help="time kept back for drawing the samples")
run_parser.add_argument("--part-mib", type=float, default=15.0)
run_parser.add_argument("--max-parts", type=int, default=8, help="most files the machine hands back")
run_parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
collect_parser = commands.add_parser("collect", help="join and unpack the parts that came back")
collect_parser.add_argument("parts", type=Path, help="folder holding stretch.tar.part-*")
collect_parser.add_argument("--into", type=Path, default=ROOT / "runs" / "stretch")

PARTS = "stretch.tar.part-"


def python(*args: str) -> None:
    """Run one of the repository's modules or scripts with this interpreter; stop on failure."""
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def train(args: argparse.Namespace, config: dict, max_steps: int, cooldown_steps: int = 0) -> None:
    unet = config["unet"]
    python("-m", "training.train_diffusion", "--data", str(args.npz), "--out", str(args.work / "out"),
           "--state-dir", str(args.work / "state"), "--resume", "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--max-steps", str(max_steps),
           "--cooldown-steps", str(cooldown_steps), "--base-channels", str(unet["base_channels"]),
           "--channel-mults", *map(str, unet["channel_mults"]), "--num-res-blocks", str(unet["num_res_blocks"]),
           "--attention-resolutions", *map(str, unet["attention_resolutions"]),
           "--log-every", str(max(1, args.probe_steps // 4)),  # the probe's speed comes from the log
           *(["--device", args.device] if args.device else []))


def steps_per_second(log: Path) -> float:
    """The speed the training log last reported."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e["steps_per_hour"] for e in entries if "steps_per_hour" in e][-1] / 3600


def run(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + 60 * args.minutes
    args.npz = args.data
    if (args.data / "manifest.json").exists():
        args.npz = args.work / "data.npz"
        if not args.npz.exists():
            python("-m", "training.pack_data", "unpack", str(args.data), "--out", str(args.npz))
    checkpoint = args.work / "out"
    if not (args.work / "state").exists():
        if args.grow > 1:
            python("-m", "training.grow_unet", str(args.start), "--out", str(checkpoint), "--factor", str(args.grow))
        else:
            shutil.copytree(args.start, checkpoint, dirs_exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    start = int(config["training"]["steps"])
    train(args, config, start + args.probe_steps)
    seconds_left = deadline - time.monotonic() - 60 * args.sample_minutes
    more = int(steps_per_second(args.work / "state" / "log.jsonl") * seconds_left)
    if more > 0:
        train(args, config, start + args.probe_steps + more, int(more * args.cooldown_fraction))
    python("-m", "training.evaluate", "--model", "diffusion", "--checkpoint", str(checkpoint), "--sample-only",
           "--n-samples", str(args.samples), "--batch-size", str(args.sample_batch_size),
           "--progress-dir", str(args.work / "eval_progress"), *(["--device", args.device] if args.device else []))
    pack(args.work, ["out", "eval_progress", "state/log.jsonl"], args.out, args.part_mib, args.max_parts)


def pack(work: Path, members: list[str], out: Path, part_mib: float, max_parts: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.add(work / member, arcname=member)
    data, size = buffer.getvalue(), int(part_mib * 2**20)
    if -(-len(data) // size) > max_parts:
        raise SystemExit(f"{len(data) / 2**20:.1f} MiB does not fit {max_parts} parts of {part_mib} MiB: the "
                         f"checkpoint and samples stay in {work}; pack fewer samples or larger parts")
    out.mkdir(parents=True, exist_ok=True)
    for index, offset in enumerate(range(0, len(data), size)):
        (out / f"{PARTS}{index:02d}").write_bytes(data[offset:offset + size])
    print(f"{len(data) / 2**20:.1f} MiB in {index + 1} parts in {out}")


def collect(args: argparse.Namespace) -> None:
    parts = sorted(args.parts.glob(f"{PARTS}*"))
    if not parts:
        raise SystemExit(f"no {PARTS}* in {args.parts}")
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r") as tar:
        tar.extractall(args.into, filter="data")
    print(f"{len(parts)} parts unpacked into {args.into}")


def main() -> None:
    args = parser.parse_args()
    run(args) if args.command == "run" else collect(args)


if __name__ == "__main__":
    main()
