"""The torch boundary: every module of qtale_export.deploy, and the deployment modules outside it
that the torch-free install runs, import without torch, transformers, peft or modelopt.

Cheap (one subprocess with those packages blocked); tests/runtime/test_torch_free.py is the
end-to-end check in a real venv without them.
"""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import qtale_export.deploy

HEAVY = ("torch", "transformers", "peft", "modelopt")
# outside deploy/, run by `qtale verify` / `qtale build` / the command registry of a deployment install
OUTSIDE = ["qtale_export", "qtale_export.cli", *(f"qtale_export.cli.{c}" for c in ("common", "verify", "build", "run",
                                                                                 "triton_repo", "bench")),
           "qtale_export.export.main",
           "qtale_export.export.verify", "qtale_export.export.reference", "qtale_export.export.manifest",
           "qtale_export.export.ort_ops", "qtale_export.export.graphs"]
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
    assert {m: tried for m, tried in report.items() if tried} == {}
