"""The learner group: K `Learner` actors in one process group; the batch is sharded contiguously by rank.

Each optimizer step's metrics come back per rank and are combined by the one reduction table
(`actors.algo.metrics`); PPO mini-batches of a rollout batch are merged the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from actors.algo.batching import mini_batches
from actors.algo.metrics import combine_parts, merge_step_metrics
from actors.common.batch import TokenTrace, TrainSequence
from actors.common.config import AlgorithmConfig, LearnerConfig, LoraConfig, RolloutConfig
from actors.common.pool import ActorPool
from actors.learner.actor import Learner, RankStep

__all__ = ["LearnerGroup"]

log = logging.getLogger("forkrl.learner")

START_TIMEOUT_S = 600.0  # the learners' start-up, or learner.collective_timeout_s when that is longer


class LearnerGroup:
    """K Learner actors in one process group; the batch is sharded contiguously by rank."""

    def __init__(
        self, model_path: str, learner: LearnerConfig, algorithm: AlgorithmConfig, rollout: RolloutConfig, seed: int,
        dtype: str, lora: LoraConfig | None = None,
    ) -> None:  # fmt: skip

        k = learner.num_learners
        gpus = learner.num_gpus_per_learner
        cpus = max(1, (os.cpu_count() or 1) // k) if not gpus else int(learner.num_cpus_per_learner)
        # start-up (placement, model load, DeepSpeed init, perhaps beside a starting vLLM) is not a step: its own
        # bound; the learners are placed as one group (one process group: all or none, on as few nodes as fit)
        bound, name = max(learner.collective_timeout_s, START_TIMEOUT_S), "learner start-up"
        self.pool = ActorPool(
            Learner,
            k,
            lambda i: (model_path, learner, algorithm, rollout, seed, dtype, cpus, lora),
            num_cpus=learner.num_cpus_per_learner,
            num_gpus=gpus,
            resources=learner.ray_resources,
            call_timeout_s=learner.collective_timeout_s,
            timeout_setting="learner.collective_timeout_s",
            pack_within_s=bound,
            pack_setting=name,
        )
        addr, port = self.pool.gather(
            [self.pool.actors[0].address.remote()], [0], timeout_s=bound, timeout_setting=name
        )[0]
        setups = [a.setup.remote(rank, k, addr, port) for rank, a in enumerate(self.pool.actors)]
        self.pool.gather(setups, list(range(k)), timeout_s=bound, timeout_setting=name)

    def _padded(self, seqs: list[TrainSequence]) -> list[TrainSequence]:
        """At least one sequence per rank (every rank takes part in the collectives): weight-0 copies."""
        return seqs + [seqs[-1].padding_copy() for _ in range(len(self.pool) - len(seqs))]

    def train_step(self, seqs: list[TrainSequence]) -> dict[str, Any]:
        return self.traced_step(seqs)[0]

    def traced_step(self, seqs: list[TrainSequence]) -> tuple[dict[str, Any], list[TokenTrace]]:
        """One optimizer step: its metrics, and the token traces of its sampled sequences."""
        results: list[RankStep] = self.pool.sharded(self._padded(seqs), lambda a, part: a.train_step.remote(part))
        metrics = combine_parts([{**r.metrics, **r.stats} for r in results])  # over ranks: actors.algo.metrics
        n_valid = results[0].num_valid
        metrics["rollout/logprob_abs_diff"] = metrics.pop("rollout/logprob_abs_diff_sum") / max(n_valid, 1)
        return metrics, [t for r in results for t in r.traces]

    def train_rollout(
        self, groups: list[list[TrainSequence]], mini_batch: int | None, epochs: int
    ) -> tuple[dict[str, Any], list[TokenTrace]]:
        """PPO over one rollout batch: `epochs` passes over its mini-batches of `mini_batch` groups, one
        optimizer step each, in order. With more than one step the old policy's log-probs are taken
        once, before the first update (as verl does), so the ratio and clipping act from the second
        step on. Returns the steps' metrics merged (`actors.algo.metrics.merge_step_metrics`) and the token
        traces of the sampled sequences from the first step each took part in."""

        parts = mini_batches(groups, mini_batch)
        if len(parts) * epochs > 1:
            flat = [s for part in parts for s in part]
            # at every response position: the micro-batches lay them out by position, loss-masked or not
            # (a trajectory's observations, a tree leaf's shared tokens)
            olds = iter(self.score([replace(s, loss_mask=None) for s in flat]))
            parts = [[replace(s, old_logprobs=next(olds)) for s in part] for part in parts]
        steps = [self.traced_step(part) for _ in range(epochs) for part in parts]
        traces: dict[int, TokenTrace] = {}
        for _, step_traces in steps:
            for t in step_traces:
                traces.setdefault(t.sample_id, t)
        return merge_step_metrics([m for m, _ in steps]), sorted(traces.values(), key=lambda t: t.sample_id)

    def export_weights(self, dtype: str, version: int | None = None) -> Any:
        """ObjectRef of rank 0's `WeightsFile` in shared memory, labelled `version` (every rank takes part
        when ZeRO-3 gathers)."""
        refs = [a.export_weights.remote(dtype, version) for a in self.pool.actors]
        return self.pool.gather(refs, list(range(len(refs))), fetch=False)[0]

    def drop_weights(self) -> None:
        """Remove rank 0's shared-memory weights file; best effort (the run is ending)."""
        import ray

        try:
            refs = [a.drop_weights.remote() for a in self.pool.actors]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        except Exception as e:  # noqa: BLE001 - never hide why the run ended
            log.warning("could not remove the learner's weights file: %s", e)

    def shutdown(self) -> None:
        """Remove the weights file, then end every learner actor (idempotent): a run that ends, even with
        an error, leaves no learner behind in a cluster that outlives it."""
        import ray

        if self.pool.actors:
            self.drop_weights()
        learners, self.pool.actors = self.pool.actors, []
        for a in learners:
            ray.kill(a)
        self.pool.release()

    def score(self, seqs: list[TrainSequence], entropy: bool = False) -> list[list[float]]:
        """Learner log-probs (entropy: each position's entropy) of each response's tokens (no gradient), the
        batch sharded over ranks."""
        parts = self.pool.sharded(self._padded(seqs), lambda a, part: a.score.remote(part, entropy))
        return [lp for part in parts for lp in part][: len(seqs)]

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        self.pool.all(lambda a: a.save_checkpoint.remote(directory, tag, client_state))

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        return dict(self.pool.all(lambda a: a.load_checkpoint.remote(directory, tag))[0])

    def export_hf(self, directory: str) -> str:
        return str(self.pool.all(lambda a: a.export_hf.remote(directory))[0])

    def weights_digest(self, frozen: bool = False) -> float:
        return float(self.pool.all(lambda a: a.weights_digest.remote(frozen))[0])

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) of the model (with LoRA: the adapters are trainable)."""
        trainable, total = self.pool.all(lambda a: a.parameter_counts.remote())[0]
        return int(trainable), int(total)
