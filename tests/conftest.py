"""Shared fixtures."""

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
