"""The index-backend contract (app/engine/backend.py), run against every
implementation: PLAID in its exact tier, PLAID past its first codec (its
background steps run at once), Qdrant (qdrant-client's local mode in memory
and in a directory; a real server too when QDRANT_URL is set), and the
in-memory fake. No model: passages are encoded by the fake encoder."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from app.engine.backend import PassageBatch, SearchRequest
from app.engine.plaid import PlaidBackend, PlaidConfig
from app.engine.qdrant import QdrantBackend, QdrantConfig
from tests.fakes import FakeEncoder, FakeInMemoryBackend

ANIMALS = [
    "aardvark", "bison", "camel", "dingo", "eland", "ferret", "gecko", "heron", "ibis", "jackal",
    "koala", "lemur", "moose", "newt", "otter", "panda", "quail", "raven", "sloth", "tapir",
]  # fmt: skip
COLORS = ["red", "green", "blue", "amber", "violet", "grey", "ochre", "teal"]
TEXTS = [f"the {ANIMALS[i % 20]} is {COLORS[i % 8]} and number {i} of the herd" for i in range(160)]
C = 1  # collection id


def settle(backend: PlaidBackend, collection_id: int, name: str, generation: int, dead_pids=None) -> str:
    """Run the background steps a manifest makes due (the first codec,
    compressing the exact tier, merges) until none is left, each folded into
    ``generation``: what a server shows once its maintainer has caught up."""
    dead = torch.empty(0, dtype=torch.int64) if dead_pids is None else dead_pids
    while (task := backend.plan(collection_id, name, dead)) is not None:
        change = backend.prepare(task, dead)
        applied = backend.apply(collection_id, name, generation, change)
        assert applied is not None
        name = applied
        dead = dead[~torch.isin(dead, change.dropped_pids)]  # purged: no longer in any segment
    return name


class SettledPlaidBackend(PlaidBackend):
    """PLAID whose every write is followed at once by :func:`settle`
    (no maintainer thread in these tests)."""

    def write(self, collection_id, base, generation, batch):
        return settle(self, collection_id, super().write(collection_id, base, generation, batch), generation)


def plaid(tmp_path, exact_max: int, settled: bool = False) -> PlaidBackend:
    encoder = FakeEncoder()
    return (SettledPlaidBackend if settled else PlaidBackend)(
        PlaidConfig(
            index_root=tmp_path / "indexes",
            dim=encoder.dim,
            nbits=encoder.nbits,
            exact_search_max_passages=exact_max,
            kmeans_niters=4,
            rebuild_deleted_share=0.3,
            rebuild_growth_factor=3.0,
        )
    )


def qdrant(tmp_path, where: str) -> QdrantBackend:
    """Qdrant in memory, in a directory, or the server at QDRANT_URL (each
    test's collections under a prefix of their own, dropped after it)."""
    encoder = FakeEncoder()
    options: dict = {"path": tmp_path / "qdrant"} if where == "path" else {}
    if where == "server":
        options = {"url": os.environ["QDRANT_URL"], "api_key": os.environ.get("QDRANT_API_KEY", "")}
    prefix = f"contract{uuid.uuid4().hex[:8]}"
    return QdrantBackend(QdrantConfig(dim=encoder.dim, dense_dim=encoder.dense_dim, prefix=prefix, **options))


QDRANT_SERVER = pytest.param(
    "qdrant-server", marks=pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="QDRANT_URL is not set")
)


@pytest.fixture(params=["plaid-exact", "plaid-built", "qdrant-memory", "qdrant-path", QDRANT_SERVER, "fake-in-memory"])
def backend(request, tmp_path):
    if request.param == "plaid-exact":
        yield plaid(tmp_path, exact_max=10_000)
    elif request.param == "plaid-built":
        yield plaid(tmp_path, exact_max=20, settled=True)  # past 20 passages: a codec, segments compressed
    elif request.param.startswith("qdrant"):
        b = qdrant(tmp_path, request.param.removeprefix("qdrant-"))
        yield b
        if not b.closed:  # (a restart test closed it)
            b.drop(C)
            b.close()
    else:
        yield FakeInMemoryBackend()


ENCODER = FakeEncoder()


def batch(first: int, texts: list[str], dense: bool = True) -> PassageBatch:
    encoded = ENCODER.encode_passages(texts)
    pids = torch.arange(first, first + len(texts), dtype=torch.int64)
    doclens = torch.tensor(encoded.doclens, dtype=torch.int64)
    return PassageBatch(pids, encoded.embs, doclens, encoded.dense if dense else None)


