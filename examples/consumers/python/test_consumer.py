#!/usr/bin/env python3
"""Tests of consumer.py against the fake bridge in test_fake_bridge.py (real sockets, a real
subprocess, the stdout contract parsed as a user's script would).

    python3 -m pip install -r requirements.txt
    python3 test_consumer.py            # or: python3 -m unittest -v test_consumer

CONSUMER_CMD runs the same tests against another implementation of the contract, e.g.
    CONSUMER_CMD="node ../node/consumer.js" python3 test_consumer.py
"""

import asyncio
import json
import os
import shlex
import socket
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fake_bridge import FakeBridge, make_event  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONSUMER_CMD = (shlex.split(os.environ["CONSUMER_CMD"]) if os.environ.get("CONSUMER_CMD")
                else [sys.executable, os.path.join(HERE, "consumer.py")])
TIMEOUT = 15


class Consumer:
    """consumer.py as a subprocess; stdout lines collected as they come."""

    def __init__(self):
        self.lines = []
        self.stderr = b""
        self._new_line = asyncio.Event()

    async def start(self, *args):
        self.proc = await asyncio.create_subprocess_exec(
            *CONSUMER_CMD, *args, cwd=HERE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._readers = [asyncio.create_task(self._read_stdout()),
                         asyncio.create_task(self._read_stderr())]
        return self

    async def _read_stdout(self):
        async for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))
            self._new_line.set()

    async def _read_stderr(self):
        self.stderr = await self.proc.stderr.read()

    async def wait_for(self, predicate, timeout=TIMEOUT):
        async def loop():
            while not any(predicate(line) for line in self.lines):
                self._new_line.clear()
                await self._new_line.wait()
        await asyncio.wait_for(loop(), timeout)

    async def exit_status(self, timeout=TIMEOUT):
        status = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return status

    def kill(self):
        if self.proc.returncode is None:
            self.proc.kill()

    @property
    def events(self):
        """EVENT lines as (seq, type, subject, id)."""
        return [tuple(line.split()[1:]) for line in self.lines if line.startswith("EVENT ")]

    @property
    def readies(self):
        return [line.split()[1:] for line in self.lines if line.startswith("READY ")]

    @property
    def log(self):
        return self.stderr.decode(errors="replace")


