"""What crosses the Engine -> Ingress handle for streamed requests (torch-free: both sides import it).

Each request is one streaming `Engine.submit` call, its lifetime: it yields `Attached` (or `Rejected`) and then
nothing until the request ends (an engine failure is raised through it; cancelling it aborts the request in the
replica that runs it), except while that replica has no channel to the request's Ingress: then it carries the
request's own deltas, and `Switched` once a channel takes over. The tokens of all of an Ingress replica's
requests on one Engine replica travel together through one streaming `Engine.channel` call: it yields `ChannelOpened`, then one list of `RequestOutput` deltas
per engine step (coalesced: a delta covers whatever the request gained since the previous message). Only a
request's first delta carries its prompt ids; the Ingress's `EngineClient` fills them in again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llama4serve.cluster.outputs import RequestOutput

CHANNEL_LINGER_S = 2.0  # an Engine replica ends a channel this long after the Ingress's last request there


@dataclass(frozen=True)
class Attached:
    """A request was queued in Engine replica `replica_id`; `has_channel`: that replica already streams to this
    Ingress replica (when not, the Ingress opens a channel)."""

    replica_id: str
    has_channel: bool


@dataclass(frozen=True)
class Switched:
    """In a request's `submit` call: its deltas so far came through this call, the rest come through the
    channel (a request that arrived before its Ingress had a channel to that Engine replica)."""


@dataclass(frozen=True)
class ChannelOpened:
    """First item of a channel: which Engine replica it streams from; `duplicate`: that replica already had a
    channel to this Ingress replica, so this one ends at once."""

    replica_id: str
    duplicate: bool = False


def for_wire(out: RequestOutput, first: bool) -> RequestOutput:
    """The delta as sent: prompt ids only in a request's first delta."""
    return out if first else replace(out, prompt_token_ids=[])


def merge(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one delta (what is ready is handed out at once)."""
    if len(outputs) == 1:
        return outputs[0]
    first, last = outputs[0], outputs[-1]

    def joined(name: str):
        parts = [getattr(o, name) for o in outputs]
        return None if all(p is None for p in parts) else [x for p in parts for x in (p or [])]

    return RequestOutput(
        request_id=first.request_id,
        prompt_token_ids=first.prompt_token_ids,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        logprobs=joined("logprobs"),
        top_logprobs=joined("top_logprobs"),
        prompt_logprobs=first.prompt_logprobs,
        num_generated_tokens=last.num_generated_tokens,
        prompt_top_logprobs=first.prompt_top_logprobs,
    )
