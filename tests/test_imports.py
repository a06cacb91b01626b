"""The house rules of helpers/: no import cycles, and no import from a lower layer to a higher one.

The layers are those of docs/design.md ("The modules, in layers"); a new module must be given one here and there."""
import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parent.parent / "helpers"

LAYERS = [  # lowest first; a module may import from its own layer or below
    {"files", "progress", "hub", "images", "unet", "diffusion", "disk", "runlock", "notebook_meta", "schedulers",
     "precision", "session", "trainlog", "values"},
    {"setting", "layout", "checkpoint", "data", "text", "autoencoder", "phema", "length", "checks"},
    {"config"},
    {"run_folder", "model", "cache", "demo_data", "step", "run_state", "disk_guard", "repair", "resume", "probe",
     "results", "command"},
    {"sample", "fit", "metrics", "score", "estimators", "shards"},
    {"previews", "baseline", "export", "grids", "weights", "selection"},
    {"judges", "panel_controls", "panel", "plots", "tables", "submission", "handin", "staged", "selection_cost",
     "replay", "sweep_view", "budget"},
    {"train", "runs", "choose"},
]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The helpers modules `path` imports, at the top or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1 and parts[0] in modules:
                found.add(parts[0])
            elif node.level == 1 and not node.module:
                found |= {a.name for a in node.names if a.name in modules}
            elif parts[0] == "helpers" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("helpers.") and a.name.split(".")[1] in modules}
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in HELPERS.glob("*.py") if p.stem != "__init__"}
    return {m: imports_of(HELPERS / f"{m}.py", modules) - {m} for m in modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_helpers_imports_have_no_cycle():
    assert cycles(graph()) == []


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    edges = graph()
    assert sorted(set(edges) - set(layer)) == [], "give these new modules a layer here and in docs/design.md"
    assert sorted(set(layer) - set(edges)) == [], "these modules are gone: take them out of LAYERS and the docs"
    upward = [f"{m} -> {d}" for m, ds in edges.items() for d in ds if layer[d] > layer[m]]
    assert upward == []


def test_the_design_docs_module_table_has_one_row_per_module_in_its_layer():
    import re

    text = (HELPERS.parent / "docs" / "design.md").read_text(encoding="utf-8")
    table = text.split("## The modules, in layers", 1)[1].split("\n\n| layer | module |", 1)[1].split("\n\n", 1)[0]
    rows, layer = {}, None
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        layer = int(cells[0].split()[0]) if cells[0] else layer
        rows.setdefault(re.fullmatch(r"`(\w+)`", cells[1])[1], []).append(layer)
    assert rows == {m: [i] for i, mods in enumerate(LAYERS) for m in mods}
