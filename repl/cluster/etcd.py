"""A small etcd v3 client: the JSON gateway etcd serves beside its gRPC API, over httpx.

etcd (3.4 and later) answers every v3 call as JSON at ``/v3/<service>/<call>``
on its client URLs, keys and values in base64, 64-bit numbers as strings,
fields at their default value left out (a txn that failed has no
``succeeded``; a PUT event no ``type``). Watches and keep-alives are
streams: a watch answers one JSON object a line for as long as it lasts.
What replfs uses of it is here: leases (grant, keep-alive, revoke), get
and put, a range of keys by prefix, a transaction (compare-and-swap) and a
watch. Nothing else in replfs speaks to etcd.

Every call goes to the first endpoint that answers; a call that no endpoint
answers raises EtcdError (so does an error etcd sends back). Calls take no
timeouts: callers bound them with trio's scopes.

httpx is imported here only, so that the primary and secondary daemons start
without it (only ``replfs node`` and ``replfs cluster`` need it).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from repl.errors import ReplError


class EtcdError(ReplError):
    """etcd could not be reached, or refused a call."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def json(self) -> dict[str, Any]:
        """The value as a JSON object ({} if it is not one)."""
        try:
            value = json.loads(self.value)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Event:
    deleted: bool  # else a put
    kv: KeyValue


@dataclass(frozen=True)
class Compare:
    """One condition of a txn: ``target`` of ``key`` (CREATE, MOD, VERSION or VALUE)
    ``result`` (EQUAL, NOT_EQUAL, GREATER, LESS) ``value``."""

    key: str
    target: str
    value: int | bytes
    result: str = "EQUAL"

    def body(self) -> dict[str, Any]:
        field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
                 "VALUE": "value"}[self.target]
        value = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": _b64(self.key), "target": self.target, "result": self.result,
                field: value}


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(_unb64(raw.get("key")).decode(errors="replace"), _unb64(raw.get("value")),
                    int(raw.get("create_revision", 0)), int(raw.get("mod_revision", 0)),
                    int(raw.get("lease", 0)))


def prefix_end(prefix: str) -> str:
    """The range end that makes a range of every key starting with *prefix*."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here end in "/", never in 0xff
    return raw.decode()


def put_op(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    """A put, for a txn's success or failure list."""
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


class Etcd:
    """A client of one etcd cluster, given its client URLs (http://HOST:PORT)."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        # No timeouts of httpx's own: every call runs inside a trio deadline.
        self._client = httpx.AsyncClient(timeout=None)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST *body* to /v3/*path* at the first endpoint that answers."""
        errors = []
        for endpoint in list(self.endpoints):
            try:
                response = await self._client.post(f"{endpoint}/v3/{path}", json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{endpoint}: {exc!r}")
                continue
            if self.endpoints[0] != endpoint:  # ask it first from now on
                self.endpoints.remove(endpoint)
                self.endpoints.insert(0, endpoint)
            return _answer(response, path)
        raise EtcdError(f"no etcd endpoint answered {path}: {'; '.join(errors)}")

    # --- leases ---------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of *ttl* seconds; returns its id."""
        reply = await self._call("lease/grant", {"TTL": str(ttl)})
        return int(reply["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew *lease*; returns the seconds it has left (0: it expired, or is unknown)."""
        reply = await self._call("lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End *lease* now: every key bound to it is deleted."""
        await self._call("lease/revoke", {"ID": str(lease)})

    # --- keys -------------------------------------------------------------------

    async def get(self, key: str) -> tuple[KeyValue | None, int]:
        """The value of *key* (None if absent), and the store's revision then."""
        reply = await self._call("kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs", [])
        return (_kv(kvs[0]) if kvs else None), int(reply["header"]["revision"])

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key starting with *prefix*, in key order, and the revision then."""
        reply = await self._call("kv/range", {"key": _b64(prefix),
                                              "range_end": _b64(prefix_end(prefix))})
        return [_kv(kv) for kv in reply.get("kvs", [])], int(reply["header"]["revision"])

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Set *key* (bound to *lease* if given); returns the revision it made."""
        body: dict[str, Any] = put_op(key, value, lease)["request_put"]
        reply = await self._call("kv/put", body)
        return int(reply["header"]["revision"])

    async def delete(self, key: str) -> None:
        await self._call("kv/deleterange", {"key": _b64(key)})

    async def txn(self, compare: Sequence[Compare], success: Sequence[dict[str, Any]],
                  failure: Sequence[dict[str, Any]] = ()) -> bool:
        """Run *success* if every condition of *compare* holds, else *failure*, as one
        atomic step; returns whether the conditions held."""
        reply = await self._call("kv/txn", {"compare": [c.body() for c in compare],
                                            "success": list(success),
                                            "failure": list(failure)})
        return bool(reply.get("succeeded", False))

    async def watch(self, key: str, *, prefix: bool = False, start_revision: int = 0
                    ) -> AsyncGenerator[list[Event], None]:
        """The changes of *key* (or of every key under it, with *prefix*) from
        *start_revision* on (0: from now), a batch at a time, for as long as the
        caller iterates. Raises EtcdError if the stream breaks."""
        create: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            create["range_end"] = _b64(prefix_end(key))
        if start_revision:
            create["start_revision"] = str(start_revision)
        errors, seen = [], False
        for endpoint in list(self.endpoints):
            try:
                async with self._client.stream("POST", f"{endpoint}/v3/watch",
                                               json={"create_request": create}) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _answer(response, "watch")
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result", {})
                        if result.get("canceled"):
                            raise EtcdError(f"etcd canceled the watch of {key}: "
                                            f"{result.get('cancel_reason', 'no reason given')}")
                        events = [Event(e.get("type") == "DELETE", _kv(e.get("kv", {})))
                                  for e in result.get("events", [])]
                        if events:
                            seen = True
                            yield events
                raise EtcdError(f"etcd at {endpoint} ended the watch of {key}")
            except (httpx.HTTPError, ValueError) as exc:
                if seen:  # changes may have been missed: the caller reads afresh
                    raise EtcdError(f"the watch of {key} at {endpoint} broke: {exc!r}"
                                    ) from None
                errors.append(f"{endpoint}: {exc!r}")
        raise EtcdError(f"no etcd endpoint kept a watch of {key}: {'; '.join(errors)}")


def _answer(response: httpx.Response, path: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise EtcdError(f"etcd answered {path} with HTTP {response.status_code} and no "
                        "JSON") from None
    if response.status_code != 200 or not isinstance(body, dict) or "error" in body:
        message = body.get("message") or body.get("error") if isinstance(body, dict) else body
        raise EtcdError(f"etcd refused {path}: {message}")
    return body
