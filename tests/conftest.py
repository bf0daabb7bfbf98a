from __future__ import annotations

import pytest
import torch

# Test models are small: one thread does as much as two and does not stall when the
# machine is busy.
THREADS = 1


@pytest.fixture(scope="session", autouse=True)
def _threads_for_the_session():
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
