"""The recipes' model-loading flags: ``--dtype``, ``--device_map``, ``--offload_folder`` and
``--quantization``, checked before any work (one line naming the flag) and passed to
`vlminterp.load`.

``--dtype`` and ``--quantization`` change the numbers a run records, so they key its resume
log (`RESULT_FLAGS`); ``--device_map`` and ``--offload_folder`` only say where the weights
live. Inside `vlminterp.merge` the model is loaded without weights (`weightless`): the merged
run only needs its config, processor and tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from .checks import RecipeError, check_device

DTYPES = ("float32", "float16", "bfloat16", "auto")
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZATIONS = ("8bit", "4bit")
RESULT_FLAGS = ("dtype", "quantization")
PLACEMENT_FLAGS = ("device_map", "offload_folder")  # where weights live: not result flags


def add_load_args(p) -> None:
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the model's weights "
                   "(default, and auto: the checkpoint's; float32 for tiny offline models)")
    p.add_argument("--device_map", default=None, help="spread a checkpoint over devices with "
                   "accelerate instead of --device: auto (every GPU, then CPU RAM, then "
                   "--offload_folder), balanced, balanced_low_0, sequential, a JSON object "
                   "{\"module\": device, ...} (a GPU index, cpu or disk) or a JSON file "
                   "holding one")
    p.add_argument("--offload_folder", type=Path, default=None, help="folder for the weights "
                   "--device_map puts on disk")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help="load the "
                   "checkpoint's linear layers quantized by bitsandbytes (pip install "
                   "'vlminterp[quant]'; a CUDA GPU)")


def is_checkpoint(model_id: str) -> bool:
    """A hub id (``org/name``) or a local folder, not a model built in memory (tiny, zoo)."""
    return "/" in model_id or os.path.isdir(os.path.expanduser(model_id))


def parse_device_map(spec: str | None):
    """``--device_map`` as accelerate takes it: a name, or ``{module: device}`` from inline JSON
    or a JSON file. Raises a one-line `RecipeError`."""
    if spec is None or spec in DEVICE_MAP_NAMES:
        return spec
    flag = f"--device_map {spec!r}"
    text = spec
    if not spec.lstrip().startswith(("{", "[")):  # else a file
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(f"{flag}: expected {', '.join(DEVICE_MAP_NAMES)}, a JSON object "
                              f"or a JSON file ({e.strerror or e})") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise RecipeError(f"{flag}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict) or not value:
        raise RecipeError(f"{flag}: expected a JSON object mapping module names to devices")
    for module, device in value.items():
        if not _placement_ok(device):
            raise RecipeError(f"{flag}: module {module!r}: {device!r} is not a GPU index, "
                              f"'cpu', 'disk' or a torch device such as 'cuda:1'")
    return value


def _placement_ok(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    if not isinstance(device, str):
        return False
    if device == "disk":
        return True
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return False
    return True


def load_kwargs(args) -> dict:
    """``vlminterp.load`` keyword arguments from the loading flags, checked: one line naming
    the flag for a bad value, a flag that cannot work with ``--remote`` or a tiny model, a
    quantization bitsandbytes or the machine cannot do, a GPU the machine does not have.
    ``--dtype auto`` is set to the default it equals (one resume key for both)."""
    from .shards import merging

    if getattr(args, "dtype", None) == "auto":
        args.dtype = None
    given = [f for f in (*RESULT_FLAGS, *PLACEMENT_FLAGS) if getattr(args, f, None) is not None]
    if getattr(args, "remote", False):
        if given:
            raise RecipeError(f"--{given[0]}: the NDIF server places the model and picks its "
                              f"dtype; drop it with --remote")
        return {}
    device_map = parse_device_map(args.device_map)
    quantization = args.quantization
    if (device_map or quantization) and not is_checkpoint(args.model_id):
        flag = "--device_map" if device_map else "--quantization"
        raise RecipeError(f"{flag}: {args.model_id!r} is built in memory (a tiny offline model); "
                          f"device maps and quantization apply to checkpoints (a hub id or a "
                          f"folder saved with save_pretrained)")
    if device_map is not None and args.device is not None:
        raise RecipeError("--device and --device_map: give one (the device map places every "
                          "module itself)")
    if isinstance(device_map, dict) and "disk" in device_map.values() and not args.offload_folder:
        raise RecipeError("--device_map puts modules on 'disk': give --offload_folder DIR")
    if not merging():
        _check_machine(device_map, quantization)
    kwargs = {"dtype": getattr(torch, args.dtype) if args.dtype else None}
    if quantization:
        kwargs["quantization"] = quantization
        if device_map is None:  # bitsandbytes places the weights; keep them on --device
            device_map = {"": check_device(args.device) if not merging() else "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    else:
        kwargs["device"] = "cpu" if merging() else check_device(args.device)
    if args.offload_folder is not None:
        kwargs["offload_folder"] = str(args.offload_folder)
    return kwargs


def _check_machine(device_map, quantization) -> None:
    if quantization:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RecipeError(f"--quantization {quantization}: bitsandbytes is not installed "
                              f"(pip install 'vlminterp[quant]')")
        if not torch.cuda.is_available():
            raise RecipeError(f"--quantization {quantization}: bitsandbytes quantization needs a "
                              f"CUDA GPU; this machine has none")
    if isinstance(device_map, dict):
        for device in set(device_map.values()) - {"disk"}:
            check_device(f"cuda:{device}" if isinstance(device, int) else device, "--device_map")


def load_model(args):
    """`vlminterp.load` of ``args.model_id`` with the loading flags (see `load_kwargs`), each
    failure one line (`vlminterp.checks.load_checked`); inside a merge, `weightless`."""
    from .checks import load_checked
    from .shards import merging

    kwargs = load_kwargs(args)
    if merging():
        return weightless(args.model_id)
    return load_checked(args.model_id, **kwargs)


def weightless(model_id: str):
    """The model's module tree on the meta device (no weights read) with its processor,
    tokenizer and family: enough for layouts, token texts and sizes. Tiny and zoo models are
    built as they are (they are small)."""
    from .checks import load_checked
    from .models import family_of, wrap
    from .models.base import VLM

    class Weightless(VLM):
        """A `VLM` without weights: inputs stay on the CPU."""

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

    if not is_checkpoint(model_id):
        return load_checked(model_id)
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_id))
        model.hf_device_map = {"": "meta"}  # keeps the pipeline nnsight builds from moving it
        vlm = wrap(model.eval(), AutoProcessor.from_pretrained(model_id), model_id,
                   family_of(model_id))
    except Exception as e:  # a missing or unreadable config / processor
        from .checks import describe_load_error

        raise RecipeError(describe_load_error(model_id, e)) from None
    return Weightless(vlm.model, vlm.processor, vlm.family, model_id, torch_model=vlm.torch_model)

