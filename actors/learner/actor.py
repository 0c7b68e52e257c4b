"""A learner: one DeepSpeed engine per Ray actor; the learners of a job form one torch.distributed
group (`actors.learner.group.LearnerGroup`).

One `train_step` is one optimizer step over this rank's contiguous shard of the batch:
  1. no-grad pass over every micro-batch: learner log-probs (the PPO "old" policy) and the
     entropy of every response position, in one read of the logits (actors.learner.logits);
  2. `plan_step`: one exact entropy threshold over all micro-batches of all ranks, the kept
     masks, and the step-global token counts that normalise the loss;
  3. per micro-batch: forward, masked clipped loss (actors.algo.loss.policy_loss), backward; DeepSpeed
     reduces gradients once, at the last micro-batch, then steps.
The loss of each rank is multiplied by the world size because data-parallel engines average
gradients over ranks, while the loss is already normalised by step-global counts.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from typing import Any

from actors.algo.entropy_filter import StepPlan
from actors.algo.metrics import combine_parts
from actors.common.batch import MicroBatch, TokenTrace, TrainSequence, collate
from actors.common.config import AlgorithmConfig, LearnerConfig, LoraConfig, RolloutConfig
from actors.common.config_base import parse_cores
from actors.common.weight_sync import ADAPTER_FILE, WeightsFile, read_weights, shm_dir, write_weights
from actors.learner.deepspeed_config import deepspeed_config
from actors.learner.lora import adapter_config_json, adapter_state, apply_lora, merged_state, unwrap

__all__ = ["Learner", "RankStep"]

log = logging.getLogger("forkrl.learner")


@dataclass
class RankStep:
    """One rank's part of an optimizer step: metric contributions (combined over ranks by
    `actors.algo.metrics`), the log_entropy statistics (the same on every rank) and the step-global
    number of valid tokens."""

    metrics: dict[str, float]
    stats: dict[str, Any]
    num_valid: int
    traces: list[TokenTrace] = field(default_factory=list)  # the step's sampled sequences on this rank


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
        lora: LoraConfig | None = None,
    ) -> None:
        self.model_path, self.dtype, self.cpus, self.seed, self.lora = model_path, dtype, cpus, seed, lora
        # rollout: the sampling temperature the learner's log-probs and entropies use, and the
        # longest response (the Dr.GRPO normaliser)
        self.cfg, self.algo, self.sampling = learner, algorithm, rollout
        self._weights_dir: str | None = None  # the shared-memory folder of export_weights

    def ready(self) -> bool:
        return True

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()  # type: ignore[no-untyped-call]

    def setup(self, rank: int, world: int, addr: str, port: int) -> int:
        import torch

        threads = max(1, self.cpus)
        if self.cfg.cpu_cores and not torch.cuda.is_available():
            cores = parse_cores(self.cfg.cpu_cores)
            os.sched_setaffinity(0, cores)
            threads = len(cores) // max(1, min(len(cores), self.cfg.num_learners))
        torch.set_num_threads(max(1, threads))
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port)
        )
        from actors.common.warm import use_one_ninja

        use_one_ninja()  # DeepSpeed's CPU op, built once for every way a learner is started
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
        if self.lora is not None:
            model = apply_lora(model, self.lora)  # the adapters are the only trainable parameters
            if learner.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        ds_config = deepspeed_config(learner, self.dtype, self.algo)
        self.ds_config = ds_config  # kept for reports (bench/learner_step.py)
        trainable = [p for p in model.parameters() if p.requires_grad]  # optimizer state for these only
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        self.ref = None
        # the frozen initial policy for the k3 KL term; with LoRA, the base model (adapters off) is that policy
        if self.algo.kl_coef > 0 and self.lora is None:
            self.ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.engine.device)
            self.ref.eval().requires_grad_(False)
        return rank

    # -- batching ---------------------------------------------------------------------------

    def _micro_batches(self, seqs: list[TrainSequence]) -> list[MicroBatch]:
        return list(collate(seqs, self.cfg.micro_batch_size, self.engine.device))

    def _logprobs_entropy(self, mb: MicroBatch, model: Any = None) -> tuple[Any, Any]:
        """Log-probs [B, T] and entropy [B, T] of the response tokens.

        The LM head runs on the response positions only: the prompt's logits are never built. With
        learner.share_prompt each prompt runs once for all its completions (actors.learner.forward).
        """
        import torch

        from actors.learner.forward import response_hidden_full, response_hidden_shared
        from actors.learner.logits import token_entropy_with_grad, token_logprobs_and_entropy

        model = unwrap(self.engine.module if model is None else model)  # under PEFT: the adapted model
        base = getattr(model, model.base_model_prefix)
        if self.cfg.share_prompt and not self.cfg.gradient_checkpointing:
            hidden = response_hidden_shared(base, mb)  # [B, T, H], one forward per prompt
        else:
            hidden = response_hidden_full(base, mb)
        # the LM head on the response tokens only (not the padding): [N, V] for N valid positions
        keep = mb.valid
        logits = model.get_output_embeddings()(hidden[keep])
        lp, ent = token_logprobs_and_entropy(logits, mb.resp_ids[keep], self.sampling.temperature)
        if self.algo.entropy_coef > 0 and torch.is_grad_enabled():  # the entropy bonus needs its gradient
            ent = token_entropy_with_grad(logits, self.sampling.temperature)
        # back to [B, T]; padding holds 0 (the valid mask drops it everywhere)
        return lp.new_zeros(keep.shape).masked_scatter(keep, lp), ent.new_zeros(keep.shape).masked_scatter(keep, ent)

    # -- the step ------------------------------------------------------------------------------

    def train_step(self, seqs: list[TrainSequence]) -> RankStep:
        """One optimizer step over this rank's shard: entropies of the whole step first (the threshold
        is global), then the masked loss of each micro-batch, backward, and DeepSpeed's step."""
        import torch

        from actors.algo.covariance import plan_covariance
        from actors.algo.entropy_filter import plan_step
        from actors.algo.loss import loss_normalizer

        algo = self.algo
        mbs = self._micro_batches(seqs)
        fused = self.cfg.entropy_pass == "fused"
        self.engine.train() if fused else self.engine.eval()
        with torch.set_grad_enabled(fused):
            lps, ents = zip(*(self._logprobs_entropy(mb) for mb in mbs), strict=True)
        # PPO mini-batches bring the old policy's log-probs (taken before the rollout's first update);
        # otherwise this update is the first: its own log-probs, detached, are the old policy
        olds = [lp.detach() if mb.old_lp is None else mb.old_lp for mb, lp in zip(mbs, lps, strict=True)]
        # the random draws (selection control, Clip-Cov): the same on every rank, new at every optimizer step
        seed = self.seed * 1_000_003 + int(self.engine.global_steps)
        plan = plan_step(
            [e.detach() for e in ents],  # (with an entropy bonus they carry a graph: the selection needs none)
            [mb.valid for mb in mbs],
            algo.top_entropy_quantile,
            token_ids=[mb.resp_ids for mb in mbs],
            log_entropy=algo.log_entropy,
            selection=algo.token_selection,
            seed=seed,
        )
        cov_masks: list[Any] = [None] * len(mbs)
        if algo.policy_loss in ("clip_cov", "kl_cov") or algo.log_entropy:  # the method, or its diagnostics
            cov = plan_covariance(list(lps), olds, [mb.adv for mb in mbs], plan.masks, algo, seed)
            plan.stats.update(cov.stats)
            cov_masks = cov.masks if algo.policy_loss in ("clip_cov", "kl_cov") else cov_masks
        norm = loss_normalizer(
            algo.loss_agg,
            num_valid_tokens=plan.num_valid,
            num_selected_tokens=plan.num_kept,
            num_sequences=plan.num_sequences,
            max_response_len=self.sampling.max_new_tokens,
        )
        metrics = combine_parts(
            self._backward(mbs, olds, list(lps) if fused else None, list(ents), cov_masks, plan, norm)
        )
        own_norm = None if hasattr(self.engine.optimizer, "_global_grad_norm") else self._grad_norm()
        self.engine.step()
        ds_norm = self.engine.get_global_grad_norm()  # None where DeepSpeed skipped the norm: logged as NaN
        grad_norm = own_norm if own_norm is not None else ds_norm
        metrics["actor/grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
        metrics["actor/lr"] = float(self.engine.get_lr()[0])
        metrics["entropy/kept_tokens"] = float(sum(int(mask.sum()) for mask in plan.masks))  # counted: adds over ranks
        return RankStep(
            metrics=metrics, stats=plan.stats, num_valid=plan.num_valid, traces=self._traces(seqs, ents, plan)
        )

    def _backward(
        self, mbs: list[MicroBatch], olds: list[Any], lps: list[Any] | None, ents: list[Any], covs: list[Any],
        plan: StepPlan, norm: float,
    ) -> list[dict[str, float]]:  # fmt: skip
        """The masked loss of each micro-batch and its backward; DeepSpeed reduces the gradients once,
        at the last. lps, ents: the log-probs and entropies of the first pass when it kept the graph
        (entropy_pass fused; lps None otherwise); covs: Clip-Cov / KL-Cov's token masks (or None).
        Returns each micro-batch's metric contributions."""
        import torch

        from actors.algo.loss import policy_loss

        refs: list[Any] = [None] * len(mbs)
        if self.ref is not None:
            with torch.no_grad():
                refs = [self._logprobs_entropy(mb, self.ref)[0] for mb in mbs]
        elif self.algo.kl_coef > 0:  # LoRA: the reference is the base model, the adapters switched off
            with torch.no_grad(), self.engine.module.disable_adapter():
                refs = [self._logprobs_entropy(mb)[0] for mb in mbs]
        self.engine.train()
        parts = []
        for i, (mb, old, mask) in enumerate(zip(mbs, olds, plan.masks, strict=True)):
            self.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            logp, ent = (lps[i], ents[i]) if lps is not None else self._logprobs_entropy(mb)
            loss, m = policy_loss(
                logp, old, mb.adv, mb.valid, mask, self.algo, normalizer=norm, num_kept_step=plan.num_kept,
                num_valid_step=plan.num_valid, max_response_len=self.sampling.max_new_tokens,
                ref_logprobs=refs[i], rollout_logprobs=mb.rollout_lp, entropy=ent, cov_mask=covs[i],
            )  # fmt: skip
            # the forwards ran on the engine's modules, not through engine.forward(), which is where
            # ZeRO starts a new micro-step; without this, ZeRO-3 overwrites (does not add) the gradient
            # of each earlier micro-batch, and the step learns from the last one only
            if i and hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
                self.engine.optimizer.clear_backward_seen_flag()
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            # rollout/learner mismatch on valid tokens: how far the engine's numbers are from ours
            m["rollout/logprob_abs_diff_sum"] = float((old - mb.rollout_lp).abs()[mb.valid].sum())
            parts.append(m)
        return parts

    def _traces(self, seqs: list[TrainSequence], ents: Any, plan: StepPlan) -> list[TokenTrace]:
        """Entropy and kept flag of each token of the step's sampled sequences (those with a sample_id)."""
        traces = []
        for j, s in enumerate(seqs):  # micro-batches are contiguous and in order: sequence j is row j % size
            if s.sample_id is not None and s.weight > 0:
                i, row, n = j // self.cfg.micro_batch_size, j % self.cfg.micro_batch_size, len(s.response_ids)
                entropy = ents[i][row, :n].detach().float().cpu().tolist()
                traces.append(TokenTrace(s.sample_id, entropy, plan.masks[i][row, :n].cpu().tolist()))
        return traces

    def _grad_norm(self) -> float:
        """Global 2-norm of the gradients before clipping, where DeepSpeed keeps none (no ZeRO
        optimizer: stage 0). The gradients are already averaged over ranks at the boundary, so
        every rank holds the global ones."""
        import torch

        sq = [p.grad.detach().float().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(sq).sum().sqrt()) if sq else 0.0

    # -- weights, checkpoints ----------------------------------------------------------------

    def _full_state(self) -> dict[str, Any] | None:
        """Every tensor of the module's state, gathered and copied (rank 0; None elsewhere)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            return {k: v.detach().clone() for k, v in module.state_dict().items()} if self.rank == 0 else None

    def export_weights(self, dtype: str, version: int | None = None) -> WeightsFile | None:
        """The policy in the rollout dtype as a weights file in shared memory (rank 0; None elsewhere;
        `actors.common.weight_sync`), labelled with the policy version (the driver's trained steps; None:
        this learner's optimizer steps): the full model, or with LoRA the adapter alone or the merged
        model (model.lora.sync). Every rank takes part (ZeRO-3 gathers the parameters)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return None
            if self._weights_dir is None:
                self._weights_dir = shm_dir("forkrl-learner-")
            label = int(self.engine.global_steps) if version is None else version
            if self.lora is None:
                return write_weights(module.state_dict().items(), dtype, self._weights_dir, label)
            if self.lora.sync == "merged":
                return write_weights(merged_state(module), dtype, self._weights_dir, label)
            state = adapter_state(module).items()
            config = adapter_config_json(module)
            return write_weights(state, dtype, self._weights_dir, label, name=ADAPTER_FILE, adapter_config=config)

    def read_weights(self, path: str) -> bytes:
        """The bytes of a weights file this learner wrote (for an engine on another node)."""
        return read_weights(path, self._weights_dir)

    def drop_weights(self) -> None:
        """Remove the shared-memory weights file (the run is over)."""
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None

    def score(self, seqs: list[TrainSequence], entropy: bool = False) -> list[list[float]]:
        """Learner log-probs of each response (no gradient), for checks against the engine; entropy: each
        position's entropy at the sampling temperature instead (tree rollouts' branch points)."""
        import torch

        self.engine.eval()
        out = []
        with torch.no_grad():
            for mb in self._micro_batches(seqs):
                values = self._logprobs_entropy(mb)[1 if entropy else 0]
                out += [values[i][mb.valid[i]].tolist() for i in range(values.shape[0])]
        return out

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint: the trainable parameters and their optimizer state (with LoRA the
        adapters only: the frozen base comes from model.path again), the client state, the RNG."""
        import torch

        state = dict(client_state, torch_rng=torch.get_rng_state())
        lora = self.lora is not None
        module = self.engine.module
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}

        def trainable_only(_: Any, sd: dict[str, Any], *__: Any) -> None:
            # DeepSpeed's exclude_frozen_parameters misses a frozen tensor's second name (a tied LM head)
            for key in [k for k in sd if k not in trainable]:
                del sd[key]

        hook = module.register_state_dict_post_hook(trainable_only) if lora else None
        try:
            self.engine.save_checkpoint(directory, tag=tag, client_state=state, exclude_frozen_parameters=lora)
        finally:
            if hook is not None:
                hook.remove()

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        import torch

        # with LoRA the checkpoint holds no frozen weights: the module's own (the base) stay
        _, client_state = self.engine.load_checkpoint(directory, tag=tag, load_module_strict=self.lora is None)
        if client_state is None:
            raise RuntimeError(f"checkpoint {directory}/{tag} could not be loaded")
        torch.set_rng_state(client_state.pop("torch_rng"))
        return dict(client_state)

    def export_hf(self, directory: str) -> str | None:
        """The trained model as a Hugging Face checkpoint in `directory` (rank 0). With LoRA: the merged
        model there, and the PEFT adapter in `directory`/adapter (`PeftModel.from_pretrained`)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return None
            from transformers import AutoTokenizer

            if self.lora is None:
                module.save_pretrained(directory, state_dict=module.state_dict(), safe_serialization=True)
            else:
                merged = {k: v.detach().clone() for k, v in merged_state(module)}
                unwrap(module).save_pretrained(directory, state_dict=merged, safe_serialization=True)
                module.save_pretrained(os.path.join(directory, "adapter"), safe_serialization=True)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(directory)
            return directory

    def weights_digest(self, frozen: bool = False) -> float:
        """Sum of |w| over all parameters (frozen: over the frozen ones only, e.g. the base under LoRA):
        a cheap fingerprint for 'the weights changed'."""
        import deepspeed

        module = self.engine.module
        params = [p for p in module.parameters() if not (frozen and p.requires_grad)]
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            return float(sum(p.detach().double().abs().sum() for p in params)) if self.rank == 0 else 0.0

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        from actors.learner.lora import trainable_parameters

        return trainable_parameters(self.engine.module)
