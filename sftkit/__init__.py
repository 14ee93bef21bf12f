"""sftkit: supervised fine-tuning of Qwen3 models with one accelerate loop.

`from sftkit import SFTConfig, SFTTrainer, SFTDataset`. Imports are lazy so that `sftkit --help`
stays instant (torch and transformers take seconds to import).
"""

from sftkit._version import __version__

__all__ = ["SFTConfig", "SFTDataset", "SFTTrainer", "__version__"]


def __getattr__(name: str):
    if name == "SFTConfig":
        from sftkit.config import SFTConfig

        return SFTConfig
    if name == "SFTTrainer":
        from sftkit.api import SFTTrainer

        return SFTTrainer
    if name == "SFTDataset":
        from sftkit.data.dataset import SFTDataset

        return SFTDataset
    raise AttributeError(f"module 'sftkit' has no attribute {name!r}")
