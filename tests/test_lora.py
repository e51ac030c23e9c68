"""LoRA: only adapters train, adapters load into PEFT + transformers with the same logits, merging is exact."""

from __future__ import annotations

import json
import math

import oracle
import pytest
import torch

from decoderkit import AutoModelForCausalLM, AutoModelForSequenceClassification
from decoderkit.training import (
    LoraConfig,
    LoraLinear,
    PackedDataset,
    Trainer,
    TrainingArguments,
    apply_lora,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return oracle.save(oracle.build("llama"), tmp_path_factory.mktemp("llama"))


def ids(n: int = 12, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def train_lora(model, tmp_path, steps: int = 6, **args):
    data = PackedDataset(ids(16, 16, seed=1))
    defaults = dict(output_dir=str(tmp_path), max_steps=steps, per_device_batch_size=4, learning_rate=2e-2,
                    progress=False, plot=False, save_final=False)
    return Trainer(model, TrainingArguments(**{**defaults, **args}), data).train()


def peft_logits(model_dir, adapter_dir, x, head=transformers.AutoModelForCausalLM) -> torch.Tensor:
    base = head.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def test_only_adapters_train_and_peft_agrees(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, seven projections, two layers
    result = train_lora(model, tmp_path / "run")
    assert result.losses[-1] < result.losses[0]
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    assert any(float(m.lora_B.weight.detach().abs().max()) > 0 for m in model.modules() if isinstance(m, LoraLinear))

    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(llama_dir))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    x = ids()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=x).logits
    assert oracle.rel_err(ours, peft_logits(llama_dir, adapter, x)) < 1e-5

    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, ours, rtol=0, atol=0)


