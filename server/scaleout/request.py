"""What the ingress sends an engine replica for one generation (pickled by Ray; no Ray import here)."""

from __future__ import annotations

from dataclasses import dataclass

from fitserve.server.engine.types import SamplingParams


@dataclass(frozen=True)
class ReplicaRequest:
    """One generation request: the prompt's token ids, the sampling parameters and the request id."""

    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    request_id: str

    @property
    def kv_tokens(self) -> int:
        """KV cache tokens the request may hold at most: prompt + max_tokens."""
        return len(self.prompt_token_ids) + self.params.max_tokens
