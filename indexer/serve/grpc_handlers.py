"""Method handlers of `kvindex.v1.KvIndexer`: the generated ones, with token ids off the wire.

A parsed `repeated uint32 token_ids` reaches Python one int object at a time, a large part
of an 8k-token Score's cost (docs/benchmarks.md, gRPC Score). With the C extension, Score
and FindBestWorker requests are deserialised into `WireTokens`: the token ids read
straight from the request bytes as packed u32 and cut out of them
(`kvcore._native.take_uint32_field`), and the message parsed from the rest, so its
`token_ids` is empty. The servicer accepts either form; without the extension the
generated deserialisers are used as is.

Every request is deserialised inside its handler, from the raw bytes (grpc gets no
deserialiser): gRPC answers a deserialiser's exception with UNKNOWN, while a request that
does not parse is the caller's error, INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from kvcore.keys import NATIVE

if NATIVE:
    from kvcore._native import take_uint32_field

__all__ = ["SERVICE_NAME", "WireTokens", "add_kv_indexer_service", "find_best_worker_parser",
           "score_request_parser", "unwrap"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvIndexer"].full_name

M = TypeVar("M")

_TOKENS = pb.ScoreRequest.DESCRIPTOR.fields_by_name["token_ids"].number
_SCORE = pb.FindBestWorkerRequest.DESCRIPTOR.fields_by_name["score"].number
# Where each request type keeps its token ids (field numbers, outermost first).
TOKEN_PATHS: dict[str, tuple[type[Any], tuple[int, ...]]] = {
    "Score": (pb.ScoreRequest, (_TOKENS,)),
    "FindBestWorker": (pb.FindBestWorkerRequest, (_SCORE, _TOKENS)),
}


@dataclass(frozen=True, slots=True)
class WireTokens(Generic[M]):
    """A request's token ids as packed u32 little-endian, read off the wire, and the
    request parsed without them."""

    message: M
    tokens: bytes


def unwrap(request: M | WireTokens[M]) -> tuple[M, bytes | None]:
    """The message, and its packed token ids when the deserialiser read them."""
    if isinstance(request, WireTokens):
        return request.message, request.tokens
    return request, None


Wire = bytes | memoryview  # a request's bytes, or a view of them in a stream message


def _wire_tokens_parser(message_type: type[Any], path: tuple[int, ...]) -> Callable[[Wire], Any]:
    parse = message_type.FromString

    def deserialize(raw: Wire) -> WireTokens[Any]:
        try:
            tokens, rest = take_uint32_field(raw, path)
        except ValueError:
            parse(raw)  # malformed: fail as the generated deserialiser does
            raise
        return WireTokens(parse(rest), tokens)

    return deserialize


def score_request_parser() -> Callable[[bytes], pb.ScoreRequest | WireTokens[pb.ScoreRequest]]:
    """What the server turns Score request bytes into (benchmarks time the same path)."""
    if NATIVE:
        return _wire_tokens_parser(*TOKEN_PATHS["Score"])
    return pb.ScoreRequest.FromString


def find_best_worker_parser() -> Callable[
        [Wire], pb.FindBestWorkerRequest | WireTokens[pb.FindBestWorkerRequest]]:
    """What FindBestWorkerStream turns each request message into (in the servicer, so that a
    message that does not parse is answered INVALID_ARGUMENT and the stream goes on)."""
    if NATIVE:
        return _wire_tokens_parser(*TOKEN_PATHS["FindBestWorker"])
    # upb parses any buffer, a memoryview too (its stub says bytes)
    parse: Callable[[Wire], pb.FindBestWorkerRequest] = (
        pb.FindBestWorkerRequest.FromString)  # type: ignore[assignment]
    return parse


# Methods whose servicer answers with bytes made by hand (`decision.EncodedAnswer`).
ENCODED_ANSWERS: frozenset[str] = frozenset({"FindBestWorker"})


def _serialize(message: Any) -> bytes:
    """An answer: a message, or bytes made by hand (`stream.StreamedAnswers`,
    `decision.EncodedAnswer`), both with SerializeToString."""
    return bytes(message.SerializeToString())


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _decoding(behavior: Behavior, deserialize: Callable[[bytes], Any],
              message_name: str) -> Behavior:
    """`behavior` taking the request's bytes: undecodable ones end INVALID_ARGUMENT."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = deserialize(raw)
        except (DecodeError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request is not a valid {message_name}: {exc}")
            raise AssertionError("context.abort returned") from exc  # pragma: no cover
        return await behavior(request, context)

    return handle


def add_kv_indexer_service(servicer: pb_grpc.KvIndexerServicer, server: grpc.aio.Server) -> None:
    """`add_KvIndexerServicer_to_server`, with wire-token deserialisers where they pay,
    every request deserialised in its handler (INVALID_ARGUMENT when it does not parse)."""
    captured: dict[str, grpc.RpcMethodHandler] = {}

    class _Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: Any) -> None:
            captured.update(handlers)

    pb_grpc.add_KvIndexerServicer_to_server(servicer, _Capture())  # type: ignore[no-untyped-call]
    methods = pb.DESCRIPTOR.services_by_name["KvIndexer"].methods_by_name
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method, generated in captured.items():
        if generated.stream_stream is not None:  # messages reach the servicer as bytes
            handlers[method] = grpc.stream_stream_rpc_method_handler(
                generated.stream_stream, response_serializer=_serialize)
            continue
        deserialize = generated.request_deserializer
        if NATIVE and method in TOKEN_PATHS:
            deserialize = _wire_tokens_parser(*TOKEN_PATHS[method])
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            _decoding(generated.unary_unary, deserialize, methods[method].input_type.full_name),
            response_serializer=(_serialize if method in ENCODED_ANSWERS
                                 else generated.response_serializer),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
