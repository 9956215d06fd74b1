"""pyproject.toml: the `nat-megatron` console script and its commands, and the declared
dependencies against the pinned requirements files (the pinned install path of `make venv`)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nat_megatron.cli import COMMANDS, console

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEV_TOOLS = {"pytest", "ruff"}  # in requirements.txt for `make test` / `make lint`, extra "dev"


def pinned(name: str) -> dict[str, Requirement]:
    """The requirements of requirements/<name>.txt by canonical name."""
    lines = (ROOT / name).read_text().splitlines()
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def declared(reqs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def test_console_script_is_the_console_function():
    module, _, name = PROJECT["scripts"]["nat-megatron"].partition(":")
    assert getattr(importlib.import_module(module), name) is console


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)], ids=" ".join)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        console(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(f"usage: nat-megatron {argv[0] if len(argv) > 1 else ''}".rstrip())
    if len(argv) == 1:
        assert all(c in out for c in COMMANDS)


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        console(["trian"])
    assert e.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def package_imports() -> set[str]:
    """Top-level names of every module the package imports (module- and function-level)."""
    names = set()
    for path in (ROOT / "nat_megatron").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"nat_megatron", "__future__"}


def test_dependencies_name_what_the_package_imports():
    """Every package of requirements.txt that the package imports is a dependency, with a lower
    bound that the pinned version satisfies."""
    distributions = importlib.metadata.packages_distributions()
    imported = {canonicalize_name(d) for name in package_imports() for d in distributions.get(name, [])}
    pins, deps = pinned("requirements.txt"), declared(PROJECT["dependencies"])
    missing = sorted(name for name in pins if name in imported and name not in deps)
    assert not missing, f"requirements.txt packages the package imports, missing from pyproject dependencies: {missing}"
    for name, req in deps.items():
        assert name in pins, f"pyproject dependency {name} is not pinned in requirements.txt"
        version = next(iter(pins[name].specifier)).version
        assert req.specifier and req.specifier.contains(version), f"{req} does not admit the pinned {version}"
    assert not DEV_TOOLS & set(deps), "test and lint tools belong to the dev extra"


def test_extras_mirror_the_requirement_files():
    extras = {k: declared(v) for k, v in PROJECT["optional-dependencies"].items()}
    for extra, path in (("cpu", "requirements-cpu.txt"), ("gpu", "requirements-gpu.txt")):
        want = {name: str(req.specifier) for name, req in pinned(path).items()}
        assert {name: str(req.specifier) for name, req in extras[extra].items()} == want, extra
    assert DEV_TOOLS <= set(extras["dev"])
