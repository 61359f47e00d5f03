"""How qm-server logs: text lines for people or JSON lines for collectors, on stderr.

Both formats carry the call's request id on every line about a call (call_context.py);
JSON lines carry its RPC and peer too, and an audit event's fields (audit.py), as keys.
The JSON is python-json-logger's formatter over the standard logging module, so every
logger of the process, grpcio's Python side included, comes out in one format, each
record one line (a traceback is the `exc_info` string of its record).

grpc's C core writes lines of its own straight to the process's stderr, in a format of
its own (`I1203 16:41:34.438760 14200 ssl_transport_security.cc:2563] Handshake failed
...`, for every client that fails its TLS handshake): they would break a JSON log and
interleave with text lines. `quiet_grpc_core` turns them off unless the operator asked
for them with GRPC_VERBOSITY or GRPC_TRACE; grpc reads the variable once, when it is
first imported, so it runs before anything imports grpc.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import TextIO

from qm_server.call_context import CallFilter

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
"""`-` stands for the request id on lines that are not about a call."""
JSON_FIELDS = "%(levelname)s %(name)s %(message)s"
JSON_NAMES = {"levelname": "level", "name": "logger"}
JSON_NEEDS = "--log-format json needs the server extra: pip install 'queue-manager[server]'"


def quiet_grpc_core(environ: MutableMapping[str, str] = os.environ) -> None:
    """GRPC_VERBOSITY=NONE unless GRPC_VERBOSITY or GRPC_TRACE is set already (not empty,
    as an empty QM_* variable counts as unset)."""
    if not environ.get("GRPC_VERBOSITY") and not environ.get("GRPC_TRACE"):
        environ["GRPC_VERBOSITY"] = "NONE"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of `log_format`; ValueError for an unknown one, ModuleNotFoundError
    for json without python-json-logger (a client-only install)."""
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT, defaults={"request_id": "-"})
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter  # the server extra's

        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES, timestamp="time")
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Every record of the process to `stream` (stderr) in `log_format`, at `level`."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallFilter())
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
