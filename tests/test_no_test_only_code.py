"""No code only tests call: every function and method in helpers/ has a caller outside tests/.

A function only a test calls is a second way to do what production does another way (the test then checks the copy,
not what runs), or dead code. The scan collects every top-level function and every method of a top-level class in
helpers/*.py (a class-level `name = property(...)` counts as a method), and every name the production code refers
to: ast.Name ids and ast.Attribute attrs that are read (not assigned), and imported names, in helpers/ (outside
`if __name__ == "__main__":`), benchmarks/*.py and the notebooks' code cells, plus the strings of an `__all__` and of
a getattr/hasattr. A module's `main` counts as called only when a command line runs it: `python -m helpers.X` (or
"-m", "helpers.X") in the Makefile, README.md, docs/, helpers/, benchmarks/ or the notebooks.

Not flagged, and why:
- dunders (`__init__`, `__call__`, `__post_init__`, ...): Python calls them, by syntax rather than by name;
- PROTOCOL: methods a library calls by name on our objects (torch's `forward`, ...), listed there with their caller;
- a `@property` needs nothing special: it is read as an attribute, which the scan counts; a dataclass's generated
  methods are not in the source, so they are not collected either;
- the functions docs/design.md lists under "## Public API": meant for users to call from their own notebooks;
Names are matched without their module, so a name used anywhere counts for every function of that name: the check
misses a copy that shares its name with a used function, never flags a used one.
"""
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = {
    "forward",  # torch.nn.Module.__call__
    "_repr_html_",  # IPython's display of an object in a notebook
}
# Flagged in files another change is rewriting (the time budget); left to it, not fixed here:


def definitions() -> dict[str, set[str]]:
    """{function or method name: {"module.name", ...}} of helpers/*.py."""
    found = {}
    for path in sorted((ROOT / "helpers").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            members = node.body if isinstance(node, ast.ClassDef) else [node]
            for f in members:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.setdefault(f.name, set()).add(f"{path.stem}.{f.name}")
                elif _is_property_assignment(f):  # RunLayout's `config = property(lambda self: ...)` entries
                    found.setdefault(f.targets[0].id, set()).add(f"{path.stem}.{f.targets[0].id}")
    return found


def _is_property_assignment(node) -> bool:
    return (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "property")


def _is_main_block(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def names_in(tree: ast.AST) -> set[str]:
    """Every name `tree` refers to, outside `if __name__ == "__main__":` blocks."""
    skipped = {id(n) for top in ast.walk(tree) if _is_main_block(top) for n in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):  # a local `x = ...` calls no x()
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            found |= {a.name.split(".")[-1] for a in node.names}
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            found |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            found |= {a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return found


def _cell_code(cell: dict) -> str:
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def production_sources() -> list[tuple[str, str]]:
    """(path, Python source) of everything but tests/: helpers/, benchmarks/ and the notebooks' code cells."""
    files = sorted((ROOT / "helpers").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    sources = [(str(p), p.read_text(encoding="utf-8")) for p in files]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        sources += [(f"{nb}[{i}]", _cell_code(c)) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    return sources


def commands_run() -> set[str]:
    """helpers modules some command line runs with `python -m helpers.X` (or "-m", "helpers.X")."""
    texts = [p.read_text(encoding="utf-8") for p in [ROOT / "Makefile", ROOT / "README.md",
                                                     *(ROOT / "docs").glob("*.md")]]
    texts += [source for _, source in production_sources()]
    return {m for text in texts for m in re.findall(r"-m[\"', ]+helpers\.(\w+)", text)}


def public_api() -> set[str]:
    """The names docs/design.md lists under "## Public API" (lines "- `helpers.module.name`...")."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("\n## Public API\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `helpers\.(\w+\.\w+)`", section, re.M))


def called_only_by_tests() -> list[str]:
    used = set().union(*(names_in(ast.parse(source, path)) for path, source in production_sources()))
    mains = {f"{m}.main" for m in commands_run()}
    allowed = public_api() | mains
    used.discard("main")  # a module's main counts only when a command line runs that module
    return sorted(q for name, qualified in definitions().items()
                  if name not in used and name not in PROTOCOL and not (name.startswith("__") and name.endswith("__"))
                  for q in qualified if q not in allowed)


def test_no_helpers_function_is_called_only_by_tests():
    assert called_only_by_tests() == [], "called only by tests (or by nothing): delete it, or give it its real caller"


def test_the_scan_sees_a_main_block_apart_and_a_getattr_string():
    tree = ast.parse("def f(): pass\nx = getattr(m, 'g')\nif __name__ == '__main__':\n    f()\n")
    assert "g" in names_in(tree) and "f" not in names_in(tree)


def test_every_exception_names_a_function_that_exists():
    defined = set().union(*definitions().values())
    assert sorted(public_api() - defined) == [], "take these out of design.md's Public API"
