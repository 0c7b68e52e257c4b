"""Process-level setup shared by the driver: Ray connection and tokenizer."""

from __future__ import annotations

import logging
import os
from typing import Any

from actors.common.config import JobConfig
from actors.common.contract import JOB_ENV_VARS

log = logging.getLogger("forkrl.runtime")


def init_ray(cfg: JobConfig) -> None:
    """Connect to the Ray cluster of RAY_ADDRESS (set by `ray job submit`), else start a local one.

    A local Ray gets enough logical CPUs for every actor: rollout, reward and learning run one
    after another within a step, so the pools may share the cores.
    """
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": dict(JOB_ENV_VARS)}
    if os.environ.get("RAY_ADDRESS"):
        # a Ray job brings its own runtime env (deploy/runtime_env.yaml); adding to it would conflict
        ray.init(log_to_driver=True)
        log.info("connected to Ray at %s", os.environ["RAY_ADDRESS"])
        return
    need = (
        cfg.rollout.num_engines * cfg.rollout.num_cpus_per_engine
        + cfg.learner.num_learners * cfg.learner.num_cpus_per_learner
    )
    cpus = int(max(os.cpu_count() or 1, need + 1))
    # address="local": always a new Ray of our own, never a cluster some earlier `ray start` left in
    # /tmp/ray/ray_current_cluster (a stale entry there would make ray.init() try to join it)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
    log.info("started a local Ray with %d logical CPUs", cpus)


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
