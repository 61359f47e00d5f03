"""The ``qm`` command line: the Python client for people and shell scripts.

Output is for people by default and JSON with ``--json``; either way a failure goes to
stderr with the code's name (``QUEUE_NOT_FOUND``), and the exit status says what kind of
outcome it was, so scripts need not parse text:

    0  success
    1  the service or the transport reported a failure (its code name is printed)
    2  usage error: bad flags, unreadable input, missing credentials
    3  ``poll`` found nothing ready (QUEUE_EMPTY)
    4  UNAVAILABLE: the server is unreachable or shutting down, or its store is failing
       (after the client's own retries); nothing was done, or for ``add`` maybe not:
       try again later. A long poll cut short by a shutdown ends here, never with 3.
"""

from ._app import build_parser, main

__all__ = ["build_parser", "main"]
