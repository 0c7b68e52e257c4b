"""Learners: DeepSpeed engines as Ray actors in one process group (actor, group), the forward
pass (forward), log-probs and entropy from the logits (logits, kernels), their DeepSpeed config."""
