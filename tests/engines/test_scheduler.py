"""The scheduler on tiny random models: batched greedy answers equal lone ones, continuous
batching (joins, leaves, cancels, evictions mid-batch), limits and order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from streaming_llm.engines.decoding import Sampler, decode_step, forward_tokens
from streaming_llm.engines.scheduler import Feed, Outcome, Request, RequestState, Scheduler
from streaming_llm.engines.sink_cache import SinkCache
from streaming_llm.engines.step import LlamaStep, ModelStep

from .tiny_models import random_ids, tiny_model, torch_threads

S, W = 4, 32
CHUNK = 16
# Prompt lengths and answer lengths: with S + W = 36 slots, rows 2, 5 and 6 evict while they
# answer and rows 1 and 7 never do.
LENGTHS = [3, 10, 25, 31, 7, 40, 2, 16]
ANSWERS = [40, 25, 60, 10, 33, 50, 45, 20]
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama", layers=2)


@pytest.fixture(params=["model", "llama"])
def new_scheduler(request: pytest.FixtureRequest, model: Any) -> Callable[..., Scheduler]:
    """Schedulers stepping with the model's own forward, and with the written-out Llama step."""
    step = ModelStep(model) if request.param == "model" else LlamaStep(model)
    return lambda **kwargs: Scheduler(model, step=step, **kwargs)


class Recorder:
    """A handler that records everything and can act on its n-th token."""

    def __init__(self, model: Any, prompt: Sequence[int], *, dense: bool = False,
                 closing: Sequence[int] = (), log: list[tuple[str, int]] | None = None,
                 name: int = 0) -> None:
        self.model, self.prompt, self.dense, self.closing = model, list(prompt), dense, closing
        self.tokens: list[int] = []
        self.fed: list[int] = []
        self.evicted_at_start: int | None = None
        self.outcome: Outcome | None = None
        self.error: Exception | None = None
        self.cache: Any = None
        self.done = threading.Event()
        self.on_token: dict[int, Callable[[], None]] = {}
        self.log = log if log is not None else []
        self.name = name
        self.prepared = False

    def prepare(self) -> Feed:
        self.prepared = True
        self.cache = DynamicCache() if self.dense else SinkCache.from_model(self.model, S, W)
        return Feed(self.cache, self.prompt, reserve=8)

    def consumed(self, ids: Sequence[int]) -> None:
        self.fed.extend(ids)
        self.log.append(("fed", self.name))

    def token(self, token: int) -> bool:
        if not self.tokens and not self.dense:
            self.evicted_at_start = self.cache.evicted_tokens
        self.tokens.append(token)
        self.log.append(("token", self.name))
        if (action := self.on_token.get(len(self.tokens))) is not None:
            action()
        return True

    def finished(self, outcome: Outcome) -> Feed | None:
        self.outcome = outcome
        return Feed(self.cache, self.closing) if self.closing else None

    def released(self) -> None:
        self.log.append(("released", self.name))
        self.done.set()

    def failed(self, error: Exception) -> None:
        self.error = error
        self.done.set()


def lone_greedy(model: Any, cache: Any, prompt: list[int], n: int) -> list[int]:
    """The lone decode loop's greedy answer: the prompt in chunks, then one decode_step a token."""
    logits = forward_tokens(model, cache, prompt, chunk_size=CHUNK)
    tokens = []
    while True:
        tokens.append(int(torch.argmax(logits)))
        if len(tokens) == n:
            return tokens
        logits = decode_step(model, cache, tokens[-1])


def request(handler: Recorder, max_new: int, key: str | None = None) -> Request:
    return Request(key=key or f"c{id(handler)}", handler=handler, sampler=Sampler(0),
                   max_new_tokens=max_new)


def wait(handlers: Sequence[Recorder]) -> None:
    for h in handlers:
        assert h.done.wait(TIMEOUT), "a request never finished"


def one_at_a_time(new_scheduler: Callable[..., Scheduler], model: Any, prompts: list[list[int]],
                  answers: list[int]) -> list[list[int]]:
    scheduler = new_scheduler(max_batch=8, prefill_chunk=CHUNK)
    try:
        out = []
        for prompt, n in zip(prompts, answers, strict=True):
            h = Recorder(model, prompt)
            scheduler.submit(request(h, n))
            wait([h])
            assert h.outcome is not None and h.outcome.batch_size <= 1
            out.append(h.tokens)
        return out
    finally:
        scheduler.close()


