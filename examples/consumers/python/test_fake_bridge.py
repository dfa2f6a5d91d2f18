#!/usr/bin/env python3
"""A tiny fake of wsbridge's `/v1/ws` endpoint (the repository README,
"Consumers: the unified WebSocket endpoint"), for the consumer tests.

It speaks the protocol the consumers rely on and nothing more: token check (HTTP 401 before
the upgrade, `Authorization: Bearer` or `?token=`), `ready`, `subscribe` with `from`/`epoch`
(answering `unrecoverable_position` for another epoch or a position older than what it
retains), `subscribed`, `event`, `unsubscribe`, `ping`/`pong`, `error`. It does not filter:
the filter a consumer sends is only recorded, for the tests to check.

Each accepted connection can follow a *plan* (keyed by its index, 0 for the first one):
  drop_after=N     after N events on a subscription, end the connection:
                   abrupt=True: TCP reset without a close frame; otherwise a close frame with
                   code (default 1011) and reason (e.g. 4001 "slow consumer")
  ignore_from=True replay from seq 1 whatever `from` says (a misbehaving server, for dedup)

Run alone it is a playground for a consumer (publishes one event per second):
    python3 test_fake_bridge.py --port 8080 --token T
"""

import argparse
import asyncio
import json
import urllib.parse
from datetime import datetime, timezone

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


def make_event(n, provider="voipbin", type_=None, subject=None, event_id=None):
    """A canonical envelope (the repository README, "The canonical envelope (contract)")
    with predictable fields."""
    now = datetime.now(timezone.utc)
    if provider == "hashi":
        type_ = type_ or "hashi.lobby.joined"
        subject = subject or f"lobby/L{n}"
    return {
        "specversion": "1.0",
        "id": event_id or f"evt-{n:04d}",
        "source": f"wsbridge://{provider}-main",
        "type": type_ or f"{provider}.call.status",
        "subject": subject or f"customer_id:abc123:call:c{n}",
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "datacontenttype": "application/json",
        "data": {"status": "answered", "n": n},
        "provider": provider,
        "recvtime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


class Connection:
    """What one client did: how it authenticated and every frame it sent."""

    def __init__(self, index, auth):
        self.index = index
        self.auth = auth
        self.frames = []

    @property
    def subscribes(self):
        return [f for f in self.frames if f.get("op") == "subscribe"]


class FakeBridge:
    def __init__(self, token="secret-token", epoch="ep-1", retain_from=1):
        self.token = token
        self.epoch = epoch
        self.retain_from = retain_from  # the oldest seq still stored
        self.journal = []  # envelopes; seq = index + 1
        self.connections = []
        self.plans = {}
        self.rejected = 0
        self._changed = asyncio.Condition()
        self._server = None
        self.port = None

    @property
    def head(self):
        return len(self.journal)

    async def publish(self, envelope):
        envelope = dict(envelope, seq=len(self.journal) + 1)
        self.journal.append(envelope)
        async with self._changed:
            self._changed.notify_all()
        return envelope["seq"]

    async def start(self, port=0):
        self._server = await serve(self._handler, "127.0.0.1", port,
                                   process_request=self._authenticate)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def _authenticate(self, connection, request):
        parts = urllib.parse.urlsplit(request.path)
        if parts.path != "/v1/ws":
            return connection.respond(404, "not found\n")
        header = request.headers.get("Authorization", "")
        query = dict(urllib.parse.parse_qsl(parts.query)).get("token")
        if header.startswith("Bearer ") and header[7:] == self.token:
            connection.wsbridge_auth = "header"
        elif query == self.token:
            connection.wsbridge_auth = "query"
        else:
            self.rejected += 1
            response = connection.respond(401, json.dumps({"error": "unknown token"}))
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    async def _handler(self, ws):
        conn = Connection(len(self.connections), getattr(ws, "wsbridge_auth", None))
        self.connections.append(conn)
        plan = self.plans.get(conn.index, {})
        streams = {}
        await ws.send(json.dumps({"op": "ready", "session": f"s{conn.index}", "consumer": "test",
                                  "epoch": self.epoch, "head": self.head}))
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    await self._error(ws, "bad_request", "not JSON")
                    continue
                conn.frames.append(frame)
                op = frame.get("op")
                if op == "ping":
                    await ws.send(json.dumps({"op": "pong"}))
                elif op == "subscribe":
                    sub = frame.get("id")
                    start = self._resolve(frame, plan)
                    if isinstance(start, str):
                        await self._error(ws, start, f"cannot serve from={frame.get('from')!r}", sub)
                        continue
                    await ws.send(json.dumps({"op": "subscribed", "id": sub}))
                    streams[sub] = asyncio.create_task(self._stream(ws, sub, start, plan))
                elif op == "unsubscribe":
                    task = streams.pop(frame.get("id"), None)
                    if task:
                        task.cancel()
                    await ws.send(json.dumps({"op": "unsubscribed", "id": frame.get("id")}))
                else:
                    await self._error(ws, "unknown_op", f"unknown op {op!r}")
        except ConnectionClosed:
            pass
        finally:
            for task in streams.values():
                task.cancel()

    def _resolve(self, frame, plan):
        """The first seq to send, or an error code."""
        filt = frame.get("filter") or {}
        if any("[" in p for key in ("providers", "types", "subjects") for p in filt.get(key, [])):
            return "bad_pattern"
        if plan.get("ignore_from"):
            return 1
        start = frame.get("from", "latest")
        if start == "latest":
            return self.head + 1
        if start == "earliest":
            return self.retain_from
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            return "bad_request"
        if frame.get("epoch") not in (None, self.epoch) or start < self.retain_from:
            return "unrecoverable_position"
        return start

    async def _stream(self, ws, sub, seq, plan):
        sent = 0
        try:
            while True:
                if plan.get("drop_after") is not None and sent >= plan["drop_after"]:
                    await self._drop(ws, plan)
                    return
                async with self._changed:
                    await self._changed.wait_for(lambda: len(self.journal) >= seq)
                envelope = self.journal[seq - 1]
                await ws.send(json.dumps({"op": "event", "subscription": sub, "seq": seq,
                                          "event": envelope}))
                sent += 1
                seq += 1
        except ConnectionClosed:
            pass

    async def _drop(self, ws, plan):
        if plan.get("abrupt"):
            ws.transport.abort()
        else:
            await ws.close(plan.get("code", 1011), plan.get("reason", ""))

    async def _error(self, ws, code, message, sub=None):
        frame = {"op": "error", "code": code, "message": message}
        if sub is not None:
            frame["id"] = sub
        await ws.send(json.dumps(frame))


async def _playground(port, token):
    bridge = await FakeBridge(token=token).start(port)
    print(f"fake bridge on {bridge.url} (token {token!r})", flush=True)
    n = 0
    while True:
        n += 1
        await bridge.publish(make_event(n, provider="voipbin" if n % 2 else "hashi"))
        await asyncio.sleep(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token", default="T")
    a = parser.parse_args()
    try:
        asyncio.run(_playground(a.port, a.token))
    except KeyboardInterrupt:
        pass
