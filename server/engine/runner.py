"""The model runner: the only place in server/ that runs the model.

`ModelRunner.run(batch)` packs the step's chunks into one sequence (`input_ids` [1, total_tokens] with per-token
`position_ids`), runs the HF model with the paged attention function (see kv_cache.py), keeps only the hidden
states of the tokens that sample (`logits_to_keep`), and samples the next token of each such sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fitserve.server.engine.compile_mode import CompileMode
from fitserve.server.engine.compiled_decode import CompiledDecode, DecodeBuckets, DecodeRow, resolve_mode
from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.cpu_linear import packable_dtypes, prepack_linears
from fitserve.server.engine.joined_projections import join_llama_projections
from fitserve.server.engine.kv_cache import (
    BATCH_KWARG,
    DecodeGroup,
    PackedBatch,
    PagedKVCache,
    SeqSlice,
    layer_devices,
    register_attention,
)
from fitserve.server.engine.llama_forward import direct_logits, supports_direct_forward
from fitserve.server.engine.sampling import sample_sequences
from fitserve.server.engine.scheduler import ScheduledBatch, Sequence
from fitserve.server.engine.types import SampleResult

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

_CPU_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory")


def is_oom(exc: BaseException) -> bool:
    """True for the out-of-memory errors a step can raise: CUDA OOM, or CPU allocation failures."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CPU_OOM_MARKERS)


@dataclass(frozen=True)
class KVCacheShape:
    """What the KV cache needs to know about the model (layers, KV heads, head size)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> KVCacheShape:
        """Read layer/head sizes from a transformers config (text part for multimodal configs)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, kv_heads, head_dim)


def kv_dtype(model: PreTrainedModel) -> torch.dtype:
    """The KV cache's dtype: the input embeddings' when floating point, else the config's dtype, else fp16."""
    weight = model.get_input_embeddings().weight
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        return weight.dtype
    configured = getattr(model.config, "dtype", None)
    return configured if isinstance(configured, torch.dtype) else torch.float16


