"""The package's import layers: every module imports only from its own layer or the layers below.

LAYERS lists them top to bottom; a module belongs to the entry with the longest matching name
(a package covers its submodules). Every import counts, at module level and inside functions
(a function-local import must not hide a dependency or a cycle):

 1. entry points: the command lines (`nat-megatron`, `python -m nat_megatron.train`, the
    checkpoint converter); they may import anything.
 2. tune: the layout tuner. Its --validate runs the trainer's own step code (batching,
    forward_backward, optimizer) and it plans with the trainer's batching, so it sits above it.
 3. train: the trainer.
 4. config: the run's typed config tree, built from the config classes of the components it
    configures (DatasetConfig, LossConfig, BingoConfig), so it sits above them.
 5. the components, in a strict order (each may import those listed after it): telemetry,
    rollout (weight sync uses the checkpoint's HF mapping), checkpoint, model, nat (the
    maths of NAT), rewards, data (which reads datasets and knows no rewards).
 6. the foundations: parallel (process layout and groups), answers (answer extraction),
    patches (every change to a third-party library's private state), and the package's
    __init__ (warning filters).

Besides the layers, no two entries of LAYERS may import each other through any chain (no cycle
between subpackages), which matters inside the entry-point layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nat_megatron"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "entry points",
        ("nat_megatron.__main__", "nat_megatron.cli", "nat_megatron.convert_cli", "nat_megatron.train.__main__"),
    ),
    ("tune", ("nat_megatron.tune",)),
    ("train", ("nat_megatron.train",)),
    ("config", ("nat_megatron.config",)),
    ("telemetry", ("nat_megatron.telemetry",)),
    ("rollout", ("nat_megatron.rollout",)),
    ("checkpoint", ("nat_megatron.checkpoint",)),
    ("model", ("nat_megatron.model",)),
    ("nat", ("nat_megatron.nat",)),
    ("rewards", ("nat_megatron.rewards",)),
    ("data", ("nat_megatron.data",)),
    ("parallel", ("nat_megatron.parallel",)),
    ("answers", ("nat_megatron.answers",)),
    ("patches", ("nat_megatron.patches",)),
    ("package", ("nat_megatron",)),  # nat_megatron/__init__.py only
]


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def unit(module: str) -> str:
    """The LAYERS entry a module belongs to (the longest matching name; the package itself only
    for its __init__)."""
    names = [n for _, names in LAYERS for n in names]
    found = [n for n in names if module == n or (n != "nat_megatron" and module.startswith(n + "."))]
    assert found, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return max(found, key=len)


def layer(module: str) -> int:
    u = unit(module)
    return next(i for i, (_, names) in enumerate(LAYERS) if u in names)


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported package module, line) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:  # `from pkg import submodule` imports the submodule
                out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno))
    return [(name, line) for name, line in out if name == "nat_megatron" or name.startswith("nat_megatron.")]


def edges() -> list[tuple[str, str, int]]:
    return [(m, target, line) for m, path in MODULES.items() for target, line in imports(m, path)]


def test_every_module_has_a_layer():
    for module in MODULES:
        unit(module)


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{m}:{line} imports {target}: layer {LAYERS[layer(m)][0]!r} may not import layer "
        f"{LAYERS[layer(target)][0]!r}, which is above it"
        for m, target, line in edges()
        if layer(target) < layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for m, target, line in edges():
        a, b = unit(m), unit(target)
        if a != b:
            graph.setdefault(a, set()).add(b)
            where.setdefault((a, b), f"{m}:{line} imports {target}")

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    for start in sorted(graph):
        cycle = cycle_from(start)
        assert cycle is None, "import cycle between subpackages:\n" + "\n".join(
            where[(a, b)] for a, b in zip(cycle, cycle[1:])
        )


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walker finds imports inside functions, resolves relative ones and submodule imports."""
    path = tmp_path / "x.py"
    path.write_text(
        "from . import layouts\n\n\ndef f():\n"
        "    from nat_megatron.rewards import registry\n"
        "    import nat_megatron.answers\n"
    )
    assert imports("nat_megatron.data.x", path) == [
        ("nat_megatron.data.layouts", 1),
        ("nat_megatron.rewards.registry", 5),
        ("nat_megatron.answers", 6),
    ]
    assert layer("nat_megatron.data.x") > layer("nat_megatron.rewards.registry")  # would be upward
