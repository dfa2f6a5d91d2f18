#!/usr/bin/env node
// A wsbridge consumer for the unified WebSocket endpoint (the repository README, "Consumers:
// the unified WebSocket endpoint"), with nothing but the `ws` package:
//
//   npm install
//   node consumer.js --url ws://127.0.0.1:8080/v1/ws --token "$DASHBOARD_TOKEN" \
//       --providers voipbin,hashi --state-file /tmp/dashboard.cursor
//
// Same contract as ../python/consumer.py (see ../README.md):
// - stdout: `READY <epoch> <head>` per ready frame, `EVENT <seq> <type> <subject> <id>` per
//   event printed (a missing field prints as `-`), and with --jsonl the envelope as one JSON
//   line after each EVENT line. Everything else goes to stderr.
// - The cursor is (epoch, last seq); every (re)connection resumes with `from: last_seq + 1`
//   and that epoch. Before the first event `--from` applies (`latest` pins the cursor to the
//   `head` of the first ready frame, so a reconnect leaves no gap). --state-file keeps the
//   cursor on disk (written atomically) and wins over --from.
// - Any disconnect (4001 "slow consumer" included) → reconnect with exponential backoff and
//   jitter (0.5 s doubling to 30 s), then resume.
// - `unrecoverable_position` → a loud warning and a re-sync from `earliest` (or as
//   --on-unrecoverable says).
// - Events are deduplicated by envelope `id` (the last 10,000 ids) across reconnects.
// - With --durable NAME the bridge keeps the cursor instead (a durable subscription): every
//   (re)connection subscribes with `durable`, each event is handled (printed) and then
//   acknowledged, in batches (`ack` with the `seqs` handled in the current read burst, sent
//   once the burst's frames are handled or 100 are). An event the bridge delivers again gets a
//   sixth field `delivery=N` on its EVENT line. `--from` applies only when the durable is
//   created.
// - Exit status: 0 after --max-events events or on SIGINT/SIGTERM; 2 usage error, bad state
//   file or a refused subscription (bad_pattern, bad_request); 3 token refused (HTTP 401/403);
//   4 `unrecoverable_position` with --on-unrecoverable exit.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const WebSocket = require('ws');

const EXIT_OK = 0;
const EXIT_USAGE = 2;
const EXIT_AUTH = 3;
const EXIT_UNRECOVERABLE = 4;
const SLOW_CONSUMER_CLOSE = 4001;
// Durable subscriptions: at most this many handled events wait for their ack.
const ACK_BATCH = 100;

class Fatal extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function log(level, message) {
  const stamp = new Date().toTimeString().slice(0, 8);
  process.stderr.write(`${stamp} ${level.padEnd(5)} ${message}\n`);
}

function out(line) {
  process.stdout.write(line + '\n');
}

// A field of an EVENT line: `-` when absent, never containing whitespace.
function field(value) {
  if (value === undefined || value === null || value === '') return '-';
  return String(value).split(/\s+/).filter(Boolean).join('_') || '-';
}

const isSeq = (v) => Number.isInteger(v);

// ---- command line ---------------------------------------------------------------------------

const USAGE = `usage: consumer.js [--url URL] --token TOKEN [--token-in-query]
       [--providers P,..] [--types T,..] [--subjects S,..] [--from latest|earliest|N]
       [--state-file PATH] [--durable NAME] [--state-interval SECONDS] [--max-events N] [--jsonl]
       [--on-unrecoverable earliest|latest|exit] [--sub-id PREFIX] [--dedup-size N]
       [--backoff-initial SECONDS] [--backoff-max SECONDS]`;

function usageError(message) {
  process.stderr.write(`${USAGE}\nconsumer.js: error: ${message}\n`);
  process.exit(EXIT_USAGE);
}

