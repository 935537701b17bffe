"""oneDNN-prepacked Linears: same results as `nn.Linear`, which modules get converted, and tied weights."""

from __future__ import annotations

import pytest
import torch

from fitserve.quant.matvec import matvec
from fitserve.server.engine import cpu_linear
from fitserve.server.engine.cpu_linear import PackedLinear, prepack_linears


class TiedLM(torch.nn.Module):
    """An embedding whose table is also the output projection, between two ordinary Linears."""

    def __init__(self, vocab: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.up = torch.nn.Linear(hidden, 3 * hidden)
        self.down = torch.nn.Linear(3 * hidden, hidden, bias=False)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.relu(self.up(self.embed(ids)))))


@pytest.mark.parametrize("shape", [(1, 32), (5, 32), (1, 7, 32)])
def test_packed_linear_matches_nn_linear(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = linear(x)
        got = PackedLinear(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tied_weight_is_packed_only_within_the_allowance() -> None:
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        expected = model(ids)
    report = prepack_linears(model)
    assert (report.packed, report.skipped, report.extra_bytes) == (2, 1, 0)
    assert isinstance(model.up, PackedLinear) and isinstance(model.down, PackedLinear)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.embed.weight

    table_bytes = model.embed.weight.numel() * 4
    assert prepack_linears(model, shared_copy_bytes=table_bytes - 1).packed == 0
    report = prepack_linears(model, shared_copy_bytes=table_bytes)
    assert (report.packed, report.extra_bytes) == (1, table_bytes)
    assert isinstance(model.lm_head, PackedLinear)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)  # the embedding still works


def test_only_plain_linears_of_packable_dtypes_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8).to(torch.float16), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16)
    )

    class NotPlain(torch.nn.Linear):  # stands in for bitsandbytes' Linear8bitLt / Linear4bit subclasses
        pass

    model.append(NotPlain(8, 8))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2-only CPU
    assert prepack_linears(model).packed == 1
    assert [type(m).__name__ for m in model] == ["Linear", "PackedLinear", "Linear", "NotPlain"]
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # native bf16
    assert prepack_linears(model).packed == 1
    assert [type(m).__name__ for m in model] == ["Linear", "PackedLinear", "PackedLinear", "NotPlain"]


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("rows", [1, 5, 16, 300])
def test_packed_bf16_linear_is_bit_identical_to_nn_linear(rows: int) -> None:
    """Prepacking bf16 changes the weight's layout, not the arithmetic: greedy outputs stay exactly the same."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = linear(x)
        got = PackedLinear(linear)(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_without_onednn_nothing_is_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build without oneDNN keeps every Linear as it is (the engine then runs plain `F.linear`)."""
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda: False)
    model = TiedLM()
    report = prepack_linears(model, shared_copy_bytes=1 << 30)
    assert (report.packed, report.skipped, report.extra_bytes) == (0, 0, 0)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_keep_dense_counts_every_packed_copy_and_keeps_the_originals() -> None:
    """With `keep_dense` each packed Linear keeps its dense weight (the compiled one-row step reads it), so every
    packed copy is extra memory within the allowance; beyond it Linears stay dense and nothing is released."""
    torch.manual_seed(0)
    model = TiedLM().eval()
    originals = {name: model.get_submodule(name).weight for name in ("up", "down", "lm_head")}
    copies = sum(w.numel() * w.element_size() for w in originals.values())
    report = prepack_linears(model, shared_copy_bytes=copies, keep_dense=True)
    assert (report.packed, report.skipped, report.extra_bytes, report.released_bytes) == (3, 0, copies, 0)
    for name, weight in originals.items():
        module = model.get_submodule(name)
        assert isinstance(module, PackedLinear) and module.dense_weight is not None
        assert module.dense_weight.data_ptr() == weight.data_ptr()

    tight = TiedLM().eval()
    up_bytes = tight.up.weight.numel() * tight.up.weight.element_size()
    report = prepack_linears(tight, shared_copy_bytes=up_bytes, keep_dense=True)
    assert (report.packed, report.skipped, report.extra_bytes) == (1, 2, up_bytes)
    assert isinstance(tight.up, PackedLinear) and type(tight.down) is torch.nn.Linear


def test_a_packed_shared_weight_keeps_its_dense_original() -> None:
    """The tied lm_head's original stays for the embedding anyway, so its PackedLinear keeps it for `matvec`."""
    model = TiedLM().eval()
    prepack_linears(model, shared_copy_bytes=1 << 30)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.dense_weight is not None
    assert model.lm_head.dense_weight.data_ptr() == model.embed.weight.data_ptr()
    assert isinstance(model.up, PackedLinear) and model.up.dense_weight is None


@pytest.mark.parametrize(("rows", "uses_matvec"), [(1, True), (5, False)])
def test_compiled_graph_takes_matvec_for_one_row_with_the_same_result(rows: int, uses_matvec: bool) -> None:
    """Traced by torch.compile, a PackedLinear that kept its dense weight computes a one-row input with `matvec`
    (the fused weight-streaming reduction) and more rows with oneDNN, both equal to `nn.Linear` within fp32 error."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(rows, 64)
    targets: list[str] = []

    def capture(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm

    torch._dynamo.reset()
    packed = PackedLinear(linear, keep_dense=True)
    with torch.inference_mode():
        expected = linear(x)
        got = torch.compile(packed, backend=capture, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert any("onednn_linear" in target for target in targets) is not uses_matvec
    assert any("sum" in target for target in targets) is uses_matvec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_is_a_linear_of_one_row(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 24).to(dtype), torch.randn(40).to(dtype)
    x = torch.randn(1, 1, 24).to(dtype)
    got = matvec(x, weight, bias)
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).to(dtype)
    assert got.shape == (1, 1, 40) and got.dtype == dtype
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
