//! Language behaviours of the REPLs that the original system documents: TypeScript and
//! REPL semantics in JavaScript (on Bun), no integer/string conversion limit in Python.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Harness;
use guest_agent::JsRuntime;
use guest_proto::Language;
use tokio_util::sync::CancellationToken;

const PY: Language = Language::Python;
const JS: Language = Language::Javascript;

/// A harness whose JavaScript REPL runs on Bun (`scripts/setup-host.sh` installs the
/// pinned Bun in `/usr/local/bin`).
fn bun_harness() -> Harness {
    let h = Harness::new();
    let cfg = h.engine.config();
    assert_eq!(
        cfg.js_runtime(),
        JsRuntime::Bun,
        "these tests need Bun on the host ({} found); run scripts/setup-host.sh",
        cfg.node.display()
    );
    h
}

#[tokio::test]
async fn python_has_no_int_str_limit_unless_the_user_sets_one() {
    let h = Harness::new();
    let r = h.exec(PY, "print(len(str(10**100000)))").await;
    assert_eq!(r.ok(), "100001\n");
    // Child interpreters inherit the setting.
    let r = h
        .exec(
            PY,
            "import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', 'print(len(str(10**5000)))'], capture_output=True, text=True).stdout, end='')",
        )
        .await;
    assert_eq!(r.ok(), "5001\n");
    // The variable for one exec applies to that exec only.
    let env = vec![("PYTHONINTMAXSTRDIGITS".to_owned(), "4300".to_owned())];
    let r = h
        .exec_full(PY, "str(10**5000)", 10, env, CancellationToken::new())
        .await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("ValueError"), "{}", r.err());
    assert_eq!(h.exec(PY, "print(len(str(10**5000)))").await.ok(), "5001\n");
    // An explicit setting wins and persists across execs.
    h.exec(PY, "import sys; sys.set_int_max_str_digits(4300)")
        .await
        .ok();
    let r = h.exec(PY, "str(10**5000)").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("Exceeds the limit"), "{}", r.err());
}

#[tokio::test]
async fn typescript_types_are_erased() {
    let h = bun_harness();
    let code = r#"
enum Color { Red, Green = 5 }
interface Point { x: number; y?: number }
type Pair<T> = [T, T];
const id = <T,>(x: T): T => x;
function first<T>(xs: T[]): T | undefined { return xs[0]; }
class Box<T> { constructor(public value: T) {} }
const p: Point = { x: 1 };
const pair: Pair<string> = ["a", "b"];
const o = JSON.parse('{"a":{"b":2}}') as { a?: { b?: number }; z?: { y: number } };
const n: number = await Promise.resolve(40);
console.log(Color.Green, Color[5], id<string>("s"), first([7, 8]), new Box(3).value, p.y ?? "none", pair.join(""), o?.a?.b, o.z?.y, n + 2);
"#;
    let r = h.exec(JS, code).await;
    assert_eq!(r.ok(), "5 Green s 7 3 none ab 2 undefined 42\n");
    // What the first exec declared is there in the next one.
    assert_eq!(
        h.exec(
            JS,
            "console.log(Color.Red, id(9), new Box<number>(1).value)"
        )
        .await
        .ok(),
        "0 9 1\n"
    );
}

#[tokio::test]
async fn invalid_typescript_is_a_syntax_error_and_the_repl_survives() {
    let h = bun_harness();
    h.exec(JS, "var kept = 1").await.ok();
    let pid = h.engine.repl_pid(JS).await.unwrap();
    for bad in [
        "let x: = 1",
        "function f(a: number { return a }",
        "interface { x: number }",
    ] {
        let r = h.exec(JS, bad).await;
        assert_eq!(r.code(), 1, "{bad}: {}", r.out());
        assert!(r.err().contains("SyntaxError"), "{bad}: {}", r.err());
        assert!(r.err().contains("<exec>:1:"), "{bad}: {}", r.err());
    }
    assert_eq!(h.exec(JS, "console.log(kept)").await.ok(), "1\n");
    assert_eq!(h.engine.repl_pid(JS).await.unwrap(), pid);
}

#[tokio::test]
async fn declarations_can_be_repeated_in_later_execs() {
    let h = bun_harness();
    h.exec(
        JS,
        "let a = 1; const b = 2; class K {}; function f() { return 1 }",
    )
    .await
    .ok();
    let r = h
        .exec(
            JS,
            "let a = 10; const b = 20; class K { v = 3 }; function f() { return 2 }; console.log(a + b, new K().v, f())",
        )
        .await;
    assert_eq!(r.ok(), "30 3 2\n");
    assert_eq!(h.exec(JS, "console.log(a, b)").await.ok(), "10 20\n");
}