def dense_search(snapshot, query: str, k: int = 5, alive=None, allowed=None) -> list[int]:
    result = snapshot.dense_search(ENCODER.encode_query(query)[1], k, alive, allowed)
    assert len(result.passage_ids) == len(result.scores)
    assert result.scores == sorted(result.scores, reverse=True)
    return result.passage_ids


def search(snapshot, query: str, k: int = 5, alive=None, allowed=None) -> list[int]:
    Q = ENCODER.encode_queries([query])
    result = snapshot.search(Q, SearchRequest(k), alive, allowed)
    assert len(result.passage_ids) == len(result.scores)
    assert result.scores == sorted(result.scores, reverse=True)
    return result.passage_ids


def commit(backend, texts_from: int, texts_to: int, base: str | None, generation: int) -> str:
    name = backend.write(C, base, generation, batch(texts_from, TEXTS[texts_from:texts_to]))
    backend.release(C, [name, base])
    return name


def test_an_empty_collection_finds_nothing(backend):
    snapshot = backend.load(C, 0, None)
    assert snapshot.num_passages == 0
    assert search(snapshot, "the otter") == []
    assert backend.stats(C, None).passages == 0


def test_written_passages_are_found_best_first(backend):
    name = commit(backend, 0, 100, None, 1)
    snapshot = backend.load(C, 1, name)
    assert snapshot.num_passages == 100
    assert backend.stats(C, name).passages == 100
    hits = search(snapshot, "the otter is ochre number 94", k=10)
    assert len(hits) == 10
    assert hits[0] == 94
    assert set(hits) <= set(range(100))


def test_appends_accumulate_and_old_snapshots_do_not_change(backend):
    first = commit(backend, 0, 10, None, 1)
    old = backend.load(C, 1, first)
    second = commit(backend, 10, 40, first, 2)
    new = backend.load(C, 2, second, previous=old)
    assert new.num_passages == 40
    assert search(new, "the moose is grey number 32", k=3)[0] == 32
    assert old.num_passages == 10
    assert max(search(old, "the moose is grey number 32", k=10)) < 10


def test_many_small_commits_stay_searchable(backend):
    name, generation = None, 0
    for start in range(0, 60, 3):
        generation += 1
        name = commit(backend, start, start + 3, name, generation)
    snapshot = backend.load(C, generation, name)
    assert snapshot.num_passages == 60
    for i in (0, 29, 59):
        assert search(snapshot, TEXTS[i], k=3)[0] == i


def test_deleted_passages_are_never_returned_and_k_still_comes_back(backend):
    name = commit(backend, 0, 80, None, 1)
    snapshot = backend.load(C, 1, name)
    assert snapshot.deleted_mask(torch.empty(0, dtype=torch.int64)) is None
    dead = torch.tensor([i for i in range(80) if TEXTS[i].startswith("the otter")], dtype=torch.int64)
    alive = snapshot.deleted_mask(dead)
    hits = search(snapshot, "the otter is ochre", k=10, alive=alive)
    assert len(hits) == 10
    assert not set(hits) & set(dead.tolist())


def test_an_allowed_set_restricts_results(backend):
    name = commit(backend, 0, 120, None, 1)
    snapshot = backend.load(C, 1, name)
    allowed = torch.tensor([3, 50, 77, 101, 119], dtype=torch.int64)
    hits = search(snapshot, "the panda is teal", k=10, allowed=allowed)
    assert sorted(hits) == allowed.tolist()  # all of them: fewer than k exist
    dead = torch.tensor([50], dtype=torch.int64)
    hits = search(snapshot, "the panda is teal", k=10, alive=snapshot.deleted_mask(dead), allowed=allowed)
    assert sorted(hits) == [3, 77, 101, 119]


def maintain(backend, name: str, generation: int, dead: torch.Tensor) -> tuple[str, int, set[int]]:
    """Run background steps until the backend plans none (as the maintainer
    and the writer would): (manifest, generation, passage ids dropped)."""
    dropped: set[int] = set()
    for _ in range(50):
        task = backend.plan(C, name, dead)
        if task is None:
            return name, generation, dropped
        change = backend.prepare(task, dead)
        applied = backend.apply(C, name, generation + 1, change)
        assert applied is not None
        backend.release(C, [applied, name])
        name, generation = applied, generation + 1
        dropped |= set(change.dropped_pids.tolist())
        dead = dead[~torch.isin(dead, change.dropped_pids)]  # the store purges them in the same commit
    raise AssertionError("maintenance never settles")