class ConsumerTests(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.bridge = await FakeBridge().start()
        self.tmp = tempfile.TemporaryDirectory()
        self.consumers = []

    async def asyncTearDown(self):
        for c in self.consumers:
            c.kill()
            try:
                await c.exit_status(5)
            except Exception:
                pass
        await self.bridge.stop()
        self.tmp.cleanup()

    async def run_consumer(self, *args, token="secret-token", url=None):
        c = await Consumer().start("--url", url or self.bridge.url, "--token", token, *args)
        self.consumers.append(c)
        return c

    async def publish(self, n, **kw):
        for i in range(n):
            await self.bridge.publish(make_event(self.bridge.head + 1, **kw))

    def state_path(self):
        return os.path.join(self.tmp.name, "cursor.json")

    def read_state(self):
        with open(self.state_path()) as fh:
            return json.load(fh)

    async def test_subscribe_prints_events_and_exits_after_max_events(self):
        await self.publish(5)
        c = await self.run_consumer(
            "--from", "earliest", "--max-events", "3", "--jsonl",
            "--providers", "voipbin,hashi", "--types", "voipbin.call.*",
            "--types", "hashi.**", "--subjects", "customer_id:abc123:*")
        self.assertEqual(await c.exit_status(), 0, c.log)

        self.assertEqual(c.lines[0], "READY ep-1 5")
        self.assertEqual(c.events, [
            (str(i), "voipbin.call.status", f"customer_id:abc123:call:c{i}", f"evt-{i:04d}")
            for i in (1, 2, 3)])
        # --jsonl: each EVENT line is followed by its envelope, unchanged.
        for i in (1, 2, 3):
            at = c.lines.index(f"EVENT {i} voipbin.call.status customer_id:abc123:call:c{i} evt-{i:04d}")
            self.assertEqual(json.loads(c.lines[at + 1]), self.bridge.journal[i - 1])

        [conn] = self.bridge.connections
        self.assertEqual(conn.auth, "header")
        [sub] = conn.subscribes
        self.assertEqual(sub["from"], "earliest")
        self.assertNotIn("epoch", sub)
        self.assertEqual(sub["filter"], {"providers": ["voipbin", "hashi"],
                                         "types": ["voipbin.call.*", "hashi.**"],
                                         "subjects": ["customer_id:abc123:*"]})
        self.assertIsInstance(sub["id"], str)

    async def test_live_events_after_latest(self):
        await self.publish(4)
        c = await self.run_consumer("--max-events", "2")
        await c.wait_for(lambda l: l.startswith("READY"))
        await asyncio.sleep(0.3)  # let it subscribe before publishing
        await self.publish(3)
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual([e[0] for e in c.events], ["5", "6"])
        self.assertEqual(self.bridge.connections[0].subscribes[0]["from"], "latest")

    async def test_reconnects_and_resumes_from_last_seq_plus_one(self):
        await self.publish(6)
        self.bridge.plans = {0: {"drop_after": 2, "abrupt": True},  # TCP reset, no close frame
                             1: {"drop_after": 2, "code": 1011, "reason": "restarting"}}
        c = await self.run_consumer("--from", "earliest", "--max-events", "6",
                                    "--state-file", self.state_path())
        self.assertEqual(await c.exit_status(), 0, c.log)

        self.assertEqual([e[0] for e in c.events], ["1", "2", "3", "4", "5", "6"])
        self.assertEqual(len(c.readies), 3)
        subs = [conn.subscribes[0] for conn in self.bridge.connections]
        self.assertEqual(subs[0]["from"], "earliest")
        self.assertEqual((subs[1]["from"], subs[1]["epoch"]), (3, "ep-1"))
        self.assertEqual((subs[2]["from"], subs[2]["epoch"]), (5, "ep-1"))
        self.assertEqual(self.read_state(), {"epoch": "ep-1", "last_seq": 6})

    async def test_state_file_resumes_a_new_process(self):
        await self.publish(5)
        with open(self.state_path(), "w") as fh:
            json.dump({"epoch": "ep-1", "last_seq": 3}, fh)
        c = await self.run_consumer("--from", "earliest", "--max-events", "2",
                                    "--state-file", self.state_path())
        self.assertEqual(await c.exit_status(), 0, c.log)
        sub = self.bridge.connections[0].subscribes[0]
        self.assertEqual((sub["from"], sub["epoch"]), (4, "ep-1"))  # the file wins over --from
        self.assertEqual([e[0] for e in c.events], ["4", "5"])
        self.assertEqual(self.read_state(), {"epoch": "ep-1", "last_seq": 5})

    async def test_slow_consumer_close_4001_reconnects_and_resumes(self):
        await self.publish(3)
        self.bridge.plans = {0: {"drop_after": 1, "code": 4001, "reason": "slow consumer"}}
        c = await self.run_consumer("--from", "earliest", "--max-events", "3")
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual([e[0] for e in c.events], ["1", "2", "3"])
        self.assertEqual(len(self.bridge.connections), 2)
        sub = self.bridge.connections[1].subscribes[0]
        self.assertEqual((sub["from"], sub["epoch"]), (2, "ep-1"))
        self.assertIn("slow consumer", c.log)
        self.assertIn("4001", c.log)

    async def test_unrecoverable_position_resyncs_from_earliest(self):
        self.bridge.epoch = "ep-2"  # the store was recreated since the cursor was saved
        await self.publish(3)
        with open(self.state_path(), "w") as fh:
            json.dump({"epoch": "ep-1", "last_seq": 41}, fh)
        c = await self.run_consumer("--max-events", "3", "--state-file", self.state_path())
        self.assertEqual(await c.exit_status(), 0, c.log)

        [conn] = self.bridge.connections
        first, second = conn.subscribes
        self.assertEqual((first["from"], first["epoch"]), (42, "ep-1"))
        self.assertEqual(second["from"], "earliest")
        self.assertNotEqual(first["id"], second["id"])
        self.assertEqual([e[0] for e in c.events], ["1", "2", "3"])
        self.assertIn("unrecoverable_position", c.log)
        self.assertIn("WARN", c.log)
        self.assertEqual(self.read_state(), {"epoch": "ep-2", "last_seq": 3})

    async def test_position_older_than_retention_is_unrecoverable_too(self):
        self.bridge.retain_from = 4
        await self.publish(5)
        c = await self.run_consumer("--from", "2", "--max-events", "2")
        self.assertEqual(await c.exit_status(), 0, c.log)
        first, second = self.bridge.connections[0].subscribes
        self.assertEqual(first["from"], 2)
        self.assertEqual(second["from"], "earliest")
        self.assertEqual([e[0] for e in c.events], ["4", "5"])

    async def test_unrecoverable_position_with_exit_policy(self):
        self.bridge.retain_from = 4
        await self.publish(5)
        c = await self.run_consumer("--from", "2", "--on-unrecoverable", "exit")
        self.assertEqual(await c.exit_status(), 4, c.log)
        self.assertIn("unrecoverable_position", c.log)

    async def test_dedup_by_event_id_across_reconnects(self):
        # ids: evt-0001, evt-0002, evt-0003, evt-0002 again (same event journalled twice), evt-0005
        for n in range(1, 6):
            await self.bridge.publish(make_event(n, event_id="evt-0002" if n == 4 else None))
        self.bridge.plans = {0: {"drop_after": 2, "code": 1001, "reason": "going away"},
                             1: {"ignore_from": True}}  # replays 1..5 whatever `from` says
        c = await self.run_consumer("--from", "earliest", "--max-events", "4")
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual([(e[0], e[3]) for e in c.events],
                         [("1", "evt-0001"), ("2", "evt-0002"), ("3", "evt-0003"),
                          ("5", "evt-0005")])
        self.assertEqual(self.bridge.connections[1].subscribes[0]["from"], 3)

    async def test_reconnect_before_first_event_after_latest_leaves_no_gap(self):
        await self.publish(3)
        self.bridge.plans = {0: {"drop_after": 0, "code": 1012, "reason": "restart"}}
        c = await self.run_consumer("--max-events", "1")
        await c.wait_for(lambda l: l.startswith("READY"))
        await self.publish(1)  # seq 4, published while the consumer is away
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual(self.bridge.connections[0].subscribes[0]["from"], "latest")
        sub = self.bridge.connections[1].subscribes[0]
        self.assertEqual((sub["from"], sub["epoch"]), (4, "ep-1"))
        self.assertEqual([e[0] for e in c.events], ["4"])

    async def test_waits_with_backoff_until_the_server_is_up(self):
        with socket.socket() as s:  # a port with nobody listening yet
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await self.bridge.stop()
        c = await self.run_consumer("--from", "earliest", "--max-events", "1",
                                    url=f"ws://127.0.0.1:{port}/v1/ws")
        await asyncio.sleep(1.5)
        self.assertIsNone(c.proc.returncode)
        self.bridge = await FakeBridge().start(port)
        await self.publish(1)
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual([e[0] for e in c.events], ["1"])

    async def test_unknown_token_exits_3_without_retrying(self):
        c = await self.run_consumer(token="wrong")
        self.assertEqual(await c.exit_status(), 3, c.log)
        self.assertIn("401", c.log)
        self.assertEqual(self.bridge.rejected, 1)
        self.assertEqual(self.bridge.connections, [])

    async def test_token_in_query(self):
        await self.publish(1)
        c = await self.run_consumer("--token-in-query", "--from", "earliest", "--max-events", "1")
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual(self.bridge.connections[0].auth, "query")

    async def test_bad_pattern_exits_2(self):
        c = await self.run_consumer("--types", "voipbin.[call")
        self.assertEqual(await c.exit_status(), 2, c.log)
        self.assertIn("bad_pattern", c.log)

    async def test_sigterm_saves_the_cursor_and_exits_0(self):
        await self.publish(2)
        c = await self.run_consumer("--from", "earliest", "--state-file", self.state_path(),
                                    "--state-interval", "3600")
        await c.wait_for(lambda l: l.startswith("EVENT 2 "))
        c.proc.terminate()
        self.assertEqual(await c.exit_status(), 0, c.log)
        self.assertEqual(self.read_state(), {"epoch": "ep-1", "last_seq": 2})


if __name__ == "__main__":
    unittest.main(verbosity=2)
