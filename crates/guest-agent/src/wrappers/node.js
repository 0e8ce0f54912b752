// sbx guest agent: persistent JavaScript (Node.js) REPL wrapper.
//
// Requests arrive on fd 3 as "<length>\n<json>" with {id, code, env}. Code runs as a
// script in the main context (vm.runInThisContext), so top-level let/const/function/class
// persist; code using top-level await is rewritten by Node's own REPL transform when
// available. Completion is reported only on fd 4 as "<id> <exit code>\n".
'use strict';
(function sbxRepl() {
  const fs = require('fs');
  const vm = require('vm');
  const path = require('path');
  const { createRequire } = require('module');
  let tla = null;
  try {
    tla = require('internal/repl/await').processTopLevelAwait;
  } catch (e) {
    tla = null;
  }
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
  const root = process.cwd();
  globalThis.require = createRequire(path.join(root, '<exec>'));
  globalThis.__dirname = root;
  globalThis.__filename = path.join(root, '<exec>');
  const dyn = vm.constants && vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER;
  if (dyn) {
    const orig = process.emitWarning;
    process.emitWarning = function (w, ...rest) {
      const m = typeof w === 'string' ? w : (w && w.message) || '';
      if (m.includes('USE_MAIN_CONTEXT_DEFAULT_LOADER')) return undefined;
      return orig.call(this, w, ...rest);
    };
  }
  const opts = { filename: '<exec>' };
  if (dyn) opts.importModuleDynamically = dyn;

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

  let current = null;
  const report = (e) => {
    try {
      let text = (e && e.stack) || String(e);
      if (typeof text === 'string') {
        text = text
          .split('\n')
          .filter((l) => !/^\s+at .*(node:vm:|\[eval\]|sbxRepl|runOne)/.test(l))
          .join('\n');
      }
      process.stderr.write(text + '\n');
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
  function drained(s) {
    return new Promise((resolve) => {
      if (!s.writableLength) return resolve();
      s.write('', () => resolve());
      return undefined;
    });
  }
  async function runOne(req) {
    const saved = [];
    for (const [k, v] of req.env || []) {
      saved.push([k, Object.prototype.hasOwnProperty.call(process.env, k) ? process.env[k] : undefined, v]);
      process.env[k] = v;
    }
    current = { failed: false };
    try {
      let script;
      try {
        script = new vm.Script(req.code, opts);
      } catch (e) {
        let wrapped = null;
        if (e instanceof SyntaxError && tla && req.code.includes('await')) {
          try {
            wrapped = tla(req.code);
          } catch (e2) {
            wrapped = null;
          }
        }
        if (!wrapped) throw e;
        script = new vm.Script(wrapped, opts);
      }
      const r = script.runInThisContext({ displayErrors: true });
      if (r && typeof r.then === 'function') await r;
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
