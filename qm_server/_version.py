"""The version of the installed distribution, so that it is written once: in pyproject.toml.

Read from the package metadata that installing wrote (importlib.metadata); a source tree
that was never installed falls back on pyproject.toml beside the package. The client and the
server share no code (tests/test_layers.py), so each package holds this small reader; a
test checks that both, and `qm --version` and `qm-server --version`, agree with pyproject.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "queue-manager"
UNKNOWN = "0+unknown"


def read_version() -> str:
    """The installed distribution's version, else the source tree's, else UNKNOWN."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return UNKNOWN
    return str(project.get("version", UNKNOWN))


__version__ = read_version()
