"""GPU kernels (Triton). Imported lazily: nothing here is needed on CPU."""
