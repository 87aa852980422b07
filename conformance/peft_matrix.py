"""Run stock PEFT's own custom-model test matrix against LoCA, S2FT and FastFourierFT.

    python conformance/peft_matrix.py [--peft-version V] [--cache DIR] [--report FILE] [pytest args...]

Fetches the source distribution of the installed PEFT version (``pip download --no-binary :all:``), keeps only its
``tests/`` folder in a cache (``.cache/peft-tests/<version>/``, reused on later runs), and runs pytest on
``tests/test_custom_models.py`` with ``conformance/plugin.py``, which adds rows for our three methods mirrored from
PEFT's FourierFT rows (see that file). Only the tests parametrized with FourierFT or one of ours are selected.

Prints, per method, the counts of passed / failed / skipped / xfailed tests, and for each of our methods the tests
it fails where stock FourierFT passes the same test on the same row, grouped by the first line of the error and where
it was raised. Exits 1 when there is such a test that ``conformance/known_differences.txt`` does not list, 0 otherwise
(2 when pytest could not run the matrix at all).

pytest runs in the cache folder (so that ``tests`` is PEFT's package, not this repository's): give paths among the
pytest arguments as absolute paths. ``-k EXPR`` is combined with the selection; PYTHONPATH=some/src runs against
another copy of spectral_peft.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEST_FILE = "tests/test_custom_models.py"
METHODS = ("FourierFT", "LoCA", "S2FT", "FastFourierFT")
OURS = METHODS[1:]
# the tests whose parameters hold one of the four config classes (FastFourierFTConfig contains FourierFTConfig)
SELECT = "FourierFTConfig or LocaConfig or S2FTConfig"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
KNOWN = HERE / "known_differences.txt"


def fetch_tests(version: str, cache: Path) -> Path:
    """``cache/<version>``, holding PEFT's ``tests/`` folder of that version (downloaded and extracted once)."""
    root = cache / version
    tests = root / "tests"
    marker = root / ".complete"
    if marker.is_file() and (tests / "test_custom_models.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"peft-matrix: downloading the source distribution of peft=={version}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"peft=={version}", "-d", tmp],
            check=True,
        )
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith(".tar.gz")]
        if len(archives) != 1:
            raise SystemExit(f"peft-matrix: expected one sdist in {tmp}, found {[p.name for p in archives]}")
        staging = Path(tmp) / "extract"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers()
                       if len(Path(m.name).parts) > 1 and Path(m.name).parts[1] == "tests"
                       and (m.isfile() or m.isdir())]
            if not members:
                raise SystemExit(f"peft-matrix: {archives[0].name} has no tests/ folder")
            archive.extractall(staging, members=members, filter="data")
        (extracted,) = [p / "tests" for p in staging.iterdir() if (p / "tests").is_dir()]
        # the sdist leaves out tests/__init__.py; PEFT's test modules import each other relatively, as a package
        (extracted / "__init__.py").touch()
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        shutil.move(str(extracted), str(tests))
    marker.write_text(f"peft=={version} tests/ from its source distribution\n")
    return root


def known_differences() -> list[tuple[str, str]]:
    """(pattern, reason) pairs from known_differences.txt: ``<test id or glob> | <reason>`` a line, '#' comments."""
    if not KNOWN.is_file():
        return []
    entries = []
    for number, line in enumerate(KNOWN.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition(" | ")
        if not sep or not reason.strip():
            raise SystemExit(f"{KNOWN}:{number}: expected '<test id or glob> | <reason>'")
        entries.append((pattern.strip(), reason.strip()))
    return entries


def matches(pattern: str, test_id: str) -> bool:
    """A test id against a pattern where only * (any text) is special: brackets are literal, as in test ids."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), test_id) is not None


def fourierft_special_cases(root: Path) -> list[str]:
    """Where PEFT's test code names FourierFT outside its imports and parametrization lists (special treatment the
    mirrored rows do not get), one entry per enclosing function."""
    found = []
    matrix = (root / TEST_FILE).read_text()
    for name in ("test_custom_models.py", "testing_common.py", "testing_utils.py"):
        source = (root / "tests" / name).read_text()
        tree = ast.parse(source)
        skip, functions = set(), []
        for node in tree.body:  # imports and module-level lists of rows
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign)):
                skip.update(range(node.lineno, node.end_lineno + 1))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(node)
        hits = defaultdict(list)
        for number, line in enumerate(source.splitlines(), 1):
            if number in skip or not re.search("fourier", line, re.IGNORECASE):
                continue
            inner = [f for f in functions if f.lineno <= number <= f.end_lineno]
            where = min(inner, key=lambda f: f.end_lineno - f.lineno).name if inner else "<module>"
            hits[where].append((number, line.strip()))
        for where, lines in hits.items():
            unused = name != Path(TEST_FILE).name and where not in matrix
            found.append(f"tests/{name}::{where} (line {', '.join(str(n) for n, _ in lines)}): {lines[0][1]}"
                         + ("  [not called by test_custom_models.py]" if unused else ""))
    return found


def pytest_args(user_args: list[str]) -> list[str]:
    """Our -k selection, ANDed with a -k among the user's arguments."""
    args, keyword = [], None
    i = 0
    while i < len(user_args):
        arg = user_args[i]
        if arg in ("-k", "--keyword") and i + 1 < len(user_args):
            keyword, i = user_args[i + 1], i + 2
            continue
        args.append(arg)
        i += 1
    selection = SELECT if keyword is None else f"({SELECT}) and ({keyword})"
    if not any(a == "--tb" or a.startswith("--tb=") for a in args):
        args.append("--tb=line")  # the summary groups the errors; rerun a test with --tb=short to see one
    return ["-k", selection] + args


