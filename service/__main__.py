"""python -m service: run the control plane with uvicorn (settings from FORKRL_* environment variables)."""

from service.cli import serve

if __name__ == "__main__":
    serve()
