#!/usr/bin/env python3
"""A wsbridge consumer for the unified WebSocket endpoint (the repository README,
"Consumers: the unified WebSocket endpoint").

It shows what a robust consumer of `/v1/ws` does, with nothing but the `websockets` library:

    python3 -m pip install -r requirements.txt
    python3 consumer.py --url ws://127.0.0.1:8080/v1/ws --token "$DASHBOARD_TOKEN" \\
        --providers voipbin,hashi --state-file /tmp/dashboard.cursor

Contract shared by the Python and Node.js consumers (see ../README.md):
- stdout, one line per item, flushed at once:
    READY <epoch> <head>                  on every `ready` frame (each connection)
    EVENT <seq> <type> <subject> <id>     per event printed (a missing field prints as `-`)
    <the envelope as one JSON line>       after each EVENT line, with --jsonl
  Everything else (connections, closes, warnings) goes to stderr.
- The cursor is (epoch, last seq). On every (re)connection the consumer resumes with
  `from: last_seq + 1` and that epoch; before its first event it uses `--from` (with
  `latest` it pins the cursor to the `head` of the first `ready`, so a reconnect leaves no gap).
  With --state-file the cursor is also kept on disk (written atomically) and wins over --from.
- Any disconnect (including close 4001 "slow consumer") → reconnect with exponential backoff
  and jitter (0.5 s doubling to 30 s), then resume.
- `unrecoverable_position` → a loud warning and a re-sync from `earliest` (or as
  --on-unrecoverable says).
- Events are deduplicated by envelope `id` (the last 10,000 ids) across reconnects.
- With --durable NAME the bridge keeps the cursor instead (a durable subscription): every
  (re)connection subscribes with `durable`, each event is handled (printed) and then
  acknowledged, in batches (`ack` with the `seqs` handled since the last ack, sent when no
  more frames are waiting or 100 are handled). An event the bridge delivers again gets a sixth
  field `delivery=N` on its EVENT line. `--from` applies only when the durable is created.
- Exit status: 0 after --max-events events or on SIGINT/SIGTERM; 2 for a usage error, a bad
  state file or a subscription the server refuses (bad_pattern, bad_request); 3 when the
  server refuses the token (HTTP 401/403); 4 on `unrecoverable_position` with
  --on-unrecoverable exit.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.parse

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNRECOVERABLE = 4

SLOW_CONSUMER_CLOSE = 4001

# Durable subscriptions: acks are sent once no frame arrives for this long, or when this many
# handled events wait for their ack, whichever comes first.
ACK_IDLE = 0.05
ACK_BATCH = 100


class Fatal(Exception):
    """Stops the consumer: retrying cannot help (a refused token or subscription)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Done(Exception):
    """--max-events events were printed."""


def log(level, message):
    """One human line on stderr; stdout is reserved for the machine-readable contract."""
    stamp = time.strftime("%H:%M:%S", time.localtime())
    sys.stderr.write(f"{stamp} {level:<5} {message}\n")
    sys.stderr.flush()


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def field(value):
    """A field of an EVENT line: `-` when absent, never containing whitespace."""
    if value is None or value == "":
        return "-"
    return "_".join(str(value).split())


class Cursor:
    """Where to resume: the last seq handled and the store epoch it was handed out under.

    With a state file the cursor is persisted atomically (temp file, fsync, rename), so a
    crash leaves either the old or the new cursor, never a torn file. Writes are throttled to
    one per `interval` seconds while events flow and forced on disconnect and exit; after a
    crash the consumer may see again the events of the last interval (at-least-once, as
    everywhere in wsbridge) and should deduplicate by event id.
    """

    def __init__(self, path=None, interval=1.0):
        self.path = path
        self.interval = interval
        self.epoch = None
        self.last_seq = None
        self._dirty = False
        self._saved_at = 0.0

    def load(self):
        if not self.path or not os.path.exists(self.path):
            return False
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            last_seq = data.get("last_seq")
            epoch = data.get("epoch")
            if last_seq is not None and (not isinstance(last_seq, int) or isinstance(last_seq, bool)):
                raise ValueError("last_seq is not an integer")
            if epoch is not None and not isinstance(epoch, str):
                raise ValueError("epoch is not a string")
        except (OSError, ValueError, AttributeError) as exc:
            raise Fatal(EXIT_USAGE, f"state file {self.path} is unreadable ({exc}); fix or delete it")
        self.last_seq, self.epoch = last_seq, epoch
        return last_seq is not None

    def advance(self, seq, epoch):
        if self.epoch != epoch or self.last_seq is None or seq > self.last_seq:
            self.last_seq, self.epoch = seq, epoch
            self._dirty = True

    def reset(self, epoch, last_seq=None):
        self.epoch, self.last_seq = epoch, last_seq
        self._dirty = True

    def save(self, force=False):
        if not self.path or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < self.interval:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        body = json.dumps({"epoch": self.epoch, "last_seq": self.last_seq}) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".cursor-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:  # make the rename itself durable (POSIX); best effort elsewhere
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        self._dirty = False
        self._saved_at = now


