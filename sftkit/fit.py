"""Does an adapter or a checkpoint fit the base model it is loaded on? A base of another size gives
torch's own error, one line per tensor; here it is one line naming a layer and both shapes.
Shapes are read from the safetensors headers (8 bytes of length, then JSON), so the check costs
milliseconds and comes before torch, peft or any weight loads.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from sftkit.errors import ConfigError

HEADER_MAX = 100 * 2**20  # safetensors caps its own header at 100 MB; a larger length is no header


def tensor_headers(folder: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, safetensors dtype such as "F32") of every tensor in the folder's
    *.safetensors files; {} where none can be read."""
    found: dict[str, tuple[list[int], str]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size)) if size <= HEADER_MAX else {}
        except (OSError, ValueError, struct.error):
            continue  # unreadable: the load that follows names it
        found.update({k: (v["shape"], v.get("dtype", "")) for k, v in header.items()
                      if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list)})
    return found


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    return {name: shape for name, (shape, _) in tensor_headers(folder).items()}


def _base_key(name: str, base: dict[str, list[int]]) -> str | None:
    """The base's tensor behind an adapter tensor's module, as the base's files name it: a Qwen3.5
    base is saved as a vision-language model (model.language_model.*), the adapter names the text model."""
    for key in (name, name.replace("model.", "model.language_model.", 1)):
        if key in base:
            return key
    return None


def expected_shapes(adapter_name: str, shape: list[int], base: dict[str, list[int]]) -> tuple[str, list[int]] | None:
    """(the base tensor, the shape the adapter tensor must have on it) for one adapter tensor;
    None where the base holds nothing to compare with (a DoRA magnitude, an expert parameter)."""
    name = adapter_name.removeprefix("base_model.model.")
    for suffix, dims in ((".lora_A.weight", "in"), (".lora_B.weight", "out"),
                         (".lora_embedding_A", "rows"), (".lora_embedding_B", "cols")):
        if name.endswith(suffix):
            key = _base_key(name.removesuffix(suffix) + ".weight", base)
            if key is None or len(base[key]) != 2 or len(shape) != 2:
                return None
            out, inp = base[key]
            want = {"in": [shape[0], inp], "out": [out, shape[1]],
                    "rows": [shape[0], out], "cols": [inp, shape[1]]}[dims]
            return key, want
    if "lora_" in name:
        return None
    key = _base_key(name.replace(".base_layer.", "."), base)  # a module saved whole (modules_to_save)
    return (key, base[key]) if key else None


def check_adapter_fits(adapter: Path, base_name: str) -> None:
    """The adapter's tensors fit the local base `base_name`; a base of another size is one line.
    Nothing is checked where either side is not local safetensors (a Hub id): the load then
    catches it (mismatch_error)."""
    theirs, base = tensor_shapes(adapter), tensor_shapes(Path(base_name))
    if not base:
        return
    for name in sorted(theirs):
        found = expected_shapes(name, theirs[name], base)
        if found and found[1] != theirs[name]:
            raise ConfigError(_line(adapter, base_name, name, theirs[name], found[1], base, found[0]))


def check_checkpoint_fits(model_dir: Path, base_name: str) -> None:
    """A checkpoint's model (an adapter, or a full fine-tune's whole model) fits the base a resume
    loads: a full model's tensors have the base's shapes, name for name."""
    if (Path(model_dir) / "adapter_config.json").is_file():
        check_adapter_fits(model_dir, base_name)
        return
    theirs, base = tensor_shapes(model_dir), tensor_shapes(Path(base_name))
    for name in sorted(set(theirs) & set(base)):
        if theirs[name] != base[name]:
            raise ConfigError(_line(model_dir, base_name, name, theirs[name], base[name]))


def _line(adapter, base_name, name, theirs, want, base=None, key=None) -> str:
    layer = name.removeprefix("base_model.model.")
    had = f" ({key} {list(base[key])})" if base and key else ""
    return (f"{adapter} was trained on a base of another size: its {layer} is {list(theirs)}, and the base "
            f"{base_name} needs {list(want)}{had}; pass the base it was trained on")


_MISMATCH = re.compile(r"size mismatch for (\S+?):? copying a param with shape torch\.Size\((\[[^]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^]]*\])\)")


def mismatch_error(err: Exception, source, base_name: str) -> ConfigError | None:
    """torch's size-mismatch RuntimeError (one line per tensor) as one line naming the first tensor,
    both shapes and how many more differ; None for any other error."""
    found = _MISMATCH.findall(str(err))
    if not found:
        return None
    name, theirs, ours = found[0]
    more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
    line = _line(source, base_name, name.replace(".default", ""), json.loads(theirs), json.loads(ours))
    return ConfigError(line.replace("; pass the base", f"{more}; pass the base"))
