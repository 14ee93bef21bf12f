"""The Python API: `SFTTrainer(config).train()` runs the same loop as `sftkit train`."""

from __future__ import annotations

from pathlib import Path

from sftkit.config import SFTConfig
from sftkit.errors import ConfigError


class SFTTrainer:
    """Thin handle on one run: the config in, the summary and eval results out."""

    def __init__(self, config: SFTConfig):
        config.validate()
        self.config = config

    def train(self) -> dict:
        """Train; returns the run summary (the last line of metrics.jsonl)."""
        from sftkit.prechecks import check_train
        from sftkit.train import run

        check_train(self.config)
        return run(self.config)

    def evaluate(self, data_path: str | None = None, model: str | None = None) -> dict:
        """Loss and perplexity of `model` (default: this run's final/) on `data_path`
        (default: eval_data_path)."""
        from sftkit.commands import eval_command

        data = data_path or self.config.eval_data_path
        if not data:
            raise ConfigError("evaluate() needs data: pass data_path= or set eval_data_path in the config")
        target = model or str(Path(self.config.output_dir) / "final")
        cfg = SFTConfig(**{**self.config.to_dict(), "data_path": [data]})
        return eval_command(target, cfg, None)  # loss and perplexity only: no generation options
