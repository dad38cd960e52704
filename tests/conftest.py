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
