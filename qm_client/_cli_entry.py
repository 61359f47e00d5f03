"""The `qm` program's entry point: the command line with grpc's C-core lines kept off stderr.

grpc's C core writes lines of its own straight to file descriptor 2 (`I1203 16:41:36.448514
14300 ssl_transport_security.cc:2563] Handshake failed ...` for a TLS client that reaches
a plaintext server, twice, before the command's own message). GRPC_VERBOSITY would turn
them off, but grpc reads it once, when first imported, and importing this package imports
grpc. So the program itself, never the library, points descriptor 2 at the null device
and gives Python's `sys.stderr` a copy of the real one: the command's messages, warnings
and tracebacks reach the terminal, the C core's lines do not.
"""

from __future__ import annotations

import os
import sys

from qm_client import cli


def quiet_grpc_core() -> None:
    """Descriptor 2 to the null device; `sys.stderr` on a duplicate of the real one."""
    stderr = sys.stderr
    stderr.flush()
    real = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    # Line-buffered, as stderr on a terminal is; open for the life of the process.
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=stderr.encoding, errors=stderr.errors)


def main() -> int:
    quiet_grpc_core()
    return cli.main()
