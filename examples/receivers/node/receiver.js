#!/usr/bin/env node
// A minimal wsbridge webhook receiver that verifies signatures with `standardwebhooks`.
//
// It shows that wsbridge's outbound webhooks (the repository README, "Signatures (Standard
// Webhooks)") verify with the Standard Webhooks reference library and nothing of ours:
//
//     npm install
//     node receiver.js --port 9200 --secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
//
// Contract shared by the Python, Node.js and Go receivers:
// - `--port N` (0 = any free port); prints `LISTENING <port>` once bound.
// - `--secret S` (repeatable, for secret rotation) or the WEBHOOK_SECRET environment variable
//   (several secrets separated by spaces); a message is accepted if any secret verifies it.
// - Every POST: 204 when the signature verifies (also for a duplicate), 400 when it does not.
// - One JSON line per request on stdout:
//   {"ok": bool, "id": webhook-id, "type": event type, "duplicate": bool, "error": str|null}
//   `type` is the `ce-type` header (binary mode) or the envelope's `type` (structured mode).
// - Deduplication by `webhook-id` is the receiver's job (delivery is at-least-once): a
//   verified id seen before is acknowledged again and printed with "duplicate": true.
"use strict";

const http = require("node:http");
const { Webhook } = require("standardwebhooks");

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node receiver.js [--port N] [--host ADDR] --secret whsec_... [--secret ...]\n`,
  );
  process.exit(2);
}

function parseArgs(argv) {
  const args = { port: 0, host: "127.0.0.1", secrets: [] };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) usage(`${flag} needs a value`);
      return argv[++i];
    };
    switch (flag) {
      case "--port": {
        const port = Number(value());
        if (!Number.isInteger(port) || port < 0 || port > 65535) usage("--port must be 0..65535");
        args.port = port;
        break;
      }
      case "--host":
        args.host = value();
        break;
      case "--secret":
        args.secrets.push(value());
        break;
      case "-h":
      case "--help":
        usage("A webhook receiver verifying Standard Webhooks signatures.");
        break;
      default:
        usage(`unknown argument ${argv[i]}`);
    }
  }
  if (args.secrets.length === 0) {
    args.secrets = (process.env.WEBHOOK_SECRET || "").split(/\s+/).filter(Boolean);
  }
  if (args.secrets.length === 0) usage("give --secret whsec_... or set WEBHOOK_SECRET");
  return args;
}

function emit(record) {
  // One line per write; stdout to a pipe is asynchronous but keeps the order of writes.
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

// The CloudEvents type: `ce-type` in binary mode, the envelope's `type` in structured mode.
function eventType(headers, body) {
  if (headers["ce-type"]) return headers["ce-type"];
  try {
    const envelope = JSON.parse(body.toString("utf8"));
    if (envelope && typeof envelope === "object" && "specversion" in envelope) {
      return envelope.type ?? null;
    }
  } catch {
    // not JSON: no type to show
  }
  return null;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  let webhooks;
  try {
    webhooks = args.secrets.map((s) => new Webhook(s));
  } catch (e) {
    usage(`invalid secret: ${e.message}`);
  }
  const seen = new Set();

  const server = http.createServer((req, res) => {
    if (req.method !== "POST") {
      res.writeHead(405, { allow: "POST" }).end();
      return;
    }
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      let error = null;
      for (const wh of webhooks) {
        try {
          wh.verify(body, req.headers);
          error = null;
          break;
        } catch (e) {
          error = (e && e.message) || String(e);
        }
      }
      const id = req.headers["webhook-id"] ?? null;
      const ok = error === null;
      const duplicate = ok && seen.has(id);
      if (ok) seen.add(id);
      emit({ ok, id, type: eventType(req.headers, body), duplicate, error });
      if (ok) {
        res.writeHead(204).end();
      } else {
        const payload = JSON.stringify({ error });
        res
          .writeHead(400, {
            "content-type": "application/json",
            "content-length": Buffer.byteLength(payload),
          })
          .end(payload);
      }
    });
  });

  server.listen(args.port, args.host, () => {
    process.stdout.write(`LISTENING ${server.address().port}\n`);
  });
  for (const sig of ["SIGINT", "SIGTERM"]) {
    process.on(sig, () => process.exit(0));
  }
}

main();
