'use strict';
/*
 * Load generator of the benchmark suite (driven by bench/suite.py; usable alone).
 *
 *   BENCH_KEY=<key> node bench/loadgen.js --node PORT [--node PORT2 ...] --clients N
 *       [--workspaces W] [--messages M] [--payload S] [--in-flight K | --rate R]
 *       [--mode publish|idle] [--connect-concurrency C] [--barrier status|probe]
 *       [--server-pid PID ...] [--wait-go] [--deadline S] [--straggler-wait S]
 *       [--client lean|ws]
 *
 * Every node is a server on 127.0.0.1:PORT serving browsers at /public and publishers at
 * /private (pydio-ws with one shared listener, or bench/peer.js). The key, which signs the
 * tokens and authorizes the publishes, comes from the environment only.
 *
 * 1. Opens N WebSocket clients (`lean`, the default: a minimal RFC 6455 client on a raw
 *    socket, see openLean; `ws`: the `ws` package's client, to cross-check), at most C
 *    opening handshakes at a time; client i uses node
 *    i % nodes, a token of its own (HS256 JWT: sub, repos {w: "r"}, exp) and sends
 *    `register:<w>` with w = 1 + i % W once open.
 * 2. Waits until every registration is in force: `status` polls GET /private/status on
 *    every node until the sum of `connections.registered` is what was sent; `probe`
 *    publishes a marker to every workspace until every client has received one (for
 *    servers whose status shows only part of the picture, e.g. several processes behind
 *    one port).
 * 3. Prints {"event": "registered", ...}; with --wait-go, waits for a line on stdin (the
 *    suite samples the server's memory or attaches a profiler meanwhile).
 * 4. publish mode: posts M messages (message s to workspace 1 + s % W, node s % nodes),
 *    closed loop with K requests in flight, or open loop at R messages/s; CONTENT is
 *    "<s> <send time, ns> " padded with "x" to S bytes. Receive times come from the same
 *    clock (process.hrtime), so latency needs no clock sync. Then waits for the last
 *    deliveries (at most --straggler-wait seconds).
 *    idle mode: nothing more; the connections stay open until the "go" line.
 * 5. Prints {"event": "result", ...} and exits: 0 when nothing was lost, duplicated,
 *    refused or closed early, 1 otherwise, 2 on a usage error. --deadline bounds it all.
 *
 * Only 127.0.0.1 is ever connected to.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const WebSocket = require('ws');

const HOST = '127.0.0.1';
const PUBLIC_PATH = '/public';
const PRIVATE_PATH = '/private';
const STATUS_PATH = '/private/status';
const TOKEN_LIFETIME = 3600;
const REQUEST_TIMEOUT_MS = 60000;
const POLL_MS = 100;
const PROBE_MS = 250;
const SATURATED = 0.9;
const SPACE = 32;
const PROBE = 80; // "P": a barrier probe, not a measured message

const BASE = process.hrtime.bigint();
const nowNs = () => Number(process.hrtime.bigint() - BASE);

function parseArgs(argv) {
  const options = {
    node: [], clients: 0, workspaces: 1, messages: 0, payload: 128, 'in-flight': 16, rate: 0,
    mode: 'publish', 'connect-concurrency': 200, barrier: 'status', 'server-pid': [],
    'wait-go': false, deadline: 300, 'straggler-wait': 30, 'clk-tck': 100, client: 'lean',
  };
  const numbers = new Set(['clients', 'workspaces', 'messages', 'payload', 'in-flight', 'rate',
    'connect-concurrency', 'deadline', 'straggler-wait', 'clk-tck']);
  for (let i = 0; i < argv.length; i += 1) {
    const name = argv[i].replace(/^--/, '');
    if (!(name in options)) throw new Error(`unknown option ${argv[i]}`);
    if (typeof options[name] === 'boolean') {
      options[name] = true;
      continue;
    }
    const value = argv[++i];
    if (value === undefined) throw new Error(`${argv[i - 1]} needs a value`);
    if (Array.isArray(options[name])) options[name].push(Number(value));
    else options[name] = numbers.has(name) ? Number(value) : value;
  }
  const o = {
    nodes: options.node, clients: options.clients, workspaces: options.workspaces,
    messages: options.messages, payload: options.payload, inFlight: options['in-flight'],
    rate: options.rate, mode: options.mode, connectConcurrency: options['connect-concurrency'],
    barrier: options.barrier, serverPids: options['server-pid'], waitGo: options['wait-go'],
    deadline: options.deadline, stragglerWait: options['straggler-wait'], clkTck: options['clk-tck'],
    client: options.client,
  };
  if (!['lean', 'ws'].includes(o.client)) throw new Error('--client is lean or ws');
  if (o.nodes.length === 0 || !o.nodes.every((p) => Number.isInteger(p) && p > 0)) throw new Error('--node PORT is required');
  if (!(o.clients >= 1 && o.workspaces >= 1 && o.workspaces <= o.clients)) throw new Error('need 1 <= --workspaces <= --clients');
  if (!['publish', 'idle'].includes(o.mode)) throw new Error('--mode is publish or idle');
  if (!['status', 'probe'].includes(o.barrier)) throw new Error('--barrier is status or probe');
  if (o.mode === 'publish' && !(o.messages >= 1 && o.inFlight >= 1 && o.rate >= 0)) throw new Error('need --messages >= 1, --in-flight >= 1');
  if (!(o.connectConcurrency >= 1 && o.deadline > 0 && o.stragglerWait >= 0)) throw new Error('bad --connect-concurrency, --deadline or --straggler-wait');
  return o;
}

const workspaceOf = (index, workspaces) => String(1 + (index % workspaces));

function makeToken(key, subject, repos, expiresAt) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const signingInput = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode({ sub: subject, repos, exp: expiresAt })}`;
  const signature = crypto.createHmac('sha256', key).update(signingInput).digest('base64url');
  return `${signingInput}.${signature}`;
}

/** User and system CPU seconds of a process, from /proc/<pid>/stat (null once it is gone). */
function processCpu(pid, clkTck) {
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(')').pop().trim().split(/\s+/);
    // fields[0] is field 3 (state) of proc(5); utime and stime are fields 14 and 15.
    return [Number(fields[11]) / clkTck, Number(fields[12]) / clkTck];
  } catch (error) {
    return null;
  }
}

