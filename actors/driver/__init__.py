"""The driver: the training loop (loop), one step's rollout with dynamic sampling (sampling), data,
checkpoints, tracking, Ray start-up (runtime) and the run summary. It alone imports every role."""
