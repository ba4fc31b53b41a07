"""Tuning on a collection's own passages, measured on queries it never saw.

For msmarco-mini and business-reports (``../shared/bench``): the corpus is
split as the server splits it (its chunker, the title before each chunk);
``app.tune`` trains the default checkpoint's projection on pseudo-queries of
those passages alone (the judged queries never reach it); then nDCG@10 of
exhaustive MaxSim (every passage scored, no PLAID; a document scores its
best passage) on the judged queries with:

- ``base``: the checkpoint as it is;
- ``tuned-own``: the projection tuned on the same dataset's passages;
- ``tuned-other``: the projection tuned on the other dataset's passages.

business-reports is also scored under the re-keyed judgments
(``bench/qrels/business-reports-rekeyed.tsv``, see ``bench/qrels/README.md``:
the published ones are keyed to the wrong query ids). Each tuned row is
compared with ``base`` query by query: mean difference, queries better, worse
and tied, and a paired bootstrap 95% interval. Dense (the mean-pooled vector of
the same forward pass, which tuning leaves as it is) is given for reference.

Vectors come from the transformer's hidden states, computed once and cached
under ``--cache`` (never in the repository), projected by each row's linear
layer: for ``layers=0`` that is what the server's encoder computes, and the
run checks it against a tuned checkpoint written to a temporary directory and
loaded with ``ColBERTEncoder``.

    python -m bench.tune [--steps 200] [--batch 32] [--seeds 0] [--max-queries 2048] [--layers 0]

With ``--layers N`` the top N transformer layers are tuned too; the tuned
rows then run those layers (as tuned) over cached states entering them, and
the written-checkpoint check covers them as well.

Writes ``bench/results/tune-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from app.tune import LINEAR_KEY, States, TunedHead, states_of
from bench.data import DATA, load, ndcg_at_10
from bench.quality import read_qrels

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {"msmarco-mini": DATA, "business-reports": DATA.parent / "business-reports"}
REKEYED = {"business-reports": ("business-reports re-keyed", ROOT / "bench" / "qrels" / "business-reports-rekeyed.tsv")}
SCORE_BLOCK = 65536  # document tokens scored per block
EVAL_ROWS = 64  # texts per batch through tuned layers
BOOTSTRAP = 10000


@dataclass
class Dataset:
    name: str
    doc_ids: list[str]
    owner: torch.Tensor  # (chunks,) the corpus entry of each chunk
    passages: list  # app.tune.TunePassage per chunk
    states: States  # per chunk: the last hidden states at its kept tokens
    dense: torch.Tensor  # (chunks, hidden) float16
    queries: dict[str, str]  # the judged ones
    query_states: States  # per judged query, in the order of ``queries``
    query_dense: dict[str, torch.Tensor]
    judgments: dict[str, dict[str, dict[str, int]]]  # label -> qrels
    layer_states: States | None = None  # with tuned layers: the states entering the first of them
    query_layer_states: States | None = None


def cached(path: Path, make):
    if path.exists():
        return torch.load(path)
    value = make()
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def prepare(encoder, name: str, cache: Path, layers: int = 0) -> Dataset:
    from app.ingest.pipeline import DocumentInput, DocumentPreparer, passage_text
    from app.tune import TunePassage

    corpus, queries, qrels = load(DATASETS[name])
    judgments = {name: qrels}
    if name in REKEYED:
        label, path = REKEYED[name]
        judgments[label] = read_qrels(path)
    judged = {q: t for q, t in queries.items() if any(q in j for j in judgments.values())}
    started = time.perf_counter()
    docs = DocumentPreparer(encoder).prepare(
        [DocumentInput(d["_id"], d["text"], (d.get("title") or "").strip() or None) for d in corpus]
    )
    texts, owner, passages = [], [], []
    for n, doc in enumerate(docs):
        for chunk in doc.chunks:
            texts.append(passage_text(doc.title, chunk.text))
            owner.append(n)
            passages.append(TunePassage(chunk.text, doc.title, str(doc.external_id)))
    key = hashlib.sha256(json.dumps([encoder.checkpoint_name, texts]).encode()).hexdigest()[:16]
    encoded = cached(cache / f"corpus-{name}-{key}.pt", lambda: dataclasses.asdict(encoder.token_states(texts)))
    qids = list(judged)
    q_texts = [judged[q] for q in qids]
    q_encoded = encoder.token_states(q_texts, queries=True)
    layer_states = query_layer_states = None
    if layers:
        first = len(encoder.checkpoint.bert.encoder.layer) - layers
        layer_states = states_of(encoder, texts, False, first, cache)
        query_layer_states = states_of(encoder, q_texts, True, first, cache)
    print(
        f"{name}: {len(corpus)} entries, {len(texts)} passages, {sum(s.size(0) for s in encoded['states'])} tokens, "
        f"{len(qids)} judged queries ({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    assert q_encoded.dense is not None
    return Dataset(
        name,
        [d["_id"] for d in corpus],
        torch.tensor(owner),
        passages,
        States(encoded["states"], None, None),
        encoded["dense"],
        judged,
        States(q_encoded.states, None, None),
        dict(zip(qids, q_encoded.dense, strict=True)),
        judgments,
        layer_states,
        query_layer_states,
    )


def vectors(head: TunedHead, states: States) -> list[torch.Tensor]:
    """Per text, its token vectors by ``head`` (at the kept positions)."""
    with torch.no_grad():
        if states.attention is None:
            return [F.normalize(s.float() @ head.weight.T, p=2, dim=-1) for s in states.states]
        out: list[torch.Tensor] = [torch.empty(0)] * len(states.states)
        order = sorted(range(len(states.states)), key=lambda i: states.states[i].size(0))
        for start in range(0, len(order), EVAL_ROWS):
            rows = order[start : start + EVAL_ROWS]
            hidden, attention, kept = states.batch(rows)
            encoded = head(hidden, attention, kept)
            for n, row in enumerate(rows):
                out[row] = encoded[n][kept[n]]
        return out


def head_states(ds: Dataset, head: TunedHead) -> tuple[States, States]:
    """(passages, queries): the states ``head`` reads."""
    if len(head.layers):
        assert ds.layer_states is not None and ds.query_layer_states is not None
        return ds.layer_states, ds.query_layer_states
    return ds.states, ds.query_states


def maxsim_runs(ds: Dataset, head: TunedHead, k: int = 10) -> dict[str, list[str]]:
    """Top-k corpus ids per judged query by exhaustive MaxSim; a document
    scores its best passage."""
    passage_states, query_states = head_states(ds, head)
    per_passage = vectors(head, passage_states)
    lens = torch.tensor([v.size(0) for v in per_passage])
    chunk_of = torch.repeat_interleave(torch.arange(len(per_passage)), lens)
    docs = torch.cat(per_passage)
    runs = {}
    for qid, q in zip(ds.queries, vectors(head, query_states), strict=True):
        best = torch.full((len(per_passage), q.size(0)), -2.0)
        for start in range(0, docs.size(0), SCORE_BLOCK):
            sim = docs[start : start + SCORE_BLOCK] @ q.T
            index = chunk_of[start : start + SCORE_BLOCK, None].expand_as(sim)
            best.scatter_reduce_(0, index, sim, reduce="amax")
        runs[qid] = ranked(ds, best.sum(1), k)
    return runs


def dense_runs(ds: Dataset, k: int = 10) -> dict[str, list[str]]:
    """The mean-pooled vector of the base forward pass (what the server's dense signal is)."""
    docs = F.normalize(ds.dense.float(), dim=-1)
    return {qid: ranked(ds, docs @ F.normalize(v.float(), dim=0), k) for qid, v in ds.query_dense.items()}


def ranked(ds: Dataset, chunk_scores: torch.Tensor, k: int) -> list[str]:
    per_doc = torch.full((len(ds.doc_ids),), float("-inf")).scatter_reduce(0, ds.owner, chunk_scores, reduce="amax")
    return [ds.doc_ids[i] for i in per_doc.topk(min(k, len(ds.doc_ids))).indices.tolist()]


def per_query(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    return {q: ndcg_at_10(runs[q], qrels[q]) for q in qrels if q in runs}


def compare(row: dict[str, float], base: dict[str, float], seed: int = 0) -> dict:
    qids = sorted(base)
    diffs = [row[q] - base[q] for q in qids]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(BOOTSTRAP))
    return {
        "mean_diff": sum(diffs) / len(diffs),
        "better": sum(d > 1e-9 for d in diffs),
        "worse": sum(d < -1e-9 for d in diffs),
        "tied": sum(abs(d) <= 1e-9 for d in diffs),
        "ci95": [means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]],
    }


