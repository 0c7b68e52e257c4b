"""Shared by every role: the job schema (config), the run directory and metric contract, the typed
batches, the model cache, the actor-pool helper and the weight-sync protocol. Imports no other
actors package; the schema and contract import neither torch nor Ray."""
