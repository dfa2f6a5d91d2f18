#!/usr/bin/env python3
"""A minimal wsbridge webhook receiver that verifies signatures with `standardwebhooks`.

It shows that wsbridge's outbound webhooks (the repository README, "Signatures (Standard
Webhooks)") verify with the Standard Webhooks reference library and nothing of ours:

    python3 -m pip install -r requirements.txt
    python3 receiver.py --port 9200 --secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw

Contract shared by the Python, Node.js and Go receivers:
- `--port N` (0 = any free port); prints `LISTENING <port>` once bound.
- `--secret S` (repeatable, for secret rotation) or the WEBHOOK_SECRET environment variable
  (several secrets separated by spaces); a message is accepted if any secret verifies it.
- Every POST: 204 when the signature verifies (also for a duplicate), 400 when it does not.
- One JSON line per request on stdout:
  {"ok": bool, "id": webhook-id, "type": event type, "duplicate": bool, "error": str|null}
  `type` is the `ce-type` header (binary mode) or the envelope's `type` (structured mode).
- Deduplication by `webhook-id` is the receiver's job (delivery is at-least-once): a
  verified id seen before is acknowledged again and printed with "duplicate": true.
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

_print_lock = threading.Lock()


def emit(record):
    """Prints one JSON line and flushes it, so a supervising process sees it at once."""
    with _print_lock:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def event_type(headers, body):
    """The CloudEvents type: `ce-type` in binary mode, the envelope's `type` in structured mode."""
    if headers.get("ce-type"):
        return headers["ce-type"]
    try:
        envelope = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(envelope, dict) and "specversion" in envelope:
        return envelope.get("type")
    return None


class Receiver:
    """Verifies and deduplicates deliveries; shared by the server's handler threads."""

    def __init__(self, secrets):
        self.webhooks = [Webhook(s) for s in secrets]
        self.seen = set()
        self.lock = threading.Lock()

    def handle(self, headers, body):
        """Returns the JSON record to print for one request."""
        error = None
        for wh in self.webhooks:
            try:
                wh.verify(body, headers)
                error = None
                break
            except Exception as e:  # the library raises more than its own error type
                error = str(e) or type(e).__name__
        msg_id = headers.get("webhook-id")
        ok = error is None
        duplicate = False
        if ok:
            with self.lock:
                duplicate = msg_id in self.seen
                self.seen.add(msg_id)
        return {
            "ok": ok,
            "id": msg_id,
            "type": event_type(headers, body),
            "duplicate": duplicate,
            "error": error,
        }


def make_handler(receiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as HTTP clients with pools expect

        def do_POST(self):
            try:
                length = int(self.headers.get("content-length") or 0)
            except ValueError:
                length = 0
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = receiver.handle(headers, body)
            emit(record)
            if record["ok"]:
                self.send_response(204)
                self.end_headers()
            else:
                payload = json.dumps({"error": record["error"]}).encode()
                self.send_response(400)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        def not_allowed(self):
            self.send_response(405)
            self.send_header("allow", "POST")
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_PUT = do_DELETE = do_PATCH = not_allowed

        def log_message(self, format, *args):  # stdout carries only the JSON lines
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        help="whsec_... secret; repeat during rotation (default: $WEBHOOK_SECRET)",
    )
    args = parser.parse_args()
    secrets = args.secret or os.environ.get("WEBHOOK_SECRET", "").split()
    if not secrets:
        parser.error("give --secret whsec_... or set WEBHOOK_SECRET")
    try:
        receiver = Receiver(secrets)
    except Exception as e:
        parser.error(f"invalid secret: {e}")

    server = ThreadingHTTPServer((args.host, args.port), make_handler(receiver))
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
