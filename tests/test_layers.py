"""The package's layers (docs/ARCHITECTURE.md): an import never goes up a layer and never closes a
cycle between packages, at top level or inside a function. One documented exception: a masked-
image-modeling or tokenizer teacher that is an earlier selfsight run is loaded by the run-folder
layer (``targets/features.py`` -> ``runs``). Imports inside functions are kept where they keep
``selfsight --help`` free of torch or load an optional extra, and each says so in a comment."""
from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "selfsight"
LAYERS = [                                   # lowest first
    {"registry", "config", "schedules", "faults", "files", "progress"},
    {"nn"},
    {"backbones", "heads", "losses", "masking", "augment"},
    {"data"},
    {"tokenizers"},
    {"targets"},
    {"methods"},
    {"resolve"},
    {"runs"},
    {"engine"},
    {"eval", "deploy", "viz", "report"},
    {"api", "cli", "__main__", "__init__"},
]
EXCEPTIONS = {("selfsight.targets.features", "selfsight.runs"),     # a teacher that is an earlier run
              ("selfsight.methods.distill", "selfsight.runs"),       # a distillation teacher: a run or an export
              ("selfsight.methods.distill", "selfsight.deploy.load")}


def part(module: str) -> str:
    """The layer member of a module: its package below selfsight, or the top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    name = part(module)
    for i, members in enumerate(LAYERS):
        if name in members:
            return i
    raise AssertionError(f"{module} is in no layer: add {name!r} to LAYERS (and to docs/ARCHITECTURE.md)")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path = PACKAGE):
    """(importer, imported, line, inside a function, the source line and the one above it)."""
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        me = module_name(path, root)
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module.startswith("selfsight") else []
                if node.module == "selfsight":          # a submodule, or a name of the package itself
                    names = [f"selfsight.{a.name}" if (root / f"{a.name}.py").exists() or (root / a.name).is_dir()
                             else "selfsight" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("selfsight")]
            for name in names:
                text = lines[node.lineno - 1] + "\n" + (lines[node.lineno - 2] if node.lineno > 1 else "")
                yield me, name, node.lineno, id(node) not in top and not _guarded(tree, node), text


def _guarded(tree, node) -> bool:
    """A top-level import inside ``if TYPE_CHECKING`` / try is still top level for our purposes."""
    return any(node in ast.walk(n) for n in tree.body if isinstance(n, (ast.If, ast.Try)))


def violations(root: Path = PACKAGE) -> list[str]:
    found, graph = [], {}
    for me, name, line, _, _ in imports(root):
        a, b = part(me), part(name)
        if a == b or (me, name) in EXCEPTIONS or name == "selfsight":     # the bare package: __version__ only
            continue
        if layer(name) > layer(me):
            found.append(f"{me}:{line} imports {name}, a higher layer")
        graph.setdefault(a, set()).add(b)
    for a, targets in graph.items():                 # cycles between packages of one layer
        for b in targets:
            if a in graph.get(b, set()) and a < b:
                found.append(f"{a} and {b} import each other")
    return sorted(found)


def test_imports_go_down_the_layers_and_close_no_cycle():
    assert violations() == []


def test_the_check_fails_on_an_upward_import(tmp_path):
    fake = tmp_path / "selfsight"
    for name, text in {"__init__.py": "", "config.py": "from selfsight.engine import trainer\n",
                       "engine/__init__.py": "", "engine/trainer.py": "from selfsight import config\n",
                       "nn/__init__.py": "", "nn/a.py": "def f():\n    from selfsight.data import x\n",
                       "data/__init__.py": "from selfsight.nn import a\n"}.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    found = violations(fake)
    assert "selfsight.config:1 imports selfsight.engine, a higher layer" in found
    assert "selfsight.nn.a:2 imports selfsight.data, a higher layer" in found      # inside a function too
    assert "data and nn import each other" in found


LAZY_REASONS = ("torch", "--help", "extra", "optional", "import selfsight", "teacher")


def lazy_imports(root: Path = PACKAGE) -> dict:
    """{(file, function): [(line, source), ...]} of the imports inside functions."""
    out: dict = {}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    key = (str(path.relative_to(root.parent)), fn.name)
                    out.setdefault(key, []).append((node.lineno, lines[node.lineno - 1]))
    return out


def test_imports_inside_functions_say_why():
    """An import inside a function keeps ``selfsight --help`` or ``import selfsight`` free of torch,
    loads an optional extra, or is the documented teacher exception; a comment on one of the
    function's imports says which."""
    bare = [f"{file}:{lines[0][0]} in {fn}(): {lines[0][1].strip()}" for (file, fn), lines in lazy_imports().items()
            if not any("#" in text and any(r in text.lower() for r in LAZY_REASONS) for _, text in lines)]
    assert bare == []


def test_no_private_name_is_imported_from_another_package():
    """``_names`` stay inside their package: what another package needs is public (one helper)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path, PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("selfsight."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and part(node.module) != part(me):
                    found.append(f"{me} imports {', '.join(private)} from {node.module}")
    assert found == []
