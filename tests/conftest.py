import os

# The suite runs on the CPU, GPU or not: Triton kernels go through the interpreter. Set before Triton is imported.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import labs.moe_optimization_journey as journey  # noqa: E402
from moe_model import MoEConfig, get_preset, init_weights  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def levels():
    return journey.load_levels()


@pytest.fixture(scope="session")
def tiny():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_weights(tiny):
    return init_weights(tiny, "cpu")


def make_config(**overrides) -> MoEConfig:
    fields = get_preset("tiny").to_dict() | {"name": "test"} | overrides
    return MoEConfig(**fields)
