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
    SoftmaxTopK,
    reference_forward,
)


def route(tokens_TH, router_HE, top_k):
    """The default router (softmax top-k) on a batch of tokens: (routing_weights_TK in the tokens' dtype,
    expert_ids_TK)."""
    routing = SoftmaxTopK()(tokens_TH @ router_HE, top_k)
    return routing.routing_weights_TK.to(tokens_TH.dtype), routing.expert_ids_TK


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
        (dict(num_shared_experts=-1), "num_shared_experts"),
    ],
)
def test_config_validation(fields, message):
    base = dict(hidden=64, intermediate=96, num_experts=4, top_k=2)
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**(base | fields))


def test_presets():
    deepseek = get_preset("deepseek-v3")
    assert (deepseek.num_experts, deepseek.top_k, deepseek.num_shared_experts) == (256, 8, 1)
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


# --- traffic shapes and load metrics -----------------------------------------------------------------------------
from moe_model import (  # noqa: E402
    ExpertChoice,
    SigmoidBias,
    Switch,
    Traffic,
    load_metrics,
    make_router,
    router_logits,
)


def test_load_metrics_on_known_distributions():
    even = load_metrics(torch.arange(8).repeat(5).view(-1, 2), num_experts=8)
    assert even["load_cv"] == 0 and abs(even["load_gini"]) < 1e-12 and even["load_max_over_mean"] == 1
    assert even["tokens_per_expert"] == [5] * 8 and even["dead_experts"] == 0
    one_hot = load_metrics(torch.zeros((30, 1), dtype=torch.long), num_experts=4)
    assert abs(one_hot["load_gini"] - 3 / 4) < 1e-12  # (E − 1) / E
    assert one_hot["load_max_over_mean"] == 4 and one_hot["dead_experts"] == 3
    assert abs(one_hot["load_cv"] - 3**0.5) < 1e-12


@pytest.mark.parametrize("traffic", [Traffic("zipf", zipf_s=1.5), Traffic("hot", hot_share=0.8)])
def test_traffic_shapes_skew_the_load(tiny_weights, traffic):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3000, 64).bfloat16()
    logits = router_logits(tokens, tiny_weights.router_HE, traffic, generator)
    routing = make_router(get_preset("tiny"))(logits, 2)
    weights_TK, ids_TK = routing.routing_weights_TK, routing.expert_ids_TK
    assert (ids_TK[:, 0] != ids_TK[:, 1]).all()  # k distinct experts per token
    assert torch.allclose(weights_TK.float().sum(-1), torch.ones(3000), atol=1e-2)
    counts = torch.bincount(ids_TK.flatten(), minlength=4).float()
    assert counts.argmax() == 0  # expert 0 is the popular one
    if traffic.shape == "hot":
        assert abs(counts[0] / len(tokens) - 0.8) < 0.03  # the share of tokens that picked it
    uniform = load_metrics(route(tokens, tiny_weights.router_HE, 2)[1], 4)
    assert load_metrics(ids_TK, 4)["load_cv"] > uniform["load_cv"]


@pytest.mark.parametrize("fields, message", [(dict(shape="bursty"), "unknown traffic"),
                                             (dict(shape="zipf", zipf_s=0), "exponent"),
                                             (dict(shape="hot", hot_share=1.5), "share")])
def test_traffic_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        Traffic(**fields)


# --- routers ------------------------------------------------------------------------------------------------------
def test_softmax_top_k_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    routing = make_router(get_preset("tiny"))(logits, 2)
    assert routing.expert_ids_TK.tolist() == [[1, 2], [0, 2]]
    assert torch.allclose(routing.routing_weights_TK, torch.tensor([[2 / 3, 1 / 3], [0.625, 0.375]]))
    assert routing.dropped_tokens == 0


def test_sigmoid_bias_selects_with_bias_weights_without():
    router = SigmoidBias(num_experts=3)
    router.bias_E = torch.tensor([0.0, 0.0, 1.0])  # pushes expert 2 into every selection
    logits = torch.tensor([[2.0, 1.0, -3.0]])
    routing = router(logits, 2)
    assert routing.expert_ids_TK.tolist() == [[2, 0]]
    scores = torch.sigmoid(logits[0, [2, 0]])
    assert torch.allclose(routing.routing_weights_TK[0], scores / scores.sum())


