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
