"""The one error a launch raises: ``ServerStartError``, its message the reason in one line."""


class ServerStartError(RuntimeError):
    """tritonserver (or its OpenAI frontend) did not come up, or could not be started (a port
    in use, a bad setting); the message is the reason in one line and names the flag to change."""
