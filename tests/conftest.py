"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the whole suite (restored after).

    Tests share a 2-core machine with other work; two OpenMP threads on an oversubscribed
    CPU spin-wait and were measured up to 10-100x slower than one. One thread also makes
    results independent of the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