function parseArgs(argv) {
  const args = {
    url: 'ws://127.0.0.1:8080/v1/ws',
    token: process.env.WSBRIDGE_TOKEN || null,
    tokenInQuery: false,
    providers: [],
    types: [],
    subjects: [],
    from: 'latest',
    stateFile: null,
    durable: null,
    stateInterval: 1.0,
    maxEvents: 0,
    jsonl: false,
    onUnrecoverable: 'earliest',
    subId: 'main',
    dedupSize: 10000,
    backoffInitial: 0.5,
    backoffMax: 30,
  };
  const number = (name, v, { integer = false, min = 0 } = {}) => {
    const n = Number(v);
    if (v === undefined || v === '' || !Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
      usageError(`${name}: expected ${integer ? 'an integer' : 'a number'} >= ${min}, got ${v}`);
    }
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const take = () => {
      if (value !== undefined) return value;
      if (i + 1 >= argv.length) usageError(`${arg} needs a value`);
      return argv[++i];
    };
    const list = () => take().split(',').map((s) => s.trim()).filter(Boolean);
    switch (arg) {
      case '--url': args.url = take(); break;
      case '--token': args.token = take(); break;
      case '--token-in-query': args.tokenInQuery = true; break;
      case '--providers': args.providers.push(...list()); break;
      case '--types': args.types.push(...list()); break;
      case '--subjects': args.subjects.push(...list()); break;
      case '--from': {
        const v = take();
        if (v === 'latest' || v === 'earliest') args.from = v;
        else if (/^\d+$/.test(v)) args.from = Number(v);
        else usageError('--from: expected latest, earliest or a sequence number');
        break;
      }
      case '--state-file': args.stateFile = take(); break;
      case '--durable': args.durable = take(); break;
      case '--state-interval': args.stateInterval = number(arg, take()); break;
      case '--max-events': args.maxEvents = number(arg, take(), { integer: true }); break;
      case '--jsonl': args.jsonl = true; break;
      case '--on-unrecoverable': {
        const v = take();
        if (!['earliest', 'latest', 'exit'].includes(v)) usageError('--on-unrecoverable: earliest, latest or exit');
        args.onUnrecoverable = v;
        break;
      }
      case '--sub-id': args.subId = take(); break;
      case '--dedup-size': args.dedupSize = number(arg, take(), { integer: true, min: 1 }); break;
      case '--backoff-initial': args.backoffInitial = number(arg, take()); break;
      case '--backoff-max': args.backoffMax = number(arg, take()); break;
      case '-h':
      case '--help':
        process.stdout.write(USAGE + '\n');
        process.exit(EXIT_OK);
        break;
      default:
        usageError(`unknown argument ${arg}`);
    }
  }
  if (!args.token) usageError('--token (or WSBRIDGE_TOKEN) is required');
  if (args.durable && args.stateFile) usageError('--state-file has no use with --durable: the bridge keeps the cursor');
  return args;
}

// ---- cursor and dedup -----------------------------------------------------------------------

// Where to resume: the last seq handled and the store epoch it was handed out under. With a
// state file it is persisted atomically (temp file, fsync, rename): a crash leaves the old or
// the new cursor, never a torn file. Writes are throttled to one per `interval` seconds while
// events flow and forced on disconnect and exit; after a crash the events of the last interval
// may come again (at-least-once), which the id dedup absorbs within a process.
class Cursor {
  constructor(file, interval) {
    this.file = file;
    this.interval = interval * 1000;
    this.epoch = null;
    this.lastSeq = null;
    this.dirty = false;
    this.savedAt = 0;
  }

  load() {
    if (!this.file || !fs.existsSync(this.file)) return false;
    let data;
    try {
      data = JSON.parse(fs.readFileSync(this.file, 'utf8'));
      if (data === null || typeof data !== 'object') throw new Error('not a JSON object');
      if (data.last_seq != null && !isSeq(data.last_seq)) throw new Error('last_seq is not an integer');
      if (data.epoch != null && typeof data.epoch !== 'string') throw new Error('epoch is not a string');
    } catch (err) {
      throw new Fatal(EXIT_USAGE, `state file ${this.file} is unreadable (${err.message}); fix or delete it`);
    }
    this.lastSeq = data.last_seq ?? null;
    this.epoch = data.epoch ?? null;
    return this.lastSeq !== null;
  }