def prompts() -> list[list[int]]:
    return [random_ids(n, seed=i) for i, n in enumerate(LENGTHS)]


def test_greedy_answers_batched_equal_one_at_a_time(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    alone = one_at_a_time(new_scheduler, model, prompts(), ANSWERS)
    scheduler = new_scheduler(max_batch=8, prefill_chunk=CHUNK)
    handlers = [Recorder(model, p) for p in prompts()]
    # Rows 0-4 start together; rows 5-7 join mid-way, when row 0 has produced 5 tokens.
    handlers[0].on_token[5] = lambda: [scheduler.submit(request(handlers[i], ANSWERS[i]))
                                       for i in (5, 6, 7)]
    try:
        for i in range(5):
            scheduler.submit(request(handlers[i], ANSWERS[i]))
        wait(handlers)
    finally:
        scheduler.close()
    together = [h.tokens for h in handlers]
    # Identical token sequences (no float tie was needed on CPU: each row's arithmetic is the
    # same whatever the other rows hold, see batch_cache B.2).
    assert together == alone
    outcomes = [h.outcome for h in handlers]
    assert all(o is not None and o.reason == "length" for o in outcomes)
    assert max(o.batch_size for o in outcomes if o) >= 5  # they really ran together
    evicted_while_answering = [o.evicted_tokens - h.evicted_at_start  # type: ignore[operator]
                               for o, h in zip(outcomes, handlers, strict=True) if o]
    assert all(evicted_while_answering[i] > 0 for i in (2, 5, 6))
    assert all(evicted_while_answering[i] == 0 for i in (1, 7))
    assert len({t for tokens in together for t in tokens}) > 10


def test_answers_equal_the_lone_decode_loop(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    """One at a time, the scheduler gives what the lone decode loop gives (same prompt chunks)."""
    for prompt, n in zip(prompts()[:4], ANSWERS[:4], strict=True):
        [mine] = one_at_a_time(new_scheduler, model, [prompt], [n])
        cache = SinkCache.from_model(model, S, W)
        cache.make_room(min(len(prompt) + min(8, W // 2), W))  # the scheduler reserves room too
        assert mine == lone_greedy(model, cache, prompt, n)


def test_cancel_of_one_row_leaves_the_others_intact(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    alone = one_at_a_time(new_scheduler, model, prompts()[:4], ANSWERS[:4])
    scheduler = new_scheduler(max_batch=8, prefill_chunk=CHUNK)
    handlers = [Recorder(model, p) for p in prompts()[:4]]
    requests = [request(h, n) for h, n in zip(handlers, ANSWERS[:4], strict=True)]
    handlers[2].on_token[4] = requests[2].cancel.set
    try:
        for r in requests:
            scheduler.submit(r)
        wait(handlers)
    finally:
        scheduler.close()
    cancelled = handlers[2]
    assert cancelled.outcome is not None and cancelled.outcome.reason == "cancelled"
    assert requests[2].state is RequestState.CANCELLED
    # it stopped within one step: at most one token after the cancel
    assert 4 <= len(cancelled.tokens) <= 5 and cancelled.tokens == alone[2][:len(cancelled.tokens)]
    # its cache holds what it was fed: the prompt and every token but the last
    assert cancelled.cache.seen_tokens == len(cancelled.fed) == LENGTHS[2] + len(cancelled.tokens) - 1
    for i in (0, 1, 3):
        assert handlers[i].tokens == alone[i]


def test_max_batch_limits_the_live_requests_first_come_first_served(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    log: list[tuple[str, int]] = []
    scheduler = new_scheduler(max_batch=2, prefill_chunk=CHUNK)
    handlers = [Recorder(model, p, log=log, name=i) for i, p in enumerate(prompts()[:5])]
    try:
        for h in handlers:
            scheduler.submit(request(h, 6))
        wait(handlers)
    finally:
        scheduler.close()
    live, most = set(), 0
    first_tokens = []
    for event, name in log:
        if event == "fed":
            live.add(name)
        elif event == "released":
            live.discard(name)
        elif name not in first_tokens:
            first_tokens.append(name)
        most = max(most, len(live))
    assert most == 2
    assert first_tokens == [0, 1, 2, 3, 4]


def test_a_joining_prompt_stalls_decoding_rows_one_chunk_per_step(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    log: list[tuple[str, int]] = []
    scheduler = new_scheduler(max_batch=4, prefill_chunk=4)
    decoding = Recorder(model, random_ids(3, seed=1), log=log, name=0)
    joining = Recorder(model, random_ids(30, seed=2), log=log, name=1)
    decoding.on_token[2] = lambda: scheduler.submit(request(joining, 3))
    try:
        scheduler.submit(request(decoding, 20))
        wait([decoding, joining])
    finally:
        scheduler.close()
    first_join = log.index(("fed", 1))
    between = 0
    for event, name in log[first_join:]:
        if (event, name) == ("token", 0):
            assert between <= 1  # one prompt chunk of the joiner per decode step, at most
            between = 0
        elif (event, name) == ("fed", 1) and joining.tokens == []:
            between += 1
    assert joining.fed[:30] == joining.prompt and len(decoding.tokens) == 20


def test_turns_of_one_conversation_run_one_after_another_and_close_first(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    log: list[tuple[str, int]] = []
    scheduler = new_scheduler(max_batch=4, prefill_chunk=CHUNK)
    first = Recorder(model, random_ids(5, seed=1), closing=[7, 8, 9], log=log, name=0)
    second = Recorder(model, random_ids(5, seed=2), log=log, name=1)
    try:
        scheduler.submit(request(first, 4, key="conv"))
        scheduler.submit(request(second, 4, key="conv"))
        wait([first, second])
    finally:
        scheduler.close()
    assert log.index(("released", 0)) < log.index(("fed", 1))
    # the closing ids went in after the answer (all its tokens but the last were fed)
    assert first.fed == [*first.prompt, *first.tokens[:-1], 7, 8, 9]
    assert first.cache.seen_tokens == len(first.fed)


def test_dense_caches_decode_one_by_one_beside_the_batch(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    scheduler = new_scheduler(max_batch=4, prefill_chunk=CHUNK)
    dense = Recorder(model, random_ids(9, seed=5), dense=True)
    sink = Recorder(model, random_ids(9, seed=6))
    try:
        scheduler.submit(request(dense, 12))
        scheduler.submit(request(sink, 12))
        wait([dense, sink])
    finally:
        scheduler.close()
    assert dense.tokens == lone_greedy(model, DynamicCache(), dense.prompt, 12)
    assert dense.outcome is not None and dense.outcome.evicted_tokens is None


def test_a_request_cancelled_while_waiting_never_prepares(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    scheduler = new_scheduler(max_batch=1, prefill_chunk=CHUNK)
    running = Recorder(model, random_ids(4, seed=1))
    queued = Recorder(model, random_ids(4, seed=2))
    queued_request = request(queued, 5)
    running.on_token[2] = queued_request.cancel.set
    try:
        scheduler.submit(request(running, 8))
        scheduler.submit(queued_request)
        wait([running, queued])
    finally:
        scheduler.close()
    assert not queued.prepared and queued.tokens == []
    assert queued.outcome is not None and queued.outcome.reason == "cancelled"
    assert not queued.outcome.prepared
    assert len(running.tokens) == 8


def test_a_failing_handler_fails_only_its_own_request(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    scheduler = new_scheduler(max_batch=4, prefill_chunk=CHUNK)
    good, bad = Recorder(model, random_ids(6, seed=1)), Recorder(model, random_ids(6, seed=2))

    def boom() -> None:
        raise RuntimeError("boom")

    bad.on_token[3] = boom
    try:
        scheduler.submit(request(good, 10))
        scheduler.submit(request(bad, 10))
        wait([good, bad])
        assert scheduler.wait_idle(TIMEOUT)
    finally:
        scheduler.close()
    assert isinstance(bad.error, RuntimeError) and bad.outcome is None
    assert good.error is None and len(good.tokens) == 10


def test_stop_from_the_handler_and_bad_settings(new_scheduler: Callable[..., Scheduler], model: Any) -> None:
    scheduler = new_scheduler(max_batch=2, prefill_chunk=CHUNK)
    h = Recorder(model, random_ids(6, seed=1))
    h.token = lambda token: (h.tokens.append(token), len(h.tokens) < 3)[1]  # type: ignore[method-assign]
    try:
        scheduler.submit(request(h, 10))
        wait([h])
    finally:
        scheduler.close()
    assert h.outcome is not None and h.outcome.reason == "stop" and len(h.tokens) == 3
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(request(h, 1))
    with pytest.raises(ValueError, match="max_batch"):
        new_scheduler(max_batch=0)
    assert torch.get_num_threads() == 1
