"""The package's layers (README, Layout): a module imports only from its own layer or the
layers before it, and no import cycle exists, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "connector"

# The README's table, lowest layer first.
LAYERS: list[set[str]] = [
    {"errors", "names", "canonical", "safetext", "sqltext", "refusals", "rate", "atomic_file",
     "arrow_stream", "process_memory", "memory", "policy.ref", "alarms", "thread_pool",
     "log_context", "commit_gate", "toml_strict", "signal_inbox", "recent"},
    {"config", "config_template", "identity", "authentication", "jws", "receipt", "status",
     "directory", "held_directory", "directory_draft"},
    {"csv_strict", "column_names", "staging", "store", "store_ingest", "version_log",
     "ingest_client", "watch"},
    {"sqlbounds", "sqltree", "querytree", "valuesize", "packing", "sqlguard", "sqljson",
     "shaping", "noise", "valuesize_tree", "sqlparser", "sqlallowed", "plantree",
     "federated_plan", "federated_sql",
     "aggregates"},
    {"policy.yaml_strict", "policy.terms", "policy.model", "policy.versions", "policy.signing",
     "policy.publish", "policy.answers", "policy.engine", "policy.opa", "policy.consistency",
     "policy.fit", "policy.registry", "policy.lint_draft", "policy.lint_across", "policy.lint",
     "policy.draft", "policy.explain", "policy.filter_order", "policy.diff",
     "policy.diff_sets"},
    {"enforce", "incremental", "plancheck", "decision_cache", "quota", "slots",
     "shaped_copies", "sandbox_errors", "sandbox_cursors", "sandbox_session", "sandbox"},
    {"request", "audit_entry", "audit_chain", "audit",
     "audit_refusals", "audit_outage", "query_run", "peer_catalog", "decided", "provider",
     "offline", "policy_replay", "decision_log", "policy_cases", "home_provider",
     "peer_failures", "backup",
     "restore"},
    {"wire", "service", "ingest_service", "tls_reload", "metrics", "flight_sql",
     "flight_tickets", "flight_status", "flight_answer", "flight_streams", "flight", "server",
     "client",
     "result_files", "federation_targets", "federated_stream", "federated_answers", "federation",
     "federated_receipts", "foreground", "__main__"},
]  # fmt: skip
LAYER_OF = {module: n for n, layer in enumerate(LAYERS) for module in layer}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = relative.parts
        if parts[0] in ("_proto", "cli") or parts[-1] == "__init__":
            continue
        found[".".join(parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """The connector modules a file imports (at module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("connector."):
                names.add(node.module.removeprefix("connector."))
            elif node.module == "connector":
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(
                a.name.removeprefix("connector.") for a in node.names
                if a.name.startswith("connector.")
            )  # fmt: skip
    return names


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) == set(LAYER_OF)


def test_no_module_imports_from_a_later_layer() -> None:
    upward = []
    for module, path in _modules().items():
        for imported in _imports(path):
            if imported in LAYER_OF and LAYER_OF[imported] > LAYER_OF[module]:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    graph = {m: {i for i in _imports(p) if i in LAYER_OF} for m, p in _modules().items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in graph[module]:
            assert state.get(imported) != "open", " -> ".join([*trail, module, imported])
            if imported not in state:
                visit(imported, [*trail, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def _readme_layout() -> str:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("| layer | module | job |") :].split("\n\n")[0]


def test_the_readme_layout_names_every_module_in_layer_order() -> None:
    table = _readme_layout()
    every = set(_modules())
    every |= {f"cli.{p.stem}" for p in (PACKAGE / "cli").glob("*.py") if p.stem != "__init__"}
    shown = {m: table.find(f"`{m.replace('.', '/')}`") for m in every}
    assert sorted(m for m, at in shown.items() if at < 0) == []
    # Rows follow the layers: no module is listed before one of an earlier layer.
    order = sorted((at, LAYER_OF[m]) for m, at in shown.items() if m in LAYER_OF)
    assert [layer for _, layer in order] == sorted(layer for _, layer in order)
