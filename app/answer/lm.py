"""Language models for the answer program, chosen by settings.

- default: the bundled SmolLM2-135M-Instruct (``models/convert_answer_lm.py``),
  run with transformers behind :class:`LocalEngine`, a DSPy engine of the
  project's own (``dspy.LM(engine=...)``): greedy decoding, capped new tokens;
- ``COLBERT_SERVER_ANSWER_LM_PATH``: any local transformers causal LM
  directory, or a ``.gguf`` file, through the same engine;
- ``COLBERT_SERVER_ANSWER_LM``: any model LiteLLM speaks
  (``openai/<name>`` with ``ANSWER_LM_BASE_URL`` for vLLM, llama.cpp or another
  OpenAI-compatible server; ``ollama_chat/<name>``; a hosted API), with the
  key from ``ANSWER_LM_API_KEY``, never logged or returned.

Every :class:`AnswerLM` offers a blocking ``complete(messages)`` (through
DSPy) and ``stream(messages)``, an iterator of text pieces for server-sent
events. Callers run both off the event loop.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dspy
import torch
from dspy.lm15 import Message, Response, StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta, TextPart, Usage
from transformers import StoppingCriteria, StoppingCriteriaList

from app.settings import Settings

log = logging.getLogger(__name__)

LOCAL_PREFIX = "local/"


class _AnswerEnd(StoppingCriteria):
    """Stop once the new text holds ``limit`` complete sentences, or at a
    blank line after a paragraph with content.

    Small models open with a lead-in ("The answer is:", "Definition of X:")
    and a blank line, then answer; and after answering they ramble on in new
    paragraphs. A paragraph ending in a colon announces what follows, so it
    does not count as content; nor does a list marker ("1.") count as the
    end of a sentence.
    """

    _END = re.compile(r"[.!?](?:\s|$)")
    _LIST_MARKER = re.compile(r"(?m)^\s*(?:\d{1,3}|[A-Za-z])[.)](?=\s|$)")
    _LEAD_IN = re.compile(r"^\W*(?:the\s+)?answer(?:\s+to\s+(?:the|this|your)\s+question)?(?:\s+is)?\W*$", re.I)

    def __init__(self, tokenizer, limit: int):
        self.tokenizer = tokenizer
        self.limit = limit
        self.prompt_length: int | None = None

    @classmethod
    def is_content(cls, paragraph: str) -> bool:
        text = cls._LIST_MARKER.sub("", paragraph).strip()
        return bool(text) and not text.endswith(":") and not cls._LEAD_IN.match(text)

    @classmethod
    def finished(cls, text: str, limit: int) -> bool:
        prose = cls._LIST_MARKER.sub("", text)
        if len(cls._END.findall(prose)) >= limit and prose.rstrip()[-1:] in ".!?":
            return True
        paragraphs = [part.strip() for part in text.lstrip().split("\n\n")[:-1]]  # followed by a blank line
        if len(set(paragraphs)) < len(paragraphs):  # a loop: the model repeats itself
            return True
        return any(cls.is_content(part) for part in paragraphs)

    def __call__(self, input_ids, scores, **kwargs):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1] - 1
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), self.finished(text, self.limit), dtype=torch.bool)


class _Cancelled(StoppingCriteria):
    """Stop when the reader of a streamed generation has gone."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class LocalEngine:
    """A DSPy engine over a transformers causal LM on this machine.

    One generation at a time (a lock); greedy decoding; ``max_tokens`` from the
    request or the engine's cap, whichever is smaller.
    """

    def __init__(
        self, path: str | Path, max_new_tokens: int, name: str, repetition_penalty: float = 1.0, max_sentences: int = 2
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        source = path.parent if kwargs else path
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        self.max_sentences = max_sentences
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
        self.lock = threading.Lock()
        self.generate([{"role": "user", "content": "Hi"}], max_tokens=2)  # warm up

    # -- plain text interface -------------------------------------------------

    def _inputs(self, messages: list[dict]):
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def _generate_kwargs(self, max_tokens: int | None) -> dict:
        cap = min(max_tokens or self.max_new_tokens, self.max_new_tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return {
            "max_new_tokens": cap,
            "do_sample": False,
            "pad_token_id": pad,
            # Small models loop ("X:\n\nX:\n\n...") and ramble: stop at a
            # blank line or after the sentences the prompt asks for. (A
            # repetition penalty would also count the prompt's passages and
            # push the model away from quoting them; it is off by default.)
            "repetition_penalty": self.repetition_penalty,
            "stopping_criteria": StoppingCriteriaList([_AnswerEnd(self.tokenizer, self.max_sentences)]),
        }

    def generate(self, messages: list[dict], max_tokens: int | None = None) -> tuple[str, int, int]:
        """The completion text and the input and output token counts."""
        import torch

        inputs = self._inputs(messages)
        with self.lock, torch.inference_mode():
            out = self.model.generate(**inputs, **self._generate_kwargs(max_tokens))
        n_in = inputs["input_ids"].shape[1]
        new = out[0, n_in:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text, n_in, int(new.shape[0])

    def generate_stream(self, messages: list[dict], max_tokens: int | None = None) -> Iterator[str]:
        """Text pieces as they are decoded (generation runs in a helper thread).

        Closing the iterator early (the client went away) stops the generation
        at the next token, so the engine is free for the next request.
        """
        import torch
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        failure: list[BaseException] = []
        cancelled = threading.Event()
        kwargs = self._generate_kwargs(max_tokens)
        kwargs["stopping_criteria"].append(_Cancelled(cancelled))

        def run() -> None:
            try:
                with self.lock, torch.inference_mode():
                    self.model.generate(**inputs, **kwargs, streamer=streamer)
            except BaseException as exc:  # surfaced to the reader below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="answer-lm-stream", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancelled.set()
            thread.join()
        if failure:
            raise failure[0]

    # -- the DSPy engine contract ---------------------------------------------

    @staticmethod
    def _request_messages(request) -> list[dict]:
        messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            messages.append({"role": "system", "content": system})
        messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        return messages

    def complete(self, request) -> Response:
        text, n_in, n_out = self.generate(self._request_messages(request), request.config.max_tokens)
        return Response(
            id=None,
            model=self.name,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out),
        )

    def stream(self, request):
        yield StreamStartEvent(model=self.name)
        for piece in self.generate_stream(self._request_messages(request), request.config.max_tokens):
            yield StreamDeltaEvent(TextDelta(piece))
        yield StreamEndEvent(finish_reason="stop")

    def close(self) -> None:
        pass


@dataclass
class AnswerLM:
    """The configured LM: a ``dspy.LM`` for the program, plus streaming."""

    name: str
    lm: dspy.LM
    engine: LocalEngine | None = None  # set for local models
    litellm_kwargs: dict | None = None  # set for LiteLLM models (holds the key; never log it)

    def complete(self, messages: list[dict]) -> str:
        """One completion through DSPy (history, callbacks) for ``messages``."""
        outputs = self.lm(messages=messages)
        first = outputs[0]
        return first["text"] if isinstance(first, dict) else str(first)

    def stream(self, messages: list[dict]) -> Iterator[str]:
        if self.engine is not None:
            yield from self.engine.generate_stream(messages)
            return
        import litellm

        response = litellm.completion(messages=messages, stream=True, **self.litellm_kwargs)
        for chunk in response:
            choices = getattr(chunk, "choices", None) or []
            piece = choices[0].delta.content if choices and choices[0].delta else None
            if piece:
                yield piece

    def __repr__(self) -> str:  # keep keys out of reprs and logs
        return f"AnswerLM(name={self.name!r})"


def describe_lm(settings: Settings) -> str:
    """The LM's public name (no URL, no key)."""
    if settings.answer_lm:
        return settings.answer_lm
    if settings.answer_lm_path:
        return LOCAL_PREFIX + Path(settings.answer_lm_path).name
    return LOCAL_PREFIX + "smollm2-135m-instruct"


def load_answer_lm(settings: Settings) -> AnswerLM:
    """Build the configured LM (blocking: loads weights for a local model)."""
    name = describe_lm(settings)
    started = time.perf_counter()
    if settings.answer_lm:
        kwargs: dict = {
            "model": settings.answer_lm,
            "temperature": 0.0,
            "max_tokens": settings.answer_max_new_tokens,
            "timeout": settings.answer_lm_timeout,
        }
        if settings.answer_lm_base_url:
            kwargs["api_base"] = settings.answer_lm_base_url
        if settings.answer_lm_api_key is not None:
            kwargs["api_key"] = settings.answer_lm_api_key.get_secret_value()
        elif settings.answer_lm_base_url:
            kwargs["api_key"] = "none"  # local servers (vLLM, llama.cpp) take any key; clients insist on one
        lm = dspy.LM(cache=False, num_retries=settings.answer_lm_retries, **kwargs)
        log.info("answer LM: %s through LiteLLM", name)
        return AnswerLM(name=name, lm=lm, litellm_kwargs={**kwargs, "num_retries": settings.answer_lm_retries})

    if settings.answer_lm_path:
        path = Path(settings.answer_lm_path).expanduser()
        if not path.exists():  # transformers would take it for a hub name and say so obscurely
            raise FileNotFoundError(f"answer_lm_path: no file or directory {path}")
    else:
        from models.convert_answer_lm import ensure_answer_lm

        path = ensure_answer_lm(settings.models_dir)
    engine = LocalEngine(path, settings.answer_max_new_tokens, name, settings.answer_repetition_penalty)
    lm = dspy.LM(name, engine=engine, cache=False, temperature=0.0, max_tokens=settings.answer_max_new_tokens)
    log.info("answer LM: %s loaded in %.1f s", name, time.perf_counter() - started)
    return AnswerLM(name=name, lm=lm, engine=engine)
