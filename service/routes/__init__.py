"""One router per resource: health, tokens, jobs (incl. metrics, samples, checkpoints, logs, events),
config checks, ingest, and the dashboard (static pages at /)."""

from service.routes import configs, dashboard, health, ingest, jobs, quotas, tokens

ROUTERS = [health.router, tokens.router, jobs.router, quotas.router, configs.router, ingest.router, dashboard.router]
