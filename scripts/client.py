#!/usr/bin/env python3
"""Command-line client for the generators on a running TorchServe (reads the token from key_file.json).

    python scripts/client.py generate diffusion -p class_label=cat -p steps=50 --n-images 16 -o cats.png
    python scripts/client.py generate gan -p digit=7 --format json -o sevens.json
    python scripts/client.py generate diffusion --n-images 64 -p class_label=ship --progress -o ships.png
    python scripts/client.py scale ebm 2
    python scripts/client.py describe diffusion
    python scripts/client.py health

A failure (server down, key file missing or unreadable, a refused request, a timeout) is one line on
stderr and a non-zero exit status: 1 unhealthy or a server error, 2 a refused request or key, 3 no answer.
An expired key is renewed with the API key in the key file and the request retried.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
from tqdm import tqdm  # noqa: E402

from generators.checkpoint import atomic_write_bytes  # noqa: E402
from scripts.serving_api import TorchServeClient, reports_failures  # noqa: E402


def parse_value(text: str):
    """`7` -> 7, `0.5` -> 0.5, `cat` -> "cat": JSON when it parses, else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                   help="TorchServe's key_file.json (written in the server's working directory)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="ask a model for images")
    g.add_argument("model", help="diffusion, ebm or gan")
    g.add_argument("--n-images", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--format", choices=["png", "json"])
    g.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="model parameter, repeatable (see `describe`)")
    g.add_argument("--version", help="model version (default: the server's default version)")
    g.add_argument("--progress", action="store_true",
                   help="ask the server for progress while it samples and show it as a bar on stderr")
    g.add_argument("-o", "--output", type=Path, required=True, help="file to write (PNG, or JSON with --format json)")

    s = sub.add_parser("scale", help="set a model's worker count")
    s.add_argument("model")
    s.add_argument("workers", type=int)
    s.add_argument("--version")

    sub.add_parser("health", help="exit 0 when every registered model has a READY worker (a Docker healthcheck)")

    d = sub.add_parser("describe", help="status, workers, checkpoint identity and accepted parameters")
    d.add_argument("model")
    d.add_argument("--version")
    return p


def generate_with_bar(client: TorchServeClient, model: str, params: dict,
                      version: str | None) -> tuple[requests.Response, bytes]:
    """The response and final body of a progress request, its steps shown as a bar on stderr meanwhile. The bar
    appears with the first progress line, so a request refused up front still fails in one line."""
    bar: tqdm | None = None

    def show(event: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=event["steps"], desc=f"{model} sampling", unit="step", file=sys.stderr)
        bar.update(event["step"] - bar.n)

    try:
        return client.generate_with_progress(model, params, show, version=version)
    finally:
        if bar is not None:
            bar.close()


@reports_failures
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    client = TorchServeClient(args.inference_url, args.management_url, args.key_file)
    if args.command == "generate":
        params = {k: v for k, v in (("n_images", args.n_images), ("seed", args.seed), ("format", args.format))
                  if v is not None}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--param needs KEY=VALUE, got {item!r}")
            params[key] = parse_value(value)
        if args.progress:
            response, body = generate_with_bar(client, args.model, params, args.version)
        else:
            response = client.generate(args.model, params, version=args.version)
            body = response.content
        atomic_write_bytes(args.output, body)  # an interrupted run never leaves half a PNG
        classes = response.headers.get("X-Classes")
        print(f"wrote {args.output} (seed {response.headers.get('X-Seed')}"
              + (f"; classes {classes.replace(',', ', ')}" if classes else "") + ")")
    elif args.command == "scale":
        print(client.scale(args.model, args.workers, version=args.version)["status"])
    elif args.command == "health":
        return 0 if client.healthy() else 1
    elif args.command == "describe":
        print(json.dumps(client.describe(args.model, version=args.version, customized=True), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
