"""Fixtures shared by the suite."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the models are tiny and the machine shared (a second thread only adds contention,
    and an OpenMP pool a parent started must not be touched by forked writers); subprocesses then compute bit for bit
    what this process computes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
