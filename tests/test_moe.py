"""MoE done right: the routers' load-balancing loss (per example, split-invariant, in the gradient,
the model config's weight by default), LoRA on fused and shared experts, merge-lora on fused 3-D
expert weights, and FLOPs that count active parameters and Gated DeltaNet layers. Tiny random-init
models from tests/family.py, the real tokenizer, fp32."""

from __future__ import annotations

import family
import pytest
import torch

from sftkit.errors import ConfigError


# ---- the balance loss -----------------------------------------------------------------------------
def test_balance_loss_is_transformers_per_example_weighted_by_tokens():
    """balance_loss_sum = sum_i T_i * mean over layers of transformers' load_balancing_loss_func on
    example i alone, whether the examples are padded rows or packed into one row; padding and a
    weight-0 row count for nothing."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from sftkit.arch.moe import RouterBalance, balance_loss_sum
    from sftkit.batching import collate

    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (7, 3, 5)]
    balance, layers = RouterBalance(0.001, num_experts=4, top_k=2), 2
    per_example = [torch.randn(layers, len(e["input_ids"]), 4, generator=g) for e in examples]
    want = sum(len(e["input_ids"]) * sum(load_balancing_loss_func((lg,), 4, 2).item() for lg in logits) / layers
               for e, logits in zip(examples, per_example))

    padded = collate([[e] for e in examples] + [[{**examples[0], "weight": 0}]], pad_id=0, packed=False)
    width = padded.keep.shape[1]
    rows = [torch.cat([lg, torch.randn(layers, width - lg.shape[1], 4, generator=g)], 1) for lg in per_example]
    rows.append(torch.randn(layers, width, 4, generator=g))  # the weight-0 row's tokens
    router = tuple(torch.cat([r[layer] for r in rows]) for layer in range(layers))
    got = balance_loss_sum(router, padded.segments, padded.lengths, balance)
    assert padded.lengths.tolist() == [7, 3, 5] and padded.counted_tokens == 15
    assert got.item() == pytest.approx(want, rel=1e-6)

    packed = collate([examples], pad_id=0, packed=True)
    router = tuple(torch.cat([lg[layer] for lg in per_example]) for layer in range(layers))
    assert balance_loss_sum(router, packed.segments, packed.lengths, balance).item() == pytest.approx(want, rel=1e-6)


def _one_step(model, data, out, **options):
    """One train_step in this process; returns (run, its StepStats, weights after the step)."""
    from sftkit.config import SFTConfig
    from sftkit.train import setup, step_batches, train_step

    run = setup(SFTConfig(model_name_or_path=str(model), data_path=[str(data)], output_dir=str(out), max_steps=1,
                          save_steps=0, max_length=512, learning_rate=1, adam_epsilon=1, warmup_ratio=0, seed=7,
                          dataloader_num_workers=0, **options))
    run.model.train()
    stats = train_step(run, step_batches(run)[0])
    return run, stats, {n: p.detach().clone() for n, p in run.model.named_parameters()}


def test_aux_loss_is_split_invariant_and_in_the_gradient(family_model, four, tmp_path):
    """One step of 4 examples as 1 x 4 and 4 x 1 micro-batches: the same aux_loss (rel 1e-6) and the
    same weights (rtol 1e-5, adam_epsilon 1 as in test_train_step). Weighted 1 (not the config's
    0.001, whose share of the update is below this test's resolution), the routers move by far
    more than the split's round-off than with --router_aux_loss_coef 0, which has no aux_loss."""
    model = family_model("qwen3_moe")
    run, whole, want = _one_step(model, four, tmp_path / "whole", per_device_train_batch_size=4,
                                 router_aux_loss_coef=1.0)
    assert run.balance.coef == 1.0 and whole.routed == sum(run.train_set["length"])
    _, split, got = _one_step(model, four, tmp_path / "split", per_device_train_batch_size=1,
                              gradient_accumulation_steps=4, router_aux_loss_coef=1.0)
    loss, aux = whole.losses(run.accelerator)
    assert 1.0 < aux < 4.0  # top-2 of 4 experts: 2 when perfectly balanced, 4 when collapsed onto two
    assert split.losses(run.accelerator) == pytest.approx((loss, aux), rel=1e-6)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    off_run, off, without = _one_step(model, four, tmp_path / "off", per_device_train_batch_size=4,
                                      router_aux_loss_coef=0.0)
    assert off_run.balance is None and off.losses(off_run.accelerator)[0] == pytest.approx(loss, rel=1e-6)
    routers = [n for n in want if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    split_noise = max((got[n] - want[n]).abs().max().item() for n in routers)
    aux_effect = min((without[n] - want[n]).abs().max().item() for n in routers)
    assert aux_effect > 100 * max(split_noise, 1e-7), (aux_effect, split_noise)


def test_router_aux_loss_coef_options(family_model):
    from transformers import AutoConfig

    from sftkit.arch.moe import router_balance
    from sftkit.config import SFTConfig

    moe = AutoConfig.from_pretrained(family_model("qwen3_moe"))
    assert router_balance(moe, -1).coef == 0.001 and router_balance(moe, 0.02).coef == 0.02
    assert router_balance(moe, 0) is None
    dense = AutoConfig.for_model("qwen3", **family.text_config("qwen3"))
    assert router_balance(dense, -1) is None
    with pytest.raises(ConfigError, match="no routed experts"):
        router_balance(dense, 0.01)
    with pytest.raises(ConfigError, match="router_aux_loss_coef must be at least 0"):
        SFTConfig(router_aux_loss_coef=-0.5).validate()


def test_moe_loss_paths_and_checkpointing_agree(family_model, tok):
    """The fused loss head (now on Qwen3 MoE) and gradient checkpointing give the plain path's token
    loss, balance loss and router gradients: the router logits recorded in a checkpointed layer
    stay in the graph, and its recompute in the backward records nothing twice."""
    from sftkit.arch.moe import router_balance
    from sftkit.batching import collate
    from sftkit.loss import fused_head, loss_sums
    from sftkit.models import load_model

    ids = [tok(t)["input_ids"] for t in ("The experts route tokens.", "Two plus two is four, said the model.")]
    batch = collate([[{"input_ids": i, "labels": i}] for i in ids], tok.pad_token_id, packed=False)
    model = load_model(str(family_model("qwen3_moe"))).train()
    balance = router_balance(model.config, -1)

    def step(head):
        model.zero_grad()
        ce, aux = loss_sums(model, batch, head, balance)
        (ce + aux).backward()
        return ce.item(), aux.item(), model.model.layers[0].mlp.gate.weight.grad.clone()

    plain = step(None)
    head = fused_head(model, "no", zero3=False, chunk=8)
    assert head is not None
    fused = step(head)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = step(head)
    for got in (fused, checkpointed):
        assert got[:2] == pytest.approx(plain[:2], rel=1e-5)
        # round-off of the fused head's other summation order: 7e-6 to 1.5e-5 where the largest entry is 1.9
        assert (got[2] - plain[2]).abs().max() <= 1e-4 * plain[2].abs().max()


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_moe"])
def test_hybrid_moe_routers_are_all_seen_and_split_free(family_model, tok, kind):
    """The hybrid MoE models (their Gated DeltaNet layers in transformers' torch fallback) return
    one router per layer, and two examples as one padded micro-batch or as two give the same sum."""
    from sftkit.arch.moe import router_balance
    from sftkit.batching import collate
    from sftkit.loss import loss_sums
    from sftkit.models import load_model

    examples = [{"input_ids": i, "labels": i} for i in (tok(t)["input_ids"] for t in ("Route me.", "And me, twice."))]
    model = load_model(str(family_model(kind))).eval()
    balance = router_balance(model.config, -1)
    assert balance.coef == 0.001 and (balance.num_experts, balance.top_k) == (4, 2)
    with torch.no_grad():
        both = collate([[e] for e in examples], tok.pad_token_id, packed=False)
        out = model(**both.inputs, use_cache=False, output_router_logits=True)
        assert len(out.router_logits) == model.config.get_text_config().num_hidden_layers
        _, together = loss_sums(model, both, None, balance)
        apart = sum(loss_sums(model, collate([[e]], tok.pad_token_id, packed=False), None, balance)[1] for e in examples)
    assert together.item() == pytest.approx(apart.item(), rel=1e-5)
    assert 1.0 < together.item() / both.counted_tokens < 4.0  # 2 when balanced, 4 when collapsed


# ---- LoRA on experts --------------------------------------------------------------------------------
def _lora(path, **options):
    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training, experts_note, lora_dropout

    cfg = SFTConfig(model_name_or_path=str(path), use_lora=True, **options)
    cfg.validate()
    model = build_for_training(cfg)
    wrapped = {n.split(".lora_A")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_A" in n}
    return model, wrapped, experts_note(cfg, model.config), lora_dropout(cfg, model.config)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_default_lora_reaches_routed_and_shared_experts(family_model, kind):
    """Default LoRA: every MoE layer's fused gate_up_proj and down_proj, and the shared expert, get
    LoRA weights, with dropout 0 (PEFT applies none to a parameter), said in one line. A dropout set
    above 0: LoRA builds (Qwen3-Next's exited 2: PEFT turned its MLP names into expert
    ParamWrappers, which refuse dropout), leaves the experts frozen and says how to train them."""
    model, wrapped, note, dropout = _lora(family_model(kind))
    layers = model.config.get_text_config().num_hidden_layers
    experts = {n for n in wrapped if ".mlp.experts" in n}
    assert len(experts) == 2 * layers, sorted(experts)  # nested: down_proj wraps gate_up_proj
    shared = {n for n in wrapped if "shared_expert." in n}
    assert len(shared) == (0 if kind == "qwen3_moe" else 3 * layers), sorted(shared)
    assert dropout == 0.0 and "adapts the experts" in note and "--lora_target_parameters none" in note
    _, wrapped, note, dropout = _lora(family_model(kind), lora_dropout=0.05)
    assert not any("experts" in n for n in wrapped) and "leave --lora_dropout unset" in note and dropout == 0.05
    _, wrapped, note, dropout = _lora(family_model(kind), lora_target_parameters=["none"])
    assert not any("experts" in n for n in wrapped) and note is None and dropout == 0.05
    if kind == "qwen3_moe":  # PEFT has no DoRA for a parameter: DoRA on the attention, experts frozen, said
        _, wrapped, note, dropout = _lora(family_model(kind), use_dora=True)
        assert not any("experts" in n for n in wrapped) and "DoRA leaves the experts" in note and dropout == 0.05


def test_default_lora_dropout_on_a_dense_model(family_model):
    """No expert parameter to reach: the dropout default is 0.05, and nothing is said."""
    _, wrapped, note, dropout = _lora(family_model("qwen3_5"))
    assert dropout == 0.05 and note is None and {n.rsplit(".", 1)[-1] for n in wrapped} >= {"q_proj", "gate_proj"}


def test_lora_on_experts_with_dropout_is_one_line_naming_the_fix(family_model):
    from sftkit.config import SFTConfig

    with pytest.raises(ConfigError, match="add --lora_dropout 0"):
        SFTConfig(use_lora=True, lora_target_parameters=["mlp.experts.down_proj"], lora_dropout=0.05).validate()
    with pytest.raises(ConfigError, match="pass --lora_dropout 0"):
        _lora(family_model("qwen3_moe"), lora_target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
              lora_dropout=0.05)
    with pytest.raises(ConfigError, match="drop --use_dora or --lora_target_parameters"):
        _lora(family_model("qwen3_moe"), lora_target_parameters=["mlp.experts.down_proj"], use_dora=True)


# ---- the whole chain ----------------------------------------------------------------------------------
# ---- FLOPs ----------------------------------------------------------------------------------------------
def _census(kind: str) -> int:
    """Matmul parameters one token passes through, from the shapes of the real modules (built on
    the meta device): every Linear and conv1d weight of the decoder, the experts' fused tensors
    times top_k / num_experts, the routers whole."""
    import transformers

    text = transformers.AutoConfig.for_model(kind if kind in ("qwen3", "qwen3_moe", "qwen3_next") else f"{kind}_text",
                                             **family.text_config(kind))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(text)
    share = getattr(text, "num_experts_per_tok", 0) / getattr(text, "num_experts", 1)
    total = 0
    for name, p in model.model.layers.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            total += p.numel() * share
        elif name.endswith("mlp.gate.weight") or (name.endswith("weight") and p.dim() >= 2):
            total += p.numel()
    return round(total)


@pytest.mark.parametrize("kind", family.KINDS)
def test_flops_count_active_parameters_and_linear_attention(kind):
    """flops.token_cost against a census of each tiny model's real parameters, and the hand count of
    the recurrence (4 x key_dim x value_dim per value head per token) and of the attention width
    (heads x head_dim on full-attention layers only), from the config values."""
    import transformers

    from sftkit.arch.flops import flops_per_step_fn, token_cost

    c = family.text_config(kind)
    config = transformers.AutoConfig.for_model(kind, **({"text_config": c} if kind.startswith("qwen3_5") else c))
    cost = token_cost(config)
    linear = c.get("layer_types", []).count("linear_attention")
    assert cost.weights == _census(kind)
    assert cost.recurrence == linear * 4 * c.get("linear_num_value_heads", 0) * 16 * 16
    assert cost.attention_width == (c["num_hidden_layers"] - linear) * c["num_attention_heads"] * c["head_dim"]
    full, lora = flops_per_step_fn(config, lora=False), flops_per_step_fn(config, lora=True)
    head = c["vocab_size"] * c["hidden_size"]
    want = 6 * (cost.weights * 100 + head * 40) + 3 * (2 * cost.attention_width * 5000 + 2 * cost.recurrence * 100)
    assert full(100, 40, 5000) == pytest.approx(want)
    assert lora(100, 40, 5000) < full(100, 40, 5000)
