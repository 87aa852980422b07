"""The package's layering: the adapter core imports nothing of the tools (command line, training loop, tasks, plots,
benchmarks) nor of the command line's front end, which imports the library only inside functions (its help and
its checks of bad input load no library); importing the package changes nothing of other libraries."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import spectral_peft
import spectral_peft_cli

PACKAGE = pathlib.Path(spectral_peft.__file__).parent
TOOLS = PACKAGE / "tools"
FRONT_END = pathlib.Path(spectral_peft_cli.__file__).parent


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of what ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(("spectral_peft", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_core_imports_nothing_of_the_tools():
    core = [p for p in PACKAGE.rglob("*.py") if TOOLS not in p.parents and p.name != "__main__.py"]
    assert len(core) > 20
    offending = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported_modules(p)
                                                     if n.startswith(("spectral_peft.tools", "spectral_peft_cli")))
                 for p in core}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_front_end_imports_the_library_only_inside_functions():
    """Every module of spectral_peft_cli imports spectral_peft and the heavy libraries in function bodies only."""
    heavy = ("spectral_peft", "torch", "transformers", "peft", "numpy", "PIL")
    offending = []
    for path in sorted(FRONT_END.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            offending += [f"{path.name}: {name}" for name in names if name.split(".")[0] in heavy]
    assert len(list(FRONT_END.glob("*.py"))) > 5 and offending == []


def test_importing_the_core_loads_no_tool_module():
    code = ("import sys, spectral_peft, spectral_peft.analysis, spectral_peft.spectral; "
            "print(sorted(m for m in sys.modules if m.startswith(('spectral_peft.tools', 'spectral_peft_cli'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
