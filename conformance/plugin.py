"""pytest plugin: run PEFT's own ``tests/test_custom_models.py`` matrix against LoCA, S2FT and FastFourierFT.

Loaded by ``conformance/peft_matrix.py`` as ``-p plugin`` (this folder on PYTHONPATH), with PEFT's test folder
(fetched from the sdist of the installed PEFT version) given by ``--peft-tests-root``.

Before pytest collects anything, the plugin imports PEFT's test module under the name pytest's default "prepend"
import mode will ask for (``tests.test_custom_models``), so pytest reuses that module object from ``sys.modules``.
It then finds every ``@pytest.mark.parametrize`` list of that module that holds a row of stock ``FourierFTConfig``
(TEST_CASES, ALL_PEFT_CONFIG_CLASSES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, inline lists ...) and appends, for each
of our three configs, a mirrored copy of each FourierFT row: the same model id and kwargs, the config class swapped
and the row's name strings renamed ("Vanilla MLP 1 FourierFT" -> "Vanilla MLP 1 LoCA", "fourierft" -> "loca").
The marks keep a reference to these list objects, so the appended rows are parametrized like PEFT's own.
It also adds a transformers ``Conv1D`` row (model "EmbConv1D", target "conv1d") for stock FourierFT and each of
ours, unless PEFT already has a FourierFT row on that model.

Each test's outcome is recorded per method (found from the test's parameters, not its name) and written as JSON to
``--peft-matrix-report`` for the runner to summarise.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest

MODULE = "tests.test_custom_models"
REFERENCE = "FourierFT"  # the stock method whose rows are mirrored
OURS = ("LoCA", "S2FT", "FastFourierFT")  # labels used in the mirrored rows' names
CONV1D_MODEL_ID = "EmbConv1D"  # ModelEmbConv1D in PEFT's test file: an Embedding and a transformers Conv1D
CONV1D_TARGET = "conv1d"

# filled in pytest_configure
_CLASSES: dict[str, type] = {}  # label -> config class, REFERENCE included
_CANONICAL: dict[str, str] = {}  # a mirrored row's string -> the FourierFT row's string it came from
_ADDED: dict[str, int] = {}  # label -> rows added (over all lists)
_LISTS: list[str] = []  # a description of each parametrization list that was extended
_STUBS: list[str] = []  # modules replaced by stubs because they are not installed
_ITEMS: dict[str, dict] = {}  # nodeid -> {"method", "key", "stable_id"}
_RESULTS: dict[str, dict] = {}  # nodeid -> {"outcome", "message"}


def pytest_addoption(parser):
    group = parser.getgroup("peft-matrix")
    group.addoption("--peft-tests-root", default=None,
                    help="folder holding PEFT's tests/ package (tests/__init__.py, tests/test_custom_models.py)")
    group.addoption("--peft-matrix-report", default=None, help="write the per-test outcomes to this JSON file")


# --------------------------------------------------------------------------------------------------------------
# setup: stubs, import, mirrored rows


def _stub_missing(name: str, attributes: dict) -> None:
    """PEFT's test helpers import ``datasets`` and ``diffusers`` at module level but test_custom_models never uses
    them (a load_dataset helper, and an isinstance check against StableDiffusionPipeline). When they are not
    installed, a stub stands in; a stubbed function raises if a test does call it."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__peft_matrix_stub__ = True
    sys.modules[name] = module
    _STUBS.append(name)