def test_merge_equals_unmerged(llama_dir):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=4, target_modules="all-linear"))
    assert not isinstance(model.lm_head, LoraLinear)  # heads are not adapted by "all-linear"
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            torch.nn.init.normal_(module.lora_B.weight, std=0.2)
    x = ids()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        base = model.model.layers[0].self_attn.q_proj.weight.clone()
        merge_lora(model)
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base)
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, rtol=1e-5, atol=1e-5)
        plain = merge_and_unload(model)
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        assert all(p.requires_grad for p in plain.parameters())
        torch.testing.assert_close(plain(input_ids=x).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_classifier_head_saved_with_adapter(tmp_path):
    model_dir = oracle.save(oracle.build("llama", "sequence_classification"), tmp_path / "cls")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    apply_lora(model, LoraConfig(r=2, modules_to_save=["score"]))
    assert model.score.weight.requires_grad
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                torch.nn.init.normal_(module.lora_B.weight, std=0.2)
        model.score.weight.add_(0.5)
    adapter = save_adapter(model, tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        ours = model.eval()(input_ids=x).logits
    theirs = peft_logits(model_dir, adapter, x, transformers.AutoModelForSequenceClassification)
    assert oracle.rel_err(ours, theirs) < 1e-5


def randomise_adapters(model, std: float = 0.2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_A.weight.copy_(torch.randn(module.lora_A.weight.shape, generator=gen) * std)
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * std)


FUSED = {"gpt_bigcode_mqa": ("gpt_bigcode", {"multi_query": True}),
         "gpt_bigcode_mha": ("gpt_bigcode", {"multi_query": False}),
         "mpt": ("mpt", {})}


@pytest.mark.parametrize("case", sorted(FUSED))
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]])
def test_fused_qkv_adapters_export_to_peft(case, targets, tmp_path):
    family, overrides = FUSED[case]
    model_dir = oracle.save(oracle.build(family, **overrides), tmp_path / case)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir),
                       LoraConfig(r=2, lora_alpha=6, target_modules=targets))
    randomise_adapters(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    fused = {"gpt_bigcode": "c_attn", "mpt": "Wqkv"}[family]
    assert fused in {t.rsplit(".", 1)[-1] for t in config["target_modules"]}
    # q/k/v adapters of rank r are one adapter of rank (adapted members) * r on the fused projection, alpha / r kept.
    members = sum(t in targets for t in ("q_proj", "k_proj", "v_proj"))
    r = config["rank_pattern"].get(fused, config["r"])
    alpha = config["alpha_pattern"].get(fused, config["lora_alpha"])
    assert (r, alpha / r) == (2 * members, 3.0)
    x = ids()
    with torch.no_grad():
        ours = model.eval()(input_ids=x).logits
    assert oracle.rel_err(ours, peft_logits(model_dir, adapter, x)) < 1e-5

    # PEFT's adapter (fused) reads back into our separate projections with the same update, and saves again.
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    adapted = {n.rsplit(".", 1)[-1] for n, m in reloaded.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == set(targets)
    with torch.no_grad():
        assert oracle.rel_err(reloaded.eval()(input_ids=x).logits, ours) < 1e-6
    again = save_adapter(reloaded, tmp_path / "again")
    assert json.loads((again / "adapter_config.json").read_text())["rank_pattern"] == config["rank_pattern"]


def test_fused_adapter_trained_by_peft_loads(tmp_path):
    """An adapter PEFT trains on c_attn itself (full B, one A for q, k and v) keeps its numbers in decoderkit."""
    model_dir = oracle.save(oracle.build("gpt_bigcode", multi_query=False), tmp_path / "m")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=x).logits
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert oracle.rel_err(ours(input_ids=x).logits, theirs) < 1e-5
    save_adapter(ours, tmp_path / "again")
    with torch.no_grad():
        assert oracle.rel_err(peft_logits(model_dir, tmp_path / "again", x), theirs) < 1e-5


def test_bf16_base_trains_fp32_adapters_like_peft(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    randomise_adapters(model, std=0.3)

    # One adapted bf16 linear against PEFT's LoRA layer on the same weights: the same bits.
    ours_layer = model.model.layers[0].self_attn.q_proj
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(ours_layer.in_features, ours_layer.out_features, bias=False,
                                              dtype=torch.bfloat16))
    theirs_model = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    theirs_layer = theirs_model.base_model.model.proj
    assert theirs_layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        theirs_layer.base_layer.weight.copy_(ours_layer.weight)
        theirs_layer.lora_A["default"].weight.copy_(ours_layer.lora_A.weight)
        theirs_layer.lora_B["default"].weight.copy_(ours_layer.lora_B.weight)
        h = torch.randn(2, 5, ours_layer.in_features, generator=torch.Generator().manual_seed(4)).bfloat16()
        out = ours_layer(h)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, theirs_layer(h), rtol=0, atol=0)

    # The whole model runs, trains only the fp32 adapters, and its adapter loads into PEFT on the bf16 base.
    out = train_lora(model.train(), tmp_path / "run", steps=2)
    assert all(math.isfinite(v) for v in out.losses)
    assert all(p.dtype == torch.float32 for p in adapters.values())
    adapter = save_adapter(model, tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        ours = model.eval()(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()(input_ids=x).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager",
                                                                 dtype=torch.bfloat16)
        # bf16 rounding noise of the base alone (ours against transformers, no adapter) bounds the difference.
        noise = oracle.rel_err(plain, base(input_ids=x).logits)
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(input_ids=x).logits
    assert oracle.rel_err(ours, theirs) <= 2 * noise + 1e-3 < oracle.rel_err(ours, plain)


def test_bad_targets_and_adapters(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"matched no nn.Linear; this model's linears are named .*'q_proj'"):
        apply_lora(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(FileNotFoundError, match="not a PEFT LoRA adapter directory"):
        load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig(r=2))
    adapter = save_adapter(model, tmp_path / "adapter")
    wider_dir = oracle.save(oracle.build("llama", hidden_size=48), tmp_path / "wider")
    wider = AutoModelForCausalLM.from_pretrained(wider_dir)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(2, 32\); this model expects \(2, 48\)"):
        load_adapter(wider, adapter)
    assert not any(isinstance(m, LoraLinear) for m in wider.modules())  # left untouched


def test_lora_checkpoints_hold_adapters_and_resume_exactly(llama_dir, tmp_path):
    def fresh():
        return apply_lora(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=2, lora_dropout=0.1))

    torch.manual_seed(0)
    full = train_lora(fresh(), tmp_path / "full", steps=4, save_steps=2, save_total_limit=None)
    from safetensors import safe_open

    with safe_open(tmp_path / "full/checkpoint-2/model.safetensors", "pt") as f:
        assert all(".lora_" in k for k in f.keys())  # the frozen base is not copied into every checkpoint
    torch.manual_seed(0)
    resumed = train_lora(fresh(), tmp_path / "full", steps=4, save_steps=2,
                         resume_from=str(tmp_path / "full/checkpoint-2"), save_total_limit=None)
    assert resumed.losses == full.losses
    # The same adapter shapes on a different base checkpoint must not resume.
    other = oracle.save(oracle.build("llama", seed=7), tmp_path / "other")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, lora_dropout=0.1))
    with pytest.raises(ValueError, match="different frozen"):
        train_lora(model, tmp_path / "full", steps=4, resume_from="latest")


def test_unexportable_targets_fail_before_training(tmp_path, monkeypatch):
    from decoderkit.families.mpt import MptFamily

    model_dir = oracle.save(oracle.build("mpt"), tmp_path / "mpt")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2))
    original = MptFamily.base_ours_to_hf

    def without_qkv(self, state, config):  # a family whose fused layout no adapter could express
        return {k: v for k, v in original(self, state, config).items() if ".Wqkv." not in k}

    monkeypatch.setattr(MptFamily, "base_ours_to_hf", without_qkv)
    with pytest.raises(ValueError, match="q_proj: mpt stores it fused with other projections in a way a PEFT "
                                         "adapter cannot express"):
        train_lora(model, tmp_path / "run", save_final=True)
    assert not (tmp_path / "run").exists()
