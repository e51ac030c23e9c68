"""The compiled CPU decode step freezes the weights into its graph: after any change of a parameter or buffer,
`generate(compile=True)` must give what the uncompiled decoder gives with the new weights, never the old graph's.

Compilation is slow on a shared machine, so one tiny model (one layer, with a LoRA adapter and a stand-in for a
quantized linear that keeps its weights in buffers) is shared by the compiling tests, each of which compiles once (the
graph before its change is still the one the previous test left), and they cover one change of each kind: through
the autograd-visible API (an optimizer step), through `.data`, in a buffer, by a LoRA merge. Every way of changing
weights is then checked without compiling: it must make the next `generate` build a new graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decoderkit
from decoderkit.generation import decode_step
from decoderkit.training.lora import LoraConfig, apply_lora, lora_modules, merge_lora, unmerge_lora

oracle = pytest.importorskip("oracle")

pytestmark = pytest.mark.slow


class Int8Linear(nn.Module):
    """A quantized linear's layout: int8 weights and per-row scales held as buffers, not parameters."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype) * self.scale)


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return oracle.save(oracle.build("llama", num_hidden_layers=1), tmp_path_factory.mktemp("compiled"))


def build(directory):
    model = decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()
    mlp = model.model.layers[0].mlp
    mlp.down_proj = Int8Linear(mlp.down_proj)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def setup(directory):
    # The C++ wrapper only changes how the graph is called, and costs a long C++ build per compilation
    options = {k: v for k, v in decode_step._CPU_INDUCTOR_OPTIONS.items() if k != "cpp_wrapper"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_step, "_CPU_INDUCTOR_OPTIONS", options)
        ids, mask, _ = oracle.left_padded_batch(97, [5, 3])
        yield build(directory), ids, mask


def logits(model, ids, mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True,
                         output_logits=True, eos_token_id=None, **kwargs)
    return out.sequences, torch.stack(out.logits)


def after_change(setup, change) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits before, logits after) `change`, asserting the compiled step agrees with the uncompiled one after it."""
    model, ids, mask = setup
    _, before = logits(model, ids, mask, compile=True)
    change(model)
    expected_ids, expected = logits(model, ids, mask, cache_implementation="static")
    got_ids, got = logits(model, ids, mask, compile=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(got_ids, expected_ids)
    return before, expected


def param(model, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name]


def changed(before: torch.Tensor, after: torch.Tensor) -> bool:
    return float((before - after).abs().max()) > 1e-2


def optimizer_step(model) -> None:
    model.train()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def load_state_dict(model) -> None:
    gen = torch.Generator().manual_seed(2)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def data_mul(model) -> None:
    param(model, "model.layers.0.self_attn.o_proj.weight").data.mul_(3.0)


def data_copy(model) -> None:
    p = param(model, "model.layers.0.mlp.gate_proj.weight")
    p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))


def no_grad_copy(model) -> None:
    p = param(model, "model.layers.0.post_attention_layernorm.weight")
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))


def buffer_write(model) -> None:
    down = model.model.layers[0].mlp.down_proj
    down.qweight.data.copy_(down.qweight.flip(0))
    down.scale.data.mul_(2.0)


CHANGES = [optimizer_step, load_state_dict, data_mul, data_copy, no_grad_copy, buffer_write, merge_lora,
           unmerge_lora]


@pytest.mark.parametrize("change", [optimizer_step, data_copy, buffer_write], ids=lambda f: f.__name__)
def test_compiled_generate_sees_changed_weights(setup, change):
    before, after = after_change(setup, change)
    assert changed(before, after)  # the change matters, so the old graph would have given other logits


def test_compiled_generate_after_lora_merge(setup):
    model = setup[0]
    weight = param(model, "model.layers.0.self_attn.q_proj.weight").detach().clone()
    graph = decode_step._compiled_step(model)
    after_change(setup, merge_lora)
    # Merging moves the update into the weight and leaves the outputs as they were: the graph frozen with the old
    # weight must still not be the one that runs
    assert changed(weight, param(model, "model.layers.0.self_attn.q_proj.weight"))
    assert decode_step._compiled_step(model) is not graph


def test_every_kind_of_change_rebuilds_the_compiled_step(directory):
    """`_compiled_step` only wraps the step (compilation happens at the first call), so this compiles nothing."""
    model = build(directory)
    graph = decode_step._compiled_step(model)
    assert decode_step._compiled_step(model) is graph  # unchanged weights keep their graph
    for change in CHANGES:
        change(model)
        rebuilt = decode_step._compiled_step(model)
        assert rebuilt is not graph, change.__name__
        graph = rebuilt


def test_fingerprint_covers_buffers_and_data_writes(directory):
    model = build(directory)
    start = decode_step.weights_fingerprint(model)
    assert decode_step.weights_fingerprint(model) == start  # unchanged weights keep their graph
    down = model.model.layers[0].mlp.down_proj
    down.qweight.data[0, 0] += 1
    assert decode_step.weights_fingerprint(model) != start
    down.qweight.data[0, 0] -= 1
    assert decode_step.weights_fingerprint(model) == start
    param(model, "lm_head.weight").data[0, 0] += 1e-6
    assert decode_step.weights_fingerprint(model) != start
