"""Server side only: an ndif model actor that serves a model from CPU memory.

ndif 0.1.2 places a model only on a node that reports a GPU, and its stock actor calls CUDA
when loading, measuring and cleaning up. On a machine without a GPU, `serve` starts Ray with a
declared (fake) GPU and deploys models with this actor, which loads the weights on CPU and turns
the CUDA bookkeeping calls into no-ops. Imported only inside the server's Ray workers (it needs
``ndif``, which lives in the server venv).
"""

from __future__ import annotations

# Import these before replacing CUDA functions, or torch registers its objects twice
# ("Duplicate torch object") when they are imported later in the same process.
import torch
import torch._dynamo  # noqa: F401
import transformers.pipelines  # noqa: F401

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel


class _DeviceProperties:
    total_memory = 1 << 40
    name = "cpu"


def _cpu_only_cuda() -> None:
    """Make the CUDA calls ndif's actor makes harmless when the node has no GPU."""
    if torch.cuda.is_available():
        return
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "set_device",
                 "set_per_process_memory_fraction"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated", "max_memory_reserved",
                 "memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.get_device_properties = lambda *a, **k: _DeviceProperties()


class CPUModelDeployment(BaseModelDeployment):
    """`BaseModelDeployment` with the weights on CPU; never parked to a cache."""

    CACHEABLE = False

    def __init__(self, *args, **kwargs):
        _cpu_only_cuda()
        super().__init__(*args, **kwargs)

    def load_from_disk(self) -> HuggingFaceModel:
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True,
                                                dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False)
        return model


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(CPUModelDeployment)
