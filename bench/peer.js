'use strict';
/*
 * The baseline peer: a minimal Node `ws` server with the subset of the pydio-ws protocol
 * the benchmark uses. It is what most users would write and measure pydio-ws against, so
 * it is deliberately plain: one process, `ws` with its default options, and the same
 * string handed to `send()` for every recipient.
 *
 * Usage: BENCH_KEY=<key> node bench/peer.js --port P [--host 127.0.0.1]
 *
 * Wire protocol (the same as pydio-ws for this subset):
 *   GET  /public?token=JWT   WebSocket upgrade. The token is an HS256 JWT signed with the
 *                            key (claims sub, repos {id: acl}, exp); its signature and
 *                            expiry are checked, 401 otherwise.
 *   text frame register:<id> listen to workspace <id> (when the token's acl on it contains
 *                            "r"), replacing the previous one; unregister:<x> stops.
 *   POST /private            key in X-Pydio-Key; body a JSON object {REPO_ID, CONTENT} or an
 *                            array of them. CONTENT goes, as one text frame, to every
 *                            connection registered on REPO_ID (to every connection when
 *                            REPO_ID is absent). 200 {"published": N}, 400, 401.
 *   GET  /private/status     {"connections": {"open": N, "registered": {id: count}}}
 *
 * The key comes from the environment only, never from argv. Listens on 127.0.0.1 by default.
 */

const crypto = require('node:crypto');
const http = require('node:http');
const { WebSocketServer, WebSocket } = require('ws');

const MAX_BODY = 1024 * 1024;

function parseArgs(argv) {
  const options = { host: '127.0.0.1', port: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!(name in options) || i + 1 >= argv.length) throw new Error(`bad option ${argv[i]}`);
    options[name] = name === 'port' ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (!Number.isInteger(options.port) || options.port <= 0) throw new Error('--port is required');
  return options;
}

/** The claims of an HS256 JWT signed with `key`, or null when invalid or expired. */
function verifyToken(token, key) {
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) return null;
  const expected = crypto.createHmac('sha256', key).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], 'base64url');
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8'));
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
    if (header.alg !== 'HS256' || typeof claims.exp !== 'number' || claims.exp * 1000 <= Date.now()) return null;
    return claims;
  } catch (error) {
    return null;
  }
}

function keyMatches(given, key) {
  const a = Buffer.from(String(given || ''));
  const b = Buffer.from(key);
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

function answer(response, status, document) {
  const body = JSON.stringify(document);
  response.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  response.end(body);
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  const key = process.env.BENCH_KEY;
  if (!key) throw new Error('BENCH_KEY must be set');

  const workspaces = new Map(); // repo id -> Set of sockets
  const wss = new WebSocketServer({ noServer: true });

  function unregister(socket) {
    if (socket.repo === undefined) return;
    const members = workspaces.get(socket.repo);
    members.delete(socket);
    if (members.size === 0) workspaces.delete(socket.repo);
    socket.repo = undefined;
  }

  function publish(message) {
    if (message === null || typeof message !== 'object' || typeof message.CONTENT !== 'string') return false;
    const content = message.CONTENT;
    const recipients = message.REPO_ID === undefined ? wss.clients : workspaces.get(String(message.REPO_ID));
    if (recipients) {
      for (const socket of recipients) {
        if (socket.readyState === WebSocket.OPEN) socket.send(content);
      }
    }
    return true;
  }

  wss.on('connection', (socket, request, claims) => {
    socket.acl = claims.repos || {};
    socket.on('message', (data, isBinary) => {
      if (isBinary) return;
      const text = data.toString();
      if (text.startsWith('register:')) {
        const repo = text.slice('register:'.length);
        if (!String(socket.acl[repo] || '').includes('r')) return;
        unregister(socket);
        socket.repo = repo;
        if (!workspaces.has(repo)) workspaces.set(repo, new Set());
        workspaces.get(repo).add(socket);
      } else if (text.startsWith('unregister:')) {
        unregister(socket);
      }
    });
    socket.on('close', () => unregister(socket));
  });

  const server = http.createServer((request, response) => {
    const url = new URL(request.url, 'http://peer');
    if (url.pathname === '/private/status' && request.method === 'GET') {
      const registered = {};
      for (const [repo, members] of workspaces) registered[repo] = members.size;
      answer(response, 200, { connections: { open: wss.clients.size, registered } });
      return;
    }
    if (url.pathname !== '/private') {
      answer(response, 404, { error: 'not found' });
      return;
    }
    if (request.method !== 'POST') {
      answer(response, 405, { error: 'POST only' });
      return;
    }
    if (!keyMatches(request.headers['x-pydio-key'], key)) {
      answer(response, 401, { error: 'bad key' });
      request.resume();
      return;
    }
    const chunks = [];
    let size = 0;
    request.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY) chunks.push(chunk);
    });
    request.on('end', () => {
      if (size > MAX_BODY) {
        answer(response, 413, { error: 'body too large' });
        return;
      }
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch (error) {
        answer(response, 400, { error: 'body is not JSON' });
        return;
      }
      const messages = Array.isArray(body) ? body : [body];
      let published = 0;
      for (const message of messages) if (publish(message)) published += 1;
      if (published !== messages.length) {
        answer(response, 400, { error: 'each message needs a string CONTENT', published });
        return;
      }
      answer(response, 200, { published });
    });
  });

  server.on('upgrade', (request, socket, head) => {
    const url = new URL(request.url, 'http://peer');
    const claims = url.pathname === '/public' ? verifyToken(url.searchParams.get('token'), key) : null;
    if (claims === null) {
      socket.end('HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    wss.handleUpgrade(request, socket, head, (ws) => wss.emit('connection', ws, request, claims));
  });

  const stop = () => {
    for (const socket of wss.clients) socket.terminate();
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.listen(options.port, options.host, () => {
    process.stdout.write(`peer listening on ${options.host}:${server.address().port}\n`);
  });
}

main();
