"""The messages between the ingress and an engine replica (pickled by Ray; no Ray import here).

The ingress sends one `ReplicaRequest` per HTTP request. The replica's stream answers `Admitted` once its engine
admitted every request of the group, then one `ChoiceOutput` per engine output, tagged with its request's index.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitserve.server.engine.types import GenerationRequest, RequestOutput


@dataclass(frozen=True)
class ReplicaRequest:
    """The engine requests of one HTTP request (its choices): routed, admitted and streamed as one group.

    One replica admits them all or none (`EngineClient.generate_group`), and the choices of one prompt share its
    prefix cache there.
    """

    requests: tuple[GenerationRequest, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("a replica request holds at least one generation request")

    @property
    def kv_tokens(self) -> int:
        """KV cache tokens the group may hold at most: prompt + max_tokens of every request."""
        return sum(len(request.prompt_token_ids) + request.params.max_tokens for request in self.requests)

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        """The first request's prompt (what prefix affinity hashes; the choices of a group share it)."""
        return tuple(self.requests[0].prompt_token_ids)


@dataclass(frozen=True)
class Admitted:
    """The first item of a replica's stream: its engine admitted every request of the group."""


@dataclass(frozen=True)
class ChoiceOutput:
    """One engine output of the group's request number `index`."""

    index: int
    output: RequestOutput
