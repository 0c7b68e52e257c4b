"""One router per resource: health, tokens, jobs (incl. metrics, checkpoints, logs, events), ingest."""

from service.routes import health, ingest, jobs, tokens

ROUTERS = [health.router, tokens.router, jobs.router, ingest.router]
