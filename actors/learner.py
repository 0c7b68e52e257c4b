"""Learners: DeepSpeed engines, one per Ray actor, joined in one torch.distributed group.

One `train_step` is one optimizer step over this rank's contiguous shard of the batch:
  1. no-grad pass over every micro-batch: learner log-probs (the PPO "old" policy) and the
     entropy of every response position, in one read of the logits (actors.logits);
  2. `plan_step`: one exact entropy threshold over all micro-batches of all ranks, the kept
     masks, and the step-global token counts that normalise the loss;
  3. per micro-batch: forward, masked clipped loss (actors.grpo.policy_loss), backward; DeepSpeed
     reduces gradients once, at the last micro-batch, then steps.
The loss of each rank is multiplied by the world size because data-parallel engines average
gradients over ranks, while the loss is already normalised by step-global counts.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

from actors.batch import MicroBatch, TokenTrace, TrainSequence, collate
from actors.config import AlgorithmConfig, LearnerConfig, RolloutConfig
from actors.pool import ActorPool
from actors.rollout import WEIGHT_ALIASES, WeightsFile, node_id

__all__ = ["Learner", "LearnerGroup", "RankStep"]

log = logging.getLogger("forkrl.learner")


@dataclass
class RankStep:
    """One rank's part of an optimizer step: metric contributions (they add up over ranks, except
    the step-global grad_norm and lr), the log_entropy statistics (the same on every rank) and the
    step-global number of valid tokens."""

    metrics: dict[str, float]
    stats: dict[str, Any]
    num_valid: int
    traces: list[TokenTrace] = field(default_factory=list)  # the step's sampled sequences on this rank


_SHM = "/dev/shm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class Learner:
    def __init__(
        self,
        model_path: str,
        learner: LearnerConfig,
        algorithm: AlgorithmConfig,
        rollout: RolloutConfig,
        seed: int,
        dtype: str,
        cpus: int,
    ) -> None:
        self.model_path, self.dtype, self.cpus, self.seed = model_path, dtype, cpus, seed
        # rollout: the sampling temperature the learner's log-probs and entropies use, and the
        # longest response (the Dr.GRPO normaliser)
        self.cfg, self.algo, self.sampling = learner, algorithm, rollout
        self._weights_dir: str | None = None  # the shared-memory folder of export_weights(to_file=True)

    def ready(self) -> bool:
        return True

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, rank: int, world: int, addr: str, port: int) -> int:
        import torch

        torch.set_num_threads(max(1, self.cpus))
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port)
        )
        import deepspeed
        from transformers import AutoModelForCausalLM

        # a collective that waits on a stalled or dead rank raises after this (gloo, and NCCL with its async
        # error handling) instead of blocking the surviving ranks for the default 30 minutes
        # (30 s after the driver's own timeout, which fires first and names the learners still busy)
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cuda else "gloo",
            timeout=datetime.timedelta(seconds=self.cfg.collective_timeout_s + 30),
        )
        self.rank, self.world = rank, world
        torch.manual_seed(self.seed + rank)
        learner = self.cfg
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        warm = learner.warmup_steps
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": learner.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": learner.grad_clip,
            "zero_optimization": {"stage": learner.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": learner.lr,
                    "weight_decay": learner.weight_decay,
                    "betas": [0.9, 0.999],
                    # torch's AdamW everywhere: DeepSpeed's own Adam kernels compile on first use (a ~2-minute
                    # C++ build on CPU for no measurable gain; on GPU a CUDA build that fails without nvcc,
                    # "CUDA_HOME does not exist"); torch's fused AdamW kernel ships built for CPU and CUDA
                    # (on this CPU 0.06 s per step for the 135M model against 0.23 s for the per-tensor loop)
                    "torch_adam": True,
                    "fused": True,
                },
            },
            "scheduler": {  # linear warm-up, then constant; no warm-up = constant from the first step
                "type": "WarmupLR",
                "params": {
                    "warmup_min_lr": 0 if warm else learner.lr,
                    "warmup_max_lr": learner.lr,
                    "warmup_num_steps": max(warm, 1),
                    "warmup_type": "linear",
                },
            },
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.ds_config = ds_config  # kept for reports (bench/learner_step.py)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.ref = None
        if self.algo.kl_coef > 0:  # frozen initial policy for the k3 KL term
            self.ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.engine.device)
            self.ref.eval().requires_grad_(False)
        return rank

    # -- batching ---------------------------------------------------------------------------

    def _micro_batches(self, seqs: list[TrainSequence]) -> list[MicroBatch]:
        return list(collate(seqs, self.cfg.micro_batch_size, self.engine.device))

    def _logprobs_entropy(self, mb: MicroBatch, model: Any = None) -> tuple[Any, Any]:
        """Log-probs [B, T] and entropy [B, T] of the response tokens.

        The LM head runs on the response positions only: the prompt's logits are never built. With
        learner.share_prompt each prompt runs once for all its completions (actors.forward).
        """
        from actors.forward import response_hidden_full, response_hidden_shared
        from actors.logits import token_logprobs_and_entropy

        model = self.engine.module if model is None else model
        base = getattr(model, model.base_model_prefix)
        if self.cfg.share_prompt and not self.cfg.gradient_checkpointing:
            hidden = response_hidden_shared(base, mb)  # [B, T, H], one forward per prompt
        else:
            hidden = response_hidden_full(base, mb)
        # the LM head on the response tokens only (not the padding): [N, V] for N valid positions
        keep = mb.valid
        logits = model.get_output_embeddings()(hidden[keep])
        lp, ent = token_logprobs_and_entropy(logits, mb.resp_ids[keep], self.sampling.temperature)
        # back to [B, T]; padding holds 0 (the valid mask drops it everywhere)
        return lp.new_zeros(keep.shape).masked_scatter(keep, lp), ent.new_zeros(keep.shape).masked_scatter(keep, ent)

    # -- the step ------------------------------------------------------------------------------

    def train_step(self, seqs: list[TrainSequence]) -> RankStep:
        import torch

        from actors.entropy_filter import plan_step
        from actors.grpo import loss_normalizer, policy_loss

        algo = self.algo
        mbs = self._micro_batches(seqs)
        fused = self.cfg.entropy_pass == "fused"
        # entropies of the whole step come first: the threshold is global
        self.engine.train() if fused else self.engine.eval()
        with torch.set_grad_enabled(fused):
            lps, ents = zip(*(self._logprobs_entropy(mb) for mb in mbs), strict=True)
        # PPO mini-batches bring the old policy's log-probs (taken before the rollout's first update);
        # otherwise this update is the first: its own log-probs, detached, are the old policy
        olds = [lp.detach() if mb.old_lp is None else mb.old_lp for mb, lp in zip(mbs, lps, strict=True)]
        refs: list[Any] = [None] * len(mbs)
        if self.ref is not None:
            with torch.no_grad():
                refs = [self._logprobs_entropy(mb, self.ref)[0] for mb in mbs]
        plan = plan_step(
            list(ents),
            [mb.valid for mb in mbs],
            algo.top_entropy_quantile,
            token_ids=[mb.resp_ids for mb in mbs],
            log_entropy=algo.log_entropy,
            selection=algo.token_selection,
            # the random control's draw: the same on every rank, new at every optimizer step (resumes with it)
            seed=self.seed * 1_000_003 + int(self.engine.global_steps),
        )
        norm = loss_normalizer(
            algo.loss_agg,
            num_valid_tokens=plan.num_valid,
            num_selected_tokens=plan.num_kept,
            num_sequences=plan.num_sequences,
            max_response_len=self.sampling.max_new_tokens,
        )
        self.engine.train()
        sums: dict[str, float] = {}
        for i, (mb, old, mask) in enumerate(zip(mbs, olds, plan.masks, strict=True)):
            self.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            logp = lps[i] if fused else self._logprobs_entropy(mb)[0]
            loss, m = policy_loss(
                logp,
                old,
                mb.adv,
                mb.valid,
                mask,
                algo,
                normalizer=norm,
                num_kept_step=plan.num_kept,
                num_valid_step=plan.num_valid,
                max_response_len=self.sampling.max_new_tokens,
                ref_logprobs=refs[i],
                rollout_logprobs=mb.rollout_lp,
            )
            # the forwards ran on the engine's modules, not through engine.forward(), which is where
            # ZeRO starts a new micro-step; without this, ZeRO-3 overwrites (does not add) the gradient
            # of each earlier micro-batch, and the step learns from the last one only
            if i and hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
                self.engine.optimizer.clear_backward_seen_flag()
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            # rollout/learner mismatch on valid tokens: how far the engine's numbers are from ours
            d = (old - mb.rollout_lp).abs()[mb.valid]
            sums["rollout/logprob_abs_diff_sum"] = sums.get("rollout/logprob_abs_diff_sum", 0.0) + float(d.sum())
        own_norm = None if hasattr(self.engine.optimizer, "_global_grad_norm") else self._grad_norm()
        self.engine.step()
        ds_norm = self.engine.get_global_grad_norm()  # None where DeepSpeed skipped the norm: logged as NaN
        norm = own_norm if own_norm is not None else ds_norm
        sums["actor/grad_norm"] = float("nan") if norm is None else float(norm)
        sums["actor/lr"] = float(self.engine.get_lr()[0])
        sums["entropy/kept_tokens"] = float(sum(int(mask.sum()) for mask in plan.masks))  # counted: adds over ranks
        traces = []
        for j, s in enumerate(seqs):  # micro-batches are contiguous and in order: sequence j is row j % size
            if s.sample_id is not None and s.weight > 0:
                i, row, n = j // self.cfg.micro_batch_size, j % self.cfg.micro_batch_size, len(s.response_ids)
                entropy = ents[i][row, :n].detach().float().cpu().tolist()
                traces.append(TokenTrace(s.sample_id, entropy, plan.masks[i][row, :n].cpu().tolist()))
        return RankStep(metrics=sums, stats=plan.stats, num_valid=plan.num_valid, traces=traces)

    def _grad_norm(self) -> float:
        """Global 2-norm of the gradients before clipping, where DeepSpeed keeps none (no ZeRO
        optimizer: stage 0). The gradients are already averaged over ranks at the boundary, so
        every rank holds the global ones."""
        import torch

        sq = [p.grad.detach().float().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(sq).sum().sqrt()) if sq else 0.0

    # -- weights, checkpoints ----------------------------------------------------------------

    def _full_state(self):
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            return {k: v.detach().clone() for k, v in module.state_dict().items()} if self.rank == 0 else None

    def export_weights(self, dtype: str, to_file: bool = False) -> bytes | WeightsFile | None:
        """The full model in the rollout dtype (rank 0; None elsewhere): safetensors bytes, or with
        to_file a safetensors file in shared memory (written aside, then renamed over the last one)
        and its `WeightsFile`. Every rank takes part (ZeRO-3 gathers the parameters)."""
        import deepspeed
        import torch
        from safetensors.torch import save, save_file

        module = self.engine.module
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return None
            # tied embeddings share storage: safetensors takes each tensor once, and the metadata names the
            # aliases (vLLM's in-place reload on CPU left a tied head at its old weights without its own
            # name: tests/ray/test_runtime.py). No copy where the dtype and device already match: the
            # tensors are written out before anything changes them
            out: dict[str, Any] = {}
            aliases: dict[str, str] = {}
            first: dict[int, str] = {}
            for k, v in module.state_dict().items():
                if v.data_ptr() in first:
                    aliases[k] = first[v.data_ptr()]
                    continue
                first[v.data_ptr()] = k
                out[k] = v.detach().to(tdtype).contiguous().cpu()
            meta = {WEIGHT_ALIASES: json.dumps(aliases)}
            if not to_file:
                return save(out, metadata=meta)
            if self._weights_dir is None:
                shm = _SHM if os.path.isdir(_SHM) else None
                self._weights_dir = tempfile.mkdtemp(prefix="forkrl-learner-", dir=shm)
            path = os.path.join(self._weights_dir, "weights.safetensors")
            save_file(out, path + ".tmp", metadata=meta)
            os.replace(path + ".tmp", path)
        import ray

        owner = ray.get_runtime_context().current_actor if ray.is_initialized() else None
        return WeightsFile(path, node_id(), os.path.getsize(path), owner)

    def read_weights(self, path: str) -> bytes:
        """The bytes of a weights file this learner wrote (for an engine on another node)."""
        if self._weights_dir is None or os.path.dirname(path) != self._weights_dir:
            raise ValueError(f"{path} is not a weights file of this learner")
        with open(path, "rb") as f:
            return f.read()

    def drop_weights(self) -> None:
        """Remove the shared-memory weights file (the run is over)."""
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None

    def score(self, seqs: list[TrainSequence]) -> list[list[float]]:
        """Learner log-probs of each response (no gradient), for checks against the engine."""
        import torch

        self.engine.eval()
        out = []
        with torch.no_grad():
            for mb in self._micro_batches(seqs):
                logp, _ = self._logprobs_entropy(mb)
                for i in range(logp.shape[0]):
                    out.append(logp[i][mb.valid[i]].tolist())
        return out

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        import torch

        state = dict(client_state, torch_rng=torch.get_rng_state())
        self.engine.save_checkpoint(directory, tag=tag, client_state=state)

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        import torch

        _, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if client_state is None:
            raise RuntimeError(f"checkpoint {directory}/{tag} could not be loaded")
        torch.set_rng_state(client_state.pop("torch_rng"))
        return client_state

    def export_hf(self, directory: str) -> str | None:
        state = self._full_state()
        if state is None:
            return None
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(directory)
        return directory

    def weights_digest(self) -> float:
        """Sum of |w| over all parameters: a cheap fingerprint for 'the weights changed'."""
        state = self._full_state()
        return float(sum(v.double().abs().sum() for v in state.values())) if state is not None else 0.0


class LearnerGroup:
    """K Learner actors in one process group; the batch is sharded contiguously by rank."""

    def __init__(
        self, model_path: str, learner: LearnerConfig, algorithm: AlgorithmConfig, rollout: RolloutConfig, seed: int,
        dtype: str,
    ) -> None:  # fmt: skip
        import ray

        k = learner.num_learners
        gpus = learner.num_gpus_per_learner
        cpus = max(1, (os.cpu_count() or 1) // k) if not gpus else int(learner.num_cpus_per_learner)
        self.pool = ActorPool(
            Learner,
            k,
            lambda i: (model_path, learner, algorithm, rollout, seed, dtype, cpus),
            num_cpus=learner.num_cpus_per_learner,
            num_gpus=gpus,
            resources=learner.ray_resources,
            call_timeout_s=learner.collective_timeout_s,
            timeout_setting="learner.collective_timeout_s",
        )
        addr, port = ray.get(self.pool.actors[0].address.remote())
        self.pool.gather(
            [a.setup.remote(rank, k, addr, port) for rank, a in enumerate(self.pool.actors)], list(range(k))
        )

    def _padded(self, seqs: list[TrainSequence]) -> list[TrainSequence]:
        """At least one sequence per rank (every rank takes part in the collectives): weight-0 copies."""
        return seqs + [seqs[-1].padding_copy() for _ in range(len(self.pool) - len(seqs))]

    def train_step(self, seqs: list[TrainSequence]) -> dict[str, Any]:
        return self.traced_step(seqs)[0]

    def traced_step(self, seqs: list[TrainSequence]) -> tuple[dict[str, Any], list[TokenTrace]]:
        """One optimizer step: its metrics, and the token traces of its sampled sequences."""
        results: list[RankStep] = self.pool.sharded(self._padded(seqs), lambda a, part: a.train_step.remote(part))
        metrics: dict[str, Any] = {}
        for r in results:  # contributions add up over ranks
            for key, v in r.metrics.items():
                if key in ("actor/grad_norm", "actor/lr"):
                    metrics[key] = v
                else:
                    metrics[key] = metrics.get(key, 0.0) + v
        n_valid = results[0].num_valid
        metrics["rollout/logprob_abs_diff"] = metrics.pop("rollout/logprob_abs_diff_sum") / max(n_valid, 1)
        metrics.update(results[0].stats)
        return metrics, [t for r in results for t in r.traces]

    def train_rollout(
        self, groups: list[list[TrainSequence]], mini_batch: int | None, epochs: int
    ) -> tuple[dict[str, Any], list[TokenTrace]]:
        """PPO over one rollout batch: `epochs` passes over its mini-batches of `mini_batch` groups, one
        optimizer step each, in order. With more than one step the old policy's log-probs are taken
        once, before the first update (as verl does), so the ratio and clipping act from the second
        step on. Returns the steps' metrics merged (`actors.grpo.merge_step_metrics`) and the token
        traces of the sampled sequences from the first step each took part in."""
        from dataclasses import replace

        from actors.grpo import merge_step_metrics, mini_batches

        parts = mini_batches(groups, mini_batch)
        if len(parts) * epochs > 1:
            flat = [s for part in parts for s in part]
            olds = iter(self.score(flat))
            parts = [[replace(s, old_logprobs=next(olds)) for s in part] for part in parts]
        steps = [self.traced_step(part) for _ in range(epochs) for part in parts]
        traces: dict[int, TokenTrace] = {}
        for _, step_traces in steps:
            for t in step_traces:
                traces.setdefault(t.sample_id, t)
        return merge_step_metrics([m for m, _ in steps]), sorted(traces.values(), key=lambda t: t.sample_id)

    def export_weights(self, dtype: str, to_file: bool = False) -> Any:
        """ObjectRef of rank 0's weights: safetensors bytes, or with to_file its `WeightsFile` in shared
        memory (every rank takes part when ZeRO-3 gathers)."""
        refs = [a.export_weights.remote(dtype, to_file) for a in self.pool.actors]
        return self.pool.gather(refs, list(range(len(refs))), fetch=False)[0]

    def drop_weights(self) -> None:
        """Remove rank 0's shared-memory weights file; best effort (the run is ending)."""
        import ray

        try:
            refs = [a.drop_weights.remote() for a in self.pool.actors]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        except Exception as e:  # noqa: BLE001 - never hide why the run ended
            log.warning("could not remove the learner's weights file: %s", e)

    def score(self, seqs: list[TrainSequence]) -> list[list[float]]:
        """Learner log-probs of each response's tokens (no gradient), the batch sharded over ranks."""
        parts = self.pool.sharded(self._padded(seqs), lambda a, part: a.score.remote(part))
        return [lp for part in parts for lp in part][: len(seqs)]

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        self.pool.all(lambda a: a.save_checkpoint.remote(directory, tag, client_state))

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        return dict(self.pool.all(lambda a: a.load_checkpoint.remote(directory, tag))[0])

    def export_hf(self, directory: str) -> str:
        return str(self.pool.all(lambda a: a.export_hf.remote(directory))[0])

    def weights_digest(self) -> float:
        return float(self.pool.all(lambda a: a.weights_digest.remote())[0])
