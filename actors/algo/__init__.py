"""The algorithm, pure: exact global top-rho selection, losses, advantages, dynamic sampling, the
metric-reduction table. Torch only (torch.distributed for the step-global selection); no Ray, no
DeepSpeed, no vLLM; imports nothing of actors but actors.common."""
