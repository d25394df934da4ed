import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The PDE tests solve many small systems: one thread avoids oversubscribing shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
