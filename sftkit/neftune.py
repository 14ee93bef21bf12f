"""NEFTune (Jain et al. 2023, arXiv:2310.05914): uniform noise on the input embeddings while
training, scaled by alpha / sqrt(sequence length x hidden size), as TRL and transformers' Trainer
add it. Only in train mode: eval, generation and the saved weights never see it (a forward hook
is not part of the state dict)."""

from __future__ import annotations

import math


def add_neftune(model, alpha: float):
    """Register the noise on `model`'s input embeddings; returns the hook handle, or None when
    alpha is 0 (then nothing is attached and the run is exactly a run without NEFTune)."""
    if alpha <= 0:
        return None
    import torch

    def noisy(module, args, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(-2) * output.size(-1))  # (batch, seq, hidden)
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(noisy)
