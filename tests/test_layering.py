"""The folders show the architecture and arrows point one way: no package imports one above it
(read from the source's import statements, lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each package may import those at its level's right or below, never one above.
ALLOWED = {
    "model": {"model"},
    "router": {"model", "router"},
    "experts": {"model", "router", "experts"},
    "gateway": {"model", "router", "gateway", "protos"},
    "protos": {"protos"},
    "cluster": {"model", "router", "experts", "gateway", "protos", "cluster"},
    "cli": {"model", "router", "experts", "gateway", "protos", "cluster", "cli", "bench"},
    "bench": {"model", "router", "experts", "gateway", "protos", "cluster", "bench"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_no_package_imports_one_above_it():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for name in imports_of(path) - allowed:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)
