// sbx guest agent: persistent JavaScript/TypeScript REPL wrapper for Bun.
//
// Requests arrive on fd 3 as "<length>\n<json>" with {id, code, env}. Each exec's code is
// TypeScript (plain JavaScript is TypeScript too): Bun's transpiler erases the types and,
// in REPL mode, turns top-level declarations into globals (so `let`/`const` may be
// declared again in a later exec) and wraps code using top-level `await` in an async
// function. The result runs in the main context (vm.Script.runInThisContext); a promise
// it leaves as its value is awaited. `import()` resolves like `require` (built-in modules,
// ./home/user/node_modules, NODE_PATH), relative paths against the working directory.
// Completion is reported only on fd 4 as "<id> <exit code>\n".
'use strict';
(function sbxRepl() {
  const fs = require('fs');
  const vm = require('vm');
  const path = require('path');
  const { createRequire, isBuiltin } = require('module');
  const { pathToFileURL } = require('url');
  // Reopen the control and status pipes with O_CLOEXEC so child processes never inherit them.
  let ctl = 3;
  let st = 4;
  try {
    const r = fs.openSync('/proc/self/fd/3', fs.constants.O_RDONLY);
    const w = fs.openSync('/proc/self/fd/4', fs.constants.O_WRONLY);
    fs.closeSync(3);
    fs.closeSync(4);
    ctl = r;
    st = w;
  } catch (e) {
    // Keep the inherited descriptors.
  }
  // Bun makes stdout/stderr non-blocking and queues what a full pipe does not take, out of
  // sight of writableLength and write callbacks: output could arrive after the completion
  // status. So the pipes are made blocking again and process.stdout/stderr.write write
  // synchronously, as Node's do on pipes (console.log already writes synchronously).
  try {
    void process.stdout.fd;
    void process.stderr.fd;
    const { dlopen } = require('bun:ffi');
    const libc = dlopen('libc.so.6', { fcntl: { args: ['i32', 'i32', 'i32'], returns: 'i32' } });
    const F_GETFL = 3;
    const F_SETFL = 4;
    const O_NONBLOCK = 0o4000;
    for (const [fd, stream] of [
      [1, process.stdout],
      [2, process.stderr],
    ]) {
      const fl = libc.symbols.fcntl(fd, F_GETFL, 0);
      if (fl < 0) continue;
      if (fl & O_NONBLOCK && libc.symbols.fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) continue;
      stream.write = function write(chunk, encoding, cb) {
        if (typeof encoding === 'function') {
          cb = encoding;
          encoding = undefined;
        }
        let err = null;
        try {
          const b =
            typeof chunk === 'string'
              ? Buffer.from(chunk, encoding || 'utf8')
              : ArrayBuffer.isView(chunk)
                ? Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)
                : Buffer.from(String(chunk));
          let off = 0;
          while (off < b.length) off += fs.writeSync(fd, b, off, b.length - off);
        } catch (e) {
          err = e;
        }
        if (typeof cb === 'function') process.nextTick(cb, err);
        else if (err && err.code !== 'EPIPE') throw err;
        return true;
      };
    }
  } catch (e) {
    // Without FFI the drain below still waits for the writes Bun reports.
  }
  const root = process.cwd();
  const execFile = path.join(root, '<exec>');
  const userRequire = createRequire(execFile);
  globalThis.__dirname = root;
  globalThis.__filename = execFile;
  const transpiler = new Bun.Transpiler({ loader: 'ts', replMode: true });

  // import(spec) of the user's code: built-in modules as they are; paths against the
  // working directory; bare names where `require` finds them (so packages in
  // ~/node_modules and on NODE_PATH work too, and a CommonJS module's default export is
  // the very object `require` returns).
  function importModule(spec) {
    if (typeof spec !== 'string') spec = String(spec);
    if (isBuiltin(spec) || /^(node|bun|data|file):/.test(spec)) return import(spec);
    if (spec.startsWith('./') || spec.startsWith('../') || spec.startsWith('/')) {
      return import(pathToFileURL(path.resolve(root, spec)).href);
    }
    let resolved;
    try {
      resolved = userRequire.resolve(spec);
    } catch (e) {
      const err = new Error(`Cannot find module '${spec}' (looked in ${root}/node_modules and NODE_PATH)`);
      err.code = 'ERR_MODULE_NOT_FOUND';
      return Promise.reject(err);
    }
    return isBuiltin(resolved) ? import(resolved) : import(pathToFileURL(resolved).href);
  }
  const scriptOpts = { filename: '<exec>', importModuleDynamically: importModule };

  // After a snapshot restore every clone holds the same V8 Math.random state, the same
  // OpenSSL DRBG state and the same randomUUID cache. Reseeding: Math.random and the
  // JavaScript crypto functions draw from /dev/urandom (the kernel CRNG, reseeded by the
  // agent with host entropy) from then on. OpenSSL itself cannot be reseeded from
  // JavaScript (crypto.setEngine cannot replace a RAND method already in use), so native
  // users (TLS, key generation) stay cloned; the agent restarts node instead unless told
  // otherwise.
  const urandom = { fd: -1, pool: Buffer.alloc(4096), pos: 4096 };
  function urandomFill(buf, offset, size) {
    if (urandom.fd < 0) urandom.fd = fs.openSync('/dev/urandom', 'r');
    let done = 0;
    while (done < size) {
      const n = fs.readSync(urandom.fd, buf, offset + done, size - done, null);
      if (n <= 0) throw new Error('short read from /dev/urandom');
      done += n;
    }
  }
  function poolBytes(n) {
    if (urandom.pos + n > urandom.pool.length) {
      urandomFill(urandom.pool, 0, urandom.pool.length);
      urandom.pos = 0;
    }
    const at = urandom.pos;
    urandom.pos += n;
    return at;
  }
  function random() {
    const at = poolBytes(8);
    const hi = urandom.pool.readUInt32LE(at) >>> 5; // 27 bits
    const lo = urandom.pool.readUInt32LE(at + 4) >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }
  let patched = false;
  function patchCrypto() {
    const crypto = require('crypto');
    const { types } = require('util');
    const viewOf = (buf) => {
      if (ArrayBuffer.isView(buf)) return Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
      if (types.isAnyArrayBuffer(buf)) return Buffer.from(buf);
      throw new TypeError('The "buf" argument must be an ArrayBuffer or ArrayBufferView');
    };
    const origFillSync = crypto.randomFillSync;
    const origFill = crypto.randomFill;
    const origInt = crypto.randomInt;
    const origUUID = crypto.randomUUID;
    // Validate arguments with Node's own function on a throwaway buffer, then fill from
    // the kernel.
    crypto.randomFillSync = function randomFillSync(buf, offset, size) {
      const view = viewOf(buf);
      const off = offset === undefined ? 0 : offset;
      const len = size === undefined ? view.length - off : size;
      origFillSync(Buffer.alloc(view.length), off, len);
      urandomFill(view, off, len);
      return buf;
    };
    crypto.randomBytes = function randomBytes(size, cb) {
      const out = Buffer.alloc(size);
      if (typeof cb === 'function') {
        let err = null;
        try {
          urandomFill(out, 0, size);
        } catch (e) {
          err = e;
        }
        process.nextTick(cb, err, err ? undefined : out);
        return undefined;
      }
      urandomFill(out, 0, size);
      return out;
    };
    crypto.randomFill = function randomFill(buf, offset, size, cb) {
      const args = [buf, offset, size, cb];
      const callback = args.reverse().find((a) => typeof a === 'function');
      if (typeof callback !== 'function') return origFill(buf, offset, size, cb);
      const o = typeof offset === 'function' ? undefined : offset;
      const s = typeof size === 'function' ? undefined : size;
      let err = null;
      try {
        crypto.randomFillSync(buf, o, s);
      } catch (e) {
        err = e;
      }
      process.nextTick(callback, err, err ? undefined : buf);
      return undefined;
    };
    crypto.randomUUID = function randomUUID(options) {
      if (options !== undefined) origUUID(options);
      const b = Buffer.alloc(16);
      urandomFill(b, 0, 16);
      b[6] = (b[6] & 0x0f) | 0x40;
      b[8] = (b[8] & 0x3f) | 0x80;
      const h = b.toString('hex');
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    };
    crypto.randomInt = function randomInt(min, max, cb) {
      if (typeof max === 'undefined' || typeof max === 'function') {
        cb = max;
        max = min;
        min = 0;
      }
      origInt(min, max); // argument checks (throws like Node does)
      const range = max - min;
      const RAND_MAX = 0xffffffffffff;
      const limit = RAND_MAX - (RAND_MAX % range);
      const b = Buffer.alloc(6);
      let n;
      do {
        urandomFill(b, 0, 6);
        n = b.readUIntBE(0, 6);
      } while (n >= limit);
      const r = min + (n % range);
      if (typeof cb === 'function') {
        process.nextTick(cb, undefined, r);
        return undefined;
      }
      return r;
    };
    const webs = new Set([crypto.webcrypto, globalThis.crypto].filter((w) => w && typeof w === 'object'));
    for (const w of webs) {
      const origGRV = w.getRandomValues && w.getRandomValues.bind(w);
      if (origGRV) {
        Object.defineProperty(w, 'getRandomValues', {
          configurable: true,
          writable: true,
          value: function getRandomValues(array) {
            origGRV(new array.constructor(0));
            if (array.byteLength > 65536) origGRV(array);
            urandomFill(Buffer.from(array.buffer, array.byteOffset, array.byteLength), 0, array.byteLength);
            return array;
          },
        });
      }
      if (typeof w.randomUUID === 'function') {
        Object.defineProperty(w, 'randomUUID', {
          configurable: true,
          writable: true,
          value: function randomUUID() {
            return crypto.randomUUID();
          },
        });
      }
    }
    try {
      require('module').syncBuiltinESMExports();
    } catch (e) {
      // ESM imports of node:crypto keep the originals.
    }
  }
  function reseed() {
    urandom.pos = urandom.pool.length; // never serve bytes read before this resume
    if (!patched) {
      Object.defineProperty(Math, 'random', { configurable: true, writable: true, value: random });
      patchCrypto();
      patched = true;
    }
  }

  const wrapperFrame = /^\s+at .*(runInThisContext|sbxRepl|runOne|importModule|\[eval\]|processTicksAndRejections)/;
  function describe(e) {
    if (e && Array.isArray(e.errors) && e.errors.length && e.errors.every((m) => m && m.position !== undefined)) {
      return e.errors.map(describe).join('\n');
    }
    if (e && typeof e === 'object' && e.position !== undefined && e.name === 'BuildMessage') {
      const p = e.position;
      const at = p ? `\n    at <exec>:${p.line}:${p.column}\n    ${p.lineText}\n    ${' '.repeat(Math.max(0, p.column - 1))}^` : '';
      return `SyntaxError: ${e.message}${at}`;
    }
    if (e instanceof Error || (e && typeof e.stack === 'string')) {
      let lines = String(e.stack || `${e.name}: ${e.message}`).split('\n');
      // Bun puts a source excerpt above the message; the message line starts the report.
      const head = `${e.name}: `;
      const i = lines.findIndex((l) => l.startsWith(head) || l === e.name);
      if (i > 0) lines = lines.slice(i);
      return lines.filter((l) => !wrapperFrame.test(l)).join('\n');
    }
    try {
      return `Uncaught ${Bun.inspect(e, { colors: false })}`;
    } catch (e2) {
      return `Uncaught ${String(e)}`;
    }
  }

  let current = null;
  const report = (e) => {
    try {
      process.stderr.write(describe(e) + '\n');
    } catch (e2) {
      // stderr gone
    }
    if (current) current.failed = true;
  };
  process.on('uncaughtException', report);
  process.on('unhandledRejection', report);

  let buf = Buffer.alloc(0);
  const scratch = Buffer.allocUnsafe(1 << 16);
  function more() {
    return new Promise((resolve, reject) => {
      fs.read(ctl, scratch, 0, scratch.length, null, (err, n) => {
        if (err) {
          if (err.code === 'EAGAIN' || err.code === 'EINTR') return resolve();
          return reject(err);
        }
        if (n === 0) process.exit(0);
        buf = Buffer.concat([buf, scratch.subarray(0, n)]);
        return resolve();
      });
    });
  }
  async function readRequest() {
    let i;
    while ((i = buf.indexOf(10)) < 0) await more();
    const n = parseInt(buf.subarray(0, i).toString('latin1'), 10);
    buf = buf.subarray(i + 1);
    while (buf.length < n) await more();
    const req = JSON.parse(buf.subarray(0, n).toString('utf8'));
    buf = Buffer.from(buf.subarray(n));
    return req;
  }
  // Bun's stdout/stderr write to a pipe without blocking and keep what the pipe does not
  // take in a queue of their own that writableLength does not show: an empty write's
  // callback runs once everything before it has been written.
  function drained(s) {
    return new Promise((resolve) => {
      try {
        if (!s.write('', () => resolve())) s.once('drain', resolve);
      } catch (e) {
        resolve();
      }
    });
  }
  const isThenable = (v) => v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
  async function runOne(req) {
    const saved = [];
    for (const [k, v] of req.env || []) {
      saved.push([k, Object.prototype.hasOwnProperty.call(process.env, k) ? process.env[k] : undefined, v]);
      process.env[k] = v;
    }
    current = { failed: false };
    // Every exec starts with the REPL's own `require`, whatever an earlier one did to it.
    if (globalThis.require !== userRequire) globalThis.require = userRequire;
    try {
      const js = transpiler.transformSync(req.code);
      let r = new vm.Script(js, scriptOpts).runInThisContext({ displayErrors: true });
      if (isThenable(r)) r = await r;
      const value = r && typeof r === 'object' && Object.prototype.hasOwnProperty.call(r, 'value') ? r.value : undefined;
      if (isThenable(value)) await value;
    } catch (e) {
      report(e);
    }
    const status = current.failed ? 1 : 0;
    current = null;
    await drained(process.stdout);
    await drained(process.stderr);
    for (const [k, old, v] of saved) {
      if (process.env[k] === v) {
        if (old === undefined) delete process.env[k];
        else process.env[k] = old;
      }
    }
    fs.writeSync(st, `${req.id} ${status}\n`);
  }
  (async () => {
    for (;;) {
      const req = await readRequest();
      if (req.reseed) {
        let status = 0;
        try {
          reseed();
        } catch (e) {
          status = 1;
        }
        fs.writeSync(st, `${req.id} ${status}\n`);
        continue;
      }
      await runOne(req);
    }
  })().catch((e) => {
    report(e);
    process.exit(70);
  });
})();