def test_sigmoid_bias_update_moves_load_toward_balance():
    generator = torch.Generator().manual_seed(0)
    router = SigmoidBias(num_experts=8, update_rate=0.02)
    skew_E = torch.linspace(1.0, -1.0, 8)  # expert 0 favoured, expert 7 shunned
    imbalance = []
    for _ in range(60):
        logits = torch.randn((512, 8), generator=generator) + skew_E
        imbalance.append(load_metrics(router(logits, 2).expert_ids_TK, 8)["load_max_over_mean"])
    assert imbalance[-1] < imbalance[0] - 0.5 and imbalance[-1] < 1.3
    assert router.bias_E[0] < 0 < router.bias_E[7]


def test_switch_drops_over_capacity_and_counts():
    logits = torch.tensor([[5.0, 0.0]] * 5 + [[0.0, 5.0]])  # five tokens want expert 0, one wants expert 1
    routing = Switch(capacity_factor=1.0)(logits, 1)  # capacity ceil(1.0 · 6 / 2) = 3
    assert routing.expert_ids_TK[:, 0].tolist() == [0, 0, 0, 0, 0, 1]
    kept = (routing.routing_weights_TK[:, 0] > 0).tolist()
    assert kept == [True, True, True, False, False, True] and routing.dropped_tokens == 2
    p = torch.softmax(torch.tensor([5.0, 0.0]), 0)[0]
    assert torch.allclose(routing.routing_weights_TK[0, 0], p)  # the gate probability, not renormalised


def test_router_validation():
    with pytest.raises(ConfigError, match="unknown router"):
        MoEConfig(hidden=8, intermediate=8, num_experts=4, top_k=1, router="hash")
    with pytest.raises(ConfigError, match="top_k must be 1"):
        MoEConfig(hidden=8, intermediate=8, num_experts=4, top_k=2, router="switch")


def test_shared_experts_add_a_dense_mlp_and_keep_routed_weights(tiny):
    from moe_model import shared_experts_forward

    with_shared = MoEConfig(**(tiny.to_dict() | {"num_shared_experts": 1}))
    plain, shared = init_weights(tiny, "cpu"), init_weights(with_shared, "cpu")
    assert torch.equal(plain.w_down_EIH, shared.w_down_EIH)  # drawn after the routed experts
    assert shared.w_shared_gate_SHI.shape == (1, 64, 96) and plain.w_shared_gate_SHI.shape == (0, 64, 96)
    tokens = torch.randn(7, 64).bfloat16()
    weights_TK, ids_TK = route(tokens, shared.router_HE, 2)
    difference = reference_forward(tokens, shared, weights_TK, ids_TK) - reference_forward(tokens, plain,
                                                                                            weights_TK, ids_TK)
    dense = shared_experts_forward(tokens, shared).float()
    assert ((difference - dense).norm() / dense.norm()).item() < 2e-2
    assert flop_count(with_shared, 10) == 2 * 10 * 3 * 3 * 64 * 96


def test_expert_choice_gives_each_expert_its_capacity():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((20, 4), generator=generator) * 2
    routing = ExpertChoice(capacity_factor=1.0)(logits, 2)  # C = ceil(20 · 2 / 4) = 10 tokens per expert
    chosen = routing.routing_weights_TK > 0
    per_expert = torch.bincount(routing.expert_ids_TK[chosen], minlength=4)
    assert per_expert.tolist() == [10, 10, 10, 10]
    for t in range(20):
        ids = routing.expert_ids_TK[t]
        assert len(set(ids.tolist())) == ids.numel()  # distinct experts, fillers included
    assert routing.dropped_tokens == int((~chosen.any(dim=1)).sum())
    probs = torch.softmax(logits, -1)
    expert, token = 2, int(torch.topk(probs[:, 2], 10).indices[0])
    slot = (routing.expert_ids_TK[token] == expert).nonzero().item()
    assert torch.isclose(routing.routing_weights_TK[token, slot], probs[token, expert])


def test_the_cli_names_the_layer_defaults_that_moe_model_sets():
    from cli import options
    from moe_model import MoEConfig, Traffic

    assert (options.ROUTER, options.CAPACITY_FACTOR) == (MoEConfig.router, MoEConfig.capacity_factor)
    assert (options.ZIPF_S, options.HOT_SHARE) == (Traffic.zipf_s, Traffic.hot_share)
