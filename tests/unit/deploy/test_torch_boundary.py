"""The torch boundary is a folder: every module under qtale_export/deploy/ (and the command-line
adapters of the deployment subcommands) imports without torch, transformers, peft or modelopt, and
deploy/ imports nothing from export/ (the torch side), which owns no part of the export folder's
contract.

Cheap (one subprocess with those packages blocked, and a read of the sources);
tests/unit/deploy/test_torch_free.py is the end-to-end check in a real venv without them.
"""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import qtale_export.deploy

HEAVY = ("torch", "transformers", "peft", "modelopt")
# outside deploy/: the package, the command registry and the deployment subcommands' adapters only
OUTSIDE = ["qtale_export", "qtale_export.cli", *(f"qtale_export.cli.{c}" for c in ("common", "verify", "build", "run",
                                                                                 "triton_repo", "bench"))]
DEPLOY = Path(qtale_export.deploy.__file__).parent
# deploy/ imports nothing from export/ (router surgery and gate naming live in deploy/routers.py)
ALLOWED_EXPORT_IMPORTS: set = set()
# files copied into a Triton model repository: they import triton_python_backend_utils, which only
# tritonserver's Python has (tests/unit/deploy/test_triton_server.py runs them)
TRITON_TEMPLATES = "qtale_export.deploy.triton_models."

PROBE = """
import importlib, json, sys
HEAVY = {heavy!r}
tried = []

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            tried.append(name)
            raise ImportError("blocked by the torch-boundary test: " + name)
        return None

sys.meta_path.insert(0, Blocker())
report = {{}}
for module in {modules!r}:
    before = len(tried)
    importlib.import_module(module)
    report[module] = tried[before:]
try:  # the control: the blocker does see a torch-side module's imports
    importlib.import_module("qtale_export.routing")
except ImportError:
    pass
report["control"] = tried[:]
report["export_loaded"] = sorted(m for m in sys.modules if m.startswith("qtale_export.export"))
print(json.dumps(report))
"""


def deploy_modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(qtale_export.deploy.__path__, "qtale_export.deploy.")]
    return ["qtale_export.deploy"] + [m for m in found if not m.startswith(TRITON_TEMPLATES)]


def test_deploy_imports_no_torch():
    modules = deploy_modules()
    assert {"qtale_export.deploy.graph_io", "qtale_export.deploy.runtime.generate", "qtale_export.deploy.bench",
            "qtale_export.deploy.triton", "qtale_export.deploy.theta"} <= set(modules)
    code = PROBE.format(heavy=HEAVY, modules=modules + OUTSIDE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "torch" in report.pop("control")
    assert report.pop("export_loaded") == []  # importing the deployment side loads nothing of export/
    assert {m: tried for m, tried in report.items() if tried} == {}


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules a file imports, inside functions too (relative imports resolved)."""
    package = ["qtale_export", *path.parent.relative_to(DEPLOY.parent).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            names.add(".".join(base + ([node.module] if node.module else [])))
    return names


def _torch_side(name: str) -> bool:
    return name == "qtale_export.export" or name.startswith("qtale_export.export.")


def test_deploy_imports_nothing_from_export():
    """Every file under deploy/, imports inside functions included."""
    found = {(path.relative_to(DEPLOY).as_posix(), name) for path in sorted(DEPLOY.rglob("*.py"))
             for name in _imports(path) if _torch_side(name)}
    assert found == ALLOWED_EXPORT_IMPORTS
    # the control: the same reading does see a torch-side import (cli/export.py's, relative)
    assert any(_torch_side(n) for n in _imports(DEPLOY.parent / "cli" / "export.py"))
