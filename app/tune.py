"""Tune a checkpoint to a collection, without labels.

The default checkpoint's 384 -> 128 linear layer is a fixed random rotation,
never trained for late interaction. Tuning trains it (and, optionally, the
transformer's top layers) on the collection's own passages:

- **pseudo-queries**: a sentence of a passage against the rest of that
  passage (the sentence taken out), and a document's title against its body;
  passages too short to leave both a query and a passage are skipped;
- **a contrastive late-interaction loss**: each pseudo-query's MaxSim score
  against its own passage and against every other passage of the batch (and,
  optionally, mined hard negatives), then cross-entropy over the scores
  divided by a temperature, the right passage as the label (the form of
  PyLate's ``Contrastive`` loss). Scores are averaged over the query's tokens
  rather than summed, so long and short pseudo-queries weigh alike (a
  query's ranking is the same either way). Other passages of the query's own
  document are never its negatives: they often answer it too; nor are
  passages that score nearly as high as its own (``false_negative_ratio``
  of its score, as NV-Retriever filters mined negatives): in a collection
  that holds one report as many documents ("... (Part 3/23)"), the other
  parts are no negatives of the report's title.

With the transformer frozen (``layers=0``, the default) its hidden states are
computed once per text and the training runs on those cached tensors: only
the linear layer learns, so the dense signal (mean-pooled hidden states) and
everything else the server stores stay as they are. The token vectors stay
L2-normalised after the projection, as ColBERT's are. The layer starts from
the checkpoint's own weights. Pseudo-queries of a few documents are held out
of training: their loss, checked every tenth of the run, chooses the weights
kept (the starting ones included). Everything random draws from ``seed``.

:func:`write_checkpoint` writes the result next to the old checkpoint: a new
directory, the old one's files with the trained tensors replaced in
``model.safetensors`` and the provenance in ``colbert_server.json``
(``tuning``), built aside and renamed into place (``models/staging.py``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import re
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from app.ingest.pipeline import passage_text
from app.validation import TITLE_FIELD

logger = logging.getLogger("app.tune")

# A pseudo-query sentence has this many words, the passage left without it at
# least MIN_REST_WORDS; a title at least MIN_TITLE_WORDS (a one-word title,
# "Introduction", matches nothing in particular).
MIN_QUERY_WORDS = 4
MAX_QUERY_WORDS = 40
MIN_REST_WORDS = 8
MIN_TITLE_WORDS = 2
# Fewer pseudo-queries than this and there is nothing to learn from.
MIN_PSEUDO_QUERIES = 8
CHECKS = 10  # held-out loss checks per run
# A sentence ends at ., ! or ? before an upper-case letter, a digit or an
# opening quote; a line break ends one too (headings, list items).
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")
# Below any cosine: document positions that are not token vectors.
NOT_A_TOKEN = -2.0
MODEL_FILE = "model.safetensors"
OPTIONS_FILE = "colbert_server.json"
LINEAR_KEY = "linear.weight"


class TuningError(ValueError):
    """The collection or the checkpoint cannot be tuned (too little text, no
    safetensors weights, a destination that exists)."""


@dataclass(frozen=True)
class TunePassage:
    """One passage of the collection as tuning sees it."""

    text: str  # the chunk, without its document's title
    title: str | None = None  # its document's title (None: none, or a chunk of the title field)
    group: str = ""  # its document: passages of one document share it


@dataclass(frozen=True)
class PseudoQuery:
    query: str
    positive: str  # the passage as the encoder sees it
    group: str
    kind: str  # "sentence" or "title"


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 200
    batch: int = 32
    seed: int = 0
    layers: int = 0  # top transformer layers trained with the projection
    learning_rate: float = 1e-3  # the projection's
    # The pretrained layers' (the usual size for fine-tuning a BERT: at the
    # projection's rate, five steps already cost business-reports 0.04 nDCG@10).
    layer_learning_rate: float = 3e-5
    temperature: float = 0.05
    hard_negatives: int = 0  # mined per pseudo-query, beside the in-batch ones
    false_negative_ratio: float | None = 0.95  # a passage scoring above this share of the positive's is no negative
    max_queries: int = 2048  # pseudo-queries drawn at most (each costs two short forwards, once)
    max_held_out: int = (
        256  # pseudo-queries of other documents kept out of training, to measure the loss on (at most a fifth)
    )

    def check(self) -> None:
        if self.steps < 1 or self.batch < 2:
            raise TuningError("tuning needs at least one step and batches of at least 2")
        if self.layers < 0 or self.hard_negatives < 0 or self.max_queries < MIN_PSEUDO_QUERIES:
            raise TuningError(
                f"layers and hard negatives must not be negative, max queries at least {MIN_PSEUDO_QUERIES}"
            )
        rates = (self.learning_rate, self.layer_learning_rate, self.temperature, self.false_negative_ratio or 1)
        if min(rates) <= 0:
            raise TuningError("learning rates, temperature and false-negative ratio must be positive")


@dataclass
class TuneResult:
    weights: dict[str, torch.Tensor]  # checkpoint key -> trained tensor
    held_out_before: float  # the loss on the held-out pseudo-queries with the checkpoint's own weights
    held_out_after: float  # with the weights kept: the best checked
    best_step: int  # the step whose weights are kept (0: the checkpoint's own)
    held_out_checks: list[tuple[int, float]]  # (step, held-out loss) at each check
    train_losses: list[float]  # per step
    queries: dict[str, int]  # training pseudo-queries by kind, and "held_out"
    passages: int
    seconds: float
    config: TuneConfig

    def curve(self, points: int = 10) -> list[float]:
        """The training loss averaged over ``points`` equal stretches of steps."""
        losses = self.train_losses
        size = max(1, len(losses) // points)
        return [round(sum(part) / len(part), 4) for i in range(0, len(losses), size) if (part := losses[i : i + size])]

    def provenance(self, base_checkpoint: str, collection: str) -> dict:
        """What ``colbert_server.json`` records of this run."""
        return {
            "base_checkpoint": base_checkpoint,
            "collection": collection,
            "passages": self.passages,
            "pseudo_queries": self.queries,
            **{k: v for k, v in asdict(self.config).items()},
            "trained": sorted(self.weights),
            "loss": {
                "held_out_before": round(self.held_out_before, 4),
                "held_out_after": round(self.held_out_after, 4),
                "kept_step": self.best_step,
                "held_out_checks": self.held_out_checks,
                "train_curve": self.curve(),
            },
            "seconds": round(self.seconds, 1),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


# -- pseudo-queries -----------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_BREAK.split(text) if s and s.strip()]


def _words(text: str) -> int:
    return len(text.split())


def sentence_query(passage: TunePassage, rng: random.Random) -> PseudoQuery | None:
    """One sentence of ``passage`` against the rest of it; None when no
    sentence leaves a query and a passage long enough."""
    sentences = split_sentences(passage.text)
    if len(sentences) < 2:
        return None
    total = sum(_words(s) for s in sentences)
    candidates = [
        i
        for i, s in enumerate(sentences)
        if MIN_QUERY_WORDS <= _words(s) <= MAX_QUERY_WORDS and total - _words(s) >= MIN_REST_WORDS
    ]
    if not candidates:
        return None
    chosen = rng.choice(candidates)
    rest = " ".join(s for i, s in enumerate(sentences) if i != chosen)
    return PseudoQuery(sentences[chosen], passage_text(passage.title, rest), passage.group, "sentence")


def title_query(passage: TunePassage) -> PseudoQuery | None:
    """The passage's title against its text alone (the title is taken out:
    with it, the match would be trivial)."""
    title = (passage.title or "").strip()
    if _words(title) < MIN_TITLE_WORDS or _words(passage.text) < MIN_REST_WORDS:
        return None
    return PseudoQuery(title, passage.text.strip(), passage.group, "title")


def pseudo_queries(passages: Sequence[TunePassage], seed: int, limit: int | None = None) -> list[PseudoQuery]:
    """Passages visited in a seeded order until ``limit`` queries are drawn:
    a sentence-vs-rest query from each that allows one, a title-vs-body query
    from the first visited passage of each titled document that allows one;
    shuffled."""
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    out: list[PseudoQuery] = []
    titled: set[str] = set()
    for i in order:
        if limit is not None and len(out) >= limit:
            break
        passage = passages[i]
        query = sentence_query(passage, rng)
        if query is not None:
            out.append(query)
        if passage.title and passage.group not in titled:
            query = title_query(passage)
            if query is not None:
                out.append(query)
                titled.add(passage.group)
    rng.shuffle(out)
    return out[:limit] if limit is not None else out


def held_out_split(queries: list[PseudoQuery], count: int, seed: int) -> tuple[list[PseudoQuery], list[PseudoQuery]]:
    """(training, held out): whole documents go to the held-out side until it
    has ``count`` queries, so it measures passages training never saw."""
    groups = sorted({q.group for q in queries})
    random.Random(seed).shuffle(groups)
    per_group = Counter(q.group for q in queries)
    held: set[str] = set()
    taken = 0
    for group in groups:
        if taken >= count:
            break
        held.add(group)
        taken += per_group[group]
    return [q for q in queries if q.group not in held], [q for q in queries if q.group in held]


def passages_from_chunks(chunks) -> list[TunePassage]:
    """Tuning passages from the store's live chunks
    (:class:`app.store.index_state.LiveChunk`)."""
    return [
        TunePassage(c.text, None if c.field == TITLE_FIELD else c.title, str(c.document_id))
        for c in chunks
        if c.text.strip()
    ]


# -- hidden states --------------------------------------------------------------


@dataclass
class States:
    """Cached inputs of the trained part, one entry per text."""

    states: list[torch.Tensor]  # (positions, hidden) float16
    attention: list[torch.Tensor] | None  # (positions,) bool; None: the positions are the kept ones
    kept: list[torch.Tensor] | None

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states (b, L, hidden) float32, attention (b, L), kept (b, L)), right-padded."""
        width = max(int(self.states[r].size(0)) for r in rows)
        hidden = self.states[rows[0]].size(1)
        out = torch.zeros(len(rows), width, hidden)
        attention = torch.zeros(len(rows), width, dtype=torch.bool)
        kept = torch.zeros(len(rows), width, dtype=torch.bool)
        for n, r in enumerate(rows):
            length = int(self.states[r].size(0))
            out[n, :length] = self.states[r].float()
            attention[n, :length] = self.attention[r] if self.attention is not None else True
            kept[n, :length] = self.kept[r] if self.kept is not None else True
        return out, attention, kept


