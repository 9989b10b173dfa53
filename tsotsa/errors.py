"""Errors that carry a message meant for a person: the CLIs print them as one line, never a traceback."""


class TsotsaError(Exception):
    """Base of every error whose message is shown to users as is."""


class CheckpointError(TsotsaError):
    """The checkpoint directory is missing, incomplete or not a Llama-family model."""


class SwarmError(TsotsaError):
    """The swarm cannot serve a request: unreachable coordinator, no route for a block, a failed peer."""
