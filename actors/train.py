"""The training job's entrypoint (the Ray job entrypoint): `python -m actors.train`.

    python -m actors.train --config examples/demo.yaml [--set trainer.steps=3] [--resume]
    ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- \
        python -m actors.train --config examples/tiny.yaml --set trainer.output_dir=$PWD/runs/tiny

Reads and validates the config, runs the driver (`actors.driver.loop.train`), prints the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from actors.common.config_load import ConfigError, load_config, validate_config
from actors.driver.location import with_run_location
from actors.driver.summary import print_summary

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.train", description="Run one forkrl training job.")
    parser.add_argument("--config", help="YAML file validated against JobConfig")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. trainer.steps=3"
    )
    parser.add_argument(
        "--config-env",
        metavar="NAME",
        help="read the config as JSON from environment variable NAME (how the control plane passes it)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (resume=auto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("FORKRL_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    overrides = list(args.set) + (["trainer.resume=auto"] if args.resume else [])
    try:
        if args.config_env:
            raw = os.environ.get(args.config_env)
            if raw is None:
                raise ConfigError(f"--config-env {args.config_env}: no such environment variable")
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--config-env {args.config_env}: not valid JSON: {e}") from None
            cfg = validate_config(data, overrides)
        else:
            cfg = load_config(args.config, overrides)
        cfg = with_run_location(cfg)  # an absolute run directory, never Ray's temporary working directory
    except ConfigError as e:
        sys.stderr.write(f"forkrl: invalid config:\n{e}\n")
        return 2
    from actors.driver.loop import train

    logging.getLogger("forkrl.train").info("run directory: %s", cfg.trainer.output_dir)
    try:
        summary = train(cfg)
    except Exception as e:
        from actors.driver.nodes import lost_node

        if (lost := lost_node(e)) is not None:  # a node died: name it, not the socket the call lost
            raise lost from e
        raise
    if "preempted_at" in summary:  # stopped for a higher-priority job: the control plane resumes it later
        print(f"forkrl: preempted after step {summary['preempted_at']}: resumes from its checkpoint there")
        return 0
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
