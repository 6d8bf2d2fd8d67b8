import os

# Hold CPU kernels to the AVX2 paths the oracle previews were made with (read when torch loads).
from pipelines.omnigen2.cpu_profile import CPU_PROFILES

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
