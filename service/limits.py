"""Bounds the API's models (service/schemas.py) and the service share. It imports nothing, so the
client side - the CLI, the API client, the study - loads the models without the server's stack."""

__all__ = ["MAX_CONFIG_BYTES", "MAX_STEP"]

MAX_STEP = 2**31 - 1  # steps are INTEGER columns
# The config reaches the driver in one environment variable; Linux caps one at 128 KiB (MAX_ARG_STRLEN).
MAX_CONFIG_BYTES = 96 * 1024
