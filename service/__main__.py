"""python -m service [--host H] [--port P]: run the control plane with uvicorn (other settings from
FORKRL_* environment variables; --help lists the options and starts nothing)."""

import typer

from service.cli import serve

if __name__ == "__main__":
    typer.run(serve)
