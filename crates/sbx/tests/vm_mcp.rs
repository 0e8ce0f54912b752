//! `sbx mcp` end to end: the official Rust MCP SDK's client (rmcp) spawns `sbx mcp`,
//! initializes, lists the tools and calls them over real microVMs (TCG here).
//! `#[ignore]`d in `cargo test`; run by `cargo xtask itest`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::{Value, json};

mod common;
use common::{config, wait_no_qemu, work_dir};

type Client = RunningService<RoleClient, ()>;

async fn call(client: &Client, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"))
}

/// The tool's JSON answer, and whether it is a tool error.
fn answer(r: &CallToolResult) -> (Value, bool) {
    let text = r
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .expect("a text content block");
    (
        serde_json::from_str(&text).expect("JSON text"),
        r.is_error == Some(true),
    )
}

async fn ok(client: &Client, tool: &str, args: Value) -> Value {
    let (v, is_error) = answer(&call(client, tool, args).await);
    assert!(!is_error, "{tool}: {v}");
    v
}

async fn tool_error(client: &Client, tool: &str, args: Value) -> Value {
    let (v, is_error) = answer(&call(client, tool, args).await);
    assert!(is_error, "{tool} should fail: {v}");
    v["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn an_mcp_client_lists_and_calls_the_tools_over_real_vms() {
    let cfg = config(0);
    let transport = TokioChildProcess::new(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sbx")).configure(|cmd| {
            cmd.arg("mcp")
                .env("SBX_ASSETS_DIR", &cfg.assets_dir)
                .env("SBX_WORK_DIR", work_dir())
                .env("SBX_SNAPSHOTS", "0");
        }),
    )
    .unwrap();
    let client: Client = ().serve(transport).await.expect("initialize");
    let info = client.peer_info().expect("server info");
    assert_eq!(info.server_info.as_ref().unwrap().name, "sbx");
    assert!(info.capabilities.tools.is_some());
    assert!(
        info.instructions
            .as_deref()
            .unwrap_or("")
            .contains("run_code")
    );

    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "close_session",
            "create_session",
            "exec_in_session",
            "list_files",
            "read_file",
            "run_code",
            "write_file"
        ]
    );
    for t in &tools {
        assert!(
            t.description.as_deref().unwrap_or("").len() > 20,
            "{}",
            t.name
        );
        assert_eq!(
            t.input_schema.get("type"),
            Some(&json!("object")),
            "{}",
            t.name
        );
    }
    let run = tools.iter().find(|t| t.name == "run_code").unwrap();
    let props = run.input_schema["properties"].as_object().unwrap();
    assert!(props.contains_key("code") && props.contains_key("language"));
    assert_eq!(run.input_schema["required"], json!(["code"]));

    // One-off runs.
    let v = ok(&client, "run_code", json!({"code": "print(6*7)"})).await;
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("42\n"), Some(0))
    );
    let v = ok(
        &client,
        "run_code",
        json!({"code": "echo $X; exit 3", "language": "raw", "env": {"X": "hi"}}),
    )
    .await;
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("hi\n"), Some(3))
    );
    // Bad input and sandbox errors are tool errors, and the server lives on.
    let e = tool_error(
        &client,
        "run_code",
        json!({"code": "1", "timeout_seconds": 0}),
    )
    .await;
    assert_eq!(
        (e["kind"].as_str(), e["retryable"].as_bool()),
        (Some("input"), Some(false))
    );
    let e = tool_error(
        &client,
        "exec_in_session",
        json!({"session_id": "nope", "code": "1"}),
    )
    .await;
    assert_eq!(e["kind"], "not_found");

    // A session across calls, with files.
    let v = ok(&client, "create_session", json!({"language": "python"})).await;
    let id = v["session_id"].as_str().unwrap().to_owned();
    assert_eq!(v["language"], "python");
    ok(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "x = 20"}),
    )
    .await;
    let v = ok(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "print(x + 22)"}),
    )
    .await;
    assert_eq!(v["stdout"], "42\n");
    let v = ok(
        &client,
        "write_file",
        json!({"session_id": id, "path": "d/a.txt", "content": "hello"}),
    )
    .await;
    assert_eq!(v["size"], 5);
    ok(
        &client,
        "write_file",
        json!({"session_id": id, "path": "b.bin", "content": "/wAB", "base64": true}),
    )
    .await;
    let v = ok(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "print(open('d/a.txt').read(), list(open('b.bin','rb').read()))"}),
    )
    .await;
    assert_eq!(v["stdout"], "hello [255, 0, 1]\n");
    let v = ok(
        &client,
        "read_file",
        json!({"session_id": id, "path": "d/a.txt"}),
    )
    .await;
    assert_eq!(
        (v["content"].as_str(), v["size"].as_u64()),
        (Some("hello"), Some(5))
    );
    let v = ok(
        &client,
        "read_file",
        json!({"session_id": id, "path": "b.bin"}),
    )
    .await;
    assert_eq!(v["content_base64"], "/wAB");
    let v = ok(&client, "list_files", json!({"session_id": id})).await;
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"d") && names.contains(&"b.bin"), "{v}");
    // Output limits and guest errors are tool errors; the session survives them.
    ok(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "open('big','wb').write(b'x' * (2 << 20))"}),
    )
    .await;
    let e = tool_error(
        &client,
        "read_file",
        json!({"session_id": id, "path": "big"}),
    )
    .await;
    assert_eq!(e["kind"], "output_limit");
    let e = tool_error(
        &client,
        "read_file",
        json!({"session_id": id, "path": "missing"}),
    )
    .await;
    assert_eq!(e["kind"], "guest");
    let e = tool_error(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "print('x' * 2_000_000)"}),
    )
    .await;
    assert_eq!(e["kind"], "output_limit");
    let v = ok(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "print(x)"}),
    )
    .await;
    assert_eq!(v["stdout"], "20\n");

    ok(&client, "close_session", json!({"session_id": id})).await;
    let e = tool_error(
        &client,
        "exec_in_session",
        json!({"session_id": id, "code": "1"}),
    )
    .await;
    assert_eq!(e["kind"], "not_found");

    // A session left open is closed when the client goes away; no VM is left behind.
    ok(&client, "create_session", json!({"language": "raw"})).await;
    client.cancel().await.unwrap();
    assert_eq!(wait_no_qemu(), 0, "sbx mcp left VMs behind");
}