def check_written(encoder_cls, options_cls, base: Path, head: TunedHead, weights: dict, ds: Dataset) -> float:
    """Largest difference between the server's encoding of the judged
    queries with a written tuned checkpoint and this benchmark's vectors."""
    from app.tune import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        dest = write_checkpoint(base, Path(tmp) / "tuned", weights, {"benchmark": "bench.tune"})
        encoder = encoder_cls(str(dest), options_cls.for_checkpoint(str(dest)))
        served = encoder.encode_queries(list(ds.queries.values()))
        mine = vectors(head, head_states(ds, head)[1])
        return max(float((served[row, : v.size(0)] - v).abs().max()) for row, v in enumerate(mine))


def tuned_head(base: TunedHead, first: int, weights: dict[str, torch.Tensor]) -> TunedHead:
    """``base`` (its layers from transformer layer ``first`` on) with the
    trained tensors of ``weights``."""
    head = TunedHead(weights[LINEAR_KEY], list(base.layers))
    for offset, layer in enumerate(head.layers):
        prefix = f"bert.encoder.layer.{first + offset}."
        layer.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    head.eval()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-queries", type=int, default=2048)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--hard-negatives", type=int, default=0)
    parser.add_argument("--layers", type=int, default=0, help="top transformer layers tuned with the projection")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "colbert-bench-tune")
    parser.add_argument("--checkpoint", help="default: the default checkpoint, built under --cache")
    args = parser.parse_args()

    from app.engine.encoder import ColBERTEncoder
    from app.tune import TuneConfig, tune
    from colbert_patches.model_loading import EncoderOptions
    from models.build_default_checkpoint import ensure_default_checkpoint

    args.cache.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint or ensure_default_checkpoint(args.cache / "colbert-minilm-l6")).resolve()
    encoder = ColBERTEncoder(str(checkpoint), EncoderOptions.for_checkpoint(str(checkpoint)))
    transformer_layers = list(encoder.checkpoint.bert.encoder.layer)
    first = len(transformer_layers) - args.layers
    base = TunedHead(encoder.checkpoint.linear.weight, transformer_layers[first:])
    base.eval()
    data = {name: prepare(encoder, name, args.cache, args.layers) for name in args.datasets}

    defaults = TuneConfig()
    overrides = {"learning_rate": args.learning_rate} if args.learning_rate else {}
    tuned: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    tuning: dict[str, dict] = {}
    for name, ds in data.items():
        for seed in args.seeds:
            config = dataclasses.replace(
                defaults,
                steps=args.steps,
                batch=args.batch,
                seed=seed,
                max_queries=args.max_queries,
                hard_negatives=args.hard_negatives,
                layers=args.layers,
                **overrides,
            )
            result = tune(encoder, ds.passages, config, cache_dir=args.cache, progress=lambda m: print(f"  {m}"))
            tuned[(name, seed)] = result.weights
            tuning[f"{name} seed {seed}"] = result.provenance(str(checkpoint), name)
            print(
                f"tuned on {name} (seed {seed}): held-out pseudo-query loss {result.held_out_before:.4f} -> "
                f"{result.held_out_after:.4f} (step {result.best_step} kept) in {result.seconds:.0f}s",
                flush=True,
            )

    results: dict = {
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "config": {**dataclasses.asdict(config), "seeds": args.seeds},
        "tuning": tuning,
        "datasets": {},
    }
    heads = {key: tuned_head(base, first, weights) for key, weights in tuned.items()}
    for name, ds in data.items():
        others = [o for o in data if o != name]
        rows: dict[str, dict[str, list[str]]] = {"base": maxsim_runs(ds, base), "dense (reference)": dense_runs(ds)}
        for seed in args.seeds:
            rows[f"tuned-own seed {seed}"] = maxsim_runs(ds, heads[(name, seed)])
            for other in others:
                rows[f"tuned-other ({other}) seed {seed}"] = maxsim_runs(ds, heads[(other, seed)])
        out: dict = {
            "passages": len(ds.states.states),
            "judged_queries": {},
            "ndcg@10": {},
            "vs_base": {},
            "over_seeds": {},
            "per_query": {},
        }
        for label, qrels in ds.judgments.items():
            judged = {q: r for q, r in qrels.items() if q in ds.queries}
            out["judged_queries"][label] = len(judged)
            scores = {row: per_query(runs, judged) for row, runs in rows.items()}
            out["ndcg@10"][label] = {row: sum(s.values()) / len(s) for row, s in scores.items()}
            out["vs_base"][label] = {row: compare(s, scores["base"]) for row, s in scores.items() if row != "base"}
            out["per_query"][label] = {row: {q: round(v, 4) for q, v in s.items()} for row, s in scores.items()}
            out["over_seeds"][label] = over_seeds(out["ndcg@10"][label])
        key = (name, args.seeds[0])
        out["written_checkpoint_max_diff"] = check_written(
            ColBERTEncoder, EncoderOptions, checkpoint, heads[key], tuned[key], ds
        )
        results["datasets"][name] = out

    dest = ROOT / "bench" / "results"
    dest.mkdir(exist_ok=True)
    path = dest / f"tune-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwritten to {path.relative_to(ROOT)}")


