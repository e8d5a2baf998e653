"""Imports point down the layer table of docs/architecture.md: a module may import its own layer and the ones below.

Every ``import`` statement counts, the ones inside functions too (a deferred import is still a dependency). The
package root is imported before any of its modules, so it counts as the bottom layer: what it offers from higher
layers it loads lazily, on first use.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monai_ld"

# module prefix -> rank (the most specific prefix wins); keep in step with docs/architecture.md
LAYERS = {
    # data / transforms
    "monai_ld": 0,
    "monai_ld.data": 0,
    "monai_ld.transforms": 0,
    "monai_ld.conditioning": 0,
    "monai_ld.bundles": 0,
    "monai_ld.utils": 0,
    "monai_ld.settings": 0,
    # networks
    "monai_ld.networks": 1,
    # schedulers / LD
    "monai_ld.drift": 2,
    "monai_ld.schedulers": 2,
    "monai_ld.diffusers": 2,
    # inferers
    "monai_ld.inferers": 3,
    "monai_ld.sampling": 3,
    # engines / evaluation
    "monai_ld.engines": 4,
    "monai_ld.evaluation": 4,
    # pipeline
    "monai_ld.pipeline": 5,
    "monai_ld.composition": 5,
    "monai_ld.outputs": 5,
    "monai_ld.cohort": 5,
    "monai_ld.campaign": 5,
    "monai_ld.estimate": 5,
    "monai_ld.bundle_support": 5,
    "monai_ld.jobs": 5,
    # cli / label
    "monai_ld.cli": 6,
    "monai_ld.bundle_cli": 6,
    "monai_ld.evaluation_cli": 6,
    "monai_ld.data.phantoms_cli": 6,
    "monai_ld.label": 6,
}

# (importer, imported) -> why it is still allowed; keep this short
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _rank(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The ``monai_ld`` modules ``module`` imports (relative ones resolved; ``from pkg import sub`` counts as ``pkg.sub``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(subs or [target])
    return {m for m in found if m == "monai_ld" or m.startswith("monai_ld.")}


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _rank(m) is None]
    assert not missing, f"add these modules to LAYERS (and to docs/architecture.md): {missing}"


def test_imports_point_down():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        rank = _rank(module)
        for target in sorted(_imports(module, path, set(modules))):
            if (_rank(target) or 0) > rank and (module, target) not in EXCEPTIONS:
                bad.append(f"{module} (layer {rank}) imports {target} (layer {_rank(target)})")
    assert not bad, "imports that point up the layer table:\n" + "\n".join(bad)


def test_exceptions_are_still_needed():
    modules = _modules()
    stale = [e for e in EXCEPTIONS if e[1] not in _imports(e[0], modules[e[0]], set(modules))]
    assert not stale, f"remove these exceptions, the imports are gone: {stale}"


def test_import_monai_ld_loads_no_module():
    """``import monai_ld`` stays cheap: its public names and submodules load on first use (bundle configs reach
    ``bundle_support`` through MONAI's ``optional_import``, i.e. ``getattr(monai_ld, "bundle_support")``)."""
    code = ("import sys, monai_ld; print(sorted(m for m in sys.modules if m.startswith('monai_ld.'))); "
            "from monai.utils import optional_import; print(optional_import('monai_ld', name='bundle_support')[0].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "monai_ld.bundle_support"], out


def test_public_names_resolve():
    import monai_ld

    for name in monai_ld.__all__:
        assert getattr(monai_ld, name) is not None, name
