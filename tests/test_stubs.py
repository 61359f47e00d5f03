"""The checked-in stubs match the proto, and the engine's codes match the wire's."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from qm.v1 import queue_manager_pb2 as pb
from qm_server.errors import Code

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True
    )
    generated = _sources(tmp_path, tmp_path / "qm")
    checked_in = _sources(ROOT, ROOT / "qm")
    assert generated == checked_in
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert stale == [], "run scripts/gen_protos.py and commit the result"


def test_engine_codes_mirror_the_proto() -> None:
    wire = {v.name.removeprefix("CODE_"): v.number for v in pb.Code.DESCRIPTOR.values}
    assert wire == {c.name: c.value for c in Code}


def _sources(root: Path, below: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in below.rglob("*") if p.suffix in {".py", ".pyi"})
