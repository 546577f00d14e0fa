"""Make lm-eval's own command line know the `hybridlm` model: `lm_eval --model hybridlm ...`.

lm-evaluation-harness (0.4.x) looks models up only in its registry, which it fills from a fixed list
when `lm_eval.models` is imported; it has no plugin discovery. So `hybridlm eval plugin install`
writes one file, `hybridlm-lm-eval.pth`, into the environment's site-packages. Python runs its one
line at every start-up: it loads THIS file by path (not the hybridlm package, so no torch import at
start-up) and calls `install()`, which puts a finder on `sys.meta_path`. The finder does nothing
until `lm_eval.api.registry` is imported; then, right after that module has run, it registers
`hybridlm` as a lazy entry ("hybridlm.evaluate.harness:HybridLMEval"), so hybridlm and torch are
imported only when an evaluation asks for that model. `hybridlm eval plugin remove` deletes the file.

Standard library only: this module runs before anything else is importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "hybridlm"
MODEL_TARGET = "hybridlm.evaluate.harness:HybridLMEval"
PTH_NAME = "hybridlm-lm-eval.pth"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for the registry module it returns the real spec with a loader that
    registers the model after executing the module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # look the module up with the other finders, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register(module.model_registry)

        spec.loader.exec_module = exec_module
        return spec


def register(model_registry) -> None:
    """Register `hybridlm` in lm-eval's model registry as a lazy entry (if not there yet)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def install() -> None:
    """Called by the .pth line at start-up: register now if lm-eval's registry is already imported,
    else when it is."""
    module = sys.modules.get(REGISTRY_MODULE)
    if module is not None:
        register(module.model_registry)
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def pth_line() -> str:
    """The .pth line: load this file by path under a private name and call install()."""
    here = str(Path(__file__).resolve())
    return (
        "import importlib.util as _u; _s = _u.spec_from_file_location('_hybridlm_lm_eval_plugin', "
        f"{here!r}); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.install()\n"
    )


def default_site_dir() -> Path:
    """The current environment's site-packages (a virtual environment's, when one is active)."""
    return Path(sysconfig.get_paths()["purelib"])


def install_pth(site_dir: str | Path | None = None) -> Path:
    """Write hybridlm-lm-eval.pth into site_dir (default: this environment's site-packages)."""
    site = Path(site_dir) if site_dir is not None else default_site_dir()
    if not site.is_dir():
        raise FileNotFoundError(f"site-packages directory {site} does not exist; pass an existing --site-dir")
    path = site / PTH_NAME
    temporary = path.with_suffix(".pth.tmp")  # not a .pth until renamed: Python never sees half a line
    temporary.write_text(pth_line())
    temporary.replace(path)
    return path


def remove_pth(site_dir: str | Path | None = None) -> Path | None:
    """Delete hybridlm-lm-eval.pth from site_dir; returns its path, or None if it was not there."""
    path = (Path(site_dir) if site_dir is not None else default_site_dir()) / PTH_NAME
    if not path.exists():
        return None
    path.unlink()
    return path