def _not_installed(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a peft-matrix stub: the package is not installed")
    return fail


def _install_stubs() -> None:
    _stub_missing("datasets", {"load_dataset": _not_installed("datasets.load_dataset")})
    # a class that no object is an instance of
    _stub_missing("diffusers", {"StableDiffusionPipeline": type("StableDiffusionPipeline", (), {})})


def _parametrize_lists(module) -> list[tuple[str, list]]:
    """Every distinct argvalues list of a parametrize mark in ``module`` (module functions and Test classes), with
    the first test that uses it."""
    seen: dict[int, tuple[str, list]] = {}

    def visit(owner: str, obj) -> None:
        for mark in getattr(obj, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            values = mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("argvalues")
            if isinstance(values, list) and id(values) not in seen:
                seen[id(values)] = (f"{owner}", values)

    for name, obj in list(vars(module).items()):
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            for attr, member in vars(obj).items():
                if callable(member):
                    visit(f"{name}.{attr}", member)
        elif isinstance(obj, types.FunctionType) and obj.__module__ == module.__name__:
            visit(name, obj)
    return list(seen.values())


def _values(row) -> tuple[tuple, object]:
    """A row's values, and the ParameterSet it came from (None for a plain value or tuple)."""
    if isinstance(row, type(pytest.param(None))):
        return tuple(row.values), row
    if isinstance(row, tuple):
        return row, None
    return (row,), None


def _rename(text: str, label: str) -> str:
    new = text.replace(REFERENCE, label).replace(REFERENCE.lower(), label.lower())
    if new != text:
        _CANONICAL[new] = text
    return new


def _mirror(row, label: str):
    """The row with FourierFTConfig swapped for ``label``'s config and its name strings renamed."""
    reference_cls, target_cls = _CLASSES[REFERENCE], _CLASSES[label]
    values, parameter_set = _values(row)
    mirrored = []
    for value in values:
        if value is reference_cls:
            mirrored.append(target_cls)
        elif isinstance(value, str):
            mirrored.append(_rename(value, label))
        elif isinstance(value, (dict, list)):
            mirrored.append(copy.deepcopy(value))
        else:
            mirrored.append(value)
    if parameter_set is not None:
        new_id = None if parameter_set.id is None else _rename(parameter_set.id, label)
        return pytest.param(*mirrored, marks=parameter_set.marks, id=new_id)
    return tuple(mirrored) if isinstance(row, tuple) else mirrored[0]


def _has_reference(row) -> bool:
    values, _ = _values(row)
    return any(value is _CLASSES[REFERENCE] for value in values)


def _conv1d_rows(module, values: list) -> list:
    """Rows on the transformers-Conv1D model for FourierFT and ours, for a TEST_CASES-shaped list
    ((name, model_id, config_cls, kwargs) rows) that has other methods' rows on that model but no FourierFT one."""
    rows = [_values(r)[0] for r in values]
    shaped = [r for r in rows if len(r) == 4 and isinstance(r[1], str) and isinstance(r[3], dict)]
    if not shaped or len(shaped) != len(rows):
        return []
    on_conv1d = [r for r in shaped if r[1] == CONV1D_MODEL_ID and r[3].get("target_modules") == [CONV1D_TARGET]]
    if not on_conv1d or any(r[1] == CONV1D_MODEL_ID and r[2] is _CLASSES[REFERENCE] for r in shaped):
        return []
    # FourierFT needs n_frequency <= in * out: a small value that fits this model's Conv1D
    base = module.MockTransformerWrapper.from_pretrained(CONV1D_MODEL_ID)
    n_weights = base.get_submodule(CONV1D_TARGET).weight.numel()
    kwargs = {"n_frequency": max(1, min(10, n_weights - 1)), "target_modules": [CONV1D_TARGET], "init_weights": True}
    # named like the other methods' Conv1D rows ("Embedding + transformers Conv1D 1 VeRA")
    reference = (f"Embedding + transformers Conv1D 1 {REFERENCE}", CONV1D_MODEL_ID, _CLASSES[REFERENCE], kwargs)
    return [reference] + [_mirror(reference, label) for label in OURS]


def _extend(module) -> None:
    ours = {_CLASSES[label] for label in OURS}
    for owner, values in _parametrize_lists(module):
        if any(isinstance(v, _CLASSES[REFERENCE]) for row in values for v in _values(row)[0]):
            # rows holding ready-made FourierFTConfig objects (not the class) are not mirrored: say so
            list_name = next((n for n, v in vars(module).items() if v is values), None)
            _LISTS.append(f"not extended: {list_name or 'inline list of ' + owner}: holds FourierFTConfig objects")
        reference_rows = [row for row in values if _has_reference(row)]
        if not reference_rows or any(v in ours for row in values for v in _values(row)[0] if isinstance(v, type)):
            continue  # no FourierFT row, or already extended
        note = ""
        extra = _conv1d_rows(module, values)
        if extra:
            values.append(extra[0])  # the stock FourierFT Conv1D row, the reference for ours
            reference_rows.append(extra[0])
            _ADDED[REFERENCE] = _ADDED.get(REFERENCE, 0) + 1
            note = f" (incl. the added {CONV1D_MODEL_ID} row)"
        for label in OURS:
            values.extend(_mirror(row, label) for row in reference_rows)
            _ADDED[label] = _ADDED.get(label, 0) + len(reference_rows)
        list_name = next((n for n, v in vars(module).items() if v is values), None)
        _LISTS.append(f"extended {list_name or 'inline list of ' + owner}: {len(reference_rows)} FourierFT rows{note}, "
                      f"+{len(reference_rows)} rows for each of {', '.join(OURS)}")


def _check_marks_see_rows(module) -> None:
    """The parametrize marks hold the same list objects that were extended (so the rows are collected)."""
    for owner, values in _parametrize_lists(module):
        if any(_has_reference(row) for row in values):
            labels = {label for label in OURS for row in values if _CLASSES[label] in _values(row)[0]}
            if labels != set(OURS):
                raise pytest.UsageError(f"peft-matrix: the parametrize list of {owner} was not extended")


def pytest_configure(config):
    root = config.getoption("peft_tests_root")
    if root is None:
        return
    config._peft_matrix_active = True
    root = str(Path(root).resolve())
    tests_dir = Path(root) / "tests"
    if not (tests_dir / "__init__.py").is_file() or not (tests_dir / "test_custom_models.py").is_file():
        raise pytest.UsageError(f"peft-matrix: {tests_dir} is not a PEFT tests package")
    # exactly what the "prepend" import mode does before importing tests/test_custom_models.py
    if sys.path[0] != root:
        sys.path.insert(0, root)
    for name in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        # a `tests` package from elsewhere (e.g. this repository's) would shadow PEFT's
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(root):
            raise pytest.UsageError(f"peft-matrix: module {name!r} was already imported from elsewhere")
    _install_stubs()

    import peft
    import spectral_peft  # registers the three methods with PEFT

    _CLASSES.update({REFERENCE: peft.FourierFTConfig, "LoCA": spectral_peft.LocaConfig,
                     "S2FT": spectral_peft.S2FTConfig, "FastFourierFT": spectral_peft.FastFourierFTConfig})
    module = importlib.import_module(MODULE)
    if not Path(module.__file__).resolve().samefile(tests_dir / "test_custom_models.py"):
        raise pytest.UsageError(f"peft-matrix: {MODULE} was imported from {module.__file__}")
    _extend(module)
    _check_marks_see_rows(module)
    config._peft_matrix_module = module


# --------------------------------------------------------------------------------------------------------------
# collection and outcomes


def _method_of(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for value in callspec.params.values():
        for label, cls in _CLASSES.items():
            if value is cls:
                return label
    return None


def _id_part(value) -> str | None:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    if type(value).__module__ == "torch":
        return str(value)
    return None  # dicts and other unnamed values: left out (they follow from the row's name)


def _canonical(value) -> str:
    """The parameter as the stock FourierFT counterpart of this test has it."""
    if isinstance(value, type):
        return REFERENCE + "Config" if value in _CLASSES.values() else value.__name__
    if isinstance(value, str):
        return _CANONICAL.get(value, value)
    return repr(value)


def pytest_collection_modifyitems(session, config, items):
    if not getattr(config, "_peft_matrix_active", False):
        return
    module = config._peft_matrix_module
    collected = {getattr(item, "module", None) for item in items if item.nodeid.startswith("tests/test_custom_models.py")}
    if collected and collected != {module}:
        # pytest imported its own copy instead of reusing the extended one from sys.modules
        raise pytest.UsageError("peft-matrix: pytest collected a different test_custom_models module object")
    for item in items:
        method = _method_of(item)
        if method is None:
            continue
        base = item.nodeid.split("::", 1)[1].split("[", 1)[0]
        params = item.callspec.params
        key = base + "[" + "|".join(f"{k}={_canonical(v)}" for k, v in sorted(params.items())) + "]"
        parts = [p for p in (_id_part(v) for v in params.values()) if p is not None]
        _ITEMS[item.nodeid] = {"method": method, "key": key, "stable_id": f"{base}[{'-'.join(parts)}]"}


def _first_line(report) -> str:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        text = crash.message
    elif isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = str(longrepr[2])
    else:
        text = str(longrepr)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


_ORIGINS: dict[tuple[str, str], str] = {}  # (nodeid, phase) -> where its exception was raised


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Note where a failure was raised: the innermost frame in spectral_peft, else in peft, else PEFT's test code
    (the line, for a failed assert). Read from the exception itself, so it does not depend on --tb."""
    if call.excinfo is None or item.nodeid not in _ITEMS:
        return None
    frames = [(Path(str(entry.path)).as_posix(), entry.lineno + 1) for entry in call.excinfo.traceback]
    origin = "test code"
    if call.excinfo.errisinstance(AssertionError):
        # a failed check of PEFT's: where it is tells which one
        checks = [(p.rsplit("/tests/", 1)[1], n) for p, n in frames if "/tests/" in p]
        if checks:
            origin = f"tests/{checks[-1][0]}:{checks[-1][1]}"
    for package in ("spectral_peft", "peft"):
        marker = f"/{package}/"
        inside = [(p.split(marker, 1)[1], n) for p, n in frames if marker in p and "/tests/" not in p.split(marker, 1)[1]]
        if inside:
            origin = f"{package}/{inside[-1][0]}:{inside[-1][1]}"
            break
    _ORIGINS[(item.nodeid, call.when)] = origin
    return None


def pytest_runtest_logreport(report):
    if report.nodeid not in _ITEMS:
        return
    entry = _RESULTS.setdefault(report.nodeid, {"outcome": None, "message": ""})
    if hasattr(report, "wasxfail"):
        outcome = "xpassed" if report.passed else "xfailed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    elif report.passed and report.when == "call":
        outcome = "passed"
    else:
        return
    # the worst phase wins (a teardown error after a pass is an error)
    rank = {None: 0, "passed": 1, "skipped": 2, "xfailed": 2, "xpassed": 3, "failed": 4, "error": 4}
    if rank[outcome] >= rank[entry["outcome"]]:
        entry["outcome"] = outcome
        entry["when"] = report.when
        if outcome != "passed":
            entry["message"] = _first_line(report)
        if outcome in ("failed", "error"):
            entry["origin"] = _ORIGINS.get((report.nodeid, report.when), "")


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    path = config.getoption("peft_matrix_report")
    if not getattr(config, "_peft_matrix_active", False) or not path:
        return
    tests = []
    for nodeid, info in _ITEMS.items():
        result = _RESULTS.get(nodeid)
        if result is None:
            continue  # deselected
        tests.append({"nodeid": nodeid, **info, **result})
    data = {
        "peft_tests_root": config.getoption("peft_tests_root"),
        "spectral_peft": os.path.dirname(sys.modules["spectral_peft"].__file__),
        "stubs": _STUBS,
        "extended_lists": _LISTS,
        "rows_added": _ADDED,
        "exitstatus": int(exitstatus),
        "tests": tests,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
