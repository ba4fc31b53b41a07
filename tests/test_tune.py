"""Tuning a checkpoint to a collection (app/tune.py, ``python -m app.cli tune``).

Pseudo-queries, the loss and the CLI's reading of the store run fast; the
training itself needs a real-shaped model: those tests use the default
checkpoint, with a few steps."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from app import cli
from app.ingest.chunking import Passage
from app.settings import Settings
from app.store.index_state import IndexStateStore
from app.store.schema import connect, initialise
from app.store.store import NewDocument, Store
from app.tune import (
    LINEAR_KEY,
    PseudoQuery,
    TuneConfig,
    TunedHead,
    TunePassage,
    TuningError,
    contrastive_loss,
    held_out_split,
    late_scores,
    pseudo_queries,
    sentence_query,
    split_sentences,
    title_query,
    tune,
    write_checkpoint,
)
from tests.fakes import FakeEncoder, FakeInMemoryBackend

PASSAGE = (
    "The violin has four strings tuned in perfect fifths. "
    "It is played with a bow made of horsehair. "
    "Stradivari built the most famous violins in Cremona."
)

# -- pseudo-queries -----------------------------------------------------------------


def test_sentences_split_at_sentence_ends_and_line_breaks():
    assert split_sentences("One two. Three four? Five!\nSix seven") == ["One two.", "Three four?", "Five!", "Six seven"]
    assert split_sentences("Pi is 3.14 exactly. e.g. not.") == ["Pi is 3.14 exactly. e.g. not."]


def test_a_sentence_is_drawn_against_the_rest_of_its_passage_with_the_title_before_it():
    query = sentence_query(TunePassage(PASSAGE, "Violins", "doc-1"), random.Random(0))
    assert query is not None and query.kind == "sentence" and query.group == "doc-1"
    assert query.query in split_sentences(PASSAGE)
    assert query.query not in query.positive
    assert query.positive.startswith("Violins\n")
    rest = [s for s in split_sentences(PASSAGE) if s != query.query]
    assert query.positive == "Violins\n" + " ".join(rest)


def test_a_title_is_drawn_against_its_body_without_the_title():
    query = title_query(TunePassage(PASSAGE, "The violin family", "doc-1"))
    assert query == PseudoQuery("The violin family", PASSAGE, "doc-1", "title")


@pytest.mark.parametrize(
    "passage",
    [
        TunePassage("A single sentence of a passage that goes on for quite a few words."),
        TunePassage("Too short. Both of them."),
        TunePassage("Query sentence with five words. Rest too short here."),
        TunePassage("Hi. Ok. Yes."),
    ],
)
def test_passages_too_short_for_a_query_and_a_passage_are_skipped(passage):
    assert sentence_query(passage, random.Random(0)) is None


def test_short_titles_and_bodies_give_no_title_query():
    assert title_query(TunePassage(PASSAGE, "Violins", "d")) is None  # one word
    assert title_query(TunePassage("Four strings only.", "The violin family", "d")) is None
    assert title_query(TunePassage(PASSAGE, None, "d")) is None


def test_pseudo_queries_take_one_title_per_document_and_are_deterministic():
    passages = [
        TunePassage(PASSAGE, "The violin family", "a"),
        TunePassage(PASSAGE.replace("violin", "viola"), "The violin family", "a"),  # a second chunk of "a"
        TunePassage(PASSAGE.replace("violin", "cello"), None, "b"),
        TunePassage("Too short.", "A titled stub", "c"),
    ]
    queries = pseudo_queries(passages, seed=3)
    assert sorted((q.group, q.kind) for q in queries) == [
        ("a", "sentence"),
        ("a", "sentence"),
        ("a", "title"),
        ("b", "sentence"),
    ]
    assert pseudo_queries(passages, seed=3) == queries
    assert len(pseudo_queries(passages, seed=3, limit=2)) == 2


def test_held_out_queries_come_from_documents_training_never_sees():
    queries = [PseudoQuery(f"q{i}", f"p{i}", f"g{i % 7}", "sentence") for i in range(40)]
    train, held = held_out_split(queries, 10, seed=1)
    assert len(train) + len(held) == 40 and len(held) >= 10
    assert not {q.group for q in train} & {q.group for q in held}


# -- the loss -------------------------------------------------------------------------


def test_late_scores_average_each_query_tokens_best_match_over_kept_tokens():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one query, two tokens
    d = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]]])
    q_kept = torch.tensor([[True, True]])
    d_kept = torch.tensor([[True, True], [True, False]])  # the second passage's second token is no token
    assert late_scores(q, q_kept, d, d_kept).tolist() == [[1.0, 0.5]]


def test_the_loss_ignores_passages_that_are_no_negatives():
    scores = torch.tensor([[1.0, 2.0, 0.0]])
    labels = torch.tensor([0])
    none = torch.zeros(1, 3, dtype=torch.bool)
    masked = torch.tensor([[False, True, False]])
    plain = contrastive_loss(scores, labels, none, 1.0)
    assert plain.item() == pytest.approx(-torch.log_softmax(scores, 1)[0, 0].item())
    assert contrastive_loss(scores, labels, masked, 1.0).item() == pytest.approx(
        -torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0].item()
    )
    own_kept = contrastive_loss(scores, labels, torch.ones(1, 3, dtype=torch.bool), 1.0)
    assert own_kept.item() == pytest.approx(0.0)  # only its own passage left


def test_the_head_keeps_vectors_unit_length_and_zero_where_no_token():
    head = TunedHead(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    states = torch.randn(2, 3, 6)
    kept = torch.tensor([[True, True, False], [True, False, False]])
    out = head(states, torch.ones(2, 3, dtype=torch.bool), kept)
    assert out.shape == (2, 3, 4)
    assert torch.allclose(out[kept].norm(dim=-1), torch.ones(3))
    assert out[~kept].abs().max() == 0


def test_a_bad_configuration_is_refused():
    for bad in (TuneConfig(steps=0), TuneConfig(batch=1), TuneConfig(layers=-1), TuneConfig(temperature=0)):
        with pytest.raises(TuningError):
            bad.check()


# -- the CLI over the store -------------------------------------------------------------


def document(external_id: str, *texts: str, title: str | None = None) -> NewDocument:
    return NewDocument(external_id, title, {}, f"{external_id}:{texts}", [Passage(t, 0, len(t)) for t in texts])


async def test_the_cli_reads_live_passages_with_their_titles_and_documents(tmp_path):
    from app.engine.writer import IndexWriter

    settings = Settings(_env_file=None, data_dir=tmp_path)
    store = Store(settings.database_path)
    await store.open()
    conn = connect(settings.database_path)
    try:
        c = (await store.create_collection("docs", None)).id
        await store.insert_pending(c, [document("a", "red fox", "blue whale", title="Animals"), document("b", "oak")])
        writer = IndexWriter(settings, FakeEncoder(), FakeInMemoryBackend())
        writer._stop.set()
        writer.step(IndexStateStore(conn))
        await store.insert_pending(c, [document("c", "still pending")])
        await store.create_collection("other", None)
    finally:
        conn.close()
    passages = cli.collection_passages(settings, "docs")
    await store.close()
    assert [(p.text, p.title) for p in passages] == [("red fox", "Animals"), ("blue whale", "Animals"), ("oak", None)]
    assert passages[0].group == passages[1].group != passages[2].group
    assert cli.collection_passages(settings, "other") == []
    sampled = cli.collection_passages(settings, "docs", sample=2, seed=1)
    assert len(sampled) == 2 and set(sampled) < set(passages)
    assert cli.collection_passages(settings, "docs", sample=2, seed=1) == sampled


def test_the_cli_refuses_an_unknown_collection(tmp_path, capsys):
    assert cli.main(["tune", "--collection", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "collection 'nope' does not exist (no server database" in capsys.readouterr().err
    initialise(Settings(_env_file=None, data_dir=tmp_path).database_path)
    assert cli.main(["tune", "--collection", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "error: collection 'nope' does not exist" in capsys.readouterr().err


def test_the_cli_refuses_a_bad_configuration_before_reading_anything(tmp_path, capsys):
    assert cli.main(["tune", "--collection", "docs", "--batch", "1", "--data-dir", str(tmp_path)]) == 2
    assert "batches of at least 2" in capsys.readouterr().err


# -- training with the real model --------------------------------------------------------

TOPICS = [
    ("volcano", "lava", "eruption"),
    ("violin", "bow", "strings"),
    ("glacier", "ice", "valley"),
    ("bakery", "bread", "oven"),
    ("satellite", "orbit", "antenna"),
    ("vaccine", "immune", "dose"),
    ("chess", "bishop", "opening"),
    ("tax", "deduction", "income"),
    ("coral", "reef", "bleaching"),
    ("bicycle", "chain", "gear"),
    ("telescope", "mirror", "galaxy"),
    ("mortgage", "interest", "lender"),
    ("espresso", "grind", "crema"),
    ("earthquake", "fault", "magnitude"),
    ("compiler", "parser", "bytecode"),
    ("honeybee", "hive", "pollen"),
]


def topic_passages() -> list[TunePassage]:
    out = []
    for n, (topic, a, b) in enumerate(TOPICS):
        for part in range(2):
            text = (
                f"The {topic} is the subject of this note number {part}. "
                f"Experts who study the {topic} talk about {a} every day. "
                f"Without {b} there would be little to say about any {topic} at all."
            )
            out.append(TunePassage(text, f"All about the {topic}" if part == 0 else None, f"doc-{n}-{part}"))
    return out


@pytest.fixture(scope="module")
def encoder(checkpoint_dir):
    from app.engine.encoder import ColBERTEncoder
    from colbert_patches.model_loading import EncoderOptions

    return ColBERTEncoder(str(checkpoint_dir), EncoderOptions.for_checkpoint(str(checkpoint_dir)))


SMALL = TuneConfig(steps=12, batch=8, max_held_out=8, learning_rate=3e-3)


@pytest.mark.slow
def test_token_states_are_what_the_served_vectors_project(encoder):
    texts = ["A passage, about thermometers. Fahrenheit built one in 1714!", "short"]
    weight = encoder.checkpoint.linear.weight.detach().float()
    states = encoder.token_states(texts)
    served = encoder.encode_passages(texts)
    projected = torch.cat([torch.nn.functional.normalize(s.float() @ weight.T, dim=-1) for s in states.states])
    assert [s.size(0) for s in states.states] == served.doclens
    assert (projected - served.embs.float()).abs().max() < 2e-3
    queries = ["what is a thermometer?", "hi"]
    q_states = encoder.token_states(queries, queries=True)
    Q = encoder.encode_queries(queries)
    for row, s in enumerate(q_states.states):
        assert (torch.nn.functional.normalize(s.float() @ weight.T, dim=-1) - Q[row, : s.size(0)]).abs().max() < 2e-3
    # The states entering the top layer, through a copy of it, give the same vectors.
    layered = encoder.token_states(texts, layer=len(encoder.checkpoint.bert.encoder.layer) - 1)
    head = TunedHead(weight, encoder.checkpoint.bert.encoder.layer[-1:])
    for n, s in enumerate(layered.states):
        with torch.no_grad():
            out = head(s[None].float(), layered.attention[n][None], layered.kept[n][None])[0]
        assert (out[layered.kept[n]] - projected[sum(served.doclens[:n]) :][: served.doclens[n]]).abs().max() < 2e-3


@pytest.mark.slow
def test_tuning_lowers_the_loss_and_is_deterministic_with_a_seed(encoder):
    passages = topic_passages()
    first = tune(encoder, passages, SMALL)
    assert first.queries["held_out"] >= 8 and first.queries["title"] > 0
    assert first.held_out_after < first.held_out_before
    assert first.held_out_after == pytest.approx(min(loss for _, loss in first.held_out_checks), abs=1e-4)
    assert first.best_step > 0 and first.held_out_checks[0][0] == 0 and first.held_out_checks[-1][0] == SMALL.steps
    steps = first.train_losses
    assert sum(steps[-4:]) / 4 < sum(steps[:4]) / 4
    again = tune(encoder, passages, SMALL)
    assert torch.equal(again.weights[LINEAR_KEY], first.weights[LINEAR_KEY])
    assert again.train_losses == first.train_losses
    other = tune(encoder, passages, TuneConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not torch.equal(other.weights[LINEAR_KEY], first.weights[LINEAR_KEY])
    # The encoder itself is untouched.
    assert torch.equal(
        encoder.checkpoint.linear.weight, load_file(f"{encoder.checkpoint_name}/model.safetensors")[LINEAR_KEY]
    )


@pytest.mark.slow
def test_the_written_checkpoint_loads_and_differs_only_in_its_projection(encoder, checkpoint_dir, tmp_path):
    from app.engine.encoder import ColBERTEncoder
    from colbert_patches.model_loading import EncoderOptions

    result = tune(encoder, topic_passages(), TuneConfig(**{**SMALL.__dict__, "steps": 3}))
    dest = write_checkpoint(
        checkpoint_dir, tmp_path / "tuned", result.weights, result.provenance(str(checkpoint_dir), "topics")
    )
    base_files = {p.name for p in checkpoint_dir.iterdir()}
    assert {p.name for p in dest.iterdir()} == base_files
    for name in base_files - {"model.safetensors", "colbert_server.json"}:
        assert (dest / name).read_bytes() == (checkpoint_dir / name).read_bytes(), name
    before, after = load_file(str(checkpoint_dir / "model.safetensors")), load_file(str(dest / "model.safetensors"))
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [LINEAR_KEY]
    assert torch.equal(after[LINEAR_KEY], result.weights[LINEAR_KEY])
    options = json.loads((dest / "colbert_server.json").read_text())
    base_options = json.loads((checkpoint_dir / "colbert_server.json").read_text())
    assert {k: v for k, v in options.items() if k != "tuning"} == base_options
    assert options["tuning"]["collection"] == "topics" and options["tuning"]["steps"] == 3
    assert options["tuning"]["base_checkpoint"] == str(checkpoint_dir)
    assert options["tuning"]["loss"]["held_out_after"] == pytest.approx(result.held_out_after, abs=1e-4)

    tuned = ColBERTEncoder(str(dest), EncoderOptions.for_checkpoint(str(dest)))
    assert tuned.dense_dim == encoder.dense_dim and tuned.options == encoder.options
    query = "who built famous violins"
    state = encoder.token_states([query], queries=True).states[0].float()
    expected = torch.nn.functional.normalize(state @ result.weights[LINEAR_KEY].T, dim=-1)
    assert (tuned.encode_queries([query])[0, : state.size(0)] - expected).abs().max() < 2e-3
    with pytest.raises(TuningError, match="exists"):
        write_checkpoint(checkpoint_dir, dest, result.weights, {})


@pytest.mark.slow
def test_tuning_the_top_layer_writes_it_beside_the_projection(encoder, checkpoint_dir, tmp_path):
    result = tune(encoder, topic_passages(), TuneConfig(**{**SMALL.__dict__, "steps": 2, "layers": 1}))
    top = len(encoder.checkpoint.bert.encoder.layer) - 1
    assert LINEAR_KEY in result.weights
    assert {k.split(".")[3] for k in result.weights if k != LINEAR_KEY} == {str(top)}
    dest = write_checkpoint(checkpoint_dir, tmp_path / "tuned", result.weights, {})
    before, after = load_file(str(checkpoint_dir / "model.safetensors")), load_file(str(dest / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert LINEAR_KEY in changed and all(k == LINEAR_KEY or f"layer.{top}." in k for k in changed)


@pytest.mark.slow
def test_too_few_pseudo_queries_are_refused(encoder):
    with pytest.raises(TuningError, match="pseudo-queries"):
        tune(encoder, topic_passages()[:3], SMALL)


@pytest.mark.slow
async def test_a_tuning_job_writes_a_checkpoint_and_the_collection_is_reindexed_with_it(
    tmp_path, checkpoint_dir, capsys
):
    """The whole loop through HTTP, with the real model: a tuning job (its
    own process, the CLI) writes a checkpoint under the data directory, the
    collection is re-indexed with it while searched, and its queries are
    then encoded with it. The CLI, run by hand beside the server, writes
    another and leaves the collection as it is."""
    import asyncio
    import time

    from tests.conftest import RunningApp, make_settings

    data_dir = tmp_path / "data"
    running = RunningApp(make_settings(data_dir, checkpoint_dir))
    client = await running.start()
    try:
        assert (await client.post("/v1/collections", json={"name": "topics"})).status_code == 201
        docs = [{"id": p.group, "text": p.text, **({"title": p.title} if p.title else {})} for p in topic_passages()]
        r = await client.post("/v1/collections/topics/documents", json={"documents": docs, "wait": True})
        assert r.status_code == 200, r.text

        async def search_finds_volcano() -> None:
            r = await client.post("/v1/collections/topics/search", json={"query": "lava eruption", "k": 1})
            assert r.status_code == 200 and "volcano" in r.json()["results"][0]["text"], r.text

        body = {"steps": 3, "max_queries": 32, "seed": 1, "reindex": True}
        r = await client.post("/v1/collections/topics/tune", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "running" and job["config"]["steps"] == 3
        deadline = time.monotonic() + 300
        while job["state"] == "running":
            assert time.monotonic() < deadline, job
            await search_finds_volcano()  # the server searches on meanwhile
            await asyncio.sleep(0.5)
            job = (await client.get(f"/v1/collections/topics/tune/{job['id']}")).json()
        assert job["state"] == "done", job
        figures = job["result"]
        assert figures["held_out_before"] > 0 and figures["held_out_after"] <= figures["held_out_before"]
        assert figures["steps"] == 3 and figures["passages"] == len(docs)
        name = job["checkpoint"]
        assert (data_dir / "checkpoints" / name / "model.safetensors").is_file()
        listed = (await client.get("/v1/checkpoints")).json()["checkpoints"]
        assert [c["name"] for c in listed] == [name] and listed[0]["tuning"]["collection"] == "topics"

        # The job asked for the re-index: the collection moves to the new checkpoint.
        while (col := (await client.get("/v1/collections/topics")).json())["checkpoint"] != name:
            assert time.monotonic() < deadline, col
            assert col["reindex"] is None or col["reindex"]["state"] == "running", col
            await search_finds_volcano()
            await asyncio.sleep(0.2)
        assert col["reindex"] is None
        await search_finds_volcano()
        assert (await client.post("/v1/collections/topics/tune", json={"steps": 0})).status_code == 422
        r = await client.get("/v1/collections/topics/tune/" + "0" * 32)
        assert r.status_code == 404

        # The CLI beside the running server: a checkpoint of its own, nothing re-indexed.
        out = tmp_path / "tuned"
        argv = ["tune", "--collection", "topics", "--steps", "3", "--batch", "8", "--data-dir", str(data_dir)]
        code = cli.main([*argv, "--out", str(out)])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "held-out pseudo-query loss:" in printed.out and f"checkpoint written to {out}" in printed.out
        assert "is not re-indexed" in printed.out
        provenance = json.loads((out / "colbert_server.json").read_text())["tuning"]
        assert provenance["collection"] == "topics" and provenance["base_checkpoint"] == str(
            data_dir / "checkpoints" / name
        )
        assert (await client.get("/v1/collections/topics")).json()["checkpoint"] == name
        assert cli.main([*argv, "--out", str(out)]) == 2
        assert "exists" in capsys.readouterr().err
    finally:
        await running.stop()


def test_hard_negatives_are_near_passages_of_other_documents():
    from app.tune import States, _Data, _mine_hard_negatives

    basis = torch.eye(4, dtype=torch.float16)
    # Documents a, b, c; a's query looks most like b's passage, then like its own.
    docs = States([basis[0:1], basis[1:2], basis[2:3]], None, None)
    queries = [PseudoQuery("qa", "pa", "a", "sentence"), PseudoQuery("qb", "pb", "b", "sentence")]
    query_states = States([(basis[1] * 2 + basis[0]).unsqueeze(0), basis[2:3]], None, None)
    data = _Data(queries, query_states, docs, ["a", "b", "c"])
    data.doc_of = [0, 1]
    _mine_hard_negatives(data, [0, 1], count=1, depth=1, seed=0)
    assert data.hard == [[1], [0]]  # b for a's query; for b's, the only other candidate