def test_maintenance_drops_tombstones_and_keeps_results(backend):
    name = commit(backend, 0, 60, None, 1)
    dead = torch.tensor([i for i in range(60) if i % 2], dtype=torch.int64)
    before = backend.load(C, 1, name)
    Q = ENCODER.encode_queries(["the eland is red and number 24 of the herd"])
    expected = before.search(Q, SearchRequest(10), before.deleted_mask(dead))
    assert backend.plan(C, name, torch.empty(0, dtype=torch.int64)) is None  # nothing to do without deletes
    name, generation, dropped = maintain(backend, name, 1, dead)
    assert dropped == set(dead.tolist())
    snapshot = backend.load(C, generation, name)
    assert snapshot.num_passages == 30
    assert backend.stats(C, name).passages == 30
    after = snapshot.search(Q, SearchRequest(10))
    assert after.scores == pytest.approx(expected.scores, abs=1e-4)  # ties may swap ids, scores may not
    assert 24 in after.passage_ids[:2] and 24 in expected.passage_ids[:2]
    assert set(after.passage_ids) <= set(range(0, 60, 2))


def test_a_step_prepared_on_an_older_generation_carries_later_commits_over(backend):
    name = commit(backend, 0, 60, None, 1)
    dead = torch.tensor(list(range(0, 40)), dtype=torch.int64)
    task = backend.plan(C, name, dead)
    assert task is not None
    change = backend.prepare(task, dead)
    later = commit(backend, 60, 70, name, 2)  # a commit lands while the step is prepared
    applied = backend.apply(C, later, 3, change)
    assert applied is not None
    backend.release(C, [applied, later])
    snapshot = backend.load(C, 3, applied)
    assert snapshot.num_passages == 30  # 20 survivors of the first 60, and the 10 committed meanwhile
    assert search(snapshot, TEXTS[65], k=1) == [65]
    assert search(snapshot, TEXTS[45], k=1) == [45]


def test_released_generations_are_gone_and_recover_drops_uncommitted_ones(backend):
    first = commit(backend, 0, 10, None, 1)
    second = commit(backend, 10, 20, first, 2)
    third = commit(backend, 20, 30, second, 3)  # keeps the second and third
    assert backend.load(C, 2, second).num_passages == 20
    uncommitted = backend.write(C, third, 4, batch(30, TEXTS[30:40]))
    backend.recover({C: [third]})
    assert backend.load(C, 3, third).num_passages == 30
    with pytest.raises(FileNotFoundError):
        backend.load(C, 4, uncommitted)
    fifth = backend.write(C, third, 5, batch(30, TEXTS[30:35]))
    backend.release(C, [fifth])  # nothing of the earlier generations is kept
    with pytest.raises(FileNotFoundError):
        backend.load(C, 3, third)
    assert backend.load(C, 5, fifth).num_passages == 35
    backend.drop(C)
    with pytest.raises(FileNotFoundError):
        backend.load(C, 5, fifth)


def test_dense_vectors_rank_passages_and_score_any_given_ones(backend):
    name = commit(backend, 0, 100, None, 1)
    snapshot = backend.load(C, 1, name)
    q = ENCODER.encode_query("the otter is ochre number 94")[1]
    expected = ENCODER.encode_passages([TEXTS[i] for i in range(100)]).dense.float() @ q.reshape(-1)
    hits = dense_search(snapshot, "the otter is ochre number 94", k=10)
    assert hits == expected.topk(10).indices.tolist()
    pids = torch.tensor([94, 3, 250, 40], dtype=torch.int64)  # 250: not in this generation
    scores = snapshot.dense_scores(q, pids)
    assert scores[[0, 1, 3]].tolist() == pytest.approx(expected[[94, 3, 40]].tolist(), abs=2e-3)
    assert torch.isnan(scores[2])
    dead = torch.tensor([94], dtype=torch.int64)
    allowed = torch.tensor([3, 40, 94], dtype=torch.int64)
    alive = snapshot.deleted_mask(dead)
    hits = dense_search(snapshot, "the otter is ochre number 94", k=10, alive=alive, allowed=allowed)
    assert hits == sorted([3, 40], key=lambda p: -float(expected[p]))