  advance(seq, epoch) {
    if (this.epoch !== epoch || this.lastSeq === null || seq > this.lastSeq) {
      this.lastSeq = seq;
      this.epoch = epoch;
      this.dirty = true;
    }
  }

  reset(epoch, lastSeq = null) {
    this.epoch = epoch;
    this.lastSeq = lastSeq;
    this.dirty = true;
  }

  save(force = false) {
    if (!this.file || !this.dirty) return;
    const now = Date.now();
    if (!force && now - this.savedAt < this.interval) return;
    const dir = path.dirname(path.resolve(this.file));
    const tmp = path.join(dir, `.cursor-${process.pid}-${now}.tmp`);
    const body = JSON.stringify({ epoch: this.epoch, last_seq: this.lastSeq }) + '\n';
    try {
      const fd = fs.openSync(tmp, 'w', 0o600);
      try {
        fs.writeSync(fd, body);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, this.file);
    } catch (err) {
      try { fs.unlinkSync(tmp); } catch { /* already gone */ }
      throw err;
    }
    try { // make the rename itself durable (POSIX); best effort elsewhere
      const dfd = fs.openSync(dir, 'r');
      try { fs.fsyncSync(dfd); } finally { fs.closeSync(dfd); }
    } catch { /* not supported here */ }
    this.dirty = false;
    this.savedAt = now;
  }
}

// The last `capacity` event ids, to drop what a reconnect or a replay delivers twice.
class SeenIds {
  constructor(capacity) {
    this.capacity = capacity;
    this.ids = new Map();
  }

  // Records `id`; false if it was already there.
  add(id) {
    if (this.ids.has(id)) {
      this.ids.delete(id);
      this.ids.set(id, true);
      return false;
    }
    this.ids.set(id, true);
    if (this.ids.size > this.capacity) this.ids.delete(this.ids.keys().next().value);
    return true;
  }
}

// ---- the consumer ---------------------------------------------------------------------------

class Consumer {
  constructor(args) {
    this.args = args;
    this.cursor = new Cursor(args.stateFile, args.stateInterval);
    this.seen = new SeenIds(args.dedupSize);
    this.printed = 0;
    this.attempt = 0; // consecutive failed connections, for the backoff
    this.subCounter = 0;
    this.subId = null; // the live subscription; events of any other are ignored
    this.epoch = null; // of the current session's ready frame
    this.head = null;
    this.resynced = false; // one re-sync per session; a second unrecoverable_position is fatal
    this.toAck = []; // durable: seqs handled and not acknowledged yet
    this.ackScheduled = false;
    this.ws = null;
    this.stopping = false;
    this.filter = {};
    for (const key of ['providers', 'types', 'subjects']) {
      if (args[key].length) this.filter[key] = args[key];
    }
  }

  async run() {
    if (this.cursor.load()) {
      log('INFO', `resuming from state file ${this.args.stateFile}: epoch=${this.cursor.epoch} last_seq=${this.cursor.lastSeq}`);
    }
    for (;;) {
      const outcome = await this.session();
      this.cursor.save(true);
      if (outcome.fatal) throw outcome.fatal;
      if (outcome.done || this.stopping) return EXIT_OK;
      await this.sleep(this.nextDelay());
      if (this.stopping) return EXIT_OK;
    }
  }

  stop() {
    this.stopping = true;
    if (this.wakeUp) this.wakeUp();
    if (this.ws) this.ws.close(1000);
  }