class ModelRunner:
    """Owns the model, the KV cache and sampling state; turns a `ScheduledBatch` into sampled tokens."""

    def __init__(self, model: PreTrainedModel, config: EngineConfig) -> None:
        self.config = config
        self.model = model.eval()
        self.device = torch.device(config.device)
        self.model.set_attn_implementation(register_attention())
        self.shape = KVCacheShape.from_config(model.config)
        self.dtype = kv_dtype(model)
        self.block_size = config.block_size_tokens
        num_blocks = config.num_kv_blocks
        self.cache = PagedKVCache(
            self.shape.num_layers,
            num_blocks,
            self.block_size,
            self.shape.num_kv_heads,
            self.shape.head_dim,
            self.dtype,
            layer_devices(self.model, self.shape.num_layers, self.device),  # several GPUs: KV beside its layer
        )
        self.oom_inject_steps = frozenset(config.oom_inject_steps)
        self.direct_forward = config.direct_forward and supports_direct_forward(self.model)
        if self.direct_forward and config.join_projections:  # before packing: the joined weights are packed once
            joined = join_llama_projections(self.model)
            if self.device.type == "cuda":  # the parts' freed blocks would stay reserved by the caching allocator
                torch.cuda.empty_cache()
            logger.info(
                "joined projections: %d q/k/v and gate/up groups joined, %d left separate, %.1f MiB of checkpoint "
                "file pages given back",
                joined.joined,
                joined.kept,
                joined.released_bytes / 2**20,
            )
        if config.prepack_cpu_linears and self.device.type == "cpu" and self.dtype in packable_dtypes():
            packed = prepack_linears(
                self.model, shared_copy_bytes=config.spare_bytes, keep_dense=config.keep_dense_cpu_linears
            )
            logger.info(
                "oneDNN prepacked Linears: %d packed, %d left unpacked (no room for a copy), %.1f MiB extra, "
                "%.1f MiB of checkpoint file pages given back%s",
                packed.packed,
                packed.skipped,
                packed.extra_bytes / 2**20,
                packed.released_bytes / 2**20,
                ", dense weights kept for compiled one-row steps" if config.keep_dense_cpu_linears else "",
            )
        logger.info(
            "KV cache: %d blocks x %d tokens, %s, %.1f MiB",
            num_blocks,
            self.block_size,
            self.dtype,
            self.cache.nbytes / 2**20,
        )
        logger.info("model forward: %s", "direct Llama layer loop" if self.direct_forward else "transformers")
        num_cache_devices = len({t.device for t in self.cache.k})
        self.compile_mode = resolve_mode(config.compile_mode, self.device, num_cache_devices)
        self.compiled_decode: CompiledDecode | None = None
        if self.compile_mode is not CompileMode.OFF:
            largest_batch = min(config.max_batch_size or config.max_compiled_batch_size, config.max_compiled_batch_size)
            buckets = DecodeBuckets.build(
                largest_batch,
                -(-config.max_model_len // self.block_size),
            )
            self.compiled_decode = CompiledDecode(
                self.model, self.cache, buckets, self.compile_mode, self.device, self.direct_forward
            )
            try:
                self.compiled_decode.warm_up()  # at start-up (serve builds the engine before it listens), not later
            except Exception as error:
                if not config.compile_fallback_to_eager:
                    raise
                first_line = next(iter(str(error).strip().splitlines()), "")
                mode, kind = self.compile_mode.value, type(error).__name__
                logger.warning("building the %s decode step failed (%s: %s); steps run eagerly", mode, kind, first_line)
                logger.debug("decode step build failure", exc_info=True)
                self.compiled_decode, self.compile_mode = None, CompileMode.OFF
        if self.compiled_decode is None:
            attention = (
                "decodes attended in one batched call per layer while the padded gather fits the plan's scratch"
                if config.batched_decode_attention
                else "per-sequence attention"
            )
            logger.info("decode step: off (eager forward each step; %s)", attention)

    def configure_threads(self) -> None:
        """Apply `EngineConfig.num_threads` (torch intra-op threads) from the engine thread."""
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)

    # ---- input preparation -------------------------------------------------------------------------------------

    def _slots(self, seq: Sequence) -> torch.Tensor:
        """Cache slots of every position the sequence may ever use (its block table is fixed while it runs)."""
        if seq.slot_state is None:
            blocks = torch.tensor(seq.block_table, dtype=torch.long)
            offsets = torch.arange(self.block_size)
            seq.slot_state = (blocks.unsqueeze(1) * self.block_size + offsets).flatten().to(self.device)
        return seq.slot_state

    def _gather_fits(self, batch: ScheduledBatch) -> bool:
        """True when the batched decode attention's padded K/V copy of every decode's context (one layer's K and V,
        `[decodes, kv_heads, widest context, head_dim]` each) fits in the plan's attention scratch."""
        cap = self.config.attention_scratch_bytes
        if cap is None:
            return True
        width = max(c.start // self.block_size + 1 for c in batch.decodes) * self.block_size
        per_token = 2 * self.shape.num_kv_heads * self.shape.head_dim * self.dtype.itemsize
        return len(batch.decodes) * width * per_token <= cap

    def _decode_group(self, batch: ScheduledBatch) -> tuple[DecodeGroup, torch.Tensor]:
        """Block tables + context lengths of all decodes (batched decode attention), and their new tokens' slots."""
        bs = self.block_size
        decodes = batch.decodes
        width = max(c.start // bs + 1 for c in decodes)
        scratch = self.cache.scratch_block
        tables = [(c.seq.block_table[: c.start // bs + 1] + [scratch] * width)[:width] for c in decodes]
        new_slots = [t[c.start // bs] * bs + c.start % bs for t, c in zip(tables, decodes, strict=True)]
        dev = self.device
        group = DecodeGroup(
            len(decodes),
            torch.tensor(tables, dtype=torch.long, device=dev),
            torch.tensor([c.start + 1 for c in decodes], dtype=torch.long, device=dev),
        )
        return group, torch.tensor(new_slots, dtype=torch.long, device=dev)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedBatch]:
        """Packed input ids, position ids, the rows to keep for logits, and the attention metadata."""
        ids: list[int] = []
        positions: list[int] = []
        keep: list[int] = []
        slot_parts: list[torch.Tensor] = []
        slices: list[SeqSlice] = []
        dev = self.device
        group = None
        chunks = batch.chunks
        if self.config.batched_decode_attention and len(batch.decodes) > 1 and self._gather_fits(batch):
            group, new_slots = self._decode_group(batch)
            slot_parts.append(new_slots)
            for i, c in enumerate(batch.decodes):
                ids.append(c.seq.token_ids[c.start])
                positions.append(c.start)
                keep.append(i)
            chunks = batch.prefills
        for c in chunks:
            row = len(ids)
            end = c.start + c.num_tokens
            ids.extend(c.seq.token_ids[c.start : end])
            positions.extend(range(c.start, end))
            if c.sample:
                keep.append(row + c.num_tokens - 1)
            slots = self._slots(c.seq)[:end]
            slot_parts.append(slots[c.start :])
            mask = None
            if c.start > 0 and c.num_tokens > 1:
                mask = torch.arange(c.start, end).unsqueeze(1) >= torch.arange(end).unsqueeze(0)
            ctx_slots = first_slot = None
            if c.start > 0:
                ctx_slots = slots
                if _is_run(c.seq.block_table, end, self.block_size):
                    first_slot = c.seq.block_table[0] * self.block_size
            slices.append(SeqSlice(row, c.num_tokens, c.start, ctx_slots, _to(mask, dev), first_slot))
        meta = PackedBatch(self.cache, torch.cat(slot_parts), slices, group, dev.type == "cpu")
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.tensor([positions], dtype=torch.long, device=dev)
        return input_ids, position_ids, torch.tensor(keep, dtype=torch.long, device=dev), meta

    # ---- the step ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the model on the batch; returns logits [num_sampled, vocab] of the sampling chunks."""
        if batch.step in self.oom_inject_steps:
            raise torch.OutOfMemoryError(f"injected OOM at step {batch.step} (EngineConfig.oom_inject_steps)")
        if self.compiled_decode is not None and batch.decodes and not batch.prefills:
            rows = [DecodeRow(c.seq.token_ids[c.start], c.start, c.seq.block_table) for c in batch.decodes]
            logits = self.compiled_decode.run(rows)
            if logits is not None:
                return logits
        input_ids, position_ids, keep, meta = self.prepare(batch)
        if self.direct_forward:
            return direct_logits(self.model, input_ids, position_ids, keep, meta)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
            **{BATCH_KWARG: meta},
        )
        return out.logits[0]

    def run(self, batch: ScheduledBatch) -> list[SampleResult]:
        """One step: forward + sampling. Returns one result per chunk with `sample=True`, in order; a row whose
        sampling failed (only that sequence) is a `SampleFailure`."""
        logits = self.forward_logits(batch)
        sampling = [c.seq for c in batch.chunks if c.sample]
        if not sampling:
            return []
        return sample_sequences(logits, sampling, frozenset(self.config.sampling_fault_request_ids))


def _is_run(block_table: list[int], num_tokens: int, block_size: int) -> bool:
    """True when the blocks holding the first `num_tokens` positions are consecutive ids."""
    used = -(-num_tokens // block_size)
    return block_table[used - 1] - block_table[0] == used - 1 if used else True


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