def states_of(encoder, texts: list[str], queries: bool, layer: int | None, cache_dir: Path | None = None) -> States:
    """The hidden states tuning trains on (``ColBERTEncoder.token_states``),
    kept in ``cache_dir`` between runs when given."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha256()
        options = asdict(encoder.options) if hasattr(encoder.options, "__dataclass_fields__") else str(encoder.options)
        meta = [encoder.checkpoint_name, options, encoder.doc_maxlen, encoder.query_maxlen, queries, layer]
        key.update(json.dumps(meta, sort_keys=True, default=str).encode())
        for text in texts:
            key.update(text.encode("utf-8", "surrogatepass") + b"\0")
        path = Path(cache_dir) / f"states-{key.hexdigest()[:24]}.pt"
        if path.exists():
            return States(**torch.load(path))
    encoded = encoder.token_states(texts, queries=queries, layer=layer)
    result = States(encoded.states, encoded.attention, encoded.kept)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(asdict(result), tmp)
        tmp.replace(path)
    return result


# -- the trained part -------------------------------------------------------------


class TunedHead(torch.nn.Module):
    """The checkpoint's top ``layers`` transformer layers (copies) and its
    linear layer: cached states in, L2-normalised token vectors out."""

    def __init__(self, linear_weight: torch.Tensor, layers: Sequence[torch.nn.Module] = ()):
        super().__init__()
        self.weight = torch.nn.Parameter(linear_weight.detach().clone().float())
        self.layers = torch.nn.ModuleList(copy.deepcopy(layer).float() for layer in layers)
        for parameter in self.layers.parameters():
            parameter.requires_grad_(True)

    def forward(self, states: torch.Tensor, attention: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        hidden = states
        if len(self.layers):
            # BERT's additive mask: padded positions get no attention.
            additive = (~attention)[:, None, None, :].float() * torch.finfo(torch.float32).min
            for layer in self.layers:
                out = layer(hidden, attention_mask=additive)
                hidden = out[0] if isinstance(out, tuple) else out
        vectors = F.normalize(hidden @ self.weight.T, p=2, dim=-1)
        return vectors * kept.unsqueeze(-1)


def late_scores(
    queries: torch.Tensor, query_kept: torch.Tensor, docs: torch.Tensor, doc_kept: torch.Tensor
) -> torch.Tensor:
    """(queries, docs) MaxSim scores averaged over each query's tokens."""
    sim = torch.einsum("qid,pjd->qpij", queries, docs)
    sim = sim.masked_fill(~doc_kept[None, :, None, :], NOT_A_TOKEN)
    best = sim.max(dim=-1).values * query_kept[:, None, :]
    return best.sum(-1) / query_kept.sum(-1, keepdim=True).clamp(min=1)