/**
 * CPU seconds of the whole machine: processes (user, nice, system), interrupts (irq and
 * softirq: loopback TCP is mostly processed there, on behalf of both sides) and steal.
 */
function machineCpu(clkTck) {
  const [user, nice, system, , , irq, softirq, steal] = fs.readFileSync('/proc/stat', 'utf8')
    .split('\n', 1)[0].trim().split(/\s+/).slice(1, 9).map(Number);
  return [(user + nice + system) / clkTck, steal / clkTck, (irq + softirq) / clkTck];
}

function emit(document) {
  return new Promise((resolve) => process.stdout.write(`${JSON.stringify(document)}\n`, resolve));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const round = (value, digits = 3) => (value === null || value === undefined || Number.isNaN(value)
  ? null : Math.round(value * 10 ** digits) / 10 ** digits);

function percentile(ordered, count, fraction) {
  return ordered[Math.max(1, Math.ceil(count * fraction)) - 1];
}

const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const HEAD_END = Buffer.from('\r\n\r\n');

/** A masked client frame (RFC 6455 5.3) of `opcode` with `payload` (< 126 bytes). */
function clientFrame(opcode, payload) {
  const mask = crypto.randomBytes(4);
  const frame = Buffer.alloc(6 + payload.length);
  frame[0] = 0x80 | opcode;
  frame[1] = 0x80 | payload.length;
  mask.copy(frame, 2);
  for (let i = 0; i < payload.length; i += 1) frame[6 + i] = payload[i] ^ mask[i & 3];
  return frame;
}

/**
 * The lean client: a raw TCP socket, the RFC 6455 opening handshake (101 and
 * Sec-WebSocket-Accept checked) and a minimal parser for what a server sends here:
 * unfragmented unmasked text frames, pings (answered), close (answered). It does what a
 * browser's WebSocket does for this traffic with less JavaScript per frame than `ws`
 * (no stream and event layers), so one load generator core keeps up with the server.
 * Returns a promise of an object with close() and closed.
 */
function openLean(port, path, register, onText, onClose, timeoutMs) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: HOST, port });
    socket.setNoDelay(true);
    const key = crypto.randomBytes(16).toString('base64');
    const accept = crypto.createHash('sha1').update(key + WS_GUID).digest('base64');
    let head = null; // bytes of the handshake answer until it is complete
    let rest = null; // an incomplete frame
    let open = false;
    const timer = setTimeout(() => socket.destroy(new Error('opening handshake timed out')), timeoutMs);
    const connection = { closed: false, close: () => socket.destroy() };

    const fail = (error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(error);
    };
    const frames = (data) => {
      if (rest !== null) {
        data = Buffer.concat([rest, data]);
        rest = null;
      }
      const length = data.length;
      let at = 0;
      while (at + 2 <= length) {
        const opcode = data[at] & 0x0f;
        let size = data[at + 1] & 0x7f;
        let start = at + 2;
        if (data[at + 1] & 0x80) return connection.close(); // servers never mask
        if (size === 126) {
          if (start + 2 > length) break;
          size = data.readUInt16BE(start);
          start += 2;
        } else if (size === 127) {
          if (start + 8 > length) break;
          size = Number(data.readBigUInt64BE(start));
          start += 8;
        }
        const end = start + size;
        if (end > length) break;
        if (opcode === 1) onText(data.subarray(start, end));
        else if (opcode === 9) socket.write(clientFrame(10, data.subarray(start, end)));
        else if (opcode === 8) {
          socket.end(clientFrame(8, data.subarray(start, Math.min(end, start + 2))));
          return undefined;
        } else onText(null); // fragmented or binary: counted as malformed
        at = end;
      }
      if (at < length) rest = data.subarray(at);
      return undefined;
    };
    socket.on('connect', () => {
      socket.write(`GET ${path} HTTP/1.1\r\nHost: ${HOST}:${port}\r\nUpgrade: websocket\r\n`
        + `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
    });
    socket.on('data', (data) => {
      if (open) {
        frames(data);
        return;
      }
      head = head === null ? data : Buffer.concat([head, data]);
      const end = head.indexOf(HEAD_END);
      if (end < 0) return;
      const lines = head.subarray(0, end).toString('latin1').split('\r\n');
      const status = lines[0].split(' ')[1];
      const accepted = lines.some((line) => /^sec-websocket-accept:/i.test(line) && line.slice(line.indexOf(':') + 1).trim() === accept);
      if (status !== '101' || !accepted) {
        fail(new Error(`handshake answered ${status}${status === '101' ? ' with a wrong Sec-WebSocket-Accept' : ''}`));
        return;
      }
      clearTimeout(timer);
      open = true;
      socket.write(clientFrame(1, Buffer.from(register)));
      const remaining = head.subarray(end + HEAD_END.length);
      head = null;
      resolve(connection);
      if (remaining.length) frames(remaining);
    });
    socket.on('error', (error) => {
      if (!open) fail(error);
    });
    socket.on('close', () => {
      connection.closed = true;
      if (open) onClose();
    });
  });
}

class LoadGenerator {
  constructor(options, key) {
    this.o = options;
    this.key = key;
    this.agent = new http.Agent({ keepAlive: true, maxSockets: options.rate > 0 ? 64 : options.inFlight });
    this.sockets = new Array(options.clients);
    this.synced = new Uint8Array(options.clients);
    this.syncedCount = 0;
    this.counts = new Uint32Array(Math.max(1, options.messages));
    this.latencies = new Float64Array(0);
    this.received = 0;
    this.stored = 0;
    this.expected = Infinity;
    this.lastNs = 0;
    this.closedEarly = 0;
    this.malformed = 0;
    this.finishing = false;
    this.complete = null;
    this.publishErrors = 0;
    this.firstPublishError = null;
    this.maxScheduleLagMs = 0;
    this.expectedPerWorkspace = new Map();
    for (let i = 0; i < options.clients; i += 1) {
      const w = workspaceOf(i, options.workspaces);
      this.expectedPerWorkspace.set(w, (this.expectedPerWorkspace.get(w) || 0) + 1);
    }
    this.phase = 'starting';
    this.result = {};
  }

  // The hot path: one call per delivery.
  onMessage(data, index) {
    const now = nowNs();
    if (data === null) {
      this.malformed += 1;
      return;
    }
    const length = data.length;
    if (length > 0 && data[0] === PROBE) {
      if (this.synced[index] === 0) {
        this.synced[index] = 1;
        this.syncedCount += 1;
        if (this.syncedCount === this.o.clients && this.onSynced) this.onSynced();
      }
      return;
    }
    let i = 0;
    let c = 0;
    let sequence = 0;
    while (i < length && (c = data[i++]) !== SPACE) sequence = sequence * 10 + (c - 48);
    let sent = 0;
    while (i < length && (c = data[i++]) !== SPACE) sent = sent * 10 + (c - 48);
    if (c !== SPACE || sequence >= this.counts.length) {
      this.malformed += 1;
      return;
    }
    this.counts[sequence] += 1;
    if (this.stored < this.latencies.length) this.latencies[this.stored++] = now - sent;
    this.received += 1;
    this.lastNs = now;
    if (this.received >= this.expected && this.complete) this.complete();
  }

  openOne(index, expiresAt) {
    const workspace = workspaceOf(index, this.o.workspaces);
    const port = this.o.nodes[index % this.o.nodes.length];
    const token = makeToken(this.key, `bench-${index}`, { [workspace]: 'r' }, expiresAt);
    if (this.o.client === 'lean') {
      return openLean(port, `${PUBLIC_PATH}?token=${token}`, `register:${workspace}`,
        (data) => this.onMessage(data, index),
        () => { if (!this.finishing) this.closedEarly += 1; }, REQUEST_TIMEOUT_MS);
    }
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(`ws://${HOST}:${port}${PUBLIC_PATH}?token=${token}`, {
        perMessageDeflate: false,
        // Validating UTF-8 costs the load generator CPU and tells nothing about the server.
        skipUTF8Validation: true,
        handshakeTimeout: REQUEST_TIMEOUT_MS,
      });
      let opened = false;
      socket.on('message', (data) => this.onMessage(data, index));
      socket.on('open', () => {
        opened = true;
        socket.send(`register:${workspace}`);
        resolve(socket);
      });
      socket.on('unexpected-response', (request, response) => {
        reject(new Error(`handshake answered ${response.statusCode}`));
        request.destroy();
      });
      socket.on('error', (error) => {
        if (!opened) reject(error);
      });
      socket.on('close', () => {
        if (opened && !this.finishing) this.closedEarly += 1;
      });
    });
  }

  async connectAll() {
    const expiresAt = Math.floor(Date.now() / 1000) + TOKEN_LIFETIME;
    const failures = [];
    let next = 0;
    const worker = async () => {
      while (next < this.o.clients) {
        const index = next++;
        try {
          this.sockets[index] = await this.openOne(index, expiresAt);
        } catch (error) {
          failures.push(error);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.o.connectConcurrency, this.o.clients) }, worker));
    if (failures.length) {
      throw new Error(`${failures.length} of ${this.o.clients} clients failed to connect; first: ${failures[0].message}`);
    }
  }

  request(port, method, path, body) {
    return new Promise((resolve, reject) => {
      const headers = { 'X-Pydio-Key': this.key };
      if (body !== undefined) {
        headers['Content-Type'] = 'application/json';
        headers['Content-Length'] = Buffer.byteLength(body);
      }
      const request = http.request({ host: HOST, port, method, path, headers, agent: this.agent }, (response) => {
        const chunks = [];
        response.on('data', (chunk) => chunks.push(chunk));
        response.on('end', () => resolve({ status: response.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
        response.on('error', reject);
      });
      request.setTimeout(REQUEST_TIMEOUT_MS, () => request.destroy(new Error(`${method} ${path} timed out`)));
      request.on('error', reject);
      request.end(body);
    });
  }

  async registeredSum() {
    const sum = new Map();
    for (const port of this.o.nodes) {
      const response = await this.request(port, 'GET', STATUS_PATH);
      if (response.status !== 200) throw new Error(`GET ${STATUS_PATH} answered ${response.status}`);
      const registered = JSON.parse(response.body).connections.registered;
      for (const [w, count] of Object.entries(registered)) sum.set(w, (sum.get(w) || 0) + count);
    }
    return sum;
  }

  async waitRegistered() {
    if (this.o.barrier === 'probe') {
      const synced = new Promise((resolve) => { this.onSynced = resolve; });
      let done = false;
      synced.then(() => { done = true; });
      while (!done && this.syncedCount < this.o.clients) {
        for (const w of this.expectedPerWorkspace.keys()) {
          const response = await this.request(this.o.nodes[0], 'POST', PRIVATE_PATH, JSON.stringify({ REPO_ID: w, CONTENT: 'P' }));
          if (response.status !== 200) throw new Error(`probe publish answered ${response.status}: ${response.body.slice(0, 200)}`);
        }
        await Promise.race([synced, sleep(PROBE_MS)]);
      }
      return;
    }
    for (;;) {
      const sum = await this.registeredSum();
      let equal = sum.size === this.expectedPerWorkspace.size;
      for (const [w, count] of this.expectedPerWorkspace) if (sum.get(w) !== count) equal = false;
      if (equal) return;
      await sleep(POLL_MS);
    }
  }

  expectedOf(sequence) {
    return this.expectedPerWorkspace.get(workspaceOf(sequence, this.o.workspaces));
  }

  async publishOne(sequence) {
    const sent = nowNs();
    if (this.firstPublishNs === undefined) this.firstPublishNs = sent;
    const content = `${sequence} ${sent} `.padEnd(this.o.payload, 'x');
    const body = JSON.stringify({ REPO_ID: workspaceOf(sequence, this.o.workspaces), CONTENT: content });
    const port = this.o.nodes[sequence % this.o.nodes.length];
    let outcome;
    try {
      const response = await this.request(port, 'POST', PRIVATE_PATH, body);
      outcome = response.status === 200 && JSON.parse(response.body).published === 1
        ? null : `${response.status} ${response.body.slice(0, 200)}`;
    } catch (error) {
      outcome = error.message;
    }
    this.lastAnswerNs = nowNs();
    if (outcome !== null) {
      this.publishErrors += 1;
      if (this.firstPublishError === null) this.firstPublishError = outcome;
      this.expected -= this.expectedOf(sequence);
      if (this.received >= this.expected && this.complete) this.complete();
    }
  }

  async publishAll() {
    const o = this.o;
    let total = 0;
    for (let s = 0; s < o.messages; s += 1) total += this.expectedOf(s);
    this.latencies = new Float64Array(total);
    this.completed = new Promise((resolve) => { this.complete = resolve; });
    this.expected = total;
    if (o.rate > 0) {
      // Open loop: message s is due at start + s / R, whatever the answers do.
      const start = nowNs();
      const pending = [];
      for (let s = 0; s < o.messages; s += 1) {
        const due = start + (s * 1e9) / o.rate;
        const wait = (due - nowNs()) / 1e6;
        if (wait > 0) await sleep(wait);
        this.maxScheduleLagMs = Math.max(this.maxScheduleLagMs, (nowNs() - due) / 1e6);
        pending.push(this.publishOne(s));
      }
      await Promise.all(pending);
    } else {
      let next = 0;
      const loop = async () => {
        while (next < o.messages) await this.publishOne(next++);
      };
      await Promise.all(Array.from({ length: o.inFlight }, loop));
    }
  }

  cpuSnapshot() {
    const servers = this.o.serverPids.map((pid) => processCpu(pid, this.o.clkTck));
    const own = process.cpuUsage();
    return {
      wallNs: nowNs(),
      server: servers.every((s) => s !== null) && servers.length
        ? servers.reduce((a, b) => [a[0] + b[0], a[1] + b[1]], [0, 0]) : null,
      loadgen: [own.user / 1e6, own.system / 1e6],
      machine: machineCpu(this.o.clkTck),
    };
  }

  async waitStragglers(completed) {
    if (this.received >= this.expected) return;
    let timer;
    await Promise.race([completed, new Promise((resolve) => { timer = setTimeout(resolve, this.o.stragglerWait * 1000); })]);
    clearTimeout(timer);
  }

  async run() {
    const o = this.o;
    this.phase = 'connecting';
    const connectStart = nowNs();
    const cpuConnect = this.cpuSnapshot();
    await this.connectAll();
    const connectSeconds = (nowNs() - connectStart) / 1e9;
    const cpuConnected = this.cpuSnapshot();
    this.phase = 'registering';
    await this.waitRegistered();
    const registerSeconds = (nowNs() - connectStart) / 1e9 - connectSeconds;
    Object.assign(this.result, {
      clients: o.clients, workspaces: o.workspaces, nodes: o.nodes.length, mode: o.mode, client: o.client,
      connect_concurrency: o.connectConcurrency,
      connect_seconds: round(connectSeconds), connections_per_second: round(o.clients / connectSeconds, 1),
      register_seconds: round(registerSeconds),
      connect_cpu: sideFigures(cpuConnect, cpuConnected, o.clients),
    });
    await emit({ event: 'registered', ...this.result });
    if (o.waitGo) {
      this.phase = 'waiting for go';
      await waitLine();
    }
    if (o.mode === 'idle') return this.finish();

    this.phase = 'publishing';
    const before = this.cpuSnapshot();
    await this.publishAll();
    await this.waitStragglers(this.completed);
    const after = this.cpuSnapshot();
    this.phase = 'done';
    const end = this.lastNs || this.lastAnswerNs;
    const phaseSeconds = (end - this.firstPublishNs) / 1e9;
    const publishSeconds = (this.lastAnswerNs - this.firstPublishNs) / 1e9;
    const ordered = this.latencies.subarray(0, this.stored).sort();
    let lost = 0;
    let unexpected = 0;
    for (let s = 0; s < o.messages; s += 1) {
      const expected = this.expectedOf(s);
      lost += Math.max(0, expected - this.counts[s]);
      unexpected += Math.max(0, this.counts[s] - expected);
    }
    // Deliveries of refused messages would show up as "unexpected"; they are not lost.
    const accepted = o.messages - this.publishErrors;
    Object.assign(this.result, {
      messages: o.messages, payload: o.payload,
      in_flight: o.rate > 0 ? null : o.inFlight, rate: o.rate > 0 ? o.rate : null,
      publish_seconds: round(publishSeconds), duration_seconds: round(phaseSeconds),
      publishes_per_second: round(accepted / publishSeconds, 1),
      expected_deliveries: this.expected, received_deliveries: this.received,
      lost_deliveries: this.publishErrors ? Math.max(0, this.expected - this.received) : lost,
      unexpected_deliveries: unexpected, malformed_deliveries: this.malformed,
      publish_errors: this.publishErrors, clients_closed_early: this.closedEarly,
      deliveries_per_second: round(this.received / phaseSeconds, 1),
      latency_ms: {
        p50: this.stored ? round(percentile(ordered, this.stored, 0.5) / 1e6) : null,
        p90: this.stored ? round(percentile(ordered, this.stored, 0.9) / 1e6) : null,
        p99: this.stored ? round(percentile(ordered, this.stored, 0.99) / 1e6) : null,
        max: this.stored ? round(ordered[this.stored - 1] / 1e6) : null,
      },
      publish_cpu: sideFigures(before, after, this.received),
    });
    if (o.rate > 0) this.result.max_schedule_lag_ms = round(this.maxScheduleLagMs);
    if (this.firstPublishError) this.result.first_publish_error = this.firstPublishError;
    return this.finish();
  }

  finish() {
    const r = this.result;
    const saturated = [];
    const cpu = r.publish_cpu || r.connect_cpu;
    if (cpu.server && cpu.server.utilization >= SATURATED) saturated.push('server');
    if (cpu.loadgen.utilization >= SATURATED) saturated.push('loadgen');
    r.bottleneck = saturated.join(' and ') || 'neither core saturated';
    r.ok = (r.lost_deliveries || 0) === 0 && (r.unexpected_deliveries || 0) === 0
      && (r.publish_errors || 0) === 0 && this.closedEarly === 0 && this.malformed === 0;
    r.clients_closed_early = this.closedEarly;
    return r;
  }

  partial(reason) {
    return {
      error: reason, phase: this.phase, clients: this.o.clients, messages: this.o.messages,
      expected_deliveries: Number.isFinite(this.expected) ? this.expected : null,
      received_deliveries: this.received, publish_errors: this.publishErrors,
      clients_closed_early: this.closedEarly, ok: false, ...this.result,
    };
  }
}

/** CPU figures of the server(s), this process and the rest of the machine between two snapshots. */
function sideFigures(before, after, work) {
  const wall = (after.wallNs - before.wallNs) / 1e9;
  const side = (a, b) => {
    if (!a || !b) return null;
    const user = b[0] - a[0];
    const system = b[1] - a[1];
    const seconds = user + system;
    return {
      cpu_seconds: round(seconds), utilization: round(seconds / wall),
      system_share: seconds ? round(system / seconds) : null,
      work_per_cpu_second: seconds ? Math.round(work / seconds) : null,
    };
  };
  const server = side(before.server, after.server);
  const loadgen = side(before.loadgen, after.loadgen);
  const busy = after.machine[0] - before.machine[0];
  const others = busy - (server ? server.cpu_seconds : 0) - loadgen.cpu_seconds;
  return {
    wall_seconds: round(wall), server, loadgen,
    machine: {
      // Other processes' CPU time (without interrupts); well above 0 means a disturbed run.
      other_busy_seconds: round(Math.max(0, others), 2),
      interrupt_seconds: round(after.machine[2] - before.machine[2], 2),
      steal_seconds: round(after.machine[1] - before.machine[1], 2),
    },
  };
}

function waitLine() {
  return new Promise((resolve, reject) => {
    const onData = () => {
      process.stdin.off('end', onEnd);
      process.stdin.pause();
      resolve();
    };
    const onEnd = () => reject(new Error('stdin closed before "go"'));
    process.stdin.once('data', onData);
    process.stdin.once('end', onEnd);
    process.stdin.resume();
  });
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`loadgen: ${error.message}\n`);
    return 2;
  }
  const key = process.env.BENCH_KEY;
  if (!key) {
    process.stderr.write('loadgen: BENCH_KEY must be set\n');
    return 2;
  }
  const generator = new LoadGenerator(options, key);
  let deadlineTimer;
  const deadline = new Promise((resolve) => {
    deadlineTimer = setTimeout(() => resolve(generator.partial(`deadline of ${options.deadline} s exceeded`)), options.deadline * 1000);
  });
  let result;
  try {
    result = await Promise.race([generator.run(), deadline]);
  } catch (error) {
    result = generator.partial(`${error.name}: ${error.message}`);
  }
  clearTimeout(deadlineTimer);
  generator.finishing = true;
  await emit({ event: 'result', ...result });
  return result.ok ? 0 : 1;
}

main().then((code) => process.exit(code), (error) => {
  process.stderr.write(`loadgen: ${error.stack}\n`);
  process.exit(1);
});
