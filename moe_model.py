"""The MoE feed-forward layer every level of the journey computes, and its fp32 reference.

Shape legend, used in every file of the lab (a tensor's name ends in its shape: tokens_TH is [T, H]):
    T  tokens            H  hidden size         I  intermediate size (per expert)
    E  routed experts    K  experts per token (top-k)
    S  shared experts (every token goes through each); where levels 7-10 fuse them into their grouped GEMMs, E and
       K inside a forward count them too (E + S experts, K + S slots: tensors such as expert_ids_TK widen)
    N  (token, slot) pairs, T·K: the rows a permutation sorts by expert
    P  padded rows: N plus each expert's run rounded up to whole GEMM tiles (levels 7-10); P_max, the most
       that any routing of T tokens can need: the rows of the buffers that hold them
    C  capacity: rows per expert in a fixed-size buffer (level 5: C = T)
    W  world size: the processes of the expert-parallel level
    B  chunks (micro-batches) the expert-parallel forward pipelines a rank's tokens in
    D  rows an expert-parallel rank sends: one per (token, rank) where that rank holds any of the token's experts
    U  rows an expert-parallel rank receives (its share of every rank's D)
    R  (row, slot) pairs of the received rows whose expert is local: the rows a rank's experts compute
A subscript b is one chunk's share (U_b, R_b); a digit is a literal size (send_counts_BW2: rows and pairs). The
FP8 weights' helpers serve either projection, so they name its axes by role: C its output columns and D its
reduction (values_ECD [E, cols, depth]); there C and D mean nothing else.
In the GEMM kernels, a program computes a BLOCK_M × BLOCK_N tile of the output (`cols` wide), stepping BLOCK_D at a
time along the reduction (`depth`: H for gate/up, I for down).

One layer: a router scores every token against every expert, each token goes to its K best experts, each expert
is a SwiGLU MLP, and the K expert outputs are summed with the router's weights:

    out[t] = sum_k  routing_weights[t, k] * down_e( silu(x_t @ w_gate[e]) * (x_t @ w_up[e]) ),  e = expert_ids[t, k]

Expert weights live in one contiguous tensor per projection: w_gate_EHI, w_up_EHI [E, H, I] and w_down_EIH
[E, I, H], the layout grouped GEMMs want (torchtitan and gpt-fast keep them the same way).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

ROUTERS = ("softmax-topk", "sigmoid-bias", "switch", "expert-choice")  # the classes below, by name

# Relative error ‖out − ref‖ / ‖ref‖ a level may have against the fp32 reference, by the dtype it computes in.
TOLERANCES: dict[str, float] = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 1e-4}


class ConfigError(ValueError):
    """A bad MoE shape or name; its message is meant for the user as it stands."""


@dataclass(frozen=True)
class MoEConfig:
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    dtype: str = "bf16"
    seed: int = 0
    name: str = "custom"
    router: str = "softmax-topk"
    capacity_factor: float = 1.25  # the switch router's per-expert capacity, in units of the mean load
    num_shared_experts: int = 0  # always-active SwiGLU experts of intermediate size I (DeepSeek, GLM)

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate", "num_experts", "top_k"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{field} must be a whole number, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{field} must be positive, got {value}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
            raise ConfigError(f"num_shared_experts must be a whole number ≥ 0, got {self.num_shared_experts!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be a whole number, got {self.seed!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts}): "
                "a token picks k distinct experts"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.router == "switch" and self.top_k != 1:
            raise ConfigError(f"the switch router sends each token to one expert: top_k must be 1, got {self.top_k}")
        if not 0 < self.capacity_factor < math.inf:
            raise ConfigError(f"capacity_factor must be positive and finite, got {self.capacity_factor}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, MoEConfig] = {
    # tiny: for tests, so every level and the Triton interpreter finish in well under a second.
    "tiny": MoEConfig(hidden=64, intermediate=96, num_experts=4, top_k=2, name="tiny"),
    # small: the CPU benchmark's default, large enough that the levels differ, small enough for 2 cores; fp32,
    # because CPUs run fp32 matmuls many times faster than bf16 ones.
    "small": MoEConfig(hidden=256, intermediate=512, num_experts=8, top_k=2, dtype="fp32", name="small"),
    "journey": MoEConfig(hidden=1024, intermediate=2048, num_experts=8, top_k=2, name="journey"),
    "mixtral": MoEConfig(hidden=4096, intermediate=14336, num_experts=8, top_k=2, name="mixtral"),
    "qwen3-moe": MoEConfig(hidden=2048, intermediate=768, num_experts=128, top_k=8, name="qwen3-moe"),
    # deepseek-v3: 256 routed experts and one shared expert that every token passes through (its runs before
    # 2026-11-25T11Z had no shared expert; their rows record shared_experts=0).
    "deepseek-v3": MoEConfig(hidden=7168, intermediate=2048, num_experts=256, top_k=8, num_shared_experts=1,
                             name="deepseek-v3"),
}


def get_preset(name: str) -> MoEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class MoEWeights:
    router_HE: torch.Tensor
    w_gate_EHI: torch.Tensor
    w_up_EHI: torch.Tensor
    w_down_EIH: torch.Tensor
    # The shared experts, S of them (S may be 0): every token goes through each, with weight 1.
    w_shared_gate_SHI: torch.Tensor
    w_shared_up_SHI: torch.Tensor
    w_shared_down_SIH: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.w_gate_EHI.device

    def nbytes(self) -> int:
        """The memory the weights take, router and shared experts included."""
        return sum(tensor.numel() * tensor.element_size() for tensor in vars(self).values())

    def without_shared(self) -> MoEWeights:
        """The same routed experts and router, with no shared experts (S = 0)."""
        return replace(self, w_shared_gate_SHI=self.w_shared_gate_SHI[:0], w_shared_up_SHI=self.w_shared_up_SHI[:0],
                       w_shared_down_SIH=self.w_shared_down_SIH[:0])


def init_weights(config: MoEConfig, device: torch.device | str, experts: range | None = None) -> MoEWeights:
    """Deterministic weights from config.seed, drawn on `device` (the same seed gives the same weights on the same
    kind of device). Scaled by 1/sqrt(fan_in) so that with unit-variance tokens every activation stays O(1).

    `experts`: draw only these routed experts (an expert-parallel rank's slice; default all). Each expert's
    weights come from a generator of its own, seeded by (config.seed, expert), so a slice equals the same experts
    of the full draw. The router and the shared experts are always drawn whole."""
    device = torch.device(device)
    H, I, E, S, dtype = (config.hidden, config.intermediate, config.num_experts, config.num_shared_experts,
                         config.torch_dtype)
    experts = range(E) if experts is None else experts

    def stack(stream: int, indices: range, rows: int, cols: int) -> torch.Tensor:
        """[len(indices), rows, cols]; stream 0-2 are the routed gate/up/down, 3-5 the shared ones."""
        out = torch.empty((len(indices), rows, cols), dtype=dtype, device=device)
        for position, index in enumerate(indices):  # one at a time: no second fp32 copy of a large preset
            seed = zlib.crc32(f"{config.seed}:{stream}:{index}".encode())  # 32 bits: what a CPU generator keeps
            generator = torch.Generator(device=device).manual_seed(seed)
            sample = torch.randn((rows, cols), generator=generator, device=device, dtype=torch.float32)
            out[position] = sample.mul_(1.0 / math.sqrt(rows))
        return out

    router_generator = torch.Generator(device=device).manual_seed(config.seed)
    router_HE = torch.randn((H, E), generator=router_generator, device=device, dtype=torch.float32) / math.sqrt(H)
    return MoEWeights(
        router_HE=router_HE.to(dtype),
        w_gate_EHI=stack(0, experts, H, I),
        w_up_EHI=stack(1, experts, H, I),
        w_down_EIH=stack(2, experts, I, H),
        w_shared_gate_SHI=stack(3, range(S), H, I),
        w_shared_up_SHI=stack(4, range(S), H, I),
        w_shared_down_SIH=stack(5, range(S), I, H),
    )


def shared_experts_forward(tokens_TH: torch.Tensor, weights: MoEWeights, out_TH: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """The always-active experts: dense SwiGLU MLPs that every token goes through, summed. [T, H], tokens' dtype,
    written into `out_TH` if given."""
    out_TH = torch.zeros_like(tokens_TH) if out_TH is None else out_TH.zero_()
    for shared in range(weights.w_shared_gate_SHI.shape[0]):
        gate = tokens_TH @ weights.w_shared_gate_SHI[shared]
        up = tokens_TH @ weights.w_shared_up_SHI[shared]
        out_TH += (F.silu(gate) * up) @ weights.w_shared_down_SIH[shared]
    return out_TH


@dataclass
class Routing:
    """K slots per token, K distinct experts in them. A slot with weight 0 contributes nothing: a pair the router
    dropped, or (expert choice) a filler where a token got fewer experts than the widest token. The levels still
    compute such pairs; a production kernel would skip them."""

    routing_weights_TK: torch.Tensor  # fp32
    expert_ids_TK: torch.Tensor  # int64
    dropped_tokens: int = 0  # tokens that no expert processes


class SoftmaxTopK:
    """Softmax over all E experts in fp32, the k largest kept and renormalised to sum to one (Mixtral).
    Guarantees: exactly k distinct experts per token, nothing dropped; says nothing about balance."""

    def __call__(self, logits_TE: torch.Tensor, top_k: int) -> Routing:
        weights_TK, expert_ids_TK = torch.topk(torch.softmax(logits_TE.float(), dim=-1), top_k, dim=-1)
        return Routing(weights_TK / weights_TK.sum(dim=-1, keepdim=True), expert_ids_TK)


class SigmoidBias:
    """DeepSeek-V3: sigmoid scores; a per-expert bias, used only to *select* experts, nudges traffic away from
    busy experts; the weights are the unbiased scores of the chosen, renormalised. After each batch the bias moves
    by `update_rate` toward balance: up for experts below the mean load, down for those above (the aux-loss-free
    rule). Guarantees: exactly k distinct experts per token, nothing dropped; balance improves over batches."""

    def __init__(self, num_experts: int, update_rate: float = 1e-3):
        self.bias_E = torch.zeros(num_experts)
        self.update_rate = update_rate

    def __call__(self, logits_TE: torch.Tensor, top_k: int) -> Routing:
        scores_TE = torch.sigmoid(logits_TE.float())
        bias_E = self.bias_E.to(scores_TE.device)
        expert_ids_TK = torch.topk(scores_TE + bias_E, top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        load_E = torch.bincount(expert_ids_TK.flatten(), minlength=bias_E.numel()).float()
        self.bias_E = (bias_E + self.update_rate * torch.sign(load_E.mean() - load_E)).cpu()
        return Routing(weights_TK / weights_TK.sum(dim=-1, keepdim=True), expert_ids_TK)


class Switch:
    """Switch Transformer: top-1 by softmax, each expert takes at most C = ceil(capacity_factor · T / E) tokens,
    first come first served in token order; the rest are dropped (weight 0: the token passes through the layer
    unchanged in a real model) and counted. The kept weight is the softmax probability, not renormalised.
    Guarantees: one expert per token, no expert over capacity; drops possible."""

    def __init__(self, capacity_factor: float):
        self.capacity_factor = capacity_factor

    def __call__(self, logits_TE: torch.Tensor, top_k: int) -> Routing:
        T, E = logits_TE.shape
        weights_T1, expert_ids_T1 = torch.softmax(logits_TE.float(), dim=-1).max(dim=-1, keepdim=True)
        capacity = math.ceil(self.capacity_factor * T / E)
        one_hot_TE = torch.nn.functional.one_hot(expert_ids_T1[:, 0], E)
        arrival_T = (one_hot_TE.cumsum(dim=0) * one_hot_TE).sum(dim=1)  # 1 for an expert's first token
        kept_T1 = (arrival_T <= capacity)[:, None]
        return Routing(weights_T1 * kept_T1, expert_ids_T1, int((~kept_T1).sum()))


class ExpertChoice:
    """Expert choice (Zhou et al., 2022): the experts pick the tokens. Each expert takes the C tokens with the
    highest softmax score for it, C = ceil(capacity_factor · T · K / E) (at most T); the weight is that score. So
    every expert gets exactly C tokens (perfect balance), and a token may get several experts or none (counted as
    dropped). The routing is as wide as the most-chosen token; narrower tokens fill with weight-0 slots."""

    def __init__(self, capacity_factor: float):
        self.capacity_factor = capacity_factor

    def __call__(self, logits_TE: torch.Tensor, top_k: int) -> Routing:
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        capacity = min(T, math.ceil(self.capacity_factor * T * top_k / E))
        chosen_CE = torch.topk(probs_TE, capacity, dim=0).indices  # each expert's tokens
        chosen_TE = torch.zeros((T, E), dtype=torch.bool, device=logits_TE.device)
        chosen_TE.scatter_(0, chosen_CE, True)
        width = max(1, int(chosen_TE.sum(dim=1).max()))
        # Chosen experts first (by score), then unchosen ones as weight-0 fillers: distinct experts per token.
        expert_ids_TK = torch.argsort(chosen_TE.float() * 2 + probs_TE, dim=1, descending=True)[:, :width]
        weights_TK = torch.where(chosen_TE.gather(1, expert_ids_TK), probs_TE.gather(1, expert_ids_TK), 0.0)
        return Routing(weights_TK, expert_ids_TK, int((~chosen_TE.any(dim=1)).sum()))


def make_router(config: MoEConfig) -> SoftmaxTopK | SigmoidBias | Switch | ExpertChoice:
    if config.router == "expert-choice":
        return ExpertChoice(config.capacity_factor)
    if config.router == "sigmoid-bias":
        return SigmoidBias(config.num_experts)
    if config.router == "switch":
        return Switch(config.capacity_factor)
    return SoftmaxTopK()


def reference_forward(
    tokens_TH: torch.Tensor,
    weights: MoEWeights,
    routing_weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    first_expert: int = 0,
    round_hidden: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The layer in fp32, one expert at a time: the function every level must compute. Returns [T, H] fp32.

    `weights` may hold a slice of the routed experts, first_expert onwards (as an expert-parallel rank does): then
    only the pairs routed to that slice contribute, plus the shared experts `weights` holds. Its expert tensors may
    be `Fp8Experts`, indexed like a tensor. `round_hidden`, if given, is applied to every expert's fp32 hidden
    (SiLU·up) before the down projection: what a quantized level stores between its two GEMMs."""
    keep = round_hidden or (lambda hidden: hidden)
    out_TH = torch.zeros(tokens_TH.shape, dtype=torch.float32, device=tokens_TH.device)
    for local in range(weights.w_gate_EHI.shape[0]):
        token_idx, slot = torch.nonzero(expert_ids_TK == first_expert + local, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        x = tokens_TH[token_idx].float()
        hidden = F.silu(x @ weights.w_gate_EHI[local].float()) * (x @ weights.w_up_EHI[local].float())
        y = keep(hidden) @ weights.w_down_EIH[local].float()
        out_TH.index_add_(0, token_idx, y * routing_weights_TK[token_idx, slot, None].float())
    x = tokens_TH.float()
    for shared in range(weights.w_shared_gate_SHI.shape[0]):
        hidden = F.silu(x @ weights.w_shared_gate_SHI[shared].float()) * (x @ weights.w_shared_up_SHI[shared].float())
        out_TH += keep(hidden) @ weights.w_shared_down_SIH[shared].float()
    return out_TH


# ---------------------------------------------------------------------------------------------------------------
# FP8 (e4m3): what level 10 and the FP8 peer compute with
#
# An e4m3 number has 3 mantissa bits and a largest finite value of 448, so a tensor is stored as e4m3 values times
# an fp32 scale, one scale per slice: amax(slice) / 448 maps the slice's largest magnitude onto e4m3's. Each
# element then carries a rounding error of up to 2^-4 of its magnitude (half an e4m3 step), and the scale's slice
# decides how much range one outlier costs its neighbours: here per output channel for weights, per row for
# activations (a token, or a (token, expert) pair's hidden).
# ---------------------------------------------------------------------------------------------------------------
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


def power_of_two_at_least(x: torch.Tensor) -> torch.Tensor:
    """2^⌈log2 x⌉ for positive normal fp32 x, exactly: adding a mantissa's worth of ones to x's bits carries into
    the exponent unless the mantissa is zero, and the mask keeps the exponent. (Triton's quantize_rows kernel does
    the same to the same bits.)"""
    return ((x.float().view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def quantize_fp8(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x ≈ values · scales, one scale per row (the last dimension): (e4m3 values, x's shape, row-major; fp32 scales
    [..., 1]). A row of zeros gets a tiny scale and zero values. With `power_of_two` each scale is rounded up to a
    power of two (as MX formats store them): dividing by it is exact, and a row's grid stays put when its amax
    moves by a rounding, so two computations of nearly the same row quantize it alike."""
    x = x.float().contiguous()
    scales = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    if power_of_two:
        scales = power_of_two_at_least(scales)
    return (x / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_fp8's inverse, in fp32: each value times its row's scale."""
    return values.float() * scales


def fp8_round_trip(x: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """x as FP8 storage gives it back, in fp32: what a quantized level computes with in place of x."""
    return dequantize_fp8(*quantize_fp8(x, power_of_two))


@dataclass
class Fp8Experts:
    """One projection's experts in FP8, kept as the GEMM kernels want them: values [E, cols, depth] with the
    reduction (`depth`) contiguous, the layout Hopper's FP8 tensor cores read, and one fp32 scale per output
    column, [E, cols]. Indexed like the [E, depth, cols] tensor it replaces, it gives an expert's weights dequantized
    to fp32 [depth, cols], which is how `reference_forward` reads it."""

    values_ECD: torch.Tensor
    scales_EC: torch.Tensor

    @classmethod
    def quantize(cls, w_EDC: torch.Tensor) -> Fp8Experts:
        E, depth, cols = w_EDC.shape
        values_ECD = torch.empty((E, cols, depth), dtype=FP8_DTYPE, device=w_EDC.device)
        scales_EC = torch.empty((E, cols), dtype=torch.float32, device=w_EDC.device)
        for expert in range(E):  # one at a time: quantize_fp8 works in fp32, 2x the bf16 weights if done at once
            values, scales = quantize_fp8(w_EDC[expert].T)  # each output column's depth is one slice
            values_ECD[expert], scales_EC[expert] = values, scales[:, 0]
        return cls(values_ECD, scales_EC)

    @property
    def shape(self) -> torch.Size:
        E, cols, depth = self.values_ECD.shape
        return torch.Size((E, depth, cols))

    def __getitem__(self, expert: int) -> torch.Tensor:
        return dequantize_fp8(self.values_ECD[expert], self.scales_EC[expert, :, None]).T

    def select(self, experts: slice = slice(None), cols: slice = slice(None)) -> Fp8Experts:
        """Some of the experts and some of their output columns, as experts of their own (views)."""
        return Fp8Experts(self.values_ECD[experts, cols], self.scales_EC[experts, cols])


def fp8_layer_weights(router_HE: torch.Tensor, gate: Fp8Experts, up: Fp8Experts, down: Fp8Experts,
                      num_experts: int) -> MoEWeights:
    """The layer's weights from FP8 experts that hold the routed experts first and the shared ones after them
    (experts E … E+S−1, as level 10 and the FP8 peer keep them for one grouped GEMM): what `reference_forward`
    reads for the reference on the quantized values."""
    routed, shared = slice(0, num_experts), slice(num_experts, None)
    return MoEWeights(router_HE=router_HE,
                      w_gate_EHI=gate.select(routed), w_up_EHI=up.select(routed), w_down_EIH=down.select(routed),
                      w_shared_gate_SHI=gate.select(shared), w_shared_up_SHI=up.select(shared),
                      w_shared_down_SIH=down.select(shared))


def flop_count(config: MoEConfig, num_tokens: int) -> int:
    """Matmul FLOPs of one forward: T·(K + S) token-expert pairs (S shared experts), three H×I matmuls each,
    2 FLOPs per multiply-add."""
    pairs = num_tokens * (config.top_k + config.num_shared_experts)
    return 2 * pairs * 3 * config.hidden * config.intermediate


def min_bytes(config: MoEConfig, num_tokens: int, experts_touched: int, weight_bytes: int | None = None) -> int:
    """Fewest bytes one forward must move through device memory: the weights of every expert that got a token
    and of the shared experts, read once, plus the tokens read once and the output written once. `weight_bytes`:
    bytes per weight where the weights are stored in another format than the tokens (1 for FP8)."""
    element = torch.finfo(config.torch_dtype).bits // 8
    experts = experts_touched + config.num_shared_experts
    weights = experts * 3 * config.hidden * config.intermediate * (weight_bytes or element)
    return weights + 2 * num_tokens * config.hidden * element


# ---------------------------------------------------------------------------------------------------------------
# Traffic shapes and load metrics
#
# Real MoE traffic is not uniform: some experts are popular, some are nearly idle. A traffic shape makes the logits
# the router sees, so a benchmark can ask how a level behaves when the load is skewed, under any router. The load
# metrics describe whatever routing a forward got.
# ---------------------------------------------------------------------------------------------------------------
TRAFFIC_SHAPES = ("uniform", "zipf", "hot")


@dataclass(frozen=True)
class Traffic:
    """uniform: the router on random tokens. zipf: expert e (0-based) is chosen with probability ∝ (e + 1)^-s.
    hot: `hot_share` of the tokens pick expert 0 (so it gets hot_share/K of the (token, slot) pairs, hot_share·E/K
    times the mean load), the rest spread uniformly. A traffic shape makes the router's logits (router_logits); the
    router still decides."""

    shape: str = "uniform"
    zipf_s: float = 1.2
    hot_share: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in TRAFFIC_SHAPES:
            raise ConfigError(f"unknown traffic {self.shape!r}; choose one of {', '.join(TRAFFIC_SHAPES)}")
        if not 0 < self.zipf_s < math.inf:
            raise ConfigError(f"the zipf exponent s must be positive and finite, got {self.zipf_s}")
        if not 0 < self.hot_share <= 1:
            raise ConfigError(f"the hot expert's share must be in (0, 1], got {self.hot_share}")

    @property
    def label(self) -> str:
        if self.shape == "zipf":
            return f"zipf(s={self.zipf_s:g})"
        if self.shape == "hot":
            return f"hot({100 * self.hot_share:g}% of tokens)"
        return "uniform"


def router_logits(
    tokens_TH: torch.Tensor, router_HE: torch.Tensor, traffic: Traffic, generator: torch.Generator
) -> torch.Tensor:
    """The scores [T, E] a router sees. Uniform traffic: the router's own logits. Skewed traffic: the log of each
    expert's popularity plus Gumbel noise, so that taking the top k samples k distinct experts with
    probability ∝ popularity (the Gumbel-top-k trick), whichever router then reads them."""
    if traffic.shape == "uniform":
        return (tokens_TH @ router_HE).float()
    T, E = tokens_TH.shape[0], router_HE.shape[1]
    uniform_TE = torch.rand((T, E), device=tokens_TH.device, generator=generator).clamp_min(1e-12)
    gumbel_TE = -torch.log(-torch.log(uniform_TE))
    if traffic.shape == "zipf":
        log_popularity_E = -traffic.zipf_s * torch.log(torch.arange(1, E + 1, device=tokens_TH.device).float())
        return log_popularity_E + gumbel_TE
    # hot: expert 0 on top for a `hot_share` fraction of the tokens, at the bottom for the rest; the other experts
    # equally likely.
    takes_hot_T = torch.rand(T, device=tokens_TH.device, generator=generator) < traffic.hot_share
    others_TE = gumbel_TE[:, 1:]
    # One above the row's best, or one below its worst: a clear order that keeps the softmax weights O(1).
    gumbel_TE[:, 0] = torch.where(takes_hot_T, others_TE.max(dim=1).values + 1, others_TE.min(dim=1).values - 1)
    return gumbel_TE


def load_metrics(expert_ids_TK: torch.Tensor, num_experts: int) -> dict:
    """How evenly the (token, slot) pairs spread over the experts.

    load_cv: standard deviation over mean of the per-expert counts (0 when perfectly even); load_gini: 0 even,
    (E − 1)/E when one expert takes everything; load_max_over_mean: the busiest expert against the average (what
    a per-expert loop waits for); dead_experts: experts with under 1% of the mean load."""
    counts_E = torch.bincount(expert_ids_TK.flatten().cpu(), minlength=num_experts).double()
    mean = counts_E.mean()
    ascending = counts_E.sort().values
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    gini = (2 * (ranks * ascending).sum() / (num_experts * ascending.sum()) - (num_experts + 1) / num_experts)
    return {
        "tokens_per_expert": counts_E.long().tolist(),
        "load_cv": (counts_E.std(unbiased=False) / mean).item(),
        "load_gini": gini.item(),
        "load_max_over_mean": (counts_E.max() / mean).item(),
        "dead_experts": int((counts_E < 0.01 * mean).sum()),
    }
