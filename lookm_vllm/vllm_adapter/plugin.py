"""Entry point for the ``vllm.general_plugins`` group (loaded in every vLLM process)."""


def register() -> None:
    """Register LOOK-M with vLLM. Does nothing unless the compression engine option is set."""
