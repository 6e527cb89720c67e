"""The matmul_ogs peer (OpenAI's triton_kernels) on the CPU: its skipped rows and their reasons, and its glue around
triton_kernels' API, run against an emulation of that API in torch ops (the GPU sweep checks the real one)."""

import types
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import make_config

import moe_benchmark
from moe_benchmark import make_inputs
from moe_model import init_weights, reference_forward

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def peer(levels):
    return levels["peer-ogs"]


@pytest.fixture(scope="module")
def peer_module(peer):
    import importlib

    return importlib.import_module(peer.__module__)


def test_it_is_skipped_on_the_cpu(peer, tiny):
    row = moe_benchmark.benchmark(peer, tiny, 13, CPU, warmup=1, repeats=3)
    assert row["status"] == "skipped" and "CUDA" in row["note"] and "\n" not in row["note"]
    assert row["launches_claimed"] is not None


def test_it_says_why_it_cannot_run(peer_module, tiny, monkeypatch):
    assert "bf16" in peer_module.unavailable(replace(tiny, dtype="fp32"), CUDA)
    assert "K a power of two, got K=3" in peer_module.unavailable(replace(tiny, top_k=3), CUDA)
    monkeypatch.setattr(peer_module.importlib.util, "find_spec", lambda name: None)
    missing = peer_module.unavailable(tiny, CUDA)
    assert "not installed" in missing and f"@v{triton.__version__.split('+')[0]}" in missing and "\n" not in missing

    # PyPI's unrelated "triton_kernels" has no submodules, and a broken one fails to import
    for error in (ModuleNotFoundError, SyntaxError):
        def failing_import(name, error=error):
            raise error(name)
        monkeypatch.setattr(peer_module.importlib.util, "find_spec", failing_import)
        assert "not installed" in peer_module.unavailable(tiny, CUDA) and peer_module.installed_at() is None


# --- triton_kernels' API as the peer calls it, in torch ops ----------------------------------------------------
@dataclass
class RoutingData:
    gate_scal: torch.Tensor
    expt_hist: torch.Tensor
    n_expts_tot: int
    n_expts_act: int
    expt_data: object


def topk(x_TE, k, apply_softmax, y_indx):
    """Given the ids: each pair's value, and the bitmatrix's metadata (each expert's count, each pair's place in
    expert order and back). The ids must be int32: the real kernel shifts in their own type."""
    assert not apply_softmax and y_indx.dtype == torch.int32 and y_indx.shape[1] == k
    ids_N = y_indx.flatten().long()
    pair_of_sorted = torch.sort(ids_N, stable=True).indices
    sorted_of_pair = torch.empty_like(pair_of_sorted)
    sorted_of_pair[pair_of_sorted] = torch.arange(len(ids_N))
    metadata = types.SimpleNamespace(col_sum=torch.bincount(ids_N, minlength=x_TE.shape[1]).int(),
                                     col_sorted_indx=pair_of_sorted.int(), row_sorted_indx=sorted_of_pair.int())
    return types.SimpleNamespace(vals=x_TE.gather(1, y_indx.long()), indx=y_indx, mask_metadata=metadata)


def matmul_ogs(x, w, bias, routing, gather_indx=None, scatter_indx=None, fused_activation=None, gammas=None):
    """Y[dst] += X[src] @ W[e] per expert slice (matmul_ogs's docstring): rows gathered in expert order (a pair's
    token is its index // K), the fused activation (the peer's SiLU·up on interleaved pairs), the row's gamma, and
    rows scattered back to pair order, each token's K summed."""
    K = routing.n_expts_act
    rows = x[gather_indx.src_indx.long() // K] if gather_indx is not None else x
    sizes = routing.expt_data.slice_sizes.long()
    starts = torch.cumsum(sizes, 0) - sizes
    y = torch.cat([rows[s:s + n].float() @ w[e].float() for e, (s, n) in enumerate(zip(starts.tolist(),
                                                                                     sizes.tolist()))])
    if fused_activation is not None:
        assert fused_activation.specs.reduction_n == 2
        y = F.silu(y[:, 0::2]) * y[:, 1::2]
    if gammas is not None:
        y = y * gammas[:, None].float()
    if scatter_indx is not None:
        y = y[scatter_indx.src_indx.long()].view(-1, K, y.shape[1]).sum(1)
    return y.to(x.dtype)


EMULATED = {
    "triton_kernels.matmul_ogs": types.SimpleNamespace(
        matmul_ogs=matmul_ogs, RoutingData=RoutingData,
        GatherIndx=lambda src_indx, dst_indx: types.SimpleNamespace(src_indx=src_indx, dst_indx=dst_indx),
        ScatterIndx=lambda src_indx, dst_indx: types.SimpleNamespace(src_indx=src_indx, dst_indx=dst_indx),
        FnSpecs=lambda name, fn, arg_names, reduction_n: types.SimpleNamespace(fn=fn, reduction_n=reduction_n),
        FusedActivation=lambda specs, args: types.SimpleNamespace(specs=specs, args=args)),
    "triton_kernels.tensor": types.SimpleNamespace(
        make_ragged_tensor_metadata=lambda sizes, n: types.SimpleNamespace(slice_sizes=sizes)),
    "triton_kernels.topk": types.SimpleNamespace(topk=topk),
}


@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_its_glue_computes_the_layer(peer, peer_module, monkeypatch, num_shared, num_tokens):
    monkeypatch.setattr(peer_module, "unavailable", lambda config, device: None)
    monkeypatch.setattr(peer_module, "import_module", EMULATED.__getitem__)
    config = make_config(num_experts=6, top_k=2, num_shared_experts=num_shared, dtype="fp32")
    weights = init_weights(config, CPU)
    inputs = make_inputs(config, weights, num_tokens, seed=3)
    inputs.expert_ids_TK[: num_tokens // 2] = torch.tensor([1, 4])  # uneven: experts 0, 2, 3, 5 get few or none
    level = peer(config, weights)
    level.prepare()
    out_TH = level.forward(*inputs.as_args())
    ref_TH = reference_forward(inputs.tokens_TH, weights, inputs.routing_weights_TK, inputs.expert_ids_TK)
    assert moe_benchmark.compare_to_reference(out_TH, ref_TH, 1e-4).passed