def contrastive_loss(
    scores: torch.Tensor, labels: torch.Tensor, not_negative: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of each query's scores over the batch's passages, its
    own passage the label; ``not_negative`` (queries, docs) marks passages
    left out of a query's negatives (its own document's)."""
    own = F.one_hot(labels, scores.size(1)).bool()
    scores = scores.masked_fill(not_negative & ~own, float("-inf"))
    return F.cross_entropy(scores / temperature, labels)


class _Data:
    """Pseudo-queries with their cached states, and the passages they point at."""

    def __init__(self, queries: list[PseudoQuery], query_states: States, docs: States, doc_groups: list[str]):
        self.queries = queries
        self.query_states = query_states
        self.docs = docs
        self.doc_groups = doc_groups
        self.doc_of: list[int] = []
        self.hard: list[list[int]] = [[] for _ in queries]

    def batch_loss(
        self, head: TunedHead, rows: Sequence[int], temperature: float, hard: bool, ratio: float | None
    ) -> torch.Tensor:
        docs: list[int] = []
        for r in rows:
            for d in [self.doc_of[r], *(self.hard[r] if hard else [])]:
                if d not in docs:
                    docs.append(d)
        q_states, q_attention, q_kept = self.query_states.batch(rows)
        d_states, d_attention, d_kept = self.docs.batch(docs)
        q = head(q_states, q_attention, q_kept)
        d = head(d_states, d_attention, d_kept)
        scores = late_scores(q, q_kept, d, d_kept)
        labels = torch.tensor([docs.index(self.doc_of[r]) for r in rows])
        groups = [self.queries[r].group for r in rows]
        not_negative = torch.tensor([[self.doc_groups[d] == g for d in docs] for g in groups], dtype=torch.bool)
        if ratio is not None:
            with torch.no_grad():
                not_negative |= scores > ratio * scores.gather(1, labels[:, None])
        return contrastive_loss(scores, labels, not_negative, temperature)


def _mine_hard_negatives(data: _Data, rows: Sequence[int], count: int, depth: int, seed: int) -> None:
    """For each of ``rows``, ``count`` passages of other documents drawn from
    the ``depth`` nearest by mean-pooled hidden states (cheap, and blind to the
    projection being trained)."""

    def pooled(states: States, which: Sequence[int]) -> torch.Tensor:
        vectors = []
        for i in which:
            s = states.states[i].float()
            if states.kept is not None:
                s = s[states.kept[i]]
            vectors.append(s.mean(0))
        return F.normalize(torch.stack(vectors), dim=-1)

    candidates = sorted(set(data.doc_of[r] for r in rows))
    docs = pooled(data.docs, candidates)
    queries = pooled(data.query_states, rows)
    sims = queries @ docs.T
    group_ids: dict[str, int] = {}
    query_group = torch.tensor([group_ids.setdefault(data.queries[r].group, len(group_ids)) for r in rows])
    doc_group = torch.tensor([group_ids.setdefault(data.doc_groups[d], len(group_ids)) for d in candidates])
    sims = sims.masked_fill(query_group[:, None] == doc_group[None, :], float("-inf"))
    top = sims.topk(min(depth, len(candidates)), dim=1)
    rng = random.Random(seed)
    for n, r in enumerate(rows):
        pool = [candidates[int(i)] for i, v in zip(top.indices[n], top.values[n], strict=True) if v > float("-inf")]
        data.hard[r] = rng.sample(pool, min(count, len(pool)))


def _held_out_loss(head: TunedHead, data: _Data, rows: list[int], config: TuneConfig, batch: int) -> float:
    """Mean loss over fixed batches of ``rows`` (in-batch negatives only)."""
    if not rows:
        return float("nan")
    total, counted = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            part = rows[i : i + batch]
            if len(part) < 2:  # one query alone has no negatives
                continue
            loss = data.batch_loss(head, part, config.temperature, False, config.false_negative_ratio)
            total += loss.item() * len(part)
            counted += len(part)
    return total / counted if counted else float("nan")


def tune(
    encoder,
    passages: Sequence[TunePassage],
    config: TuneConfig,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Train ``encoder``'s linear layer (and its top ``config.layers``
    layers) on pseudo-queries of ``passages``; the encoder is not changed."""
    config.check()
    say = progress or (lambda message: logger.info("%s", message))
    started = time.perf_counter()
    queries = pseudo_queries(passages, config.seed, config.max_queries)
    if len(queries) < MIN_PSEUDO_QUERIES:
        raise TuningError(
            f"{len(passages)} passages give {len(queries)} pseudo-queries; tuning needs at least "
            f"{MIN_PSEUDO_QUERIES} (passages of two or more sentences, or titled documents)"
        )
    held_count = min(config.max_held_out, max(2, len(queries) // 5))
    train, held = held_out_split(queries, held_count, config.seed)
    if len(train) < 2:
        raise TuningError("too few pseudo-queries left to train on once some are held out")
    ordered = train + held
    kinds = Counter(q.kind for q in train)
    say(
        f"{len(passages)} passages: {len(train)} pseudo-queries to train on "
        f"({kinds['sentence']} sentence, {kinds['title']} title), {len(held)} held out"
    )

    model = encoder.checkpoint
    transformer_layers = list(model.bert.encoder.layer)
    if config.layers > len(transformer_layers):
        raise TuningError(f"the checkpoint has {len(transformer_layers)} transformer layers, not {config.layers}")
    first_trained = len(transformer_layers) - config.layers if config.layers else None
    positives = sorted({q.positive for q in ordered})
    doc_index = {text: i for i, text in enumerate(positives)}
    doc_groups = [""] * len(positives)
    for q in ordered:
        doc_groups[doc_index[q.positive]] = q.group
    say(f"encoding {len(ordered)} pseudo-queries and {len(positives)} passages (once; the transformer is frozen)")
    query_states = states_of(encoder, [q.query for q in ordered], True, first_trained, cache_dir)
    doc_states = states_of(encoder, positives, False, first_trained, cache_dir)
    data = _Data(ordered, query_states, doc_states, doc_groups)
    data.doc_of = [doc_index[q.positive] for q in ordered]
    train_rows = list(range(len(train)))
    held_rows = list(range(len(train), len(ordered)))
    if config.hard_negatives:
        _mine_hard_negatives(data, train_rows, config.hard_negatives, depth=30, seed=config.seed)

    head = TunedHead(model.linear.weight, transformer_layers[first_trained:] if first_trained is not None else ())
    head.eval()  # no dropout in the trained layers: a run is the same run every time
    batch = min(config.batch, len(train))
    before = _held_out_loss(head, data, held_rows, config, batch)
    groups = [{"params": [head.weight], "lr": config.learning_rate}]
    if len(head.layers):
        groups.append({"params": list(head.layers.parameters()), "lr": config.layer_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    say(f"training {config.steps} steps of {batch} (held-out loss {before:.4f})")
    # The held-out loss is checked every tenth of the run and the weights
    # that scored best are kept, the starting ones included: trained too
    # long, the projection fits the pseudo-queries and drifts from what
    # real queries need (800 steps on msmarco-mini: held-out loss up from
    # its low, nDCG@10 down; BENCHMARKS.md); never better, nothing changes.
    every = max(1, config.steps // CHECKS)
    best, best_step, best_state = before, 0, copy.deepcopy(head.state_dict())
    checks = [(0, round(before, 4))]
    for step in range(config.steps):
        if len(order) < batch:  # a new pass over the training queries
            order = torch.randperm(len(train), generator=generator).tolist()
        rows, order = order[:batch], order[batch:]
        loss = data.batch_loss(head, rows, config.temperature, config.hard_negatives > 0, config.false_negative_ratio)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == config.steps:
            held_loss = _held_out_loss(head, data, held_rows, config, batch)
            checks.append((step + 1, round(held_loss, 4)))
            logger.debug("step %d: training loss %.4f, held-out %.4f", step + 1, losses[-1], held_loss)
            if held_loss < best or math.isnan(best):
                best, best_step, best_state = held_loss, step + 1, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    after = best
    weights = {LINEAR_KEY: head.weight.detach().clone()}
    if first_trained is not None:
        for offset, layer in enumerate(head.layers):
            for name, tensor in layer.state_dict().items():
                weights[f"bert.encoder.layer.{first_trained + offset}.{name}"] = tensor.detach().clone()
    return TuneResult(
        weights=weights,
        held_out_before=before,
        held_out_after=after,
        best_step=best_step,
        held_out_checks=checks,
        train_losses=losses,
        queries={**{k: kinds[k] for k in ("sentence", "title")}, "held_out": len(held)},
        passages=len(passages),
        seconds=time.perf_counter() - started,
        config=config,
    )


# -- the checkpoint -------------------------------------------------------------


def default_destination(root: Path, collection: str) -> Path:
    """Under ``root`` (the data directory's checkpoints/): the collection's
    name, the time (UTC) and a random tag; a new path each run, so a
    checkpoint in use is never written over."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return root / f"{collection}-tuned-{stamp}-{secrets.token_hex(2)}"


def write_checkpoint(base: Path, dest: Path, weights: dict[str, torch.Tensor], tuning: dict) -> Path:
    """A copy of checkpoint ``base`` at ``dest`` with ``weights`` replaced in
    its ``model.safetensors`` and ``tuning`` in its ``colbert_server.json``;
    built in a directory beside ``dest`` and renamed into place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from models.build_default_checkpoint import DONE_MARKER
    from models.staging import staged_directory

    base, dest = Path(base), Path(dest)
    if not (base / MODEL_FILE).is_file():
        raise TuningError(f"{base} has no {MODEL_FILE}: tuning writes safetensors checkpoints only")
    if dest.exists():
        raise TuningError(f"{dest} exists: choose a new directory (a checkpoint in use must not change)")
    with staged_directory(dest, DONE_MARKER) as tmp:
        for item in sorted(base.iterdir()):
            if item.name in (DONE_MARKER, MODEL_FILE) or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        with safe_open(str(base / MODEL_FILE), "pt") as stored:
            metadata = stored.metadata()
            tensors = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118 (not a dict)
        for key, value in weights.items():
            if key not in tensors or tensors[key].shape != value.shape:
                raise TuningError(f"{base / MODEL_FILE} has no tensor {key} of shape {tuple(value.shape)}")
            tensors[key] = value.detach().to(tensors[key].dtype).contiguous()
        save_file(tensors, str(tmp / MODEL_FILE), metadata=metadata)
        options = json.loads((base / OPTIONS_FILE).read_text()) if (base / OPTIONS_FILE).exists() else {}
        previous = options.get("tuning")
        options["tuning"] = {**tuning, **({"base_tuning": previous} if previous else {})}
        (tmp / OPTIONS_FILE).write_text(json.dumps(options, indent=2))
    return dest
