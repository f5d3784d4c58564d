"""tests/conftest.py's guard against CPython 3.11's AST race (python/cpython#106905) while pytest
renders a failure: an inner pytest run whose report rendering raises that SystemError must still
report its tests (failed stays failed, xfail stays xfailed) and exit 1, not INTERNALERROR (3)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

INNER_CONFTEST = '''
import _pytest.reports
from tests.conftest import pytest_runtest_makereport  # the hook under test

_real = _pytest.reports.TestReport.from_item_and_call.__func__
_calls = {{"n": 0}}

def _racy(cls, item, call):
    if call.excinfo is not None and _calls["n"] < {raises}:
        _calls["n"] += 1
        raise SystemError("AST constructor recursion depth mismatch (before=129, after=181)")
    return _real(cls, item, call)

_pytest.reports.TestReport.from_item_and_call = classmethod(_racy)
'''

INNER_TESTS = '''
import pytest

def test_passes():
    assert True

def test_fails():
    assert 1 == 2, "a real failure"

@pytest.mark.xfail(strict=True, reason="known")
def test_xfails():
    raise ValueError("expected")
'''


@pytest.mark.parametrize("raises", [1, 100], ids=["race-once", "race-always"])
def test_ast_race_in_rendering_keeps_every_outcome(tmp_path, raises):
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST.format(raises=raises))
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfx", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    out = r.stdout + r.stderr
    assert "INTERNALERROR" not in out, out
    assert r.returncode == 1, out
    assert "1 failed, 1 passed, 1 xfailed" in out, out
    assert "a real failure" in out, out
