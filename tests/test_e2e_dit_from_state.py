"""`dit_from_state_dict`: a WanDiT from weights in memory (the benchmark shares one set of random weights
between the reference network and several of our variants)."""

from __future__ import annotations

import torch
from comfyui_turbodiffusion.wan_models.dit_loader import dit_from_state_dict, load_dit
from comfyui_turbodiffusion.wan_models.linear_layers import Int8Linear
from dit_reference import make_diffusers_model, make_inputs, to_original_layout, to_turbodiffusion_layout


def _state() -> dict[str, torch.Tensor]:
    original = to_turbodiffusion_layout(to_original_layout(make_diffusers_model(16, seed=6).state_dict()))
    return {k: (v.float() if ".norm" in k else v.to(torch.bfloat16)) for k, v in original.items()}


def test_same_model_as_from_a_file_and_the_weights_are_shared(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "m.pth")
    from_file = load_dit(tmp_path / "m.pth")
    in_memory = dit_from_state_dict(state)
    x, t, context, _ = make_inputs(16, (1, 16, 2, 4, 4))
    with torch.no_grad():
        assert torch.equal(in_memory(x, t, context), from_file(x, t, context))
    weight = in_memory.blocks[0].self_attn.q.weight
    assert weight.data_ptr() == state["blocks.0.self_attn.q.weight"].data_ptr()
    assert in_memory.source is None


def test_converted_linears_leave_the_given_weights_alone():
    state = _state()
    before = {key: tensor.clone() for key, tensor in state.items()}
    model = dit_from_state_dict(state, linear_quant="int8")
    assert isinstance(model.blocks[1].ffn[0], Int8Linear)
    assert state.keys() == before.keys()
    assert all(torch.equal(state[key], before[key]) for key in state)
