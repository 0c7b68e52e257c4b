"""Rollout: vLLM engines as Ray actors (engine), the pool that spreads prompts over them and
replaces a dead one (pool). The receive side of weight sync lives in actors.common.weight_sync."""