def summarize(data: dict, known: list[tuple[str, str]]) -> int:
    tests = data["tests"]
    print("\n==== peft-matrix: PEFT's test_custom_models.py, FourierFT rows mirrored ====")
    print(f"spectral_peft from {data['spectral_peft']}")
    if not tests:
        print("no test ran")
        return 0
    counts = {m: dict.fromkeys(OUTCOMES, 0) for m in METHODS}
    by_key = {}
    for test in tests:
        counts[test["method"]][test["outcome"]] += 1
        if test["method"] == "FourierFT":
            by_key[test["key"]] = test
    if data["stubs"]:
        print(f"stubbed (not installed, unused by these tests): {', '.join(data['stubs'])}")
    for line in data["extended_lists"]:
        print(line)
    shown = [o for o in OUTCOMES if any(counts[m][o] for m in METHODS) or o in ("passed", "failed", "skipped", "xfailed")]
    print()
    print(f"{'method':<15}" + "".join(f"{o:>9}" for o in shown) + f"{'total':>8}")
    for method in METHODS:
        print(f"{method:<15}" + "".join(f"{counts[method][o]:>9}" for o in shown) + f"{sum(counts[method].values()):>8}")

    unexplained = 0
    for method in OURS:
        regressions = []
        for test in tests:
            if test["method"] != method or test["outcome"] not in ("failed", "error"):
                continue
            reference = by_key.get(test["key"])
            if reference is None or reference["outcome"] != "passed":
                continue
            reason = next((r for p, r in known if matches(p, test["stable_id"]) or matches(p, test["nodeid"])), None)
            regressions.append((test, reason))
        fresh = [t for t, r in regressions if r is None]
        unexplained += len(fresh)
        print(f"\n---- {method}: {len(regressions)} tests fail where stock FourierFT passes"
              f" ({len(regressions) - len(fresh)} listed in known_differences.txt) ----")
        groups = defaultdict(list)
        for test, reason in regressions:
            groups[(test["message"], test.get("origin", ""), reason)].append(test)
        for (message, origin, reason), members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0][:2])):
            print(f"\n[{len(members)}] {message[:300]}\n    raised in: {origin or '?'}"
                  + (f"\n    known difference: {reason}" if reason else ""))
            for test in sorted(members, key=lambda t: t["stable_id"]):
                print(f"    {test['stable_id']}")
        # not counted, but shown: tests ours skip where FourierFT passes (a PEFT helper may turn an error into a skip)
        skipped = [t for t in tests if t["method"] == method and t["outcome"] == "skipped"
                   and by_key.get(t["key"], {}).get("outcome") == "passed"]
        if skipped:
            print(f"\n  ({len(skipped)} {method} tests skipped where stock FourierFT passes:)")
            for test in sorted(skipped, key=lambda t: t["stable_id"]):
                print(f"    {test['stable_id']}  {test['message'][:200]}")
        # nor these: tests ours fail where FourierFT fails or skips
        other = [t for t in tests if t["method"] == method and t["outcome"] in ("failed", "error")
                 and (by_key.get(t["key"]) is None or by_key[t["key"]]["outcome"] != "passed")]
        if other:
            print(f"\n  ({len(other)} more {method} failures where stock FourierFT also fails, skips or has no row:)")
            for test in sorted(other, key=lambda t: t["stable_id"]):
                ref = by_key.get(test["key"])
                print(f"    {test['stable_id']}  [FourierFT: {ref['outcome'] if ref else 'no row'}]  {test['message']}")
    return unexplained


def main(argv=None) -> int:
    # no abbreviations: pytest's own options (--cache-clear, ...) pass through untouched
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-version", default=None, help="default: the installed peft's version")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "peft-tests",
                        help="where PEFT's tests are kept, one folder a version (default: .cache/peft-tests)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also keep the per-test JSON outcomes here (default: a temporary file)")
    args, rest = parser.parse_known_args(argv)
    version = args.peft_version or importlib.metadata.version("peft")
    installed = importlib.metadata.version("peft")
    if version != installed:
        print(f"peft-matrix: warning: running peft=={version}'s tests against the installed peft=={installed}")
    root = fetch_tests(version, args.cache.resolve())

    for line in fourierft_special_cases(root):
        print(f"peft-matrix: FourierFT special case in PEFT's tests (not applied to our rows): {line}")

    with tempfile.TemporaryDirectory() as tmp:
        report = args.report.resolve() if args.report else Path(tmp) / "report.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
        command = [
            sys.executable, "-m", "pytest", TEST_FILE,
            "-p", "plugin", "-p", "no:cacheprovider",
            "-c", str(HERE / "pytest.ini"), "--rootdir", str(root),
            "--peft-tests-root", str(root), "--peft-matrix-report", str(report),
            *pytest_args(rest),
        ]
        print("peft-matrix: " + " ".join(command[1:]), flush=True)
        start = time.monotonic()
        # run from PEFT's test root: `tests` there is PEFT's tests package, not this repository's
        code = subprocess.run(command, cwd=root, env=env).returncode
        print(f"\npeft-matrix: pytest exited {code} after {time.monotonic() - start:.0f} s")
        if not report.is_file() or code not in (0, 1):
            print("peft-matrix: pytest did not run the matrix (see above)")
            return 2
        data = json.loads(report.read_text())

    unexplained = summarize(data, known_differences())
    if not data["tests"]:
        return code
    if unexplained:
        print(f"\npeft-matrix: FAIL: {unexplained} tests fail for our methods where stock FourierFT passes "
              f"and {KNOWN.name} does not list them")
        return 1
    print("\npeft-matrix: OK: no unlisted test fails for our methods where stock FourierFT passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
