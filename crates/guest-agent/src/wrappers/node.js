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
      await runOne(req);
    }
  })().catch((e) => {
    report(e);
    process.exit(70);
  });
})();
