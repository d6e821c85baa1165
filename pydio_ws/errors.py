"""Errors shared by the decoders."""


class DecodeError(ValueError):
    """A body or frame that is not a valid message; `reason` is the precise cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
