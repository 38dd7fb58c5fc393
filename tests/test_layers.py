"""The project's layering, declared once (:data:`LAYERS`) and checked on every import of every .py file.

README.md (Layout) and docs/architecture.md state the same table in words: the library is ``dagan``
(model, config, checkpoints, graph contract, face, media, paste, smoothing, helpers) → ``export`` →
``engine``; the applications (``commands``, ``server``, ``vcam``, ``training``, ``evaluation``) use the
library and never each other, except that the ``dagan`` dispatcher (``commands/cli.py``) loads each
application's ``cli`` module, and nothing imports the dispatcher.

The checker reads each file with :mod:`ast` (nothing is imported), so it sees what a grep would miss:
imports inside functions and ``TYPE_CHECKING`` blocks, relative imports (resolved to absolute names),
``from package import module`` (resolved to the module), and dynamic imports by literal name. A test
plants violations of each kind in a temporary tree and proves the checker reports every one. Modules
also may not import each other round a loop (:func:`import_cycles`), inside a package too.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ANY = "*"  # a row that may import every package of the project (tools and tests)
LIBRARY = ("dagan", "export", "engine")

# Who may import what, beyond its own top-level package. Keys are packages or modules (the most specific
# key is a module's row); values are packages or modules it may import (a name covers its submodules).
# Every top-level folder holding .py files must have a row, so a new package has to be placed here.
LAYERS: dict[str, tuple[str, ...]] = {
    # the library, bottom up: each layer imports only the layers below it
    "dagan": (),
    "export": ("dagan",),
    "engine": ("dagan", "export"),
    # the applications: the library only, never another application
    "training": LIBRARY,
    "evaluation": LIBRARY,
    "server": LIBRARY,
    # dagan cam --server drives the service through the server package's one public client (its API,
    # not its internals: server.client imports nothing of the server)
    "vcam": (*LIBRARY, "server.client"),
    # the benchmarks measure the library and the running server (in-process), so they may import both;
    # nothing but the dispatcher (`dagan bench`) imports them
    "bench": (*LIBRARY, "server"),
    "client_web": (),  # the browser page's package: files only, no imports
    "commands": LIBRARY,  # the offline commands: animate, demo, init-checkpoint, bench, import, synth, export
    # the `dagan` dispatcher: the one place that reaches other applications, through their `cli` module
    "commands.cli": (*LIBRARY, "training.cli", "evaluation.cli", "server.cli", "vcam.cli", "bench.model"),
    # tools that no package imports: measuring scripts, the container's entrypoint and smoke call, tests
    "scripts": (ANY,),
    "docker": (ANY,),
    "tests": (ANY,),
}
# Modules no other module may import (tests may): the top of the graph.
TOPMOST = ("commands.cli",)
# Modules allowed a dynamic import whose name the checker cannot read, with the reason.
DYNAMIC_IMPORTS: dict[str, str] = {
    "bench.report": "versions of optional third-party runtimes (onnxruntime, tensorrt) for the report",
}
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "__pycache__", "node_modules"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.imported} ({self.why})"


def _git_files(root: Path) -> list[str] | None:
    """The project's files as git sees them (tracked, plus new files not ignored), or None outside a git
    checkout. Ignored folders (training runs, data, scratch scripts in runs/) are not the project's code."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
        cwd=root,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return [name for name in result.stdout.decode().split("\0") if name]


