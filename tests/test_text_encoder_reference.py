"""The reference itself: transformers' UMT5EncoderModel computes the umT5 encoder of TURBODIFFUSION.md §8.2.

The loader tests compare against transformers run directly; this checks that transformers, configured as the
fixtures configure it, is the network TurboDiffusion runs (unscaled attention, per-layer bidirectional
relative buckets, gated tanh-GELU FFN, RMS norm with eps 1e-6), with the formulas written out in float64.
"""

import math

import torch
from text_encoder_fixtures import encoder_state, make_tiny_umt5

HEADS = 4


def relative_bucket(relative: torch.Tensor) -> torch.Tensor:
    """§8.2: 16 buckets per direction (offset 16 when the key is after the query); exact below 8, then log."""
    distance = relative.abs()
    logarithmic = 8 + (torch.log(distance.double().clamp(min=1) / 8) / math.log(128 / 8) * 8).long()
    bucket = torch.where(distance < 8, distance, logarithmic.clamp(max=15))
    return bucket + 16 * (relative > 0).long()


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def spec_encoder(state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = {key: tensor.double() for key, tensor in state.items()}
    x = w["shared.weight"][ids]
    batch, length, _ = x.shape
    positions = torch.arange(length)
    buckets = relative_bucket(positions[None, :] - positions[:, None])  # [query, key]
    key_mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask == 0, -math.inf)[:, None, None]
    for layer in range(2):
        p = f"encoder.block.{layer}.layer."
        h = rms_norm(x, w[p + "0.layer_norm.weight"])
        q, k, v = (
            (h @ w[p + f"0.SelfAttention.{name}.weight"].T).view(batch, length, HEADS, -1).transpose(1, 2)
            for name in "qkv"
        )
        bias = w[p + "0.SelfAttention.relative_attention_bias.weight"][buckets].permute(2, 0, 1)
        attention = torch.softmax(q @ k.transpose(-1, -2) + bias + key_mask, dim=-1)
        heads_out = (attention @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + heads_out @ w[p + "0.SelfAttention.o.weight"].T
        h = rms_norm(x, w[p + "1.layer_norm.weight"])
        gate = gelu_tanh(h @ w[p + "1.DenseReluDense.wi_0.weight"].T)
        x = x + (gate * (h @ w[p + "1.DenseReluDense.wi_1.weight"].T)) @ w[p + "1.DenseReluDense.wo.weight"].T
    return rms_norm(x, w["encoder.final_layer_norm.weight"])


def test_relative_bucket_matches_the_spec_examples():
    relative = torch.tensor([0, 3, 7, 8, 15, 16, 127, 128, 500, -1, -7, -8, -200])
    expected = torch.tensor([0, 19, 23, 24, 25, 26, 31, 31, 31, 1, 7, 8, 15])
    assert torch.equal(relative_bucket(relative), expected)


def test_transformers_umt5_is_the_spec_encoder():
    model = make_tiny_umt5(seed=3)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, 300), generator=generator)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 170:] = 0  # a padded batch member; 300 positions reach the logarithmic buckets
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = spec_encoder(encoder_state(model), ids, mask)
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)