class SeenIds:
    """The last `capacity` event ids, to drop what a reconnect or a replay delivers twice."""

    def __init__(self, capacity=10_000):
        self.capacity = capacity
        self._ids = collections.OrderedDict()

    def add(self, event_id):
        """Records `event_id`; False if it was already there."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


class Consumer:
    def __init__(self, args):
        self.args = args
        self.cursor = Cursor(args.state_file, args.state_interval)
        self.seen = SeenIds(args.dedup_size)
        self.printed = 0
        self.attempt = 0  # consecutive failed connections, for the backoff
        self.sub_counter = 0
        self.sub_id = None  # the live subscription; events of any other are ignored
        self.epoch = None  # of the current session's ready frame
        self.head = None
        self.resynced = False  # one re-sync per session; a second unrecoverable_position is fatal
        self.to_ack = []  # durable: seqs handled and not acknowledged yet
        self.filter = {
            key: values
            for key, values in (
                ("providers", args.providers),
                ("types", args.types),
                ("subjects", args.subjects),
            )
            if values
        }

    # ---- connection loop -------------------------------------------------------------------

    async def run(self):
        if self.cursor.load():
            log("INFO", f"resuming from state file {self.args.state_file}: "
                        f"epoch={self.cursor.epoch} last_seq={self.cursor.last_seq}")
        url, headers = self.endpoint()
        while True:
            try:
                async with connect(
                    url,
                    additional_headers=headers,
                    open_timeout=10,
                    ping_interval=20,  # protocol-level keep-alive; a dead peer ends the session
                    ping_timeout=20,
                    max_size=16 * 1024 * 1024,
                ) as ws:
                    log("INFO", f"connected to {self.args.url}")
                    await self.session(ws)
            except Done:
                return EXIT_OK
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
                    raise Fatal(EXIT_AUTH, f"the server refused the token: HTTP {status} {body}".rstrip())
                log("WARN", f"handshake refused: HTTP {status}")
            except ConnectionClosed as exc:
                self.log_close(exc)
            except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
                log("WARN", f"connection failed: {type(exc).__name__}: {exc}")
            finally:
                self.cursor.save(force=True)
            await asyncio.sleep(self.next_delay())

    def endpoint(self):
        if self.args.token_in_query:
            parts = urllib.parse.urlsplit(self.args.url)
            query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            query.append(("token", self.args.token))
            url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
            return url, None
        return self.args.url, {"Authorization": f"Bearer {self.args.token}"}

    def next_delay(self):
        """0.5 s doubling to 30 s; each delay drawn from its upper half (jitter)."""
        base = min(self.args.backoff_max, self.args.backoff_initial * (2 ** self.attempt))
        self.attempt += 1
        delay = base / 2 + random.uniform(0, base / 2)
        log("INFO", f"reconnecting in {delay:.2f}s (attempt {self.attempt}), "
                    f"resuming {self.describe_resume()}")
        return delay

    def describe_resume(self):
        if self.args.durable:
            return f"durable {self.args.durable} (the bridge keeps its cursor)"
        if self.cursor.last_seq is None:
            return f"from {self.args.from_}"
        return f"from {self.cursor.last_seq + 1} (epoch {self.cursor.epoch})"

    def log_close(self, exc):
        frame = exc.rcvd
        if frame is None:
            log("WARN", "connection lost (no close frame)")
        elif frame.code == SLOW_CONSUMER_CLOSE:
            log("WARN", f"closed by the server as a slow consumer (4001 {frame.reason!r}); will resume")
        else:
            log("WARN", f"connection closed by the server: {frame.code} {frame.reason!r}")

    # ---- one connection --------------------------------------------------------------------

    async def session(self, ws):
        ready = await self.recv(ws)
        if ready.get("op") != "ready":
            log("WARN", f"expected a ready frame first, got {ready.get('op')!r}; reconnecting")
            return
        self.epoch = ready.get("epoch")
        self.head = ready.get("head")
        out(f"READY {field(self.epoch)} {field(self.head)}")
        self.resynced = False

        self.to_ack = []  # acks are per connection: what the last one held is sent again
        if self.args.durable:
            await self.subscribe(ws, self.args.from_)  # the bridge keeps the cursor
        elif self.cursor.last_seq is not None:
            await self.subscribe(ws, self.cursor.last_seq + 1, self.cursor.epoch)
        else:
            await self.subscribe(ws, self.args.from_)

        while True:
            if self.to_ack:
                try:
                    # Cancelling recv() loses nothing: the next call returns the next frame.
                    frame = await asyncio.wait_for(self.recv(ws), ACK_IDLE)
                except asyncio.TimeoutError:
                    await self.flush_acks(ws)
                    continue
            else:
                frame = await self.recv(ws)
            op = frame.get("op")
            if op == "event":
                await self.on_event(ws, frame)
            elif op == "subscribed":
                if frame.get("id") == self.sub_id:
                    self.attempt = 0  # a working session resets the backoff
                    if self.args.durable:
                        log("INFO", f"subscribed {self.sub_id} to durable {self.args.durable}: "
                                    f"acked through {frame.get('acked')}, {frame.get('pending')} pending")
                    else:
                        log("INFO", f"subscribed {self.sub_id}")
            elif op == "error":
                await self.on_error(ws, frame)
            elif op in ("pong", "unsubscribed", "ready"):
                pass
            else:
                log("DEBUG", f"ignoring unknown op {op!r}")

    async def recv(self, ws):
        while True:
            raw = await ws.recv()
            try:
                frame = json.loads(raw)
            except ValueError:
                log("WARN", f"ignoring a frame that is not JSON: {str(raw)[:200]!r}")
                continue
            if isinstance(frame, dict):
                return frame
            log("WARN", f"ignoring a frame that is not a JSON object: {str(raw)[:200]!r}")

    async def subscribe(self, ws, from_, epoch=None):
        self.sub_counter += 1
        self.sub_id = f"{self.args.sub_id}-{self.sub_counter}"
        frame = {"op": "subscribe", "id": self.sub_id, "filter": self.filter, "from": from_}
        if self.args.durable:
            frame["durable"] = self.args.durable
        if epoch is not None:
            frame["epoch"] = epoch
        if from_ == "latest" and self.cursor.last_seq is None and isinstance(self.head, int) \
                and not isinstance(self.head, bool) and not self.args.durable:
            # Take position now: a reconnect before the first event resumes from head + 1
            # instead of asking for "latest" again and losing what arrived in between.
            self.cursor.reset(self.epoch, self.head)
        await ws.send(json.dumps(frame))
        log("INFO", f"subscribe {self.sub_id} from={from_}" + (f" epoch={epoch}" if epoch else "")
                    + (f" durable={self.args.durable}" if self.args.durable else "")
                    + f" filter={json.dumps(self.filter)}")

    async def flush_acks(self, ws):
        """Acknowledges the durable events handled since the last ack, in one frame."""
        if not self.to_ack:
            return
        seqs, self.to_ack = self.to_ack, []
        await ws.send(json.dumps({"op": "ack", "id": self.sub_id, "seqs": seqs}))

    async def on_event(self, ws, frame):
        if frame.get("subscription") != self.sub_id:
            return  # a subscription replaced after a re-sync; the new one replays it
        envelope = frame.get("event")
        if not isinstance(envelope, dict):
            log("WARN", "ignoring an event frame without an envelope")
            return
        seq = frame.get("seq", envelope.get("seq"))
        is_seq = isinstance(seq, int) and not isinstance(seq, bool)
        event_id = envelope.get("id")
        if is_seq and not self.args.durable:
            self.cursor.advance(seq, self.epoch)
        if event_id is not None and not self.seen.add(event_id):
            log("DEBUG", f"duplicate event {event_id} (seq {seq}) skipped")
            await self.handled(ws, seq if is_seq else None)
            return
        line = (f"EVENT {field(seq)} {field(envelope.get('type'))} "
                f"{field(envelope.get('subject'))} {field(event_id)}")
        delivery = frame.get("delivery")
        if isinstance(delivery, int) and delivery > 1:
            line += f" delivery={delivery}"
        out(line)
        if self.args.jsonl:
            out(json.dumps(envelope, separators=(",", ":"), ensure_ascii=False))
        self.printed += 1
        await self.handled(ws, seq if is_seq else None)
        if self.args.max_events and self.printed >= self.args.max_events:
            await self.flush_acks(ws)
            self.cursor.save(force=True)
            await ws.close()
            raise Done()

    async def handled(self, ws, seq):
        """After an event is handled: a durable one is acknowledged (batched), a plain one
        moves the saved cursor."""
        if not self.args.durable:
            self.cursor.save()
            return
        if seq is not None:
            self.to_ack.append(seq)
        if len(self.to_ack) >= ACK_BATCH:
            await self.flush_acks(ws)

    async def on_error(self, ws, frame):
        code = frame.get("code")
        message = frame.get("message", "")
        sub = frame.get("id")
        if sub is not None and sub != self.sub_id:
            log("WARN", f"error for an old subscription {sub}: {code} {message}")
            return
        if code == "unrecoverable_position":
            policy = self.args.on_unrecoverable
            log("WARN", "!" * 72)
            log("WARN", f"unrecoverable_position: the server cannot resume "
                        f"{self.describe_resume()} ({message}).")
            if policy == "exit" or self.resynced:
                raise Fatal(EXIT_UNRECOVERABLE, "unrecoverable_position: re-sync needed; exiting")
            log("WARN", f"RE-SYNCING from {policy}: events between the old cursor and now may be "
                        f"missing or seen again (the {self.args.dedup_size} last ids are deduplicated)")
            log("WARN", "!" * 72)
            self.resynced = True
            self.cursor.reset(self.epoch)
            self.cursor.save(force=True)
            await self.subscribe(ws, policy)
        elif code in ("bad_pattern", "bad_request", "durable_mismatch", "too_many_durables") \
                and sub == self.sub_id:
            raise Fatal(EXIT_USAGE, f"the server refused the subscription: {code}: {message}")
        elif code == "unknown_durable" and self.args.durable and sub == self.sub_id:
            log("WARN", f"the durable {self.args.durable} was deleted on the bridge; "
                        f"subscribing again creates it anew from {self.args.from_}")
            self.to_ack = []
            await self.subscribe(ws, self.args.from_)
        else:
            log("WARN", f"server error {code}: {message}")


def parse_from(value):
    if value in ("latest", "earliest"):
        return value
    try:
        seq = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected latest, earliest or a sequence number")
    if seq < 0:
        raise argparse.ArgumentTypeError("a sequence number is >= 0")
    return seq


def csv_list(value):
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description="Consume wsbridge's unified WebSocket endpoint.")
    p.add_argument("--url", default="ws://127.0.0.1:8080/v1/ws")
    p.add_argument("--token", default=os.environ.get("WSBRIDGE_TOKEN"),
                   help="consumer token (default: $WSBRIDGE_TOKEN)")
    p.add_argument("--token-in-query", action="store_true",
                   help="send the token as ?token= instead of an Authorization header")
    for name in ("providers", "types", "subjects"):
        p.add_argument(f"--{name}", type=csv_list, action="extend", default=[],
                       help="comma-separated patterns (repeatable)")
    p.add_argument("--from", dest="from_", type=parse_from, default="latest",
                   help="latest (default), earliest or a seq; a cursor in --state-file wins")
    p.add_argument("--state-file", help="keep the cursor (epoch, last seq) in this file")
    p.add_argument("--durable", metavar="NAME",
                   help="a durable subscription: the bridge keeps the cursor, events are acked")
    p.add_argument("--state-interval", type=float, default=1.0,
                   help="seconds between cursor writes while events flow (0 = every event)")
    p.add_argument("--max-events", type=int, default=0, help="exit 0 after N events")
    p.add_argument("--jsonl", action="store_true", help="also print each envelope as a JSON line")
    p.add_argument("--on-unrecoverable", choices=("earliest", "latest", "exit"), default="earliest")
    p.add_argument("--sub-id", default="main", help="prefix of the subscription ids")
    p.add_argument("--dedup-size", type=int, default=10_000)
    p.add_argument("--backoff-initial", type=float, default=0.5)
    p.add_argument("--backoff-max", type=float, default=30.0)
    args = p.parse_args(argv)
    if not args.token:
        p.error("--token (or WSBRIDGE_TOKEN) is required")
    if args.durable and args.state_file:
        p.error("--state-file has no use with --durable: the bridge keeps the cursor")
    if args.max_events < 0 or args.dedup_size < 1:
        p.error("--max-events must be >= 0 and --dedup-size >= 1")
    return args


async def amain(args):
    consumer = Consumer(args)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, task.cancel)
        except (NotImplementedError, RuntimeError):
            pass  # Windows: KeyboardInterrupt still stops the loop
    try:
        return await consumer.run()
    except Fatal as exc:
        log("ERROR", str(exc))
        return exc.status
    except asyncio.CancelledError:
        log("INFO", "stopping")
        return EXIT_OK
    finally:
        consumer.cursor.save(force=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
