"""Suite-wide pytest hooks.

CPython 3.11 (CI's interpreter) keeps the AST constructor's recursion counter in per-interpreter
state, so an `ast.parse` that runs while another one is in flight (another thread, or a GC
finalizer that formats a traceback: 3.11's traceback module parses source for its caret marks)
makes the outer one raise `SystemError: AST constructor recursion depth mismatch`
(python/cpython#106905). pytest parses the failing test's source to render its traceback, and
Ray's driver threads format tracebacks of their own, so a failing (or xfail) test under
tests/serve could turn into an INTERNALERROR that ended the whole run (stop 21's CI: 105 tests,
then nothing). Rendering is retried, and if it fails again the report carries a plain,
source-free traceback: the test's outcome is never changed, only how its failure is printed.
"""
from __future__ import annotations

import pytest
from _pytest.reports import TestReport

AST_RACE = "AST constructor recursion depth mismatch"


def plain_longrepr(call) -> str:
    """The failure without reading any source: file:line per frame, then the exception."""
    excinfo = call.excinfo
    frames = [f"{entry.path}:{entry.lineno + 1}: in {entry.name}" for entry in excinfo.traceback]
    return "\n".join([*frames, f"{excinfo.typename}: {excinfo.value}",
                      f"(traceback source not shown: {AST_RACE}, a CPython 3.11 bug)"])


@pytest.hookimpl(wrapper=True, trylast=True)  # innermost wrapper: skipping's xfail handling sees our report
def pytest_runtest_makereport(item, call):
    try:
        return (yield)
    except SystemError as e:
        if AST_RACE not in str(e):
            raise
    try:
        return TestReport.from_item_and_call(item, call)
    except SystemError as e:
        if AST_RACE not in str(e):
            raise
    return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed", plain_longrepr(call),
                      call.when, list(item._report_sections), call.duration, call.start, call.stop,
                      user_properties=item.user_properties)
