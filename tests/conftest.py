import pytest
import torch

# The offline environment, the docs-snippet plugin and the gpu-marker hook are in the repository's root
# conftest.py, which pytest loads for every test here too.


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global seed, on one intra-op thread (tiny models run faster
    that way and timings do not depend on the machine's load); tests that need more set them."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
