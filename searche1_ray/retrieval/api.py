"""The Search-R1 retrieval API: request validation and response shape (no Ray, no web framework).

    POST /retrieve {"queries": [str], "topk": int, "return_scores": bool}
      -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}

Like Search-R1's server, ``return_scores`` defaults to false, and then each hit is the bare
document ``{"id", "contents"}``. Bad requests raise ``RequestError`` with an HTTP status:
400 for a body that is not JSON, 413 for more queries than the server takes in one request,
422 for a field of the wrong type or value (empty query, text that is not valid Unicode such as a
lone surrogate, topk outside 1..100).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOPK_MIN, TOPK_MAX = 1, 100


class RequestError(ValueError):
    """A request the retriever refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SearchRequest:
    queries: list[str]
    topk: int
    return_scores: bool = False


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def check_queries(queries: Any, max_queries: int, allow_blank: bool = False) -> list[str]:
    """``queries`` must be a non-empty list of strings, at most ``max_queries`` long."""
    if not isinstance(queries, (list, tuple)):
        raise RequestError(422, f"'queries' must be a list of strings, got {_type_name(queries)}")
    if len(queries) == 0:
        raise RequestError(422, "'queries' is empty: send at least one query")
    if len(queries) > max_queries:
        raise RequestError(413, f"too many queries in one request: {len(queries)} > "
                                f"{max_queries} (retriever.max_queries_per_request); "
                                "split them over several requests")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise RequestError(422, f"queries[{i}] must be a string, got {_type_name(q)}")
        if not allow_blank and not q.strip():
            raise RequestError(422, f"queries[{i}] is empty: every query needs some text")
        try:
            q.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): JSON allows it, tokenizers don't
            raise RequestError(422, f"queries[{i}] is not valid Unicode text: {e.reason} "
                                    f"{q[e.start:e.end]!r} at character {e.start}; send UTF-8 text") from None
    return list(queries)


def check_topk(topk: Any) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int):
        if isinstance(topk, float) and topk.is_integer():
            topk = int(topk)
        else:
            raise RequestError(422, f"'topk' must be an integer, got {_type_name(topk)} {topk!r}")
    if not TOPK_MIN <= topk <= TOPK_MAX:
        raise RequestError(422, f"'topk' must be between {TOPK_MIN} and {TOPK_MAX}, got {topk}")
    return topk


def parse_request(body: bytes | str | Any, max_queries: int, default_topk: int) -> SearchRequest:
    """Validate a Search-R1 request body (raw bytes / text, or already-decoded JSON)."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except RecursionError:  # "[[[[…": nesting deeper than the parser's recursion limit
            raise RequestError(400, "request body is JSON nested too deeply; send "
                                    "{\"queries\": [\"...\"], \"topk\": 3}") from None
        except ValueError as e:  # not JSON, not UTF-8, or an integer over CPython's 4,300 digits
            raise RequestError(400, f"request body must be JSON like {{\"queries\": [\"...\"], "
                                    f"\"topk\": 3}}: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(422, f"request body must be a JSON object, got {_type_name(body)}")
    if "queries" not in body:
        raise RequestError(422, "field 'queries' is required: a list of query strings")
    queries = check_queries(body["queries"], max_queries)
    topk = check_topk(body["topk"]) if body.get("topk") is not None else default_topk
    return_scores = body.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise RequestError(422, f"'return_scores' must be true or false, got "
                                f"{_type_name(return_scores)}")
    return SearchRequest(queries, topk, return_scores)


def format_response(hits: list[list[dict]], return_scores: bool) -> dict:
    """Search-R1's response: hits with scores, or bare documents when ``return_scores`` is off."""
    if return_scores:
        return {"result": hits}
    return {"result": [[h["document"] for h in per_query] for per_query in hits]}
