"""The LoRA adapter and the quantised towers in pieces: the merge's arithmetic, the peft adapter files read back by
peft itself, quantised layers against their float originals, and the refusals that need no run."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from blip2_train.utils.errors import ConfigError


@pytest.fixture
def llama(tiny_llms):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llms["llama"])).eval()


def test_merge_equals_the_adapted_model_and_the_lora_formula(llama):
    from blip2_train.models.adapters import apply_adapter, has_adapter, is_adapter_param, merge_adapter

    base = copy.deepcopy(llama)
    apply_adapter(llama, {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    assert has_adapter(llama) and llama.blip2_adapter["r"] == 4
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in llama.named_parameters():
            if is_adapter_param(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(0, 100, (2, 7), generator=g)
    adapted = llama(input_ids=ids).logits
    a = llama.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    b = llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    expected = base.model.layers[0].self_attn.q_proj.weight + (8 / 4) * b @ a
    merge_adapter(llama)
    assert not has_adapter(llama) and type(llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(llama.model.layers[0].self_attn.q_proj.weight, expected)
    torch.testing.assert_close(llama(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert llama.state_dict().keys() == base.state_dict().keys()  # the base family's names again


def test_adapter_files_load_with_peft_as_saved(llama, tiny_llms, tmp_path):
    import json

    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from blip2_train.models.adapters import adapter_files, apply_adapter, is_adapter_param, load_adapter_weights

    apply_adapter(llama, {"kind": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "o_proj"]})
    with torch.no_grad():
        for n, p in llama.named_parameters():
            if is_adapter_param(n):
                p.normal_(0, 0.1)
    conf, tensors = adapter_files(llama, str(tiny_llms["llama"]), "CAUSAL_LM")
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llms["llama"])),
                                           str(tmp_path)).eval()
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(peft_model(input_ids=ids).logits, llama(input_ids=ids).logits)
    # and back into an injected adapter (blip2_train.load of an --adapter-only export)
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llms["llama"])).eval()
    apply_adapter(fresh, llama.blip2_adapter)
    load_adapter_weights(fresh, tensors, "test")
    torch.testing.assert_close(fresh(input_ids=ids).logits, llama(input_ids=ids).logits)


def test_unknown_family_and_module_names_are_refused(llama):
    from blip2_train.models.adapters import apply_adapter, lora_config

    with pytest.raises(ConfigError, match="no default LoRA targets"):
        lora_config({"kind": "lora", "r": 4}, "some-new-family")
    with pytest.raises(ConfigError, match="no such module"):
        apply_adapter(llama, {"kind": "lora", "r": 4, "target_modules": ["qkv"]})


@pytest.mark.parametrize("kind, tol", [("nf4", 0.15), ("int8", 0.02)])
def test_quantised_linears_compute_what_the_float_ones_do(kind, tol):
    from blip2_train.models.quant import is_quantized, quantize_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(8, 128)
    ref = net(x)
    q = copy.deepcopy(net)
    assert quantize_linears(q, kind, torch.float32) == 2 and is_quantized(q)
    assert not any(p.requires_grad for p in q.parameters())
    err = (q(x) - ref).norm() / ref.norm()
    assert err < tol, err


@pytest.mark.parametrize("kw, says", [
    (dict(adapter={"kind": "lora"}, freeze_llm=False), "train twice over"),
    (dict(llm_quant="nf4", freeze_llm=False), "quantised weights cannot train"),
    (dict(vision_quant="int8", freeze_vision=False), "cannot train"),
    (dict(llm_quant="nf2"), "model.llm_quant"),
    (dict(adapter={"kind": "dora"}), "adapter.kind"),
])
def test_combinations_that_cannot_train_are_refused(kw, says):
    from blip2_train.models.build_stage2 import check_low_memory

    args = dict(adapter=None, freeze_llm=True, llm_quant=None, vision_quant=None, freeze_vision=True) | kw
    with pytest.raises(ConfigError, match=says):
        check_low_memory(**args)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_a_quantised_tower_under_a_sharding_strategy_is_refused(strategy):
    from blip2_train.cli.train import check_low_memory_fits
    from blip2_train.config.compose import compose

    cfg = compose("train", ["experiment=stage2_pretrain", "adapter=lora", "model.llm_quant=nf4",
                            f"strategy={strategy}"])
    with pytest.raises(ConfigError, match="use strategy=ddp"):
        check_low_memory_fits(cfg)
    check_low_memory_fits(compose("train", ["experiment=stage2_pretrain", "adapter=lora", "model.llm_quant=nf4"]))
    assert OmegaConf.select(cfg, "model.adapter.kind") == "lora"  # the group reaches the model


def test_the_memory_plan_prices_what_it_counts():
    """NF4 holds 4 bits + its scales per Linear weight; LoRA's parameters are r x (in + out) per adapted layer."""
    from blip2_train.bench.plan import GIB, predict

    bf16 = predict("llama-7b", adapter="lora", batch_size=2)
    nf4 = predict("llama-7b", adapter="lora", quant="nf4", batch_size=2)
    assert bf16["params"]["llm"] == nf4["params"]["llm"] == pytest.approx(6.74e9, rel=0.01)
    assert nf4["params"]["lora"] == 32 * 2 * 16 * (4096 + 4096)  # q_proj and v_proj in 32 layers
    assert 3.4 < nf4["LLM weights"] / GIB < 3.8 and 12.4 < bf16["LLM weights"] / GIB < 12.7
    assert predict("llama-7b", adapter="lora", quant="nf4", batch_size=8)["activations"] > nf4["activations"]
