import pytest
import torch

from moe_model import (
    ConfigError,
    MoEConfig,
    PRESETS,
    flop_count,
    get_preset,
    init_weights,
    min_bytes,
    reference_forward,
    route,
)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(top_k=5), "cannot exceed num_experts"),
        (dict(hidden=0), "hidden must be positive"),
        (dict(intermediate=-3), "intermediate must be positive"),
        (dict(num_experts=0), "num_experts must be positive"),
        (dict(top_k=0), "top_k must be positive"),
        (dict(hidden=64.5), "whole number"),
        (dict(dtype="int7"), "unknown dtype"),
    ],
)
def test_config_validation(fields, message):
    base = dict(hidden=64, intermediate=96, num_experts=4, top_k=2)
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**(base | fields))


def test_presets():
    assert get_preset("journey").shape_str() == "H=1024 I=2048 E=8 K=2 bf16"
    assert (get_preset("deepseek-v3").num_experts, get_preset("deepseek-v3").top_k) == (256, 8)
    assert {"tiny", "journey", "mixtral", "qwen3-moe", "deepseek-v3"} <= set(PRESETS)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_weights_are_deterministic_and_scaled(tiny):
    a, b = init_weights(tiny, "cpu"), init_weights(tiny, "cpu")
    assert torch.equal(a.w_gate_EHI, b.w_gate_EHI) and torch.equal(a.w_down_EIH, b.w_down_EIH)
    assert a.w_gate_EHI.shape == (4, 64, 96) and a.w_down_EIH.shape == (4, 96, 64)
    assert a.w_gate_EHI.is_contiguous()
    other = init_weights(MoEConfig(**(tiny.to_dict() | {"seed": 1})), "cpu")
    assert not torch.equal(a.w_gate_EHI, other.w_gate_EHI)
    tokens = torch.randn(256, 64).bfloat16()
    weights_TK, ids_TK = route(tokens, a.router_HE, tiny.top_k)
    out = reference_forward(tokens, a, weights_TK, ids_TK)
    assert 0.05 < out.std().item() < 5  # activations stay O(1)


def test_router_picks_top_k_and_renormalises(tiny_weights):
    tokens = torch.randn(50, 64).bfloat16()
    weights_TK, ids_TK = route(tokens, tiny_weights.router_HE, 2)
    probs = torch.softmax((tokens @ tiny_weights.router_HE).float(), -1)
    assert torch.equal(ids_TK, probs.topk(2, -1).indices)
    assert torch.allclose(weights_TK.float().sum(-1), torch.ones(50), atol=1e-2)
    assert (ids_TK[:, 0] != ids_TK[:, 1]).all()


def test_reference_matches_dense_formula(tiny, tiny_weights):
    tokens = torch.randn(9, 64).bfloat16()
    weights_TK, ids_TK = route(tokens, tiny_weights.router_HE, 2)
    out = reference_forward(tokens, tiny_weights, weights_TK, ids_TK)
    w = tiny_weights
    for t in range(9):
        expected = torch.zeros(64)
        for k in range(2):
            e = ids_TK[t, k]
            x = tokens[t].float()
            h = torch.nn.functional.silu(x @ w.w_gate_EHI[e].float()) * (x @ w.w_up_EHI[e].float())
            expected += weights_TK[t, k].float() * (h @ w.w_down_EIH[e].float())
        assert torch.allclose(out[t], expected, atol=1e-5)


def test_counts():
    config = get_preset("journey")
    assert flop_count(config, 8192) == 2 * 8192 * 2 * 3 * 1024 * 2048
    assert min_bytes(config, 10, experts_touched=2) == 2 * 3 * 1024 * 2048 * 2 + 2 * 10 * 1024 * 2
