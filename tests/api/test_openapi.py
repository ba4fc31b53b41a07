"""The OpenAPI document says what the server does: links that lead from a new
collection to its documents, the error shape on every operation, the rules
on text and numbers; and a 405 names every method of its path. No model is
loaded: the app is built, not started."""

from __future__ import annotations

import re
import sys

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api.routes.files import _json_form
from app.api.schemas import AnswerRequest, DocumentIn, SearchRequest
from app.errors import InvalidInput
from app.factory import create_app
from app.validation import NOT_BLANK_PATTERN
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(make_settings(tmp_path_factory.mktemp("openapi"), tmp_path_factory.mktemp("no-model")))


@pytest.fixture(scope="module")
def spec(app) -> dict:
    return app.openapi()


def _operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _field_schema(spec: dict, schema: dict, pointer: str) -> dict:
    """The schema a JSON pointer into a body of ``schema`` lands on."""
    for token in pointer.strip("/").split("/"):
        schema = _resolve(spec, schema)
        if token.isdigit():
            assert schema["type"] == "array", (pointer, schema)
            schema = schema["items"]
        else:
            assert token in schema.get("properties", {}), (pointer, token, schema)
            assert token in schema.get("required", []), f"{pointer}: {token} may be missing from the response"
            schema = schema["properties"][token]
    return _resolve(spec, schema)


def test_links_name_operations_parameters_and_response_fields_that_exist(spec):
    by_id = {op["operationId"]: op for _, _, op in _operations(spec)}
    followed = set()
    for path, method, operation in _operations(spec):
        for status, response in operation["responses"].items():
            for name, link in response.get("links", {}).items():
                target = by_id[link["operationId"]]
                target_parameters = {p["name"] for p in target.get("parameters", [])}
                body_schema = response["content"]["application/json"]["schema"]
                for parameter, expression in link["parameters"].items():
                    assert parameter in target_parameters, (path, method, status, name, parameter)
                    source, _, pointer = expression.partition("#")
                    assert source == "$response.body", expression
                    assert _field_schema(spec, body_schema, pointer)["type"] == "string", (path, name, expression)
                followed.add((operation["operationId"], link["operationId"]))
    create, upsert = (
        "create_collection_v1_collections_post",
        "upsert_documents_v1_collections__collection__documents_post",
    )
    assert (create, upsert) in followed
    assert (create, "search_v1_collections__collection__search_post") in followed
    assert (create, "list_documents_v1_collections__collection__documents_get") in followed
    assert (upsert, "get_document_v1_collections__collection__documents__document_id__get") in followed
    assert (upsert, "delete_document_v1_collections__collection__documents__document_id__delete") in followed
    assert ("upload_files_v1_collections__collection__files_post", "get_job_v1_jobs__job_id__get") in followed


def test_every_operation_states_the_json_error_shape(spec):
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body, which this server never sends
    error = schemas["ErrorResponse"]
    assert error["required"] == ["error"] and error["additionalProperties"] is False
    assert set(_resolve(spec, error["properties"]["error"])["required"]) == {"code", "message"}
    for path, method, operation in _operations(spec):
        for status in ("4XX", "5XX"):
            content = operation["responses"][status]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, (path, method, status)


def test_the_rules_on_text_and_numbers_are_in_the_document(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["DocumentIn"]["properties"]["text"]["pattern"] == NOT_BLANK_PATTERN
    assert schemas["SearchRequest"]["properties"]["query"]["pattern"] == NOT_BLANK_PATTERN
    assert schemas["AnswerRequest"]["properties"]["question"]["pattern"] == NOT_BLANK_PATTERN
    k = schemas["AnswerRequest"]["properties"]["k"]["anyOf"][0]
    assert (k["minimum"], k["maximum"]) == (1, 50)  # not "ge"/"le", which no client reads
    files = schemas["Body_upload_files_v1_collections__collection__files_post"]["properties"]["files"]
    assert files["minItems"] == 1
    reference = {p["name"]: p["schema"] for p in spec["paths"]["/api/search"]["get"]["parameters"]}
    assert (
        reference["collection"]["anyOf"][0]["pattern"] == schemas["CollectionCreate"]["properties"]["name"]["pattern"]
    )


def test_the_not_blank_pattern_is_what_strip_keeps():
    pattern = re.compile(NOT_BLANK_PATTERN)
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code < 0xE000:
            continue
        c = chr(code)
        assert bool(pattern.search(c)) == bool(c.strip()), hex(code)
    # pydantic's validator (Rust regex) and the service (str.strip) agree too.
    for text in ("\u3000\x1c\x85 \t", "\ufeff", " x ", "\u200b"):
        try:
            DocumentIn.model_validate({"text": text})
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == bool(text.strip()), repr(text)


def test_a_whole_number_written_as_a_float_is_an_integer():
    # JSON Schema counts 10.0 as an integer; so does the server now.
    assert SearchRequest.model_validate_json('{"query": "x", "k": 10.0}').k == 10
    assert AnswerRequest.model_validate_json('{"question": "x", "k": 5.0}').k == 5
    for k in ("1.5", "true", '"10"', "1e300", "0.0"):
        with pytest.raises(ValidationError):
            SearchRequest.model_validate_json('{"query": "x", "k": ' + k + "}")


def test_a_405_names_every_method_of_its_path(app):
    client = TestClient(app, base_url="http://localhost")  # no lifespan: these requests never reach a route
    for method, path, allowed in (
        ("PUT", "/v1/collections", "GET, POST"),
        ("OPTIONS", "/v1/collections/notes", "GET, DELETE"),
        ("PATCH", "/v1/collections/notes/documents", "GET, POST"),
        ("PUT", "/v1/collections/notes/documents/a/b", "GET, DELETE"),
        ("GET", "/v1/collections/notes/search", "POST"),
    ):
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (method, path, r.headers.get("allow"))
        assert r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("depth", [990, 1000, 100_000])
def test_a_form_field_nested_past_the_json_parser_limit_is_invalid_input(depth):
    # Past about 1,000 levels json.loads raises RecursionError, which answered 500.
    nested = "[" * depth + "]" * depth
    for field, kind, value in (("metadata", dict, '{"x": ' + nested + "}"), ("ids", list, nested)):
        with pytest.raises(InvalidInput):
            _json_form(value, field, kind)
