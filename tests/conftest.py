"""Shared fixtures."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread. Its matrices are tiny: a second thread gains nothing,
    and on a shared, busy 2-core machine its spin-waiting made the same run 30-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_for_the_suite():
    """The whole suite runs with one intra-op thread: every model here is small, and CI's timings
    (the classic run must finish well under a minute) must not depend on what else the machine runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory):
    """actsparse's cache (the GEMM choice, language models) in a folder of the test session, not the
    user's ``~/.cache/actsparse``; subprocesses inherit it. A test may set its own."""
    before = os.environ.get("ACTSPARSE_CACHE")
    os.environ["ACTSPARSE_CACHE"] = str(tmp_path_factory.mktemp("actsparse-cache"))
    yield
    if before is None:
        os.environ.pop("ACTSPARSE_CACHE", None)
    else:
        os.environ["ACTSPARSE_CACHE"] = before


@pytest.fixture
def chromium() -> Path:
    """Debian's headless Chromium, for the tests that render a page; skipped where it is missing,
    except under CI (``.ci/run`` installs it)."""
    path = Path("/usr/bin/chromium")
    if path.is_file():
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {path} is missing (.ci/run installs Debian's chromium)")
    pytest.skip(f"needs {path} (apt-get install chromium)")
