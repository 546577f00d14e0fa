"""The constructions run the chunked operator: thousands of small ops that gain little from a second
thread and slow down many times over when other processes share the cores. One thread keeps these
tests fast and steady; the previous setting is restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
