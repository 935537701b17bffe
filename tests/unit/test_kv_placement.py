"""KV cache placement: each layer's K/V on that layer's device, as many bytes per device as the plan's split says.

No GPU here: the second "device" is torch's meta device, which allocates nothing but keeps shapes and dtypes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fitserve.quant.budget import GIB
from fitserve.quant.plan import PlanRequest, make_plan
from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.kv_cache import PagedKVCache, layer_devices
from tests.unit.test_budget import FakeProbe
from tests.unit.test_plan import SHAPE


def test_cache_allocates_each_layer_on_its_device_as_the_plan_split_says() -> None:
    probe = FakeProbe(gpus=[(3 * GIB, 4 * GIB), (3 * GIB, 4 * GIB)])  # neither holds every layer
    shape = replace(SHAPE, layers_module="model.layers")
    plan = make_plan(
        PlanRequest(model="/fake", device="cuda", precision="bf16", max_num_seqs=4), probe=probe, shape=shape
    )
    first, second = plan.device_split
    assert first.num_layers and second.num_layers
    config = EngineConfig(
        served_model_name="m",
        max_model_len=plan.max_model_len,
        kv_capacity_tokens=plan.kv_capacity_tokens,
        block_size_tokens=plan.block_size_tokens,
    )
    fake = {"cuda:0": "cpu", "cuda:1": "meta"}  # stand-ins for the two GPUs
    devices = [fake[s.device] for s in plan.device_split for _ in range(s.num_layers)]
    cache = PagedKVCache(
        shape.num_layers,
        config.num_kv_blocks,
        config.block_size_tokens,
        shape.num_kv_heads,
        shape.head_dim,
        torch.bfloat16,
        devices,
    )
    assert cache.nbytes_by_device() == {"cpu": first.kv_cache_bytes, "meta": second.kv_cache_bytes}
    assert [t.device.type for t in cache.k] == ["cpu"] * first.num_layers + ["meta"] * second.num_layers


def test_one_device_cache_holds_exactly_the_planned_kv_bytes() -> None:
    """The plan counts the cache's scratch block; the engine's cache is the pool's blocks plus that block."""
    request = PlanRequest(model="/fake", memory_budget_bytes=5 * GIB + 12_345, max_num_seqs=256)  # budget-bound
    plan = make_plan(request, probe=FakeProbe(), shape=SHAPE)
    config = EngineConfig(
        served_model_name="m",
        max_model_len=plan.max_model_len,
        kv_capacity_tokens=plan.kv_capacity_tokens,
        block_size_tokens=plan.block_size_tokens,
    )
    cache = PagedKVCache(
        SHAPE.num_layers,
        config.num_kv_blocks,
        config.block_size_tokens,
        SHAPE.num_kv_heads,
        SHAPE.head_dim,
        torch.float32 if plan.kv_dtype == "float32" else torch.bfloat16,
        "meta",  # shapes and dtypes without allocating
    )
    assert cache.nbytes == plan.kv_cache_bytes == (plan.kv_capacity_tokens + 16) * plan.kv_bytes_per_token
    assert plan.total_bytes == plan.weights_bytes + plan.quant_state_bytes + plan.overhead_bytes + cache.nbytes
    assert plan.spare_bytes == plan.budget_bytes - plan.total_bytes < 16 * plan.kv_bytes_per_token


def test_cache_refuses_a_device_list_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 devices given for 3 layers"):
        PagedKVCache(3, 4, 16, 2, 8, torch.float32, ["cpu", "cpu"])


def test_layer_devices_follow_the_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    cpu = torch.device("cpu")
    assert layer_devices(model, num_layers, cpu) == [cpu] * num_layers
    model.model.layers[1].to("meta")  # as if layer 1 lived on another device
    devices = layer_devices(model, num_layers, cpu)
    assert devices[1].type == "meta" and all(d == cpu for i, d in enumerate(devices) if i != 1)