def python_files(root: Path) -> Iterator[Path]:
    """Every .py file of the project under ``root``: git's list in a checkout, else every file outside
    :data:`SKIP_DIRS` and hidden folders (a planted tree, an unpacked source archive)."""
    tracked = _git_files(root)
    paths = sorted(root / name for name in tracked) if tracked is not None else sorted(root.rglob("*.py"))
    for path in paths:
        rel = path.relative_to(root)
        if path.is_file() and not any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            yield path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_names(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth of the syntax tree."""
    module = module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 >= len(parts):  # beyond the top-level package: reported as written
                    for alias in node.names:
                        written = ".".join(filter(None, (node.module, alias.name)))
                        yield node.lineno, "." * node.level + written
                    continue
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                # `from package import module` imports the module; `from module import name` the module
                yield node.lineno, sub if alias.name != "*" and _is_module(root, sub) else base
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value
            else:
                yield node.lineno, "<dynamic>"


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _covers(names: tuple[str, ...] | list[str], dotted: str) -> bool:
    return any(n == ANY or dotted == n or dotted.startswith(n + ".") for n in names)


def row_of(module: str, layers: Mapping[str, tuple[str, ...]]) -> str | None:
    """The most specific key of ``layers`` that contains ``module``."""
    keys = [k for k in layers if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def check(
    root: Path,
    layers: Mapping[str, tuple[str, ...]] = LAYERS,
    topmost: tuple[str, ...] = TOPMOST,
    dynamic_ok: Mapping[str, str] = DYNAMIC_IMPORTS,
) -> list[Violation]:
    """Every import in ``root`` that its layer does not allow, and every folder without a layer."""
    project = {k.split(".")[0] for k in layers}
    out: list[Violation] = []
    for path in python_files(root):
        rel = str(path.relative_to(root))
        module = module_name(root, path)
        row = row_of(module, layers)
        if row is None:
            out.append(Violation(rel, 0, module, "-", "its top-level folder has no row in LAYERS"))
            continue
        own = module.split(".")[0]
        for line, name in sorted(set(imported_names(root, path))):
            if name == "<dynamic>":
                if module not in dynamic_ok:
                    out.append(Violation(rel, line, module, name, "a dynamic import the checker cannot read"))
                continue
            if name.startswith("."):
                out.append(Violation(rel, line, module, name, "relative import beyond the top-level package"))
                continue
            top = name.split(".")[0]
            if top not in project:
                continue  # standard library or third party
            if _covers(topmost, name) and row != "tests":
                out.append(Violation(rel, line, module, name, "nothing imports the top of the graph"))
            elif top != own and not _covers(layers[row], name):
                out.append(Violation(rel, line, module, name, f"not allowed for {row!r}"))
    return out


def import_cycles(root: Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (any import, at any depth:
    a function-level import does not make a cycle go away, it only hides it until run time)."""
    modules = {module_name(root, p): p for p in python_files(root)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, name in imported_names(root, path):
            parts = name.split(".")
            target = next(
                (".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in modules),
                None,
            )
            if target is not None and target != module:
                graph[module].add(target)
    # Tarjan's strongly connected components, iteratively (no recursion limit on deep graphs)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


# ------------------------------------------------------------------------------------------------ tests


def test_every_import_respects_the_declared_layers():
    violations = check(ROOT)
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


def test_no_module_imports_itself_round_a_loop():
    assert import_cycles(ROOT) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    _write(
        tmp_path,
        {
            "training/__init__.py": "",
            "training/losses.py": "def build():\n    from .perceptual import Loss\n",
            "training/perceptual.py": "from training.losses import build\nclass Loss: ...\n",
            "training/stage.py": "from . import losses, perceptual\n",
        },
    )
    assert import_cycles(tmp_path) == [["training.losses", "training.perceptual"]]


def test_every_package_has_a_row_and_the_library_imports_no_application():
    folders = {p.relative_to(ROOT).parts[0] for p in python_files(ROOT) if len(p.relative_to(ROOT).parts) > 1}
    assert folders <= {k.split(".")[0] for k in LAYERS}, folders - set(LAYERS)
    applications = {"commands", "server", "vcam", "training", "evaluation"}
    for layer in LIBRARY:
        assert not applications & {n.split(".")[0] for n in LAYERS[layer]}
    # the console script is the dispatcher at the top of the graph
    assert 'dagan = "commands.cli:main"' in (ROOT / "pyproject.toml").read_text()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


PLANTED_CLEAN = {
    "dagan/__init__.py": "",
    "dagan/face.py": "import numpy\nfrom .media import load\n",
    "dagan/media.py": "def load(): ...\n",
    "dagan/nets/__init__.py": "from .. import face\n",
    "export/__init__.py": "",
    "export/graphs.py": "from dagan import face\n",
    "engine/__init__.py": "from export.graphs import *\n",
    "server/__init__.py": "",
    "server/cli.py": "from dagan.media import load\n",
    "server/worker.py": "from engine import graphs\n",
    "vcam/__init__.py": "",
    "vcam/cli.py": "def add_commands(sub): ...\n",
    "commands/__init__.py": "",
    "commands/cli.py": "def main():\n    from server import cli\n    from vcam import cli as vcam_cli\n",
    "commands/animate.py": "from engine import graphs\nfrom dagan.media import load\n",
    "tests/test_x.py": "from commands.cli import main\nimport server.worker\n",
}
PLANTED_VIOLATIONS = {
    # the library reaching up: absolute, inside a function, and `from package import module`
    "dagan/paste.py": ("from engine import graphs\n", "engine"),
    "dagan/nets/dense.py": ("def f():\n    import server.worker\n", "server.worker"),
    "export/onnx.py": ("from engine import graphs as g\n", "engine"),
    # an application importing another application's internals (`from package import module`)
    "vcam/remote.py": ("from server import worker\n", "server.worker"),
    "server/extras.py": ("from commands import animate\n", "commands.animate"),
    # a relative import that reaches the dispatcher (resolved to commands.cli)
    "commands/demo.py": ("from .cli import main\n", "commands.cli"),
    # a dynamic import by literal name, and one the checker cannot read
    "engine/select.py": ("import importlib\nimportlib.import_module('server.worker')\n", "server.worker"),
    "engine/report.py": ("name = 'x'\n__import__(name)\n", "<dynamic>"),
    # a package nobody placed in the table
    "newapp/__init__.py": ("", "-"),
}


def test_the_checker_passes_a_clean_tree_and_reports_every_planted_violation(tmp_path):
    layers = {k: v for k, v in LAYERS.items() if k not in ("scripts", "docker")}
    _write(tmp_path, PLANTED_CLEAN)
    assert check(tmp_path, layers, TOPMOST, {}) == []
    _write(tmp_path, {rel: text for rel, (text, _) in PLANTED_VIOLATIONS.items()})
    found = {(v.path, v.imported) for v in check(tmp_path, layers, TOPMOST, {})}
    expected = {(rel, imported) for rel, (_, imported) in PLANTED_VIOLATIONS.items()}
    assert found == expected


def test_imports_are_resolved_to_absolute_modules(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from . import sub\n",
            "pkg/sub/__init__.py": "from .. import mod\nfrom ..mod import name\nfrom .leaf import *\n",
            "pkg/sub/leaf.py": "def f():\n    from ... import beyond\n",
            "pkg/mod.py": "name = 1\n",
        },
    )
    names = {
        str(p.relative_to(tmp_path)): sorted(n for _, n in imported_names(tmp_path, p))
        for p in python_files(tmp_path)
    }
    assert names == {
        "pkg/__init__.py": ["pkg.sub"],
        "pkg/sub/__init__.py": ["pkg.mod", "pkg.mod", "pkg.sub.leaf"],
        "pkg/sub/leaf.py": ["...beyond"],
        "pkg/mod.py": [],
    }
