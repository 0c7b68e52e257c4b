"""forkrl control plane: a FastAPI service that submits training jobs to Ray and monitors them."""
