// Checks docs/asyncapi.yaml for tests/it/asyncapi.rs:
//
//   node check.js <asyncapi.yaml> <src/downstream> <src/http/server.rs> [frames.json]
//
// 1. parses and validates the document with @asyncapi/parser; any diagnostic of severity
//    error fails;
// 2. reads the Rust sources and fails unless every op, error code, close code and HTTP
//    status they can send is in the document, and every error code in the document is one
//    the code sends (the document neither misses nor invents one);
// 3. with frames.json (what a real session received, each `{message, payload}` naming the
//    message it must be, `{close}` or `{channel, status}`), validates each payload against
//    its message's payload schema with ajv, every object in it closed to the members the
//    document lists, so a member the bridge sends but the document does not name fails too.
//
// Prints one line per problem and exits 1 if there is any.

'use strict';
const fs = require('fs');
const path = require('path');
const { Parser, DiagnosticSeverity } = require('@asyncapi/parser');
const Ajv = require('ajv');
const addFormats = require('ajv-formats');

const [docPath, downstreamDir, serverRs, framesPath] = process.argv.slice(2);
const problems = [];
const problem = (msg) => problems.push(msg);

/** Every match of `re`'s first group in `text`. */
function all(re, text) {
  return [...text.matchAll(re)].map((m) => m[1]);
}

/** A copy of `schema` in which every object schema listing `properties` admits no others. */
function closed(schema) {
  if (Array.isArray(schema)) return schema.map(closed);
  if (schema === null || typeof schema !== 'object') return schema;
  const out = {};
  for (const [k, v] of Object.entries(schema)) {
    // Only members' schemas are closed: `if` sub-schemas test single members.
    if (k === 'properties') {
      out[k] = Object.fromEntries(Object.entries(v).map(([n, s]) => [n, closed(s)]));
    } else if (k === 'items' || k === 'oneOf' || k === 'anyOf') {
      out[k] = closed(v);
    } else {
      out[k] = v;
    }
  }
  if (out.properties && !('additionalProperties' in out)) out.additionalProperties = false;
  return out;
}

