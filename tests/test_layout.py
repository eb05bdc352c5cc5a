"""The layout: every module imports only modules below it, in the order README's "Layout" gives."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aspy"

# From the top down; a module may import those of its own layer and of the layers below it.
# One request flows routing -> proxy -> observe -> recorder -> sessions -> store, and the API
# reads the store. The proxy calls the router (so it imports it) and hands the record on to
# the recorder through the app, so each step imports only the steps after it; everyone may
# import the records.
LAYERS: list[tuple[str, set[str]]] = [
    ("entry points", {"__main__", "cli", "serving", "worker", "__init__"}),
    ("commands and the API's clients", {"migration", "config_file", "report", "top", "mcp_server", "apiclient"}),
    ("what is asked of the store", {"api", "health", "metrics", "dashboard"}),
    ("what the API may change", {"commands"}),
    ("forward and stream", {"proxy", "chunked"}),
    ("who is this, where does it go", {"routing"}),
    ("parse the answer", {"observe", "bedrock"}),
    ("record off the request's path", {"recorder", "journal", "inflight"}),
    ("the session ledger", {"sessions"}),
    ("what an exchange adds to its session", {"accounting"}),
    ("what it costs", {"billing", "models"}),
    ("figures over time", {"usage"}),
    ("where it lives", {"store"}),
    ("what everyone may import", {"identity", "prompts", "claude_code", "records", "config", "addresses", "errors",
                                  "logs", "native", "timerange", "status"}),
]
# The API's clients talk to a server over HTTP: they import none of its modules.
CLIENTS = {"apiclient", "top", "mcp_server"}
CLIENTS_MAY_IMPORT = {"__init__", "apiclient", "records", "timerange"}


def layer_of(module: str) -> int:
    """Return the index of a module's layer (a subpackage's modules are in the subpackage's)."""
    found = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    assert found, f"aspy/{module} is in no layer: add it to tests/test_layout.py's LAYERS and README's Layout"
    return found[0]


def modules() -> dict[str, Path]:
    """Return every module of the package by its dotted name under aspy ("" for the package)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(p for p in parts if p != "__init__")] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Return the aspy modules a module imports (anywhere in it: at the top, in functions, for typing)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name[5:] for a in node.names if a.name.startswith("aspy.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "aspy" or node.module.startswith("aspy.")):
                target = node.module[5:]
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target)
    return {m for m in found if m != name}


def top_of(module: str) -> str:
    """Return the name a module has in LAYERS: its first part under aspy, or __init__ for the package."""
    return module.split(".")[0] if module else "__init__"


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(top_of(name))


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_one_above_it(name):
    known = modules()
    mine = top_of(name)
    for other in imported(name, known[name], known):
        theirs = top_of(other)
        if theirs in (mine, "__init__"):
            # Within one module or subpackage; and the package itself, which every import loads.
            continue
        assert layer_of(theirs) >= layer_of(mine), (
            f"aspy/{mine} ({LAYERS[layer_of(mine)][0]}) imports aspy/{theirs}, "
            f"above it ({LAYERS[layer_of(theirs)][0]})")


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_the_apis_clients_import_no_server_module(name):
    known = modules()
    assert {top_of(m) for m in imported(name, known[name], known)} <= CLIENTS_MAY_IMPORT


def test_the_store_imports_only_the_records():
    known = modules()
    used = {top_of(m) for name in known if top_of(name) == "store" for m in imported(name, known[name], known)}
    assert used <= {"store", "records", "native"}
