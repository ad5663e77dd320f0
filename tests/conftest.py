"""Shared fixtures: tiny offline models (built once per session) and synthetic inputs."""

import os
import warnings

# Tests never reach a model hub: fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# vlminterp first: importing nnsight before beartype's import hook has seen vlminterp breaks
# beartype 0.23 ("unhashable type: 'instancemethod'") in a test file run on its own.
import vlminterp  # noqa: F401,E402

warnings.filterwarnings("ignore", message=".*per-frame pixel cap.*")

from support import HF_FAMILIES, tiny  # noqa: E402


@pytest.fixture(params=HF_FAMILIES)
def hf_vlm(request):
    return tiny(request.param)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Recipes set torch to one thread; every test leaves the count as it found it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: OpenMP's barriers cost more than they
    save on 2 shared cores); `_restore_threads` puts the count back."""
    import torch

    torch.set_num_threads(1)