#[tokio::test]
async fn top_level_await_and_its_rejections() {
    let h = bun_harness();
    let r = h
        .exec(
            JS,
            "const v = await new Promise(r => setTimeout(() => r(41), 20)); console.log(v + 1)",
        )
        .await;
    assert_eq!(r.ok(), "42\n");
    assert_eq!(h.exec(JS, "console.log(v)").await.ok(), "41\n");
    let r = h
        .exec(JS, "await Promise.reject(new Error('it rejected'))")
        .await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("Error: it rejected"), "{}", r.err());
    // A promise left as the value of the code is awaited too.
    let r = h
        .exec(
            JS,
            "new Promise((_, j) => setTimeout(() => j(new TypeError('late')), 10))",
        )
        .await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("TypeError: late"), "{}", r.err());
    assert_eq!(h.exec(JS, "console.log(v)").await.ok(), "41\n");
}

#[tokio::test]
async fn dynamic_import_matches_require() {
    let h = bun_harness();
    // A package in ~/node_modules, as npm/bun install it.
    let pkg = h.root().join("node_modules/sbx-fixture");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(
        pkg.join("package.json"),
        r#"{"name":"sbx-fixture","version":"1.0.0","main":"index.js"}"#,
    )
    .unwrap();
    std::fs::write(pkg.join("index.js"), "module.exports = { answer: 42 };\n").unwrap();
    std::fs::write(h.root().join("local.mjs"), "export const here = 'local';\n").unwrap();
    let code = r#"
const path = await import("node:path");
const name = ["node", "os"].join(":");
const os = await import(name);
const fx = await import("sbx-fixture");
const local = await import("./local.mjs");
console.log(path.default === require("node:path"), path.join === require("node:path").join);
console.log(os.default === require(name), typeof os.cpus);
console.log(fx.default === require("sbx-fixture"), fx.default.answer);
console.log(local.here);
"#;
    let r = h.exec(JS, code).await;
    assert_eq!(r.ok(), "true true\ntrue function\ntrue 42\nlocal\n");
    // import() in a later exec and in a callback.
    let r = h
        .exec(
            JS,
            "await import('node:fs').then(m => console.log(typeof m.readFileSync))",
        )
        .await;
    assert_eq!(r.ok(), "function\n");
}

#[tokio::test]
async fn import_lookalikes_are_left_alone() {
    let h = bun_harness();
    let code = r#"
const s = "import('x') and import(y)";
const t = `template import("z")`;
function reimport(x) { return x * 2 }
const obj = { import(v) { return v + 1 } };
// import("commented")
console.log(s, t, reimport(2), obj.import(1));
"#;
    let r = h.exec(JS, code).await;
    assert_eq!(
        r.ok(),
        "import('x') and import(y) template import(\"z\") 4 2\n"
    );
}

#[tokio::test]
async fn a_missing_module_rejects_clearly() {
    let h = bun_harness();
    let r = h.exec(JS, "await import('no-such-module-sbx')").await;
    assert_eq!(r.code(), 1);
    assert!(
        r.err().contains("Cannot find module 'no-such-module-sbx'"),
        "{}",
        r.err()
    );
    let r = h.exec(JS, "require('no-such-module-sbx')").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("no-such-module-sbx"), "{}", r.err());
    assert_eq!(
        h.exec(JS, "console.log('still here')").await.ok(),
        "still here\n"
    );
}

#[tokio::test]
async fn overriding_require_or_import_fails_that_exec_only() {
    let h = bun_harness();
    let r = h.exec(JS, "require = null; require('fs')").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("TypeError"), "{}", r.err());
    let r = h
        .exec(
            JS,
            "globalThis.require = () => { throw new Error('mine') }; require('fs')",
        )
        .await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("mine"), "{}", r.err());
    let r = h.exec(JS, "import = 5").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("SyntaxError"), "{}", r.err());
    // The next exec has the REPL's require and import() again.
    let r = h
        .exec(
            JS,
            "console.log(typeof require('fs').readFileSync, typeof (await import('node:fs')).readFileSync)",
        )
        .await;
    assert_eq!(r.ok(), "function function\n");
}
