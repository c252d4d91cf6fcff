#!/usr/bin/env python3
"""Change a checkpoint's served sampling defaults without retraining.

    python scripts/set_defaults.py checkpoints/diffusion guidance_scale=2 guidance_t_max=700 guidance_rescale=0.5

Each NAME=VALUE (VALUE as JSON) is validated by the very parameter specs the handler serves with,
then written into the config's sampling section ("sampling" for diffusion, "langevin" for the
EBM); the weights are untouched. Archive the checkpoint again to serve the new defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import CONFIG_NAME, atomic_write_bytes  # noqa: E402
from generators.params import InvalidParameter, validate  # noqa: E402
from generators.pipelines import load_pipeline  # noqa: E402

SECTIONS = {"diffusion": "sampling", "ebm": "langevin"}
NOT_DEFAULTS = {"n_images", "seed", "format", "class_label"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("settings", nargs="+", metavar="NAME=VALUE")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    pipeline = load_pipeline(args.checkpoint)
    section = SECTIONS.get(pipeline.model_type)
    if section is None:
        sys.exit(f"{args.checkpoint}: a {pipeline.model_type} model has no sampling defaults")
    body = {}
    for setting in args.settings:
        name, sep, value = setting.partition("=")
        if not sep or name in NOT_DEFAULTS:
            sys.exit(f"{setting!r}: expected NAME=VALUE for a sampling parameter other than {sorted(NOT_DEFAULTS)}")
        try:
            body[name] = json.loads(value)
        except json.JSONDecodeError:
            body[name] = value
    try:
        params = validate(dict(body, class_label=0) if "class_label" in {p.name for p in pipeline.param_specs()}
                          else body, pipeline.param_specs())
        pipeline.check_work(dict(params, n_images=1))
    except InvalidParameter as error:
        sys.exit(f"refused: {error}")
    config = dict(pipeline.config)
    config[section] = {**config[section], **{name: params[name] for name in body}}
    atomic_write_bytes(args.checkpoint / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    print(f"{args.checkpoint / CONFIG_NAME}: {section} = {config[section]}")


if __name__ == "__main__":
    main()
