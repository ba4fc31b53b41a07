"""Answers: retrieve through the server's own search, generate, cite, check.

The LM and the hallucination scorer load once, on their own thread (the
"answer" executor), in the background at start-up or on the first request.
Generation and scoring run on that thread too, never on the event loop;
searches keep their own model thread, so a long generation does not hold
them up. A missing or broken LM makes the answer endpoint say so (503
``answer_unavailable``); search is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import asdict
from typing import TYPE_CHECKING

from app.answer.program import AnswerProgram, AnswerResult, may_become_lead_in, without_lead_in
from app.engine.retrieval import DEFAULT, Retrieval
from app.errors import ServerError
from app.service import SearchHit, SearchService
from app.settings import Settings
from app.validation import TITLE_FIELD

if TYPE_CHECKING:  # both load heavy libraries: imported when the models load
    from app.answer.hallucination import HallucinationScorer
    from app.answer.lm import AnswerLM

log = logging.getLogger(__name__)

RETRY_LOAD_AFTER_S = 30.0


class AnswerUnavailable(ServerError):
    status_code = 503
    code = "answer_unavailable"


class AnswerLMFailed(ServerError):
    status_code = 502
    code = "answer_lm_error"


class AnswerUnsupported(ServerError):
    status_code = 422
    code = "answer_unsupported"


def stage_timings(started: float, retrieved: float, generated: float, done: float) -> dict[str, float]:
    """Seconds per answer stage, from the stage boundaries."""
    return {
        "retrieve": retrieved - started,
        "generate": generated - retrieved,
        "check": done - generated,
        "total": done - started,
    }


def hit_out(hit: SearchHit) -> dict:
    h = hit.hit
    return {
        "document_id": h.document_id,
        "chunk_id": h.chunk_id,
        "chunk_index": h.chunk_index,
        "text": h.text,
        "score": hit.score,
        "rank": hit.rank,
        "title": h.title,
        "metadata": h.metadata,
        "page": h.page,
        "heading": h.heading,
        "field": h.field,
    }


class AnswerService:
    def __init__(self, settings: Settings, search: SearchService):
        self.settings = settings
        self.search = search
        # Set together by ensure_loaded(); every answer awaits it first.
        self.lm: AnswerLM | None = None
        self.scorer: HallucinationScorer | None = None
        self.program: AnswerProgram | None = None
        self.error: str | None = None  # public (/ready): the failure's type only
        self._error_detail = ""  # for the answer endpoint's 503 (behind the API key when keys are set)
        self._failed_at = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="answer")
        self._load_lock = asyncio.Lock()
        self._preload: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------

    async def astart(self) -> None:
        if self.settings.answer_preload:
            self._preload = asyncio.create_task(self._preload_when_search_ready())

    async def _preload_when_search_ready(self) -> None:
        while not self.search.ready:  # search first: it is what /ready waits for
            await asyncio.sleep(0.2)
        try:
            await self.ensure_loaded()
        except AnswerUnavailable:
            pass  # logged in ensure_loaded; the endpoint reports it

    async def astop(self) -> None:
        if self._preload is not None:
            self._preload.cancel()
            await asyncio.gather(self._preload, return_exceptions=True)
        # Off the loop: the job in progress may be waiting on it (attribution runs a search).
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def state(self) -> dict:
        if self.program is not None:
            state = "ready"
        elif self.error is not None:
            state = "failed"
        elif self._load_lock.locked():
            state = "loading"
        else:
            state = "not_loaded"
        from app.answer.lm import describe_lm

        out = {"state": state, "lm": describe_lm(self.settings)}
        if self.scorer is not None:
            out["hallucination_scorer"] = getattr(self.scorer, "name", type(self.scorer).__name__)
        if self.error is not None:
            out["error"] = self.error
        return out

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _load(self) -> tuple[AnswerLM, HallucinationScorer]:
        from app.answer.hallucination import load_scorer
        from app.answer.lm import load_answer_lm

        lm = load_answer_lm(self.settings)
        scorer = load_scorer(self.settings)
        return lm, scorer

    async def ensure_loaded(self) -> None:
        if self.program is not None:
            return
        async with self._load_lock:
            if self.program is not None:
                return
            if self.error is not None and time.monotonic() - self._failed_at < RETRY_LOAD_AFTER_S:
                raise AnswerUnavailable(f"no answer model could be loaded: {self._error_detail}")
            try:
                lm, scorer = await self._run(self._load)
            except Exception as exc:  # any loader failure becomes a clear 503, not a 500
                # /ready is public: it and the 503 name the failure; its text (paths,
                # hub or provider messages) goes to the log only.
                self.error = f"{type(exc).__name__} (see the server log)"
                self._error_detail = f"{type(exc).__name__}: {self._redact(str(exc))}"
                self._failed_at = time.monotonic()
                log.error("answer models failed to load: %s", self._error_detail)
                raise AnswerUnavailable(f"no answer model could be loaded: {self._error_detail}") from exc
            self.lm, self.scorer = lm, scorer
            self.program = AnswerProgram(attribute=self._attribute)
            self.error = None

    def _attribute(self, answer: str, passages: list[str]) -> list[float]:
        """ColBERT MaxSim of the answer against each passage (called on the answer thread)."""
        return self.search.rerank_blocking(answer, passages)

    # -- answering ---------------------------------------------------------

    def _passages(self, hits: list[SearchHit]) -> list[str]:
        cut = self.settings.answer_passage_chars
        out = []
        for h in hits:
            text = h.hit.text if len(h.hit.text) <= cut else h.hit.text[:cut].rsplit(" ", 1)[0] + " …"
            # A title field's chunk is the title itself: no prefix.
            out.append(f"{h.hit.title}: {text}" if h.hit.title and h.hit.field != TITLE_FIELD else text)
        return out

    def _generate(self, question: str, passages: list[str]) -> AnswerResult:
        import dspy

        assert self.lm is not None and self.program is not None, "ensure_loaded() first"
        try:
            # No history: DSPy would keep every prompt (all k passages) and response in memory.
            with dspy.context(lm=self.lm.lm, disable_history=True):
                prediction = self.program(question=question, passages=passages)
        except ServerError:
            raise  # not the LM's failure (attribution's search, say): its own status
        except Exception as exc:
            raise self._lm_failed(exc) from exc
        return AnswerResult(answer=prediction.answer, citations=prediction.citations)

    def _redact(self, text: str) -> str:
        """``text`` without the LM's API key (providers echo request URLs, some with the key in them)."""
        key = self.settings.answer_lm_api_key
        secret = key.get_secret_value() if key is not None else ""
        return text.replace(secret, "[redacted]") if secret else text

    def _lm_failed(self, exc: BaseException) -> AnswerLMFailed:
        # The response names the failure, not its text: a provider's error text
        # can echo request details. The log gets the text, with the key
        # redacted, and no traceback (its frames' reprs are not redacted).
        assert self.lm is not None
        log.error("answer LM %s failed: %s: %s", self.lm.name, type(exc).__name__, self._redact(str(exc)))
        return AnswerLMFailed(f"the answer LM ({self.lm.name}) failed: {type(exc).__name__}")

    def _check(self, answer: str, hits: list[SearchHit]):
        if not answer.strip():  # nothing claimed, nothing to score: no "supported" label for an empty answer
            return None
        assert self.scorer is not None, "ensure_loaded() first"
        return self.scorer.score(answer, [h.hit.text for h in hits])

    def _response(self, question: str, hits, result: AnswerResult, report, timings: dict) -> dict:
        citations = []
        for c in result.citations:
            out = hit_out(hits[c.index])
            out.update({"number": c.index + 1, "source": c.source})
            citations.append(out)
        return {
            "question": question,
            "answer": result.answer,
            "citations": citations,
            "hallucination": asdict(report) if report is not None else None,
            "context": [hit_out(h) for h in hits],
            "model": self.lm.name if self.lm is not None else None,
            "took_ms": {name: round(value * 1000, 1) for name, value in timings.items()},
            "note": None if result.answer.strip() else "the model gave no answer from these passages",
        }

    def _observe(self, timings: dict, label: str) -> None:
        metrics = self.search.metrics
        for stage, seconds in timings.items():
            metrics.answer_seconds.labels(stage).observe(seconds)
        metrics.answers.labels(label).inc()

    def _refuse_if_unsupported(self, response: dict, timings: dict) -> None:
        report = response["hallucination"]
        refuse = self.settings.answer_unsupported == "refuse" and report is not None and report["label"] != "supported"
        self._observe(timings, "refused" if refuse else report["label"] if report else "empty")
        if refuse:
            raise AnswerUnsupported(
                f"the answer scored {report['score']:.2f}, under the support threshold {report['threshold']:.2f}",
                # Score only: the sentences would give the withheld answer away.
                details={"hallucination": {key: report[key] for key in ("score", "label", "threshold")}},
            )

    async def answer(self, collection: str, question: str, k: int, retrieval: Retrieval = DEFAULT) -> dict:
        started = time.perf_counter()
        hits = await self.search.search(collection, question, k, retrieval)
        await self.ensure_loaded()
        t_retrieved = time.perf_counter()
        if not hits:
            return self._empty(question, started)
        result = await self._run(self._generate, question, self._passages(hits))
        t_generated = time.perf_counter()
        report = await self._run(self._check, result.answer, hits)
        timings = stage_timings(started, t_retrieved, t_generated, time.perf_counter())
        response = self._response(question, hits, result, report, timings)
        self._refuse_if_unsupported(response, timings)
        return response

    def _empty(self, question: str, started: float) -> dict:
        return {
            "question": question,
            "answer": "",
            "citations": [],
            "hallucination": None,
            "context": [],
            "model": self.lm.name if self.lm is not None else None,
            "took_ms": {"total": round((time.perf_counter() - started) * 1000, 1)},
            "note": "no passage in the collection matched the question",
        }

    async def _stream_pieces(self, lm: AnswerLM, messages: list[dict]) -> AsyncGenerator[str, None]:
        """The LM's pieces as they come, generated on the answer thread.
        Closing this iterator (the client went away) stops the generation."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        end = object()

        def produce() -> None:
            try:
                for piece in lm.stream(messages):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, end)

        producer = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                item = await queue.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise self._lm_failed(item) from item
                yield item
        finally:
            stop.set()
            await asyncio.shield(producer)

    async def stream(
        self, collection: str, question: str, k: int, retrieval: Retrieval = DEFAULT
    ) -> AsyncIterator[tuple[str, object]]:
        """(event, data) pairs: ``token`` pieces, then ``citations``,
        ``hallucination`` and ``done`` (the full response). Under
        ``answer_unsupported=refuse`` tokens are held back until the check
        passes, since a refused answer must not have been sent already."""
        started = time.perf_counter()
        hits = await self.search.search(collection, question, k, retrieval)
        await self.ensure_loaded()
        t_retrieved = time.perf_counter()
        if not hits:
            response = self._empty(question, started)
            yield "citations", []
            yield "done", response
            return
        lm, program = self.lm, self.program
        assert lm is not None and program is not None, "ensure_loaded() first"
        passages = self._passages(hits)
        hold = self.settings.answer_unsupported == "refuse"
        text = _LeadInHold()
        async with aclosing(self._stream_pieces(lm, program.messages(question, passages))) as pieces:
            async for piece in pieces:
                out = text.feed(piece)
                if out and not hold:
                    yield "token", {"text": out}
        if not hold and (rest := text.flush()):  # the stream ended while its start was held
            yield "token", {"text": rest}
        pieces_text = text.completion
        t_generated = time.perf_counter()
        result = await self._run(program.finish_text, pieces_text, passages)
        report = await self._run(self._check, result.answer, hits)
        timings = stage_timings(started, t_retrieved, t_generated, time.perf_counter())
        response = self._response(question, hits, result, report, timings)
        self._refuse_if_unsupported(response, timings)
        if hold:
            yield "token", {"text": response["answer"]}
        yield "citations", response["citations"]
        yield "hallucination", response["hallucination"]
        yield "done", response


class _LeadInHold:
    """The streamed text of a completion without its lead-in ("The answer
    is:"): its start is held while it may still become one, so the streamed
    text reads like the final answer; no space before the first text."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.opened = False  # the start of the completion has been released
        self.started_text = False  # some text of it has been released

    @property
    def completion(self) -> str:
        return "".join(self.pieces)

    def feed(self, piece: str) -> str:
        """Add a piece; the text to send now ("" for nothing yet)."""
        self.pieces.append(piece)
        if not self.opened:
            head = self.completion
            if may_become_lead_in(head):
                return ""
            self.opened = True
            piece = without_lead_in(head)
        if not self.started_text:
            piece = piece.lstrip()
            self.started_text = bool(piece)
        return piece

    def flush(self) -> str:
        """What is still held when the completion ends."""
        if self.opened or not self.pieces:
            return ""
        return without_lead_in(self.completion).lstrip()
