"""FS-Merge tests run their tiny models on one thread: on the shared 2-core CI box, two intra-op threads
competing with other processes made a 12-wide ViT step 528 ms instead of 11 ms (measured)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
