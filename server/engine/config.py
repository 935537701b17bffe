"""The engine's configuration: one frozen dataclass, built once by the serve wiring (or a test)."""

from __future__ import annotations

from dataclasses import dataclass

from fitserve.server.engine.compile_mode import CompileMode


@dataclass(frozen=True)
class EngineConfig:
    """Everything the continuous-batching engine needs to know besides the model and tokenizer.

    Token budgets are in tokens, times in seconds. `max_batch_size` caps the running sequences (`None`: as many as
    the KV cache admits); after an OOM the scheduler lowers its `current_max_batch_size` below it for a while.
    """

    served_model_name: str
    max_model_len: int
    kv_capacity_tokens: int  # the plan's block-aligned capacity (a whole number of `block_size_tokens` blocks)
    max_batch_size: int | None = None
    max_waiting: int = 256
    max_prefill_tokens: int = 512  # prompt tokens computed per step (chunked prefill budget)
    oom_inject_steps: tuple[int, ...] = ()  # fault injection: steps (1-based) whose forward raises OOM
    sampling_fault_request_ids: tuple[str, ...] = ()  # fault injection: requests whose sampling raises (tests)
    crash_inject_step: int | None = None  # fault injection: the step (1-based) at which the loop itself dies
    device: str = "cpu"
    block_size_tokens: int = 16  # KV cache page size
    oom_recovery_steps: int | None = 256  # OOM-free steps after which a lowered batch cap doubles; None: never
    max_oom_retries: int = 2  # times one sequence may be re-queued after an OOM before it fails with 503
    idle_wait_s: float = 0.05  # how long the loop sleeps when there is nothing to do (woken early by new work)
    # One padded, masked SDPA call per layer for all decodes of a step instead of one call per sequence: the default
    # model in bf16 on 2 CPU cores, 16 decodes: 79 -> 50 ms a step (fp32: 114 -> 105 ms; equal at 4 decodes), and
    # one kernel instead of one per sequence on a GPU. Rounding differs from a lone `model.generate` in the last bits
    # (near-ties may diverge: the equivalence test's rule; docs/engine.md). A step whose padded K/V gather would
    # not fit in `attention_scratch_bytes` attends per sequence instead.
    batched_decode_attention: bool = True
    # transient memory one layer's attention may take (the plan's attention overhead); None: no limit
    attention_scratch_bytes: int | None = None
    num_threads: int | None = None  # torch intra-op threads for the engine thread; None leaves torch's default
    # Reuse the KV of full blocks whose token prefix an earlier or running sequence already computed (shared
    # system prompts, chat history). A hit prefills only the rest of the prompt, on top of the cached context.
    enable_prefix_caching: bool = True
    # fp32 on CPU: Linears run through oneDNN with weights prepacked once (server/engine/cpu_linear.py), 1.2-2x
    # faster matmuls for decode-sized batches, same memory. A weight shared with another module (tied lm_head)
    # costs an extra copy when packed: packed only within `spare_bytes`.
    prepack_cpu_linears: bool = True
    # Packed Linears keep their dense weight too, for the compiled one-row decode step's `matvec` (cpu_linear.py):
    # every packed copy is then extra memory within `spare_bytes`. Set by `fitserve serve` when AUTO compiles a
    # dense fp32/bf16 model's batch-1 step and the plan counted the copies.
    keep_dense_cpu_linears: bool = False
    spare_bytes: int = 0  # what packing may spend on copies: the plan's spare (+ the copies a compile choice counted)
    # Decode-only steps through a fixed-shape forward compiled (inductor) or captured (CUDA graphs) per bucket at
    # start-up (server/engine/compiled_decode.py); AUTO picks per device, OFF keeps the eager per-sequence path.
    compile_mode: CompileMode = CompileMode.OFF
    # Llama models run their decoder-layer loop directly (server/engine/llama_forward.py) instead of through
    # transformers' module wrappers: bit-identical logits, milliseconds less Python per step. Other architectures
    # (and models split over devices by accelerate) always take `model(...)`.
    direct_forward: bool = True
    # With the direct loop, each layer's q/k/v and gate/up projections joined into one matmul each, where exact
    # (server/engine/joined_projections.py): 4 matmuls a layer instead of 7.
    join_projections: bool = True
    # largest decode batch bucket (bigger decode steps run eagerly); AUTO on CPU compiles batch 1 only
    max_compiled_batch_size: int = 64
    # When building the decode step fails at start-up (no C++ compiler, an inductor error), log it and run every step
    # eagerly (`OFF`) instead of failing: what `fitserve serve` sets when it chose the mode itself (AUTO).
    compile_fallback_to_eager: bool = False

    def __post_init__(self) -> None:
        if self.block_size_tokens <= 0:
            raise ValueError(f"block_size_tokens must be positive, got {self.block_size_tokens}")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_capacity_tokens < self.block_size_tokens or self.kv_capacity_tokens % self.block_size_tokens:
            raise ValueError(
                f"kv_capacity_tokens ({self.kv_capacity_tokens}) must be a whole number (at least one) of blocks "
                f"of {self.block_size_tokens} tokens"
            )
        if self.spare_bytes < 0:
            raise ValueError(f"spare_bytes must be >= 0, got {self.spare_bytes}")
        if self.max_batch_size is not None and self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive or None, got {self.max_batch_size}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_prefill_tokens <= 0:
            raise ValueError(f"max_prefill_tokens must be positive, got {self.max_prefill_tokens}")

    @property
    def num_kv_blocks(self) -> int:
        """Blocks the KV cache hands to sequences: the one place this number is computed (scheduler and runner read
        it). The runner's cache allocates one more, the scratch block (counted by the plan too)."""
        return self.kv_capacity_tokens // self.block_size_tokens
