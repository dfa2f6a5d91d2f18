// Tests of consumer.js against the fake bridge in test_fake_bridge.js (real sockets, a real
// child process, the stdout contract parsed as a user's script would).
//
//   npm install --no-audit --no-fund --no-package-lock
//   npm test                      # = node --test test_consumer.js
//
// CONSUMER_CMD runs the same tests against another implementation of the contract, e.g.
//   CONSUMER_CMD="python3 ../python/consumer.py" npm test
'use strict';

const { test, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { FakeBridge, makeEvent } = require('./test_fake_bridge');

const CONSUMER_CMD = process.env.CONSUMER_CMD
  ? process.env.CONSUMER_CMD.split(/\s+/).filter(Boolean)
  : [process.execPath, path.join(__dirname, 'consumer.js')];
const TIMEOUT = 15000;

class Consumer {
  constructor(args) {
    this.lines = [];
    this.stderr = '';
    this.waiters = [];
    this.proc = spawn(CONSUMER_CMD[0], [...CONSUMER_CMD.slice(1), ...args], { cwd: __dirname });
    let buf = '';
    this.proc.stdout.setEncoding('utf8');
    this.proc.stdout.on('data', (chunk) => {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        this.lines.push(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
      }
      for (const w of this.waiters) w();
    });
    this.proc.stderr.setEncoding('utf8');
    this.proc.stderr.on('data', (chunk) => { this.stderr += chunk; });
    this.exited = new Promise((resolve) => this.proc.on('close', (code) => resolve(code)));
  }

  waitFor(predicate, timeout = TIMEOUT) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.lines.some(predicate)) {
          clearTimeout(timer);
          this.waiters = this.waiters.filter((w) => w !== check);
          resolve();
        }
      };
      const timer = setTimeout(() => reject(new Error(`timed out; stdout:\n${this.lines.join('\n')}\nstderr:\n${this.stderr}`)), timeout);
      this.waiters.push(check);
      check();
    });
  }

  async exitStatus(timeout = TIMEOUT) {
    let timer;
    const limit = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no exit; stdout:\n${this.lines.join('\n')}\nstderr:\n${this.stderr}`)), timeout);
    });
    try {
      return await Promise.race([this.exited, limit]);
    } finally {
      clearTimeout(timer);
    }
  }

  kill() { if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL'); }

  // EVENT lines as [seq, type, subject, id].
  get events() { return this.lines.filter((l) => l.startsWith('EVENT ')).map((l) => l.split(' ').slice(1)); }
  get seqs() { return this.events.map((e) => e[0]); }
  get readies() { return this.lines.filter((l) => l.startsWith('READY ')); }
}

let bridge;
let tmp;
let consumers;

beforeEach(async () => {
  bridge = await new FakeBridge().start();
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'wsbridge-consumer-'));
  consumers = [];
});

afterEach(async () => {
  for (const c of consumers) { c.kill(); await c.exited; }
  await bridge.stop();
  fs.rmSync(tmp, { recursive: true, force: true });
});

function run(args, { token = 'secret-token', url = bridge.url } = {}) {
  const c = new Consumer(['--url', url, '--token', token, ...args]);
  consumers.push(c);
  return c;
}

const publish = (n, opts) => { for (let i = 0; i < n; i++) bridge.publish(makeEvent(bridge.head + 1, opts)); };
const statePath = () => path.join(tmp, 'cursor.json');
const readState = () => JSON.parse(fs.readFileSync(statePath(), 'utf8'));
const writeState = (s) => fs.writeFileSync(statePath(), JSON.stringify(s));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pad = (n) => String(n).padStart(4, '0');

test('subscribes, prints events and exits 0 after --max-events', async () => {
  publish(5);
  const c = run(['--from', 'earliest', '--max-events', '3', '--jsonl',
    '--providers', 'voipbin,hashi', '--types', 'voipbin.call.*', '--types', 'hashi.**',
    '--subjects', 'customer_id:abc123:*']);
  assert.equal(await c.exitStatus(), 0, c.stderr);

  assert.equal(c.lines[0], 'READY ep-1 5');
  assert.deepEqual(c.events, [1, 2, 3].map((i) =>
    [String(i), 'voipbin.call.status', `customer_id:abc123:call:c${i}`, `evt-${pad(i)}`]));
  for (const i of [1, 2, 3]) { // --jsonl: each EVENT line is followed by its envelope
    const at = c.lines.indexOf(`EVENT ${i} voipbin.call.status customer_id:abc123:call:c${i} evt-${pad(i)}`);
    assert.deepEqual(JSON.parse(c.lines[at + 1]), bridge.journal[i - 1]);
  }
  assert.equal(bridge.connections.length, 1);
  const conn = bridge.connections[0];
  assert.equal(conn.auth, 'header');
  assert.equal(conn.subscribes.length, 1);
  const sub = conn.subscribes[0];
  assert.equal(sub.from, 'earliest');
  assert.equal(sub.epoch, undefined);
  assert.deepEqual(sub.filter, { providers: ['voipbin', 'hashi'], types: ['voipbin.call.*', 'hashi.**'], subjects: ['customer_id:abc123:*'] });
  assert.equal(typeof sub.id, 'string');
});

test('live events after from=latest', async () => {
  publish(4);
  const c = run(['--max-events', '2']);
  await c.waitFor((l) => l.startsWith('READY'));
  await sleep(300); // let it subscribe before publishing
  publish(3);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.deepEqual(c.seqs, ['5', '6']);
  assert.equal(bridge.connections[0].subscribes[0].from, 'latest');
});

test('reconnects and resumes from last seq + 1 with its epoch', async () => {
  publish(6);
  bridge.plans = { 0: { dropAfter: 2, abrupt: true }, 1: { dropAfter: 2, code: 1011, reason: 'restarting' } };
  const c = run(['--from', 'earliest', '--max-events', '6', '--state-file', statePath()]);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.deepEqual(c.seqs, ['1', '2', '3', '4', '5', '6']);
  assert.equal(c.readies.length, 3);
  const subs = bridge.connections.map((conn) => conn.subscribes[0]);
  assert.equal(subs[0].from, 'earliest');
  assert.deepEqual([subs[1].from, subs[1].epoch], [3, 'ep-1']);
  assert.deepEqual([subs[2].from, subs[2].epoch], [5, 'ep-1']);
  assert.deepEqual(readState(), { epoch: 'ep-1', last_seq: 6 });
});

test('a state file resumes a new process and wins over --from', async () => {
  publish(5);
  writeState({ epoch: 'ep-1', last_seq: 3 });
  const c = run(['--from', 'earliest', '--max-events', '2', '--state-file', statePath()]);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  const sub = bridge.connections[0].subscribes[0];
  assert.deepEqual([sub.from, sub.epoch], [4, 'ep-1']);
  assert.deepEqual(c.seqs, ['4', '5']);
  assert.deepEqual(readState(), { epoch: 'ep-1', last_seq: 5 });
});

test('close 4001 (slow consumer): reconnects and resumes', async () => {
  publish(3);
  bridge.plans = { 0: { dropAfter: 1, code: 4001, reason: 'slow consumer' } };
  const c = run(['--from', 'earliest', '--max-events', '3']);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.deepEqual(c.seqs, ['1', '2', '3']);
  assert.equal(bridge.connections.length, 2);
  const sub = bridge.connections[1].subscribes[0];
  assert.deepEqual([sub.from, sub.epoch], [2, 'ep-1']);
  assert.match(c.stderr, /slow consumer/);
  assert.match(c.stderr, /4001/);
});

test('unrecoverable_position (another epoch): warns and re-syncs from earliest', async () => {
  bridge.epoch = 'ep-2'; // the store was recreated since the cursor was saved
  publish(3);
  writeState({ epoch: 'ep-1', last_seq: 41 });
  const c = run(['--max-events', '3', '--state-file', statePath()]);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.equal(bridge.connections.length, 1);
  const [first, second] = bridge.connections[0].subscribes;
  assert.deepEqual([first.from, first.epoch], [42, 'ep-1']);
  assert.equal(second.from, 'earliest');
  assert.notEqual(first.id, second.id);
  assert.deepEqual(c.seqs, ['1', '2', '3']);
  assert.match(c.stderr, /WARN.*unrecoverable_position/);
  assert.deepEqual(readState(), { epoch: 'ep-2', last_seq: 3 });
});

test('a position older than the retention is unrecoverable too', async () => {
  bridge.retainFrom = 4;
  publish(5);
  const c = run(['--from', '2', '--max-events', '2']);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  const [first, second] = bridge.connections[0].subscribes;
  assert.equal(first.from, 2);
  assert.equal(second.from, 'earliest');
  assert.deepEqual(c.seqs, ['4', '5']);
});

test('unrecoverable_position with --on-unrecoverable exit: status 4', async () => {
  bridge.retainFrom = 4;
  publish(5);
  const c = run(['--from', '2', '--on-unrecoverable', 'exit']);
  assert.equal(await c.exitStatus(), 4, c.stderr);
  assert.match(c.stderr, /unrecoverable_position/);
});

test('dedups by event id across reconnects', async () => {
  // ids: evt-0001, evt-0002, evt-0003, evt-0002 again (same event journalled twice), evt-0005
  for (let n = 1; n <= 5; n++) bridge.publish(makeEvent(n, { id: n === 4 ? 'evt-0002' : undefined }));
  bridge.plans = { 0: { dropAfter: 2, code: 1001, reason: 'going away' }, 1: { ignoreFrom: true } };
  const c = run(['--from', 'earliest', '--max-events', '4']);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.deepEqual(c.events.map((e) => [e[0], e[3]]),
    [['1', 'evt-0001'], ['2', 'evt-0002'], ['3', 'evt-0003'], ['5', 'evt-0005']]);
  assert.equal(bridge.connections[1].subscribes[0].from, 3);
});

test('a reconnect before the first event after from=latest leaves no gap', async () => {
  publish(3);
  bridge.plans = { 0: { dropAfter: 0, code: 1012, reason: 'restart' } };
  const c = run(['--max-events', '1']);
  await c.waitFor((l) => l.startsWith('READY'));
  publish(1); // seq 4, published while the consumer is away
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.equal(bridge.connections[0].subscribes[0].from, 'latest');
  const sub = bridge.connections[1].subscribes[0];
  assert.deepEqual([sub.from, sub.epoch], [4, 'ep-1']);
  assert.deepEqual(c.seqs, ['4']);
});

test('waits with backoff until the server is up', async () => {
  const port = await new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
  });
  await bridge.stop();
  const c = run(['--from', 'earliest', '--max-events', '1'], { url: `ws://127.0.0.1:${port}/v1/ws` });
  await sleep(1500);
  assert.equal(c.proc.exitCode, null);
  bridge = await new FakeBridge().start(port);
  publish(1);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.deepEqual(c.seqs, ['1']);
});

test('an unknown token exits 3 without retrying', async () => {
  const c = run([], { token: 'wrong' });
  assert.equal(await c.exitStatus(), 3, c.stderr);
  assert.match(c.stderr, /401/);
  assert.equal(bridge.rejected, 1);
  assert.equal(bridge.connections.length, 0);
});

test('--token-in-query', async () => {
  publish(1);
  const c = run(['--token-in-query', '--from', 'earliest', '--max-events', '1']);
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.equal(bridge.connections[0].auth, 'query');
});

test('bad_pattern: exits 2', async () => {
  const c = run(['--types', 'voipbin.[call']);
  assert.equal(await c.exitStatus(), 2, c.stderr);
  assert.match(c.stderr, /bad_pattern/);
});

test('SIGTERM saves the cursor and exits 0', async () => {
  publish(2);
  const c = run(['--from', 'earliest', '--state-file', statePath(), '--state-interval', '3600']);
  await c.waitFor((l) => l.startsWith('EVENT 2 '));
  c.proc.kill('SIGTERM');
  assert.equal(await c.exitStatus(), 0, c.stderr);
  assert.deepEqual(readState(), { epoch: 'ep-1', last_seq: 2 });
});
