"""The egress error: one class with a stable ``code``, like :class:`chorus.sfu.errors.ChorusError`."""

from __future__ import annotations

from chorus.sfu.errors import ChorusError


class EgressError(ChorusError):
    """
    An egress operation failed in a way the caller can report or act on.

    ``code`` is one of: ``unsupported_codec`` (nothing this egress can carry), ``bad_input`` (malformed media or
    arguments), ``invalid_state`` (closed, not started, already started), ``timeout`` (a blocking playlist request
    outlived its wait), ``not_found`` (a part or segment that does not exist and never will), ``io_error`` (the
    file system refused: full disk, permissions), ``worker_failed`` (the encoder process died).
    """

    code = "egress_error"

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code

    def __repr__(self) -> str:
        return f"EgressError({self.code!r}, {self.reason!r})"
