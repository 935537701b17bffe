"""The decode step compiled once per shape bucket and replayed.

A decode-only step (every running sequence adds one token) has the same work at every step except for two
sizes: how many sequences decode, and how far back their contexts reach. `DecodeBuckets` rounds both up to a
few fixed shapes; `StaticDecodeInputs` holds one bucket's inputs as preallocated tensors (token ids, positions,
the slot each new K/V goes to, block tables padded with the cache's scratch block, context lengths) that each
step overwrites in place. The forward over those tensors is the stock HF model with one batched paged attention
call per layer (`kv_cache.DecodeGroup`), so a bucket's forward always sees the same shapes and addresses:

- `CompileMode.INDUCTOR`: `torch.compile` (inductor) of that forward: one graph for batch 1 and one, dynamic in
  the batch and context sizes, for every larger bucket (CPU or GPU);
- `CompileMode.CUDA_GRAPHS`: the forward captured once per bucket with `torch.cuda.CUDAGraph` into one shared
  memory pool, largest bucket first, and replayed (GPU only);
- `CompileMode.EAGER`: the same fixed-shape forward, run as it is (nothing to compile);
- `CompileMode.OFF`: no decode step of its own; the runner's eager per-sequence path runs every step.

`CompiledDecode.warm_up()` compiles or captures every bucket at start-up, so no user request pays for it
(EAGER has nothing to build).
Prefill and mixed prefill+decode steps stay eager in the runner. Sampling runs right after, on the bucket's
first `num` rows of logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fitserve.server.engine.compile_mode import CompileMode
from fitserve.server.engine.kv_cache import BATCH_KWARG, DecodeGroup, PackedBatch, PagedKVCache
from fitserve.server.engine.llama_forward import direct_logits

logger = logging.getLogger(__name__)


def resolve_mode(mode: CompileMode, device: torch.device, num_cache_devices: int = 1) -> CompileMode:
    """The concrete mode for `device`: AUTO is CUDA graphs on one CUDA device and OFF elsewhere.

    On CPU `fitserve serve` decides AUTO itself, with the plan (`compile_mode.choose_cpu_compile`: batch-1 steps
    compiled for torch's weight-only INT8/INT4 when the spare budget holds it), and hands the engine a concrete mode;
    an AUTO that reaches the runner on CPU (an engine built by hand) stays OFF. Compiling every batch bucket
    (`--compile-mode inductor`) takes minutes at the first start and ~400 MiB on CPU (docs/benchmarks.md). CUDA
    graphs on a non-CUDA device is a configuration error, and so is capturing one graph over layers (and their KV
    caches) on `num_cache_devices` > 1 GPUs: a graph is captured on one device's stream; AUTO keeps such a model on
    OFF.
    """
    if mode is CompileMode.AUTO:
        one_gpu = device.type == "cuda" and num_cache_devices == 1
        return CompileMode.CUDA_GRAPHS if one_gpu else CompileMode.OFF
    if mode is CompileMode.CUDA_GRAPHS and device.type != "cuda":
        raise ValueError(f"compile mode {mode.value!r} needs a CUDA device, got {device}")
    if mode is CompileMode.CUDA_GRAPHS and num_cache_devices > 1:
        raise ValueError(f"compile mode {mode.value!r} captures one GPU; the model spans {num_cache_devices}")
    return mode


def cpu_compiler_available() -> bool:
    """True when inductor finds the C++ compiler it builds CPU kernels with (`CXX` or g++/clang++ on PATH); a slim
    container image has none."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own error types (InvalidCxxCompiler, RuntimeError)
        return False
    return True


def _powers_of_two_up_to(limit: int, start: int = 1) -> tuple[int, ...]:
    """start, 2*start, 4*start, ... below `limit`, then `limit` itself."""
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return tuple(sizes)


@dataclass(frozen=True)
class DecodeBuckets:
    """The fixed decode shapes: batch sizes and context lengths (in KV blocks), each ascending."""

    batch_sizes: tuple[int, ...]
    context_blocks: tuple[int, ...]

    @classmethod
    def build(cls, max_batch_size: int, max_context_blocks: int, min_context_blocks: int = 8) -> DecodeBuckets:
        """Powers of two up to each limit (the limit itself is the last bucket)."""
        if max_batch_size <= 0 or max_context_blocks <= 0:
            raise ValueError(f"bucket limits must be positive, got {max_batch_size}, {max_context_blocks}")
        first_context = min(min_context_blocks, max_context_blocks)
        return cls(_powers_of_two_up_to(max_batch_size), _powers_of_two_up_to(max_context_blocks, first_context))

    def select(self, num: int, blocks: int) -> tuple[int, int] | None:
        """The smallest bucket (batch size, context blocks) holding `num` decodes over `blocks` blocks; None if
        none does."""
        batch = next((b for b in self.batch_sizes if b >= num), None)
        context = next((c for c in self.context_blocks if c >= blocks), None)
        return None if batch is None or context is None else (batch, context)

    def all(self) -> list[tuple[int, int]]:
        """Every (batch size, context blocks) pair, largest first (the order CUDA graphs are captured in)."""
        return sorted(((b, c) for b in self.batch_sizes for c in self.context_blocks), reverse=True)


@dataclass(frozen=True)
class DecodeRow:
    """One decoding sequence: its new token, that token's position, and the sequence's block table."""

    token_id: int
    position: int
    block_table: Sequence[int]


class StaticDecodeInputs:
    """One bucket's inputs, allocated once; `fill` overwrites them in place (the addresses never change)."""

    def __init__(self, batch: int, context_blocks: int, cache: PagedKVCache, device: torch.device) -> None:
        self.batch = batch
        self.context_blocks = context_blocks
        self.block_size = cache.block_size
        self.scratch_block = cache.scratch_block
        self.input_ids = torch.zeros((1, batch), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((1, batch), dtype=torch.long, device=device)
        self.slot_mapping = torch.full((batch,), cache.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((batch, context_blocks), cache.scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones((batch,), dtype=torch.long, device=device)

    def batch_dims(self) -> tuple[tuple[torch.Tensor, int], ...]:
        """Each input tensor with the dimension that runs over the bucket's rows (its batch)."""
        return (
            (self.input_ids, 1),
            (self.position_ids, 1),
            (self.slot_mapping, 0),
            (self.block_tables, 0),
            (self.context_lens, 0),
        )

    def host_values(self, rows: Sequence[DecodeRow]) -> dict[str, torch.Tensor]:
        """The padded CPU tensors `fill` copies in: padding rows decode token 0 at position 0 in the scratch block
        (they write the scratch slot and attend to it alone)."""
        if len(rows) > self.batch:
            raise ValueError(f"{len(rows)} rows do not fit a bucket of {self.batch}")
        bs, width = self.block_size, self.context_blocks
        pad = self.batch - len(rows)
        tables = []
        for r in rows:
            used = r.position // bs + 1
            if used > width:
                raise ValueError(f"position {r.position} needs {used} blocks, the bucket holds {width}")
            tables.append(list(r.block_table[:used]) + [self.scratch_block] * (width - used))
        tables.extend([[self.scratch_block] * width] * pad)
        positions = [r.position for r in rows] + [0] * pad
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        return {
            "input_ids": torch.tensor([[r.token_id for r in rows] + [0] * pad], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "slot_mapping": torch.tensor(slots, dtype=torch.long),
            "block_tables": torch.tensor(tables, dtype=torch.long),
            "context_lens": torch.tensor([p + 1 for p in positions], dtype=torch.long),
        }

    def fill(self, rows: Sequence[DecodeRow]) -> None:
        """Write `rows` (then padding) into the static tensors."""
        for name, value in self.host_values(rows).items():
            getattr(self, name).copy_(value, non_blocking=True)


def decode_forward(
    model: torch.nn.Module, cache: PagedKVCache, inputs: StaticDecodeInputs, direct: bool = False
) -> torch.Tensor:
    """The fixed-shape decode forward: logits [batch, vocab] for every row of the bucket (padding included), through
    the direct Llama layer loop when `direct` (server/engine/llama_forward.py), else `model(...)`."""
    group = DecodeGroup(inputs.block_tables.shape[0], inputs.block_tables, inputs.context_lens)  # symbolic when dynamic
    meta = PackedBatch(cache, inputs.slot_mapping, [], group)
    if direct:
        return direct_logits(model, inputs.input_ids, inputs.position_ids, None, meta)
    out = model(
        input_ids=inputs.input_ids,
        position_ids=inputs.position_ids,
        use_cache=False,
        **{BATCH_KWARG: meta},
    )
    return out.logits[0]


@dataclass(frozen=True)
class WarmUpReport:
    """What `CompiledDecode.warm_up` did: the mode, the buckets and how long they took."""

    mode: CompileMode
    buckets: tuple[tuple[int, int], ...]
    seconds: float


class CompiledDecode:
    """Decode-only steps through per-bucket compiled (or CUDA-graph captured) forwards."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        buckets: DecodeBuckets,
        mode: CompileMode,
        device: torch.device,
        direct_forward: bool = False,
    ) -> None:
        if mode in (CompileMode.AUTO, CompileMode.OFF):
            raise ValueError(f"CompiledDecode needs a concrete compile mode, got {mode.value!r}")
        self.model = model
        self.cache = cache
        self.buckets = buckets
        self.mode = mode
        self.device = device
        self.direct_forward = direct_forward
        self._inputs: dict[tuple[int, int], StaticDecodeInputs] = {}
        self._runners: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self._compiled: Callable[[torch.nn.Module, PagedKVCache, StaticDecodeInputs, bool], torch.Tensor] | None = None
        self._graph_pool: torch.cuda._POOL_HANDLE | None = None  # one memory pool shared by every bucket's graph

    def bucket_for(self, rows: Sequence[DecodeRow]) -> tuple[int, int] | None:
        """The bucket these rows run in, or None when they exceed the largest one."""
        if not rows:
            return None
        blocks = max(r.position // self.cache.block_size + 1 for r in rows)
        return self.buckets.select(len(rows), blocks)

    @torch.inference_mode()
    def warm_up(self) -> WarmUpReport:
        """Compile or capture every bucket now (start-up), largest first. EAGER has nothing to build."""
        start = time.perf_counter()
        pairs = self.buckets.all() if self.mode is not CompileMode.EAGER else []
        for pair in pairs:
            self._runner(pair)
        seconds = time.perf_counter() - start
        logger.info(
            "decode step: %s, buckets: batch sizes %s x context blocks %s; %d built at start-up in %.1f s",
            self.mode.value,
            list(self.buckets.batch_sizes),
            list(self.buckets.context_blocks),
            len(pairs),
            seconds,
        )
        return WarmUpReport(self.mode, tuple(pairs), seconds)

    @torch.inference_mode()
    def run(self, rows: Sequence[DecodeRow]) -> torch.Tensor | None:
        """Logits [len(rows), vocab] of one decode-only step, or None when no bucket holds it (run it eagerly)."""
        pair = self.bucket_for(rows)
        if pair is None:
            return None
        runner = self._runner(pair)
        self._inputs[pair].fill(rows)
        return runner()[: len(rows)]

    # ---- building a bucket ---------------------------------------------------------------------------------------

    def _runner(self, pair: tuple[int, int]) -> Callable[[], torch.Tensor]:
        """The bucket's replay function, built (compiled / captured) on first use."""
        runner = self._runners.get(pair)
        if runner is None:
            inputs = self._inputs[pair] = StaticDecodeInputs(*pair, self.cache, self.device)
            if self.mode is CompileMode.CUDA_GRAPHS:
                runner = self._capture(inputs)
            elif self.mode is CompileMode.INDUCTOR:
                runner = self._compile(inputs)
            else:
                runner = self._eager(inputs)
            self._runners[pair] = runner
        return runner

    def _eager(self, inputs: StaticDecodeInputs) -> Callable[[], torch.Tensor]:
        """The fixed-shape forward run as it is (nothing to build: buckets are made on first use)."""
        model, cache, direct = self.model, self.cache, self.direct_forward
        return lambda: decode_forward(model, cache, inputs, direct)

    def _compile(self, inputs: StaticDecodeInputs) -> Callable[[], torch.Tensor]:
        """torch.compile the forward and run it once to build this bucket's graph.

        Two graphs serve every bucket: batch 1 has its own (its Linears are matrix-vector products), and every larger
        batch bucket shares one with the batch dimension marked dynamic; the context width is dynamic in both. With
        one static graph per batch size, `--compile-mode inductor` built the default model's 15 buckets (batch 1-16
        x 3 context widths, bf16) in 149 s cold and 133 s again with the compile cache warm, on the 2-core VM; as two
        graphs in 113 s cold, 100 s at the next start, then 16 s, with the same batch-16 step (27.5-27.7 vs 27.6-28.2
        ms; `benchmarks/decode_step.py --compile-modes off,inductor --precision bf16 --keep-dense-linears
        --batch-sizes 16`).
        """
        if self._compiled is None:
            # batch 1 and the other batch sizes are two graphs of the same function: keep dynamo from falling back
            limit = len(self.buckets.batch_sizes) + len(self.buckets.context_blocks) + 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            self._compiled = torch.compile(decode_forward)
        torch._dynamo.maybe_mark_dynamic(inputs.block_tables, 1)
        if inputs.batch > 1:
            for tensor, dim in inputs.batch_dims():
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        compiled = self._compiled
        model, cache, direct = self.model, self.cache, self.direct_forward
        compiled(model, cache, inputs, direct)  # compiles this bucket's graph
        return lambda: compiled(model, cache, inputs, direct)

    def _capture(self, inputs: StaticDecodeInputs) -> Callable[[], torch.Tensor]:
        """Capture the eager forward into a CUDA graph (after warm-up runs on a side stream, as capture needs)."""
        model, cache, direct = self.model, self.cache, self.direct_forward
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy cuBLAS/kernel initialisation must not happen during capture
                decode_forward(model, cache, inputs, direct)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = decode_forward(model, cache, inputs, direct)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay
