"""Schemathesis against a live server's /openapi.json, once with a read-write
key and once with a read-only key, plus raw bodies it cannot generate.

Every phase runs (coverage, fuzzing, and stateful through the OpenAPI links:
create collection → upsert → search / get / delete, upload → job). Checks:
schemathesis's own (no 5xx, responses, status codes, content types and
headers as the document states them, Allow on 405, ignored auth, ...) and
this server's promises (tests/api/schemathesis_checks.py): every 4xx/5xx has
the JSON error shape, a 4xx changed nothing stored, and the read-only key
gets 403 for anything that changes data.

Left out: positive_data_acceptance and negative_data_rejection. The server
refuses some schema-valid values that JSON Schema cannot state, or states
only at great length (integers past 64 bits inside metadata and filters, the
filter grammar, duplicate ids in a batch, limits set in the settings), so
those two checks would report the document's reach, not the server's faults.

Run: ``.venv/bin/python -m pytest tests/api/test_schemathesis.py -q`` (about
3 minutes on 2 cores, a minute of it starting the server). By hand, against a
server with keys on $PORT whose database is $DB (the read-only run adds
SCHEMATHESIS_COLBERT_ACCESS=read-only SCHEMATHESIS_COLBERT_KEY=$RO and its key):

    SCHEMATHESIS_HOOKS=tests.api.schemathesis_checks SCHEMATHESIS_COLBERT_DATABASE=$DB \\
    st run http://127.0.0.1:$PORT/openapi.json -H "Authorization: Bearer $RW" --checks all \\
      --exclude-checks positive_data_acceptance,negative_data_rejection --max-examples 30 --seed 1 --workers 1
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.answer.fake_openai import FakeOpenAIServer
from tests.api.schemathesis_checks import stored_state
from tests.conftest import ROOT, ServerProcess

pytestmark = pytest.mark.slow

RW_KEY = "rw-" + uuid.uuid4().hex
RO_KEY = "ro-" + uuid.uuid4().hex
RW = {"Authorization": f"Bearer {RW_KEY}"}
MAX_EXAMPLES = 30  # per operation and phase; both runs together take about 1.5 minutes on 2 cores
SEED = 1


class LiveServer:
    def __init__(self, server: ServerProcess, database: Path):
        self.server = server
        self.url = server.url
        self.database = database


@pytest.fixture(scope="module")
def live(tmp_path_factory, checkpoint_dir, shared_models_dir):
    data = tmp_path_factory.mktemp("schemathesis") / "data"
    with FakeOpenAIServer() as lm:
        server = ServerProcess(
            data,
            checkpoint_dir,
            {
                "COLBERT_SERVER_ENVIRONMENT": "test",
                # The hallucination scorer's ONNX export, shared with the other tests of the session.
                "COLBERT_SERVER_MODELS_DIR": str(shared_models_dir),
                "COLBERT_SERVER_API_KEYS": RW_KEY,
                "COLBERT_SERVER_READ_ONLY_API_KEYS": RO_KEY,
                "COLBERT_SERVER_EXACT_SEARCH_MAX_PASSAGES": "16",
                # Answers from a fake OpenAI-compatible LM: fast and offline.
                "COLBERT_SERVER_ANSWER_LM": "openai/fake-model",
                "COLBERT_SERVER_ANSWER_LM_BASE_URL": lm.base_url,
                "COLBERT_SERVER_ANSWER_LM_API_KEY": "fake",
                "COLBERT_SERVER_ANSWER_PRELOAD": "true",
            },
        )
        try:
            server.wait_ready()
            _wait_for_answers(server.url)
            yield LiveServer(server, data / "server.sqlite3")
        finally:
            server.stop()


def _wait_for_answers(url: str, timeout: float = 300) -> None:
    """The answer LM and the hallucination scorer load in the background
    after /ready; the run starts once they have, so no first answer waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(url + "/ready", timeout=10).json().get("answers", {}).get("state")
        if state == "ready":
            return
        assert state != "failed", "the answer LM did not load"
        time.sleep(0.5)
    raise TimeoutError("the answer LM did not load")


def run_schemathesis(live: LiveServer, key: str, access: str, out: Path) -> dict:
    """One `st run` against the live server; its JSON report and how often
    the server's own checks passed, by check and status."""
    report, stats = out / "report.json", out / "checks.json"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{live.url}/openapi.json"),
        *("--header", f"Authorization: Bearer {key}"),
        # "all" keeps the checks of schemathesis_checks.py on; a list of names would turn them off.
        *("--checks", "all", "--exclude-checks", "positive_data_acceptance,negative_data_rejection"),
        *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-database", "none"),
        # One call at a time: the stored state is compared before and after each.
        *("--workers", "1", "--request-timeout", "60", "--max-response-time", "60"),
        *("--report", "json", "--report-json-path", str(report), "--no-color"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_checks",
        "SCHEMATHESIS_COLBERT_DATABASE": str(live.database),
        "SCHEMATHESIS_COLBERT_ACCESS": access,
        "SCHEMATHESIS_COLBERT_KEY": key,
        "SCHEMATHESIS_COLBERT_STATS": str(stats),
    }
    # Run in the test's own folder: schemathesis keeps a cache of past crashes
    # under .schemathesis/ there, which would make one run depend on the last.
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-30_000:]
    assert live.server.proc.poll() is None, "the server died during the run"
    return {"report": json.loads(report.read_text()), "checks": json.loads(stats.read_text()), "output": output}


def _status_total(counts: dict[str, int], low: int, high: int) -> int:
    return sum(n for status, n in counts.items() if low <= int(status) < high)


def test_schemathesis_with_a_read_write_key(live, tmp_path):
    run = run_schemathesis(live, RW_KEY, "read-write", tmp_path)
    cases = run["report"]["test_cases"]
    print(f"read-write key: {cases['generated']} cases; server checks passed: {run['checks']}")
    assert cases["generated"] >= 500 and cases["with_failures"] == 0 and cases["errored"] == 0
    # The stateful phase followed the links to real data: collections were
    # created, documents upserted, fetched and deleted.
    assert run["report"]["phases"]["stateful"]["status"] == "success", run["output"][-5000:]
    links = re.search(r"API Links:\s+(\d+) covered", run["output"])
    assert links and int(links.group(1)) >= 5, run["output"][-5000:]
    assert _status_total(run["checks"]["error_shape"], 400, 600) >= 200
    assert _status_total(run["checks"]["changed_nothing"], 400, 500) >= 200


def test_schemathesis_with_a_read_only_key(live, tmp_path):
    run = run_schemathesis(live, RO_KEY, "read-only", tmp_path)
    cases = run["report"]["test_cases"]
    print(f"read-only key: {cases['generated']} cases; server checks passed: {run['checks']}")
    assert cases["generated"] >= 500 and cases["with_failures"] == 0 and cases["errored"] == 0
    assert run["checks"]["read_only"].get("403", 0) >= 100


# Raw bodies schemathesis cannot send (it only writes valid JSON, and valid
# Unicode), each to the real server over HTTP: a 4xx with the error shape,
# and nothing stored changes.
def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _doc_with_metadata(metadata: str) -> bytes:
    return b'{"documents": [{"id": "raw", "text": "poison", "metadata": ' + metadata.encode() + b"}]}"


def _search_with_filter(where: str) -> bytes:
    return b'{"query": "basalt", "filter": ' + where.encode() + b"}"


RAW_JSON = {
    # Nesting around the JSON parser's recursion limit (about 1,000 levels) and far past it.
    **{
        f"metadata nested {d}": ("documents", _doc_with_metadata('{"x": ' + _nested(d) + "}"))
        for d in (990, 1000, 5000)
    },
    **{f"filter nested {d}": ("search", _search_with_filter('{"x": ' + _nested(d) + "}")) for d in (990, 1000, 5000)},
    "$and nested 990": ("search", _search_with_filter('{"$and": [' * 990 + '{"x": 1}' + "]}" * 990)),
    # SQLite's expression tree (about 1,000 terms) and its bound-parameter limit.
    **{
        f"$or of {n}": ("search", _search_with_filter(json.dumps({"$or": [{"n": i} for i in range(n)]})))
        for n in (997, 998, 5000)
    },
    "$in of 10,001": ("search", _search_with_filter(json.dumps({"n": {"$in": list(range(10_001))}}))),
    "a 1,000-key filter": ("search", _search_with_filter(json.dumps({f"k{i}": 1 for i in range(1000)}))),
    # Integers SQLite cannot bind (signed 64 bits), as values and as operands.
    "filter 2**63": ("search", _search_with_filter('{"n": 9223372036854775808}')),
    "filter -2**63-1": ("search", _search_with_filter('{"n": {"$lt": -9223372036854775809}}')),
    "filter 2**64 in $in": ("search", _search_with_filter('{"n": {"$in": [18446744073709551616]}}')),
    "metadata 2**64": ("documents", _doc_with_metadata('{"n": 18446744073709551616}')),
    # Not JSON at all: NaN and the infinities, and a broken document.
    "metadata NaN": ("documents", _doc_with_metadata('{"x": NaN}')),
    "metadata -Infinity": ("documents", _doc_with_metadata('{"x": [-Infinity]}')),
    "filter Infinity": ("search", _search_with_filter('{"n": {"$gte": Infinity}}')),
    "k NaN": ("search", b'{"query": "basalt", "k": NaN}'),
    "truncated": ("documents", b'{"documents": [{"id": "raw", "text": "cut'),
    # Lone surrogates: valid JSON escapes, not valid Unicode.
    "text lone surrogate": ("documents", b'{"documents": [{"id": "raw", "text": "bad \\udc00"}]}'),
    "metadata key lone surrogate": ("documents", _doc_with_metadata('{"\\ud800": 1}')),
    "filter key lone surrogate": ("search", _search_with_filter('{"\\udfff": 1}')),
    "collection name with a newline": ("create", b'{"name": "rawcheck\\n"}'),
}


@pytest.mark.parametrize("case", list(RAW_JSON), ids=list(RAW_JSON))
def test_raw_json_bodies_are_refused_and_change_nothing(live, case):
    _seed(live)
    target, body = RAW_JSON[case]
    path = {
        "documents": "/v1/collections/raw/documents",
        "search": "/v1/collections/raw/search",
        "create": "/v1/collections",
    }[target]
    before = stored_state_of(live)
    r = httpx.post(live.url + path, content=body, headers={**RW, "Content-Type": "application/json"}, timeout=120)
    assert_refused(r)
    assert stored_state_of(live) == before


def test_raw_multipart_forms_and_paths_are_refused_and_change_nothing(live):
    _seed(live)
    before = stored_state_of(live)
    files = {"files": ("a.txt", b"Pumice floats on water.", "text/plain")}
    for form in (
        {"ids": '["\\ud800"]'},  # a lone surrogate, escaped in JSON
        {"metadata": '{"k": "\\udc00"}'},
        {"metadata": '{"\\ud800": 1}'},
        {"metadata": '{"x": NaN}'},
        {"metadata": '{"x": ' + _nested(1000) + "}"},
        {"metadata": '{"n": 9223372036854775808}'},
        {"ids": '["a", "b"]'},  # two ids for one file
    ):
        r = httpx.post(live.url + "/v1/collections/raw/files", files=files, data=form, headers=RW, timeout=60)
        assert_refused(r)
    # Collection names with a trailing newline on every route that takes one,
    # and offsets SQLite cannot bind.
    client = httpx.Client(base_url=live.url, headers=RW, timeout=60)
    for method, path, body in (
        ("GET", "/v1/collections/raw%0A", None),
        ("DELETE", "/v1/collections/raw%0A", None),
        ("POST", "/v1/collections/raw%0A/documents", {"documents": [{"text": "x"}]}),
        ("GET", "/v1/collections/raw%0A/documents", None),
        ("GET", "/v1/collections/raw%0A/documents/rock", None),
        ("DELETE", "/v1/collections/raw%0A/documents/rock", None),
        ("POST", "/v1/collections/raw%0A/search", {"query": "x"}),
        ("POST", "/v1/collections/raw%0A/answer", {"question": "x"}),
        ("GET", "/api/search?query=x&collection=raw%0A", None),
        ("GET", "/v1/collections/raw/documents?offset=9223372036854775808", None),
        ("GET", "/v1/collections/raw/documents?offset=18446744073709551616", None),
        ("GET", "/v1/collections/raw/documents?limit=9223372036854775808", None),
    ):
        assert_refused(client.request(method, path, json=body))
    client.close()
    assert stored_state_of(live) == before


def test_a_form_field_that_is_not_utf8_is_read_as_latin_1(live):
    """A lone surrogate sent raw (not as a JSON escape) in a form field is not
    UTF-8 at all; Starlette reads such a field as Latin-1, so what is stored is
    valid text (never a 500, never a value SQLite or the tokenizer cannot take)."""
    _seed(live)
    boundary = "rawboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\nPumice.\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="ids"\r\n\r\n["'
        ).encode()
        + b'\xed\xa0\x80"]\r\n'
        + f"--{boundary}--\r\n".encode()
    )
    r = httpx.post(
        live.url + "/v1/collections/raw/files",
        content=body,
        headers={**RW, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    assert r.json()["files"][0]["document_id"] == b"\xed\xa0\x80".decode("latin-1")


def _seed(live: LiveServer) -> None:
    """A collection with one document (created once; later calls find it)."""
    r = httpx.post(live.url + "/v1/collections", json={"name": "raw"}, headers=RW, timeout=60)
    assert r.status_code in (201, 409), r.text
    r = httpx.post(
        live.url + "/v1/collections/raw/documents",
        json={"documents": [{"id": "rock", "text": "Basalt forms when lava cools quickly.", "metadata": {"n": 3}}]},
        headers=RW,
        timeout=120,
    )
    assert r.status_code == 200, r.text


def stored_state_of(live: LiveServer) -> tuple:
    return stored_state(str(live.database))


def assert_refused(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str), body
