"""The answer endpoint: DSPy program, LiteLLM path (against a fake
OpenAI-compatible server), streaming, refusal, and a missing LM.

The default offline LM (SmolLM2) is exercised in test_default_lm.py.
"""

from __future__ import annotations

import json
import logging

import dspy
import pytest

from app.answer.lm import _AnswerEnd, load_answer_lm
from app.answer.program import AnswerProgram, marked_citations, may_become_lead_in, strip_markers
from app.answer.service import AnswerService
from tests.answer.fake_openai import FakeOpenAIServer
from tests.conftest import RunningApp, make_settings

SECRET = "sk-test-secret-7f3a9"

DOCS = [
    {
        "id": "eiffel",
        "title": "Eiffel Tower",
        "text": "The Eiffel Tower is 330 metres tall. It stands in Paris on the Champ de Mars.",
    },
    {"id": "banana", "title": "Bananas", "text": "Bananas are rich in potassium. They grow in tropical climates."},
    {
        "id": "louvre",
        "title": "Louvre",
        "text": "The Louvre is the most visited art museum in the world. It is in Paris.",
    },
    {
        "id": "volcano",
        "title": "Volcanoes",
        "text": "A volcano is a rupture in the crust of a planet where lava escapes.",
    },
]


def parse_sse(text: str) -> list[tuple[str, object]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# -- the program on its own ---------------------------------------------------


def test_markers_are_parsed_and_removed():
    assert marked_citations("Paris [1]. Also [2, 3] and [2].") == [1, 2, 3]
    assert strip_markers("The answer to the question is: Paris [1] .") == "Paris."
    assert strip_markers("No markers here.") == "No markers here."
    # Loops and dangling announcements of small models are dropped.
    assert strip_markers("Exon definition:\n\nExon definition:\nAn exon is coded DNA.\nExon definition:") == (
        "Exon definition:\n\nAn exon is coded DNA."
    )
    assert strip_markers("Definition of X:") == "Definition of X:"
    # A stream holds its start only while it may still become a lead-in.
    assert may_become_lead_in("The answer") and may_become_lead_in("The answer to the question is")
    assert not may_become_lead_in("The Salvation") and not may_become_lead_in("The answer is: Paris")


def test_local_lm_stops_at_the_end_of_an_answer():
    # Two sentences, or a blank line after a paragraph with content, or a loop.
    assert _AnswerEnd.finished("Paris is big. It is old.", 2)
    assert _AnswerEnd.finished("Paris is the capital.\n\nMore", 2)
    assert _AnswerEnd.finished("X:\n\nX:\n\n", 2)
    # List markers end no sentence; a lead-in or a line ending in a colon is no content.
    assert not _AnswerEnd.finished("1. 1.", 2)
    assert not _AnswerEnd.finished("1. Active margins\n2.", 2)
    assert not _AnswerEnd.finished("The answer is:\n\n", 2)
    assert not _AnswerEnd.finished("Anthropological definition of environment:\n\nIt is the world. ", 2)
    assert _AnswerEnd.finished("1. Paris is big. It is old.", 2)


def test_program_through_litellm_against_a_fake_server(caplog):
    passages = ["The Eiffel Tower is 330 metres tall. It is in Paris.", "Bananas are rich in potassium."]
    with FakeOpenAIServer() as fake, caplog.at_level(logging.DEBUG):
        settings = make_settings_for_lm(fake)
        lm = load_answer_lm(settings)
        program = AnswerProgram()
        with dspy.context(lm=lm.lm):
            out = program(question="How tall is the Eiffel Tower?", passages=passages)
        streamed = list(lm.stream(program.messages("How tall is the Eiffel Tower?", passages)))
    assert out.answer == "The Eiffel Tower is 330 metres tall."
    assert [(c.index, c.source) for c in out.citations] == [(0, "model")]
    assert "".join(streamed) == "The Eiffel Tower is 330 metres tall. [1]" and len(streamed) > 3
    sent = fake.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["body"]["model"] == "fake-model" and sent["body"]["temperature"] == 0.0
    assert "[1] The Eiffel Tower" in sent["body"]["messages"][-1]["content"]
    assert fake.requests[-1]["body"]["stream"] is True
    assert SECRET not in caplog.text and SECRET not in repr(lm)


def test_wrong_model_citations_are_replaced_by_attribution():
    """A small LM marks the wrong passage: attribution (word overlap here,
    ColBERT MaxSim in the server) overrules it."""
    passages = ["Bananas are rich in potassium.", "The Eiffel Tower is in Paris."]

    def overlap(answer, texts):
        words = set(answer.lower().strip(".").split())
        return [len(words & set(t.lower().strip(".").split())) for t in texts]

    program = AnswerProgram(attribute=overlap)
    result = program.finish("The Eiffel Tower is in Paris.", [1], passages)
    assert [(c.index, c.source) for c in result.citations] == [(1, "attribution")]
    result = program.finish("The Eiffel Tower is in Paris.", [2], passages)
    assert [(c.index, c.source) for c in result.citations] == [(1, "model")]


def make_settings_for_lm(fake, **overrides):
    from app.settings import Settings

    return Settings(
        _env_file=None,
        answer_lm="openai/fake-model",
        answer_lm_base_url=fake.base_url,
        answer_lm_api_key=SECRET,
        **overrides,
    )


# -- the endpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
async def answer_app(tmp_path_factory, checkpoint_dir, shared_models_dir, fake_lm):
    running = RunningApp(
        make_settings(
            tmp_path_factory.mktemp("answer-data"),
            checkpoint_dir,
            models_dir=shared_models_dir,
            answer_lm="openai/fake-model",
            answer_lm_base_url=fake_lm.base_url,
            answer_lm_api_key=SECRET,
        )
    )
    client = await running.start()
    assert (await client.post("/v1/collections", json={"name": "facts"})).status_code == 201
    r = await client.post("/v1/collections/facts/documents", json={"documents": DOCS})
    assert r.status_code == 200, r.text
    yield running
    await running.stop()


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_answer_cites_the_passage_it_used(answer_app, fake_lm):
    client = answer_app.client
    r = await client.post("/v1/collections/facts/answer", json={"question": "How tall is the Eiffel Tower?", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "The Eiffel Tower is 330 metres tall."
    assert [c["document_id"] for c in body["citations"]] == ["eiffel"]
    assert body["citations"][0]["number"] == 1 and body["citations"][0]["source"] == "model"
    assert len(body["context"]) == 3 and body["context"][0]["document_id"] == "eiffel"
    report = body["hallucination"]
    assert report["label"] == "supported" and report["score"] >= report["threshold"]
    assert [s["text"] for s in report["sentences"]] == ["The Eiffel Tower is 330 metres tall."]
    assert body["model"] == "openai/fake-model"
    assert SECRET not in r.text
    # The prompt carried the retrieved passages, numbered, best first.
    prompt = fake_lm.requests[-1]["body"]["messages"][-1]["content"]
    assert "[1] Eiffel Tower: The Eiffel Tower is 330 metres tall." in prompt


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_answer_streams_tokens_then_citations_and_score(answer_app, fake_lm):
    client = answer_app.client
    copy_passage = fake_lm.reply
    # A lead-in, as small models write: held back and dropped from the stream, as from the answer.
    fake_lm.reply = lambda messages: (
        "The answer is: " + copy_passage(messages).replace("potassium.", "potassium. They grow in tropical climates.")
    )
    try:
        r = await client.post(
            "/v1/collections/facts/answer", json={"question": "What are bananas rich in?", "k": 2, "stream": True}
        )
    finally:
        fake_lm.reply = copy_passage
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    kinds = [e for e, _ in events]
    assert kinds[-3:] == ["citations", "hallucination", "done"]
    tokens = [d["text"] for e, d in events if e == "token"]
    assert len(tokens) > 3 and set(kinds[: len(tokens)]) == {"token"}
    assert "".join(tokens) == "Bananas are rich in potassium. They grow in tropical climates. [1]"
    done = events[-1][1]
    assert done["answer"] == "Bananas are rich in potassium. They grow in tropical climates."
    assert [c["document_id"] for c in done["citations"]] == ["banana"]
    assert events[-2][1] == done["hallucination"] and done["hallucination"]["label"] == "supported"


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_streamed_events_survive_unicode_line_separators(answer_app):
    # U+2028, U+2029 and U+0085 are line ends to str.splitlines (and to httpx's line reader):
    # every data line must still be one whole JSON document.
    question = "What are bananas\u2028rich in?\u0085 \u2029ok"
    r = await answer_app.client.post(
        "/v1/collections/facts/answer", json={"question": question, "k": 2, "stream": True}
    )
    assert r.status_code == 200
    r.content.decode("ascii")
    data = [json.loads(line[len("data: ") :]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1]["question"] == question


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_bad_answer_requests(answer_app):
    client = answer_app.client
    r = await client.post("/v1/collections/facts/answer", json={"question": ""})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = await client.post("/v1/collections/facts/answer", json={"question": "x", "k": 0})
    assert r.status_code == 422
    r = await client.post("/v1/collections/nope/answer", json={"question": "anything"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
    r = await client.post("/v1/collections/nope/answer", json={"question": "anything", "stream": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
    r = await client.post("/v1/collections/facts/answer", json={"question": "x", "filter": {"a": {"$regex": "."}}})
    assert r.status_code == 422


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_lone_surrogate_in_a_question_is_refused(answer_app):
    r = await answer_app.client.post(
        "/v1/collections/facts/answer",
        content=b'{"question": "\\ud800?"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_an_empty_answer_gets_a_note_and_no_support_label(answer_app, fake_lm):
    copy_passage = fake_lm.reply
    fake_lm.reply = lambda messages: " [1] "  # a marker and nothing else
    try:
        for stream in (False, True):
            r = await answer_app.client.post(
                "/v1/collections/facts/answer", json={"question": "How tall is the Eiffel Tower?", "stream": stream}
            )
            assert r.status_code == 200, r.text
            body = r.json() if not stream else parse_sse(r.text)[-1][1]
            assert body["answer"] == "" and body["hallucination"] is None and body["citations"] == []
            assert body["note"] == "the model gave no answer from these passages"
    finally:
        fake_lm.reply = copy_passage


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_unsupported_answers_are_flagged_or_refused(answer_app, fake_lm):
    """An LM that answers off the passages: flagged by default, refused
    (422, nothing streamed) when the setting says so."""
    client = answer_app.client
    settings = answer_app.app.state.answers.settings
    question = {"question": "How tall is the Eiffel Tower?", "k": 2}
    copy_passage = fake_lm.reply
    fake_lm.reply = lambda messages: (
        "Quantum chromodynamics describes the strong interaction between quarks and gluons."
    )
    try:
        r = await client.post("/v1/collections/facts/answer", json=question)
        assert r.status_code == 200, r.text
        assert r.json()["hallucination"]["label"] == "unsupported"
        assert r.json()["answer"].startswith("Quantum")

        settings.answer_unsupported = "refuse"
        r = await client.post("/v1/collections/facts/answer", json=question)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "answer_unsupported"
        assert error["details"]["hallucination"]["label"] == "unsupported"
        r = await client.post("/v1/collections/facts/answer", json={**question, "stream": True})
        assert r.status_code == 422 and "Quantum" not in r.text

        fake_lm.reply = copy_passage  # a supported answer still passes under refuse
        r = await client.post("/v1/collections/facts/answer", json=question)
        assert r.status_code == 200 and r.json()["hallucination"]["label"] == "supported"
    finally:
        fake_lm.reply = copy_passage
        settings.answer_unsupported = "flag"


@pytest.mark.slow  # the real checkpoint and the exported hallucination scorer
async def test_no_lm_gives_a_clear_error_and_search_still_works(answer_app, tmp_path):
    """An answer service whose LM cannot load, in place of the app's own."""
    state = answer_app.app.state
    working = state.answers
    broken = AnswerService(
        working.settings.model_copy(update={"answer_lm": "", "answer_lm_path": str(tmp_path / "no-such-model")}),
        state.service,
    )
    await broken.astart()
    state.answers = broken
    client = answer_app.client
    try:
        r = await client.post("/v1/collections/facts/answer", json={"question": "How tall is the Eiffel Tower?"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "answer_unavailable"
        assert "no-such-model" in r.json()["error"]["message"]
        r = await client.get("/ready")  # public: it names the failure, not its text (paths)
        assert r.status_code == 200 and r.json()["answers"]["state"] == "failed"
        assert str(tmp_path) not in r.text and r.json()["answers"]["error"].startswith("FileNotFoundError")
        r = await client.post("/v1/collections/facts/search", json={"query": "Eiffel Tower height", "k": 2})
        assert r.status_code == 200 and r.json()["results"][0]["document_id"] == "eiffel"
    finally:
        state.answers = working
        await broken.astop()


async def test_answers_retrieve_with_the_field_choice_and_cite_a_title_chunk_without_its_prefix(tmp_path):
    from app.engine.search import SearchHit
    from app.store.store import Hit

    def hit(field: str, text: str) -> SearchHit:
        return SearchHit(Hit(0, 0, 0, text, 0, len(text), None, None, "tea", "Green tea", {}, field), 1.0, 1)

    class RecordingSearch:
        def __init__(self) -> None:
            self.calls: list = []

        async def search(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return [hit("title", "Green tea"), hit("summary", "How it is made.")]

    from app.engine.retrieval import Retrieval

    search = RecordingSearch()
    answers = AnswerService(make_settings(tmp_path, tmp_path), search)  # type: ignore[arg-type]
    retrieval = Retrieval(mode="colbert", fields=["title", "summary"], field_weights={"title": 2})

    async def no_model() -> None:  # retrieval is what is tested here, not generation
        raise RuntimeError("retrieved; no model in this test")

    answers.ensure_loaded = no_model  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="retrieved"):
        await answers.answer("docs", "tea?", 3, retrieval)
    assert search.calls == [(("docs", "tea?", 3, retrieval), {})]
    hits = await search.search()
    assert answers._passages(hits) == ["Green tea", "Green tea: How it is made."]
    # The HTTP request's choices reach the searcher as that one value.
    from app.api.schemas import AnswerRequest

    body = AnswerRequest(question="tea?", mode="colbert", fields=["title", "summary"], field_weights={"title": 2})
    assert body.retrieval() == retrieval
