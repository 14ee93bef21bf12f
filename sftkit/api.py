"""The Python API: `SFTTrainer(config).train()` runs the same loop as `sftkit train`."""

from __future__ import annotations

from pathlib import Path

from sftkit.config import SFTConfig
from sftkit.errors import ConfigError


class SFTTrainer:
    """Thin handle on one run: the config in, the summary and eval results out. As quiet as the
    CLI: the expected third-party lines (sftkit/quiet.py) are dropped from the first train() or
    evaluate() on, for this process; `verbose=True` keeps everything, as `--verbose` does."""

    def __init__(self, config: SFTConfig, verbose: bool = False):
        config.validate()
        self.config, self.verbose = config, verbose

    def _quiet(self) -> None:
        if not self.verbose:
            from sftkit.quiet import quiet_third_party

            quiet_third_party()

    def train(self) -> dict:
        """Train; returns the run summary (the last line of metrics.jsonl)."""
        from sftkit.prechecks import check_train
        from sftkit.train import run

        check_train(self.config)
        self._quiet()
        return run(self.config)

    def evaluate(self, data_path: str | None = None, model: str | None = None) -> dict:
        """Loss and perplexity of `model` (default: this run's final/) on `data_path`
        (default: eval_data_path)."""
        from sftkit.checkpoint import FINAL_DIR
        from sftkit.commands import eval_command

        data = data_path or self.config.eval_data_path
        if not data:
            raise ConfigError("evaluate() needs data: pass data_path= or set eval_data_path in the config")
        target = model or str(Path(self.config.output_dir) / FINAL_DIR)
        cfg = SFTConfig(**{**self.config.to_dict(), "data_path": [data]})
        self._quiet()
        return eval_command(target, cfg, None)  # loss and perplexity only: no generation options