def over_seeds(table: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each tuned row's nDCG@10 over its seeds: mean, lowest, highest."""
    rows: dict[str, list[float]] = {}
    for row, value in table.items():
        if " seed " in row:
            rows.setdefault(row.rsplit(" seed ", 1)[0], []).append(value)
    return {row: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "seeds": len(v)} for row, v in rows.items()}


def print_table(results: dict) -> None:
    for out in results["datasets"].values():
        for label, table in out["ndcg@10"].items():
            print(f"\n{label} ({out['judged_queries'][label]} judged queries, {out['passages']} passages)")
            print(f"  {'row':<46} {'nDCG@10':>8} {'vs base':>8} {'better':>6} {'worse':>6} {'tied':>5}  95% CI")
            for row, value in table.items():
                if row == "base":
                    print(f"  {row:<46} {value:>8.3f}")
                    continue
                c = out["vs_base"][label][row]
                ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
                print(
                    f"  {row:<46} {value:>8.3f} {c['mean_diff']:>+8.3f} {c['better']:>6} {c['worse']:>6} "
                    f"{c['tied']:>5}  {ci}"
                )
            base = table["base"]
            for row, summary in out.get("over_seeds", {}).get(label, {}).items():
                if summary["seeds"] > 1:
                    print(
                        f"  {row + ' over ' + str(summary['seeds']) + ' seeds':<46} {summary['mean']:>8.3f} "
                        f"{summary['mean'] - base:>+8.3f}  (seeds from {summary['min']:.3f} to {summary['max']:.3f})"
                    )
        print(f"  written tuned checkpoint vs these vectors: max |diff| {out['written_checkpoint_max_diff']:.2e}")


if __name__ == "__main__":
    main()
