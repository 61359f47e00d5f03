"""What the distribution ships and promises: one version everywhere, the licence it
declares, the proto inside, and a client install that needs none of the server's
dependencies."""

from __future__ import annotations

import ast
import email
import email.message
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata, resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import qm_client
import qm_server
from qm_client import _version as client_version
from qm_server import _version as server_version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DISTRIBUTION = PROJECT["name"]
PROTO = ROOT / "protos" / "qm" / "v1" / "queue_manager.proto"


def test_every_version_is_pyprojects() -> None:
    version = PROJECT["version"]
    assert qm_client.__version__ == version
    assert qm_server.__version__ == version
    for module, prog in (("qm_client", "qm"), ("qm_server", "qm-server")):
        result = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stdout) == (0, f"{prog} {version}\n"), result.stderr


def test_a_source_tree_never_installed_reads_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert client_version.read_version() == PROJECT["version"]
    assert server_version.read_version() == PROJECT["version"]


def test_both_packages_name_this_distribution() -> None:
    assert client_version.DISTRIBUTION == server_version.DISTRIBUTION == DISTRIBUTION


MIT_BODY = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def test_the_license_file_is_the_declared_licence() -> None:
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text == f"MIT License\n\nCopyright (c) 2026 queue manager authors\n\n{MIT_BODY}"


def test_the_proto_is_in_the_installed_package() -> None:
    shipped = resources.files("qm.v1").joinpath("queue_manager.proto")
    assert shipped.read_text() == PROTO.read_text()


PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"]
PIP_WHEEL.append("--no-build-isolation")  # the setuptools of .venv, offline


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel `pip wheel` builds from a copy of the tree (no build/ left in the tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("protos", "qm", "qm_client", "qm_server"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP_WHEEL, "--wheel-dir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("*.whl")
    return zipfile.ZipFile(built)


def wheel_metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_the_wheel_holds_the_proto_and_the_licence(wheel: zipfile.ZipFile) -> None:
    assert wheel.read("qm/v1/queue_manager.proto") == PROTO.read_bytes()
    (licence,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(licence) == (ROOT / "LICENSE").read_bytes()
    meta = wheel_metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]


def third_party_imports(package: str) -> set[str]:
    """Top-level names of the modules a package's source imports, ours and stdlib aside."""
    ours = {"qm", "qm_client", "qm_server"}
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in ours and m not in sys.stdlib_module_names}


def distributions_of(modules: set[str]) -> set[str]:
    owners = metadata.packages_distributions()
    # Named as installed (prometheus_client), compared as required (prometheus-client).
    return {canonicalize_name(dist) for module in modules for dist in owners[module]}


def declared(requirements: list[str], extra: str | None) -> set[str]:
    """The distributions required by the base install (extra None) or by one extra alone."""
    names: set[str] = set()
    for line in requirements:
        req = Requirement(line)
        if extra is None:
            wanted = req.marker is None
        else:
            wanted = req.marker is not None and req.marker.evaluate({"extra": extra})
        if wanted:
            names.add(canonicalize_name(req.name))
    return names


@pytest.mark.parametrize("source", ["installed", "wheel"])
def test_a_client_install_pulls_none_of_the_servers_dependencies(
    source: str, wheel: zipfile.ZipFile
) -> None:
    if source == "installed":
        requirements = metadata.requires(DISTRIBUTION) or []
    else:
        requirements = wheel_metadata(wheel).get_all("Requires-Dist") or []
    base = declared(requirements, None)
    server = declared(requirements, "server")
    # The PostgreSQL store's driver is an extra of its own, imported only with --store.
    postgresql = declared(requirements, "postgresql")
    client_needs = distributions_of(third_party_imports("qm_client") | third_party_imports("qm"))
    server_needs = distributions_of(third_party_imports("qm_server")) - postgresql
    assert client_needs <= base, client_needs - base
    assert server_needs <= base | server, server_needs - base - server
    server_only = server_needs - client_needs
    assert server_only == {"grpcio-reflection", "prometheus-client", "python-json-logger"}
    assert postgresql == {"psycopg", "psycopg-pool"}
    assert base.isdisjoint(server_only)
    assert base == client_needs, base - client_needs  # nothing the client does not import


# A client-only install, imitated: the server's packages and its extra cannot be imported
# (grpc itself imports grpc_reflection when it can, so its presence alone proves nothing).
def without(*packages: str) -> str:
    """Code that makes importing any of packages fail as if they were not installed."""
    return f"""
import sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Absent())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_client_works_without_the_server_or_its_extra() -> None:
    result = run_python(
        without("qm_server", "grpc_reflection")
        + "import qm_client, qm_client.cli\n"
        + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'qm_server'))\n"
        + "qm_client.cli.main(['--version'])\n"
    )
    assert result.stdout == f"[]\nqm {PROJECT['version']}\n", result.stderr
    assert result.returncode == 0


def test_qm_server_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    """--version and `check` work; serving ends with exit status 2 and the extra to add."""
    result = run_python(
        without("grpc_reflection")
        + "from qm_server.__main__ import main\n"
        + f"print(main(['check', '--data-dir', {str(tmp_path)!r}]))\n"
        + f"print(main(['--rsa-bits', '2048', '--data-dir', {str(tmp_path)!r}]))\n"
        + "main(['--version'])\n"
    )
    assert result.stdout == f"2\n2\nqm-server {PROJECT['version']}\n", result.stderr
    assert result.stderr.splitlines()[-1] == (
        "qm-server: No module named 'grpc_reflection'; serving needs the server extra: "
        "pip install 'queue-manager[server]'"
    )
    assert list(tmp_path.iterdir()) == []  # nothing created before the refusal


def test_json_logs_without_the_extra_say_what_to_install(tmp_path: Path) -> None:
    result = run_python(
        without("pythonjsonlogger")
        + "from qm_server.__main__ import main\n"
        + f"print(main(['--log-format', 'json', 'check', '--data-dir', {str(tmp_path)!r}]))\n"
    )
    assert result.stdout == "2\n", result.stderr
    assert result.stderr == (
        "qm-server: --log-format json needs the server extra: pip install 'queue-manager[server]'\n"
    )


def test_scripts_serve_installs_the_server_extra_alone() -> None:
    serve = (ROOT / "scripts" / "serve").read_text()
    assert "QM_EXTRAS=${QM_EXTRAS:-server} " in serve
    extras = PROJECT["optional-dependencies"]
    assert [Requirement(r).name for r in extras["server"]] == [
        "grpcio-reflection",
        "prometheus-client",
        "python-json-logger",
    ]
    for tools in ("dev", "bench"):  # a test or bench venv can serve too
        assert "queue-manager[server]" in extras[tools]


def test_scripts_setup_installs_only_extras_not_yet_installed(tmp_path: Path) -> None:
    """The stamp remembers which extras are in .venv: scripts/serve after scripts/test
    installs nothing, and a changed pyproject.toml installs again."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", tmp_path / "scripts" / "setup")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    log = tmp_path / "pip.log"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')  # records what pip would install
    python.chmod(0o755)

    def setup(extras: str) -> list[str]:
        env = {"PATH": "/usr/bin:/bin", "QM_SKIP_NODE": "1", "QM_SKIP_STRACE": "1"}
        log.unlink(missing_ok=True)
        subprocess.run(
            ["bash", "scripts/setup"], cwd=tmp_path, env={**env, "QM_EXTRAS": extras}, check=True
        )
        return log.read_text().splitlines() if log.exists() else []

    install = "-m pip install --quiet --disable-pip-version-check -e .[{}]"
    assert setup("dev,bench") == [install.format("dev,bench")]
    assert setup("server") == []  # dev includes it
    assert setup("dev") == []
    assert setup("bench,dev") == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'changed'\n")
    assert setup("server") == [install.format("server")]
    assert setup("server") == []
    assert setup("dev") == [install.format("dev")]
    assert setup("server,dev") == []
    assert setup("postgresql") == [install.format("postgresql")]
    assert setup("server") == []  # still there: pip removes nothing