  sleep(seconds) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, seconds * 1000);
      this.wakeUp = () => { clearTimeout(timer); resolve(); };
    });
  }

  endpoint() {
    if (this.args.tokenInQuery) {
      const url = new URL(this.args.url);
      url.searchParams.append('token', this.args.token);
      return { url: url.toString(), headers: {} };
    }
    return { url: this.args.url, headers: { Authorization: `Bearer ${this.args.token}` } };
  }

  // 0.5 s doubling to 30 s; each delay drawn from its upper half (jitter).
  nextDelay() {
    const base = Math.min(this.args.backoffMax, this.args.backoffInitial * 2 ** this.attempt);
    this.attempt += 1;
    const delay = base / 2 + Math.random() * (base / 2);
    log('INFO', `reconnecting in ${delay.toFixed(2)}s (attempt ${this.attempt}), resuming ${this.describeResume()}`);
    return delay;
  }

  describeResume() {
    if (this.args.durable) return `durable ${this.args.durable} (the bridge keeps its cursor)`;
    if (this.cursor.lastSeq === null) return `from ${this.args.from}`;
    return `from ${this.cursor.lastSeq + 1} (epoch ${this.cursor.epoch})`;
  }

  // One connection, resolved with {done}, {fatal} or {} (reconnect) when it ends.
  session() {
    return new Promise((resolve) => {
      const { url, headers } = this.endpoint();
      const ws = new WebSocket(url, {
        headers,
        handshakeTimeout: 10000,
        maxPayload: 16 * 1024 * 1024,
      });
      this.ws = ws;
      let outcome = {};
      let refused = null; // HTTP status of a refused handshake
      let gotReady = false;
      let heartbeat = null;

      const finish = (result) => {
        outcome = result;
        if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) {
          ws.close(1000);
          // a peer that never answers the close must not keep us waiting
          setTimeout(() => ws.terminate(), 2000).unref();
        }
      };

      ws.on('unexpected-response', (req, res) => {
        refused = res.statusCode;
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => { if (body.length < 500) body += chunk; });
        res.on('end', () => { refused = `${res.statusCode} ${body.trim()}`.trim(); ws.terminate(); });
        res.on('error', () => ws.terminate());
        if ([401, 403].includes(res.statusCode)) {
          outcome = { fatal: new Fatal(EXIT_AUTH, '') }; // message completed on close
        }
      });

      ws.on('open', () => {
        log('INFO', `connected to ${this.args.url}`);
        // Protocol-level keep-alive: a peer that misses a pong for 20 s is dead.
        let alive = true;
        ws.on('pong', () => { alive = true; });
        heartbeat = setInterval(() => {
          if (!alive) {
            log('WARN', 'no pong for 20s; dropping the connection');
            ws.terminate();
            return;
          }
          alive = false;
          ws.ping();
        }, 20000);
      });

      ws.on('message', (data, isBinary) => {
        if (outcome.done || outcome.fatal) return;
        let frame;
        try {
          frame = JSON.parse(isBinary ? data.toString('utf8') : data.toString());
        } catch {
          log('WARN', `ignoring a frame that is not JSON: ${JSON.stringify(data.toString().slice(0, 200))}`);
          return;
        }
        if (frame === null || typeof frame !== 'object' || Array.isArray(frame)) {
          log('WARN', 'ignoring a frame that is not a JSON object');
          return;
        }
        try {
          if (!gotReady) {
            if (frame.op !== 'ready') {
              log('WARN', `expected a ready frame first, got ${JSON.stringify(frame.op)}; reconnecting`);
              finish({});
              return;
            }
            gotReady = true;
            this.onReady(ws, frame);
            return;
          }
          const result = this.onFrame(ws, frame);
          if (result) finish(result);
        } catch (err) {
          finish({ fatal: err instanceof Fatal ? err : new Fatal(1, err.stack || String(err)) });
        }
      });

      ws.on('error', (err) => {
        if (refused === null) log('WARN', `connection failed: ${err.code || ''} ${err.message}`.replace('  ', ' '));
      });

      ws.on('close', (code, reasonBuf) => {
        clearInterval(heartbeat);
        this.ws = null;
        const reason = reasonBuf.toString();
        if (outcome.fatal && outcome.fatal.status === EXIT_AUTH) {
          outcome.fatal.message = `the server refused the token: HTTP ${refused}`;
        } else if (refused !== null) {
          log('WARN', `handshake refused: HTTP ${refused}`);
        } else if (outcome.done || outcome.fatal || this.stopping) {
          // we closed it
        } else if (!gotReady && code === 1006) {
          // never opened or dropped before ready: already logged by 'error' when relevant
        } else if (code === SLOW_CONSUMER_CLOSE) {
          log('WARN', `closed by the server as a slow consumer (4001 ${JSON.stringify(reason)}); will resume`);
        } else if (code === 1006) {
          log('WARN', 'connection lost (no close frame)');
        } else {
          log('WARN', `connection closed by the server: ${code} ${JSON.stringify(reason)}`);
        }
        resolve(outcome);
      });
    });
  }

  onReady(ws, frame) {
    this.epoch = frame.epoch ?? null;
    this.head = frame.head ?? null;
    this.resynced = false;
    out(`READY ${field(this.epoch)} ${field(this.head)}`);
    this.toAck = []; // acks are per connection: what the last one held is sent again
    if (this.args.durable) this.subscribe(ws, this.args.from); // the bridge keeps the cursor
    else if (this.cursor.lastSeq !== null) this.subscribe(ws, this.cursor.lastSeq + 1, this.cursor.epoch);
    else this.subscribe(ws, this.args.from);
  }

  subscribe(ws, from, epoch = null) {
    this.subCounter += 1;
    this.subId = `${this.args.subId}-${this.subCounter}`;
    const frame = { op: 'subscribe', id: this.subId, filter: this.filter, from };
    if (this.args.durable) frame.durable = this.args.durable;
    if (epoch !== null) frame.epoch = epoch;
    if (from === 'latest' && this.cursor.lastSeq === null && isSeq(this.head) && !this.args.durable) {
      // Take position now: a reconnect before the first event resumes from head + 1
      // instead of asking for "latest" again and losing what arrived in between.
      this.cursor.reset(this.epoch, this.head);
    }
    ws.send(JSON.stringify(frame));
    log('INFO', `subscribe ${this.subId} from=${from}${epoch ? ` epoch=${epoch}` : ''}${this.args.durable ? ` durable=${this.args.durable}` : ''} filter=${JSON.stringify(this.filter)}`);
  }

  // Acknowledges the durable events handled since the last ack, in one frame.
  flushAcks(ws) {
    this.ackScheduled = false;
    if (!this.toAck.length) return;
    const seqs = this.toAck;
    this.toAck = [];
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ op: 'ack', id: this.subId, seqs }));
  }

  // After an event is handled: a durable one is acknowledged (batched: the frames of one read
  // burst are handled before setImmediate runs), a plain one moves the saved cursor.
  handled(ws, seq) {
    if (!this.args.durable) {
      this.cursor.save();
      return;
    }
    if (isSeq(seq)) this.toAck.push(seq);
    if (this.toAck.length >= ACK_BATCH) this.flushAcks(ws);
    else if (!this.ackScheduled) {
      this.ackScheduled = true;
      setImmediate(() => this.flushAcks(ws));
    }
  }

  // Handles one frame after `ready`; returns {done} or {fatal} to end the session.
  onFrame(ws, frame) {
    switch (frame.op) {
      case 'event':
        return this.onEvent(ws, frame);
      case 'subscribed':
        if (frame.id === this.subId) {
          this.attempt = 0; // a working session resets the backoff
          if (this.args.durable) {
            log('INFO', `subscribed ${this.subId} to durable ${this.args.durable}: acked through ${frame.acked}, ${frame.pending} pending`);
          } else {
            log('INFO', `subscribed ${this.subId}`);
          }
        }
        return null;
      case 'error':
        return this.onError(ws, frame);
      case 'pong':
      case 'unsubscribed':
      case 'ready':
        return null;
      default:
        log('DEBUG', `ignoring unknown op ${JSON.stringify(frame.op)}`);
        return null;
    }
  }

  onEvent(ws, frame) {
    if (frame.subscription !== this.subId) return null; // replaced after a re-sync
    const env = frame.event;
    if (env === null || typeof env !== 'object' || Array.isArray(env)) {
      log('WARN', 'ignoring an event frame without an envelope');
      return null;
    }
    const seq = frame.seq ?? env.seq;
    const id = env.id;
    if (isSeq(seq) && !this.args.durable) this.cursor.advance(seq, this.epoch);
    if (id !== undefined && id !== null && !this.seen.add(id)) {
      log('DEBUG', `duplicate event ${id} (seq ${seq}) skipped`);
      this.handled(ws, seq);
      return null;
    }
    let line = `EVENT ${field(seq)} ${field(env.type)} ${field(env.subject)} ${field(id)}`;
    if (Number.isInteger(frame.delivery) && frame.delivery > 1) line += ` delivery=${frame.delivery}`;
    out(line);
    if (this.args.jsonl) out(JSON.stringify(env));
    this.printed += 1;
    this.handled(ws, seq);
    if (this.args.maxEvents && this.printed >= this.args.maxEvents) {
      this.flushAcks(ws);
      this.cursor.save(true);
      return { done: true };
    }
    return null;
  }

  onError(ws, frame) {
    const { code, message = '', id: sub } = frame;
    if (sub !== undefined && sub !== null && sub !== this.subId) {
      log('WARN', `error for an old subscription ${sub}: ${code} ${message}`);
      return null;
    }
    if (code === 'unrecoverable_position') {
      const policy = this.args.onUnrecoverable;
      log('WARN', '!'.repeat(72));
      log('WARN', `unrecoverable_position: the server cannot resume ${this.describeResume()} (${message}).`);
      if (policy === 'exit' || this.resynced) {
        return { fatal: new Fatal(EXIT_UNRECOVERABLE, 'unrecoverable_position: re-sync needed; exiting') };
      }
      log('WARN', `RE-SYNCING from ${policy}: events between the old cursor and now may be missing or seen again (the ${this.args.dedupSize} last ids are deduplicated)`);
      log('WARN', '!'.repeat(72));
      this.resynced = true;
      this.cursor.reset(this.epoch);
      this.cursor.save(true);
      this.subscribe(ws, policy);
      return null;
    }
    if (['bad_pattern', 'bad_request', 'durable_mismatch', 'too_many_durables'].includes(code) && sub === this.subId) {
      return { fatal: new Fatal(EXIT_USAGE, `the server refused the subscription: ${code}: ${message}`) };
    }
    if (code === 'unknown_durable' && this.args.durable && sub === this.subId) {
      log('WARN', `the durable ${this.args.durable} was deleted on the bridge; subscribing again creates it anew from ${this.args.from}`);
      this.toAck = [];
      this.subscribe(ws, this.args.from);
      return null;
    }
    log('WARN', `server error ${code}: ${message}`);
    return null;
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const consumer = new Consumer(args);
  let signalled = false;
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, () => {
      if (signalled) return;
      signalled = true;
      log('INFO', 'stopping');
      consumer.stop();
    });
  }
  let status;
  try {
    status = await consumer.run();
  } catch (err) {
    if (!(err instanceof Fatal)) throw err;
    log('ERROR', err.message);
    status = err.status;
  } finally {
    consumer.cursor.save(true);
  }
  // let stdout drain (pipes are asynchronous on some platforms) before exiting
  process.stdout.write('', () => process.exit(status));
}

main().catch((err) => {
  log('ERROR', err.stack || String(err));
  process.exit(1);
});