(async () => {
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(fs.readFileSync(docPath, 'utf8'));
  for (const d of diagnostics) {
    if (d.severity === DiagnosticSeverity.Error) {
      problem(`asyncapi: ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
    }
  }
  if (!document) {
    problems.forEach((p) => console.log(p));
    console.log('the document did not parse');
    process.exit(1);
  }
  const doc = document.json();

  // What the code sends.
  // Without the unit tests, whose frames are made up.
  const read = (f) => fs.readFileSync(path.join(downstreamDir, f), 'utf8').split('#[cfg(test)]')[0];
  const ws = read('ws.rs');
  const sse = read('sse.rs');
  // Durable subscribes are refused with these codes (sent through `error_frame` in ws.rs).
  const durable = read('durable/mod.rs');
  const wsOps = new Set([
    ...all(/"op":\s*"([a-z_]+)"/g, ws),
    // The client ops the parser knows.
    ...all(/Some\(("[a-z_|" ]+")\)/g, ws).flatMap((s) => all(/"([a-z_]+)"/g, s)),
  ]);
  const wsCodes = new Set([
    ...all(/error_frame\(\s*"([a-z_]+)"/g, ws),
    ...all(/"code":\s*"([a-z_]+)"/g, ws),
    ...all(/\(\s*"([a-z_]+)",\s*(?:e\.to_string|format!)/g, ws),
    ...all(/refused\(\s*"([a-z_]+)"/g, durable),
  ]);
  const sseCodes = new Set(all(/bad\(\s*StatusCode::[A-Z_]+,\s*"([a-z_]+)"/g, sse));
  const sseDataCodes = new Set(all(/"code":\s*"([a-z_]+)"/g, sse));
  // `event:` names; an event without one is `message`.
  const sseEvents = new Set(['message', ...all(/\.event\("([a-z_]+)"\)/g, sse)]);
  const closeConsts = Object.fromEntries(
    [...ws.matchAll(/const (CLOSE_[A-Z_]+): u16 = (\d+);/g)].map((m) => [m[1], Number(m[2])]),
  );
  const closeCodes = new Set(
    all(/close_frame\(\s*([A-Z_0-9]+)/g, ws).map((c) => closeConsts[c] ?? Number(c)),
  );
  const statusNumbers = {
    BAD_REQUEST: 400, UNAUTHORIZED: 401, CONFLICT: 409, TOO_MANY_REQUESTS: 429,
    SERVICE_UNAVAILABLE: 503,
  };
  const mod = read('mod.rs');
  const statuses = (text) => all(/StatusCode::([A-Z_]+)/g, text).map((s) => {
    if (!(s in statusNumbers)) problem(`check.js: add StatusCode::${s} to statusNumbers`);
    return statusNumbers[s];
  });
  // Both endpoints: the per-token cap (mod.rs) and the listener's connection cap.
  const common = [...statuses(mod), ...all(/HTTP\/1\.1 (\d{3}) /g, fs.readFileSync(serverRs, 'utf8')).map(Number)];
  const wsStatuses = new Set([...statuses(ws), ...common]);
  const sseStatuses = new Set([...statuses(sse), ...common]);
  if (wsOps.size < 9 || wsCodes.size < 8 || closeCodes.size < 4) {
    problem(`check.js: the source scan found too little (ops ${[...wsOps]}, codes ${[...wsCodes]}, closes ${[...closeCodes]}); has the code's shape changed?`);
  }

  console.log(`the code sends: ops ${[...wsOps].sort()}; error codes ${[...wsCodes].sort()}; close codes ${[...closeCodes].sort()}; HTTP ${[...wsStatuses].sort()} (/v1/ws), ${[...sseStatuses].sort()} (/v1/events); SSE events ${[...sseEvents].sort()}, refusal codes ${[...sseCodes].sort()}`);

  // What the document says.
  const wsChannel = doc.channels.ws;
  const eventsChannel = doc.channels.events;
  const docOps = new Set(Object.values(wsChannel.messages).map((m) => m.payload.properties.op.const));
  const docCodes = new Set(doc.components.schemas.ErrorCode.enum);
  const docSseCodes = new Set(doc.components.messages.sseRefused.payload.properties.code.enum);
  const docCloses = new Set(wsChannel['x-close-codes'].map((c) => c.code));
  const docSseEvents = new Set(Object.values(eventsChannel.messages).map((m) => m['x-sse-event']).filter(Boolean));
  const docSseDataCodes = new Set([doc.components.messages.sseUnreadableEvent.payload.properties.code.const]);
  const refusals = (ch) => new Set(ch['x-http-refusals'].map((r) => r.status));

  const same = (what, code, documented) => {
    for (const c of code) if (!documented.has(c)) problem(`${what}: ${c} is sent by the code but not in docs/asyncapi.yaml`);
    for (const c of documented) if (!code.has(c)) problem(`${what}: ${c} is in docs/asyncapi.yaml but the code never sends it`);
  };
  same('/v1/ws op', wsOps, docOps);
  same('/v1/ws error code', wsCodes, docCodes);
  same('/v1/events refusal code', sseCodes, docSseCodes);
  same('/v1/events event name', sseEvents, docSseEvents);
  same('/v1/events data code', sseDataCodes, docSseDataCodes);
  same('/v1/ws close code', closeCodes, docCloses);
  same('/v1/ws HTTP status', wsStatuses, refusals(wsChannel));
  same('/v1/events HTTP status', sseStatuses, refusals(eventsChannel));
  for (const op of Object.keys(doc.operations)) {
    const o = doc.operations[op];
    if (!o.messages || o.messages.length === 0) problem(`operation ${op} has no messages`);
  }

  // A real session's frames.
  if (framesPath) {
    const ajv = new Ajv({ strict: false, allErrors: true });
    addFormats(ajv);
    const validators = {};
    const validator = (name) => {
      if (!validators[name]) {
        const [channel, message] = name.split('/');
        const m = doc.channels[channel] && doc.channels[channel].messages[message];
        if (!m) return null;
        validators[name] = ajv.compile(closed(m.payload));
      }
      return validators[name];
    };
    const frames = JSON.parse(fs.readFileSync(framesPath, 'utf8'));
    const seen = new Set();
    for (const f of frames) {
      if ('close' in f) {
        if (!docCloses.has(f.close)) problem(`close code ${f.close} is not in x-close-codes`);
        continue;
      }
      if ('status' in f) {
        if (!refusals(doc.channels[f.channel]).has(f.status)) problem(`${f.channel}: HTTP ${f.status} is not in x-http-refusals`);
        continue;
      }
      const v = validator(f.message);
      if (!v) {
        problem(`no message ${f.message} in the document`);
        continue;
      }
      seen.add(f.message);
      if (!v(f.payload)) {
        problem(`${f.message}: ${JSON.stringify(f.payload)} does not match: ${ajv.errorsText(v.errors)}`);
      }
    }
    console.log(`checked ${frames.length} frames of ${seen.size} messages`);
  }

  problems.forEach((p) => console.log(p));
  if (problems.length > 0) process.exit(1);
  console.log('docs/asyncapi.yaml: valid, and true to the code');
})().catch((e) => {
  console.log(`check.js failed: ${e.stack || e}`);
  process.exit(1);
});
