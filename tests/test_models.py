"""The model a run trains: LoRA options that reach PEFT, NEFTune, a bf16 base under fp32 LoRA weights,
an adapter on a base of another size, and the architectures sequence parallelism refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from sftkit.errors import ConfigError


def test_dora_and_rslora_reach_peft():
    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training

    dora = build_for_training(SFTConfig(use_lora=True, use_dora=True, lora_r=4, lora_alpha=16))
    layer = dora.base_model.model.model.layers[0].self_attn.q_proj
    assert dora.peft_config["default"].use_dora and "default" in layer.lora_magnitude_vector
    assert layer.scaling["default"] == 16 / 4
    rs = build_for_training(SFTConfig(use_lora=True, use_rslora=True, lora_r=4, lora_alpha=16))
    assert rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 16 / 4 ** 0.5


def test_neftune_noise_in_training_only():
    """Noise of at most alpha / sqrt(L x d) on each embedding in train mode, none in eval mode; at
    alpha 0 nothing is attached, and the hook never enters the saved weights."""
    import torch

    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training
    from sftkit.neftune import add_neftune

    model = build_for_training(SFTConfig())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    emb, ids = model.get_input_embeddings(), torch.arange(12).reshape(2, 6)
    plain = emb(ids).detach()
    assert add_neftune(model, 0.0) is None
    model.train()
    assert torch.equal(emb(ids), plain)
    handle = add_neftune(model, 5.0)
    noisy_a, noisy_b = emb(ids).detach(), emb(ids).detach()
    bound = 5.0 / (6 * plain.size(-1)) ** 0.5
    assert not torch.equal(noisy_a, plain) and not torch.equal(noisy_a, noisy_b)
    assert (noisy_a - plain).abs().max() <= bound and (noisy_a - plain).abs().max() > bound / 2
    model.eval()
    assert torch.equal(emb(ids), plain)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    handle.remove()


def lora_step(tmp_path, name: str, **options):
    """setup() a tiny LoRA run, give lora_B seeded values (at init it is 0, which would leave
    lora_A without a gradient), and take one forward and backward of the first micro-batch
    through the run's own model and loss head: (run, loss, trainable grads)."""
    from accelerate.state import AcceleratorState

    from sftkit.config import SFTConfig
    from sftkit.loss import token_loss_sum
    from sftkit.train import setup, step_batches

    AcceleratorState._reset_state(True)  # one process, two precisions: accelerate keeps one state per process
    run = setup(SFTConfig(data_path=[str(ROOT / "data" / "sample_alpaca.json")], output_dir=str(tmp_path / name),
                          use_lora=True, max_steps=1, save_steps=0, max_length=256, per_device_train_batch_size=2,
                          seed=11, **options))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = step_batches(run)[0][0]
    loss = token_loss_sum(run.model, batch, run.head)
    loss.backward()
    return run, loss.item() / batch.targets.numel(), {n: p.grad.clone() for n, p in run.model.named_parameters()
                                                      if p.requires_grad}


def test_bf16_keeps_the_frozen_base_in_bf16_and_trains_in_fp32(tmp_path):
    """With --bf16 every frozen tensor (the tied embedding/lm_head, norms, projections) is bf16 and
    every LoRA tensor fp32; the loss and LoRA gradients match the fp32 run within bf16 round-off:
    loss within 0.1%, each gradient tensor within 8% of its norm (bf16 keeps 8 bits of mantissa,
    ~0.4% per rounding, compounded over 2 layers, a bf16 residual stream and the 151,936-word
    softmax; measured here: 1.4e-5 and at most 3.6%). A base cast wrongly (fp16 overflow, an
    integer type) or a gradient lost is off by far more."""
    run, loss, grads = lora_step(tmp_path, "bf16", bf16=True)
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    trains = {p.dtype for p in run.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trains == {torch.float32}
    assert run.head is not None and run.head.lm_head.weight.dtype == torch.bfloat16  # the fused head, bf16
    _, want_loss, want = lora_step(tmp_path, "fp32")
    assert loss == pytest.approx(want_loss, rel=1e-3)
    assert grads.keys() == want.keys() and len(want) == 28
    for n, g in want.items():
        assert g.norm() > 0 and (grads[n] - g).norm() <= 8e-2 * g.norm(), (n, ((grads[n] - g).norm() / g.norm()).item())


def test_a_mismatch_the_headers_could_not_show_is_one_line_at_load(other_size):
    """Where the base is no local folder (a Hub id), the load itself: torch's 8 lines become one."""
    from transformers import AutoModelForCausalLM

    from sftkit.errors import ConfigError
    from sftkit.models import load_adapter

    _, wide, adapter = other_size
    with pytest.raises(ConfigError) as err:
        load_adapter(AutoModelForCausalLM.from_pretrained(wide), adapter, "Qwen/some-hub-id")
    assert str(err.value) == (f"{adapter} was trained on a base of another size: its model.layers.0."
                              "self_attn.q_proj.lora_A.weight is [4, 64], and the base Qwen/some-hub-id needs [4, 96] "
                              "(and 3 more tensors); pass the base it was trained on")


def test_a_gated_deltanet_hybrid_or_indivisible_heads_are_refused():
    from transformers import AutoConfig, Qwen3Config

    from sftkit.sequence_parallel import check_model

    with pytest.raises(ConfigError, match="Gated DeltaNet layers, whose recurrence runs along the whole sequence"):
        check_model(AutoConfig.for_model("qwen3_next"), 2)
    with pytest.raises(ConfigError, match="must divide the model's 4 attention heads"):
        check_model(Qwen3Config(num_attention_heads=4, num_key_value_heads=2), 3)
    check_model(Qwen3Config(num_attention_heads=4, num_key_value_heads=2), 4)  # kv heads repeated to split
