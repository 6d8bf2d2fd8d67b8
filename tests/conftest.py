import os

# Hold CPU kernels to the AVX2 paths the oracle previews were made with (read when torch loads).
from pipelines.common.cpu_profile import CPU_PROFILES

for _key, _value in CPU_PROFILES["avx2"].items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

from fixtures import ORACLE_DIR  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def oracle_dir():
    return ORACLE_DIR


@pytest.fixture
def run_ranks_in_threads():
    """``run(world, work)``: ``work(rank, gather)`` in ``world`` threads, ``gather`` an all-gather of dicts between
    them (as ``check.py`` merges every rank's scores under torchrun); returns each rank's result."""
    import threading

    def run(world: int, work) -> list:
        slots: list = [None] * world
        results: list = [None] * world
        barrier = threading.Barrier(world)

        def gather_for(rank):
            def gather(mine: dict) -> dict:
                slots[rank] = dict(mine)
                barrier.wait()
                merged = {k: v for part in slots for k, v in part.items()}
                barrier.wait()
                return merged

            return gather

        def target(rank):
            results[rank] = work(rank, gather_for(rank))

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return results

    return run
