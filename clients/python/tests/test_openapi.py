"""The client's types must match the server's OpenAPI document, so the two cannot drift."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
from typing import Any

import pytest

import sbx_client as sbx
from sbx_client import _common, _models


@pytest.fixture(scope="module")
def doc(sbx_path: str) -> dict[str, Any]:
    out = subprocess.run([sbx_path, "openapi"], check=True, capture_output=True, timeout=60)
    d: dict[str, Any] = json.loads(out.stdout)
    return d


def props(doc: dict[str, Any], name: str) -> set[str]:
    return set(doc["components"]["schemas"][name]["properties"])


@pytest.mark.parametrize("schema", sorted(_models.SCHEMAS))
def test_dataclass_fields_are_the_schema_properties(doc: dict[str, Any], schema: str) -> None:
    fields = {f.name for f in dataclasses.fields(_models.SCHEMAS[schema])}
    assert fields == props(doc, schema), schema


def test_request_bodies_cover_the_schemas(doc: dict[str, Any]) -> None:
    run = _common.run_body(
        "1",
        language="python",
        timeout_seconds=1,
        memory_mb=128,
        disk_mb=64,
        env={"A": "1"},
        allow_network=True,
        allowed_domains=["example.com"],
        expose_ports=[1],
        task_id="t",
        packages=["numpy==2.1.3"],
    )
    assert set(run) == props(doc, "RunBody")
    session = _common.session_body(
        language="python",
        memory_mb=128,
        disk_mb=64,
        idle_timeout_seconds=10,
        allow_network=True,
        allowed_domains=["example.com"],
        expose_ports=[1],
        packages=["numpy==2.1.3"],
    )
    assert set(session) == props(doc, "SessionBody")
    assert set(_common.exec_body("1", timeout_seconds=1, env={"A": "1"})) == props(doc, "ExecBody")
    assert set(_models.LANGUAGES) == set(doc["components"]["schemas"]["ApiLanguage"]["enum"])


def test_every_error_kind_has_a_class(doc: dict[str, Any]) -> None:
    text = doc["components"]["schemas"]["ErrorDetail"]["properties"]["kind"]["description"]
    kinds = set(re.findall(r"`([a-z_]+)`", text))
    assert kinds == set(sbx.ERROR_CLASSES)
    assert set(props(doc, "ErrorDetail")) <= set(
        inspect.signature(sbx.SandboxError.__init__).parameters
    ) | {"kind", "message"}


def test_stream_events_are_the_ones_handled(doc: dict[str, Any]) -> None:
    variants = doc["components"]["schemas"]["StreamEvent"]["oneOf"]
    types = {v["properties"]["type"]["enum"][0] for v in variants if "properties" in v}
    types |= {
        t
        for v in variants
        for part in v.get("allOf", [])
        for t in part.get("properties", {}).get("type", {}).get("enum", [])
    }
    assert types == {"stdout", "stderr", "result", "error"}
