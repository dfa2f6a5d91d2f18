// A tiny fake of wsbridge's `/v1/ws` endpoint (the repository README,
// "Consumers: the unified WebSocket endpoint"), for the consumer tests.
//
// It speaks the protocol the consumers rely on and nothing more: token check (HTTP 401 before
// the upgrade, `Authorization: Bearer` or `?token=`), `ready`, `subscribe` with `from`/`epoch`
// (answering `unrecoverable_position` for another epoch or a position older than what it
// retains), `subscribed`, `event`, `unsubscribe`, `ping`/`pong`, `error`. It does not filter:
// the filter a consumer sends is only recorded, for the tests to check.
//
// Each accepted connection can follow a *plan* (keyed by its index, 0 for the first one):
//   dropAfter: N      after N events on a subscription, end the connection:
//                     abrupt: true → TCP reset without a close frame; otherwise a close frame
//                     with `code` (default 1011) and `reason` (e.g. 4001 "slow consumer")
//   ignoreFrom: true  replay from seq 1 whatever `from` says (a misbehaving server, for dedup)
//
// Run alone it is a playground for a consumer (publishes one event per second):
//   node test_fake_bridge.js --port 8080 --token T
'use strict';

const http = require('node:http');
const { EventEmitter } = require('node:events');
const { WebSocketServer } = require('ws');

function makeEvent(n, { provider = 'voipbin', type, subject, id } = {}) {
  const now = new Date().toISOString();
  if (provider === 'hashi') {
    type = type || 'hashi.lobby.joined';
    subject = subject || `lobby/L${n}`;
  }
  return {
    specversion: '1.0',
    id: id || `evt-${String(n).padStart(4, '0')}`,
    source: `wsbridge://${provider}-main`,
    type: type || `${provider}.call.status`,
    subject: subject || `customer_id:abc123:call:c${n}`,
    time: now.replace(/\.\d+Z$/, 'Z'),
    datacontenttype: 'application/json',
    data: { status: 'answered', n },
    provider,
    recvtime: now,
  };
}

class FakeBridge {
  constructor({ token = 'secret-token', epoch = 'ep-1', retainFrom = 1 } = {}) {
    this.token = token;
    this.epoch = epoch;
    this.retainFrom = retainFrom; // the oldest seq still stored
    this.journal = []; // envelopes; seq = index + 1
    this.connections = []; // {index, auth, frames, subscribes}
    this.plans = {};
    this.rejected = 0;
    this.changed = new EventEmitter();
    this.changed.setMaxListeners(0);
    this.sockets = new Set();
  }

  get head() { return this.journal.length; }
  get url() { return `ws://127.0.0.1:${this.port}/v1/ws`; }

  publish(envelope) {
    const seq = this.journal.length + 1;
    this.journal.push({ ...envelope, seq });
    this.changed.emit('publish');
    return seq;
  }

  start(port = 0) {
    this.server = http.createServer((req, res) => { res.writeHead(426); res.end(); });
    this.server.on('connection', (s) => { this.sockets.add(s); s.on('close', () => this.sockets.delete(s)); });
    this.wss = new WebSocketServer({ noServer: true });
    this.server.on('upgrade', (req, socket, head) => {
      const url = new URL(req.url, 'http://x');
      const header = req.headers.authorization || '';
      let auth = null;
      if (header === `Bearer ${this.token}`) auth = 'header';
      else if (url.searchParams.get('token') === this.token) auth = 'query';
      if (url.pathname !== '/v1/ws' || auth === null) {
        const status = url.pathname !== '/v1/ws' ? '404 Not Found' : '401 Unauthorized';
        if (auth === null) this.rejected += 1;
        const body = JSON.stringify({ error: auth === null ? 'unknown token' : 'not found' });
        socket.end(`HTTP/1.1 ${status}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => this.handle(ws, auth));
    });
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, '127.0.0.1', () => {
        this.port = this.server.address().port;
        resolve(this);
      });
    });
  }

  stop() {
    for (const ws of this.wss.clients) ws.terminate();
    for (const s of this.sockets) s.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  handle(ws, auth) {
    const conn = { index: this.connections.length, auth, frames: [] };
    Object.defineProperty(conn, 'subscribes', { get: () => conn.frames.filter((f) => f.op === 'subscribe') });
    this.connections.push(conn);
    const plan = this.plans[conn.index] || {};
    const streams = new Map();
    const send = (frame) => { if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(frame)); };
    const error = (code, message, id) => send(id == null ? { op: 'error', code, message } : { op: 'error', code, message, id });
    send({ op: 'ready', session: `s${conn.index}`, consumer: 'test', epoch: this.epoch, head: this.head });

    ws.on('message', (data) => {
      let frame;
      try { frame = JSON.parse(data.toString()); } catch { error('bad_request', 'not JSON'); return; }
      conn.frames.push(frame);
      if (frame.op === 'ping') send({ op: 'pong' });
      else if (frame.op === 'subscribe') {
        const start = this.resolve(frame, plan);
        if (typeof start === 'string') { error(start, `cannot serve from=${JSON.stringify(frame.from)}`, frame.id); return; }
        send({ op: 'subscribed', id: frame.id });
        streams.set(frame.id, this.stream(ws, send, frame.id, start, plan));
      } else if (frame.op === 'unsubscribe') {
        const stop = streams.get(frame.id);
        if (stop) { stop(); streams.delete(frame.id); }
        send({ op: 'unsubscribed', id: frame.id });
      } else error('unknown_op', `unknown op ${JSON.stringify(frame.op)}`);
    });
    ws.on('close', () => { for (const stop of streams.values()) stop(); });
  }

  // The first seq to send, or an error code.
  resolve(frame, plan) {
    const filter = frame.filter || {};
    for (const key of ['providers', 'types', 'subjects']) {
      if ((filter[key] || []).some((p) => p.includes('['))) return 'bad_pattern';
    }
    if (plan.ignoreFrom) return 1;
    const from = frame.from ?? 'latest';
    if (from === 'latest') return this.head + 1;
    if (from === 'earliest') return this.retainFrom;
    if (!Number.isInteger(from) || from < 0) return 'bad_request';
    if ((frame.epoch != null && frame.epoch !== this.epoch) || from < this.retainFrom) return 'unrecoverable_position';
    return from;
  }

  // Sends from `seq` on, then live; returns a function that stops it.
  stream(ws, send, sub, seq, plan) {
    let sent = 0;
    let stopped = false;
    const pump = () => {
      while (!stopped) {
        if (plan.dropAfter != null && sent >= plan.dropAfter) {
          stopped = true;
          if (plan.abrupt) ws.terminate(); // no close frame: a TCP-level drop
          else ws.close(plan.code || 1011, plan.reason || '');
          return;
        }
        if (this.journal.length < seq) return; // wait for the next publish
        send({ op: 'event', subscription: sub, seq, event: this.journal[seq - 1] });
        sent += 1;
        seq += 1;
      }
    };
    this.changed.on('publish', pump);
    setImmediate(pump);
    return () => { stopped = true; this.changed.off('publish', pump); };
  }
}

module.exports = { FakeBridge, makeEvent };

if (require.main === module) {
  const argv = process.argv.slice(2);
  const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
  const bridge = new FakeBridge({ token: opt('--token', 'T') });
  bridge.start(Number(opt('--port', 8080))).then(() => {
    console.log(`fake bridge on ${bridge.url} (token ${JSON.stringify(bridge.token)})`);
    let n = 0;
    setInterval(() => { n += 1; bridge.publish(makeEvent(n, { provider: n % 2 ? 'voipbin' : 'hashi' })); }, 1000);
  });
}