def test_dense_vectors_survive_maintenance_and_passages_without_them_are_not_ranked(backend):
    first = backend.write(C, None, 1, batch(0, TEXTS[:40], dense=False))  # written by a checkpoint without one
    name = backend.write(C, first, 2, batch(40, TEXTS[40:100]))
    backend.release(C, [name])
    dead = torch.tensor(list(range(40, 100, 3)), dtype=torch.int64)
    before = backend.load(C, 2, name)
    query = "the koala is ochre and number 70 of the herd"
    alive = before.deleted_mask(dead)
    expected = dense_search(before, query, k=10, alive=alive)
    assert min(expected) >= 40 and not set(expected) & set(dead.tolist())
    name, generation, dropped = maintain(backend, name, 2, dead)
    after = backend.load(C, generation, name)
    q = ENCODER.encode_query(query)[1]
    still_dead = torch.tensor(sorted(set(dead.tolist()) - dropped), dtype=torch.int64)
    assert dense_search(after, query, k=10, alive=after.deleted_mask(still_dead))[:3] == expected[:3]
    kept = torch.tensor([p for p in range(40, 100) if p not in set(dead.tolist())])
    assert after.dense_scores(q, kept).tolist() == pytest.approx(before.dense_scores(q, kept).tolist(), abs=1e-3)
    old = after.dense_scores(q, torch.tensor([5]))
    assert torch.isnan(old[0]) or float(old[0]) == 0.0  # no vector: never a positive cosine


def test_a_retried_write_leaves_no_duplicates(backend):
    base = commit(backend, 0, 30, None, 1)
    again = batch(30, TEXTS[30:40])
    backend.write(C, base, 2, again)  # its commit failed: the writer writes it again
    name = backend.write(C, base, 2, again)
    backend.release(C, [name, base])
    snapshot = backend.load(C, 2, name)
    assert snapshot.num_passages == 40
    hits = search(snapshot, TEXTS[35], k=40)
    assert len(hits) == len(set(hits)) == 40
    assert hits[0] == 35


def test_first_stage_hints_find_what_maxsim_alone_finds(backend):
    """With the query's dense vector and words (a backend may gather MaxSim's
    candidates from them), the best hits and their scores are MaxSim's."""
    name = commit(backend, 0, 120, None, 1)
    snapshot = backend.load(C, 1, name)
    dead = torch.tensor([7, 27], dtype=torch.int64)
    alive = snapshot.deleted_mask(dead)
    for query in ("the otter is ochre number 94", "the heron is amber and number 7 of the herd", "camel"):
        Q, q = ENCODER.encode_query(query)
        plain = snapshot.search(ENCODER.encode_queries([query]), SearchRequest(5), alive)
        hinted = snapshot.search(ENCODER.encode_queries([query]), SearchRequest(5, dense=q, text=query), alive)
        assert hinted.passage_ids[:1] == plain.passage_ids[:1]
        assert hinted.scores == pytest.approx(plain.scores, abs=1e-3)
        assert not set(hinted.passage_ids) & {7, 27}
    allowed = torch.tensor([3, 50, 119], dtype=torch.int64)  # few allowed, none near the query's words
    Q, q = ENCODER.encode_query("the otter is ochre number 94")
    hinted = snapshot.search(Q, SearchRequest(5, dense=q, text="zebra"), alive, allowed)
    assert sorted(hinted.passage_ids) == [3, 50, 119]


def reopened(backend, tmp_path):
    """The same storage opened by a new backend (a restarted server), or None
    for a backend that keeps nothing past its process."""
    if isinstance(backend, PlaidBackend):
        return type(backend)(backend.config)
    if isinstance(backend, QdrantBackend) and backend.config.path is not None:
        backend.close()
        return QdrantBackend(backend.config)
    if isinstance(backend, QdrantBackend) and backend.config.url:
        return QdrantBackend(backend.config)
    return None


def test_committed_generations_survive_a_restart(backend, tmp_path):
    first = commit(backend, 0, 50, None, 1)
    second = commit(backend, 50, 60, first, 2)
    uncommitted = backend.write(C, second, 3, batch(60, TEXTS[60:70]))
    restarted = reopened(backend, tmp_path)
    if restarted is None:
        pytest.skip("keeps nothing past its process")
    restarted.recover({C: [second]})
    snapshot = restarted.load(C, 2, second)
    assert snapshot.num_passages == 60
    assert search(snapshot, TEXTS[55], k=1) == [55]
    assert max(search(snapshot, TEXTS[65], k=60)) < 60  # the uncommitted write is gone
    with pytest.raises(FileNotFoundError):
        restarted.load(C, 3, uncommitted)
    # Generation 3 again, smaller: nothing of the uncommitted write comes back with it.
    third = restarted.write(C, second, 3, batch(60, TEXTS[60:62]))
    restarted.release(C, [third, second])
    assert restarted.load(C, 3, third).num_passages == 62
    if isinstance(restarted, QdrantBackend):
        restarted.drop(C)
        restarted.close()
