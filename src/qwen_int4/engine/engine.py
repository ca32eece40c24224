"""LLMEngine: requests in, a step at a time: schedule -> run the model -> sample -> outputs.

Synchronous and single-threaded (AsyncEngine drives it from a thread for the server).
A request joins the batch at the next step and leaves when its last sequence finishes.
NTK: each sequence's alpha comes from its own prompt length at its first prefill (the
reference's per-sample rule: 1 up to seq_length, then 3, 7, ...) and is kept for all its
decode steps and across preemption, so a sequence never mixes keys of two alphas.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..model.rope import ntk_alpha
from ..tokenizer import QWenTokenizer
from .block_pool import BlockPool
from .request import CompletionOutput, Request, RequestOutput, SamplingParams, Sequence
from .runner import ModelRunner, num_kv_blocks
from .sampler import sample, sample_launch
from .scheduler import Scheduler, SchedulerOutput
from .text import IncrementalText

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine sizes. The KV cache: num_blocks if given, else from kv_cache_gb, else (CUDA) a
    fraction gpu_memory_utilization of the card; see runner.num_kv_blocks. kv_cache_dtype: "auto"
    (the model's dtype) or "int8" (engine/paged_cache.py)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: config.max_position_embeddings
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # decode-only steps replay a captured graph (CUDA only)
    # chained decode steps: launch the next decode step before the host has this one's tokens
    # (LLMEngine.step); None: on when the model is on CUDA (on the CPU nothing runs ahead anyway)
    async_decode: bool | None = None


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: QWenTokenizer, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        num_blocks = config.num_blocks or num_kv_blocks(
            model, config.block_size, config.kv_cache_gb, config.gpu_memory_utilization, config.max_num_batched_tokens,
            config.kv_cache_dtype)
        self.pool = BlockPool(num_blocks, config.enable_prefix_caching)
        context = config.max_model_len or model.config.max_position_embeddings
        capacity = num_blocks * config.block_size
        if capacity < context:
            log.warning("the KV cache holds %d tokens, fewer than the context of %d: max_model_len is %d",
                        capacity, context, capacity)
        self.max_model_len = min(context, capacity)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.max_num_seqs, self.max_model_len,
                                  config.cuda_graphs, config.kv_cache_dtype)
        self.scheduler = Scheduler(self.pool, config.block_size, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_id = model.generation_config.eos_token_id
        self.async_decode = config.async_decode if config.async_decode is not None else model.device.type == "cuda"
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.num_prompt_tokens = 0  # totals, for /metrics
        self.num_generation_tokens = 0
        self.num_preemptions = 0
        self._inflight: tuple[torch.Tensor, list[Sequence]] | None = None  # launched, not yet sampled
        self._ended_by_scheduler: list[Sequence] = []

    # ---- requests ---------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot be served (nothing is queued)."""
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [i for i in prompt_ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                             f"has {len(prompt_ids)} tokens: shorten the prompt or the history")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: lower max_tokens to "
                             f"at most {self.max_model_len - len(prompt_ids)}")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival: float | None = None) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_ids, params)
        request = Request(request_id, prompt_ids, params, arrival)
        cfg = self.model.config
        alpha = ntk_alpha(len(prompt_ids), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
        for i in range(params.n):
            text = IncrementalText(self.tokenizer, params.stop, params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), request, i, text)
            seq.ntk_alpha = alpha
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        self.num_prompt_tokens += len(prompt_ids)
        return request

    def abort_request(self, request_id: str) -> None:
        """Drop a request (client gone): its sequences end and free their blocks now."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Outputs of the requests that changed: one model step's tokens.

        Pipelined: the step in flight is collected (sampled: the host waits for the device, and
        every decision that can end a sequence is taken), the next step is scheduled and launched,
        and only then is the collected step's text decoded and reported, while the device runs.
        A sequence that ends meanwhile (an abort) has its row of the launched step dropped.

        Chained (async_decode, see _plan_ahead): when the next step can only be one more decode of
        the same batch, it is launched before the host waits: its input ids are the in-flight
        step's draws, taken on the device. The device then never idles for the host; a sequence
        that ends on the collected tokens (stop token or string) has its row of that step dropped.
        """
        if self._inflight is None:
            self._launch()
        ahead = self._plan_ahead()
        changed, deferred = self._collect(ahead)
        if ahead is None:
            self._launch()
        for seq, token in deferred:
            seq.text.add(token)  # its request has no stop strings: text cannot end the sequence
        return [self._output(r) for r in changed.values() if r.request_id in self.requests]

    def _launch(self) -> None:
        """Schedule a step and start it on the device (the logits are not waited for)."""
        out: SchedulerOutput = self.scheduler.schedule()
        self.num_preemptions += len(out.preempted)
        self._ended_by_scheduler += out.finished
        if out.scheduled:
            self._inflight = self.runner.execute(out.scheduled)
            self.scheduler.commit(out)

    def _plan_ahead(self) -> SchedulerOutput | None:
        """The next step, if it can be launched before the in-flight step's tokens are known: one
        decode of each of its sampling sequences, where none can end by length on those tokens
        (other endings need their values) and the scheduler would do just that (schedule_ahead)."""
        if not self.async_decode or self._inflight is None or not self._inflight[1]:
            return None
        for seq in self._inflight[1]:
            if len(seq.output_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                return None
        return self.scheduler.schedule_ahead(self._inflight[1])

    def _collect(self, ahead: SchedulerOutput | None = None) -> tuple[dict[str, Request], list[tuple[Sequence, int]]]:
        """Sample the step in flight and append its tokens; (changed requests, tokens whose text waits).
        With `ahead` (from _plan_ahead), that step is launched on the draws before the host waits."""
        changed = {seq.request.request_id: seq.request for seq in self._ended_by_scheduler}
        self._ended_by_scheduler = []
        deferred = []
        if self._inflight is not None:
            (logits, sampling), self._inflight = self._inflight, None
            live = [i for i, seq in enumerate(sampling) if not seq.finished]
            if len(live) < len(sampling):
                logits, sampling = logits[live], [sampling[i] for i in live]
            if ahead is None:
                results = sample(logits, sampling)
            else:  # launch the next step on the draws, then wait for them
                sampled = sample_launch(logits, sampling)
                self._inflight = self.runner.execute(ahead.scheduled, sampled.tokens)
                results = sampled.result()
            for seq, (token, logprob) in zip(sampling, results):
                if self._append(seq, token, logprob):
                    deferred.append((seq, token))
                changed[seq.request.request_id] = seq.request
            if ahead is not None:
                self.scheduler.commit(ahead)  # after the appends: full blocks are hashed by their tokens
        return changed, deferred

    def _append(self, seq: Sequence, token: int, logprob) -> bool:
        """Add a sampled token and end the sequence if it must; True when its text is left for later
        (the request has no stop strings, so only the stop-token and length checks can end it)."""
        request, p = seq.request, seq.params
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.num_generation_tokens += 1
        defer = not seq.text.stop
        reason = None
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            reason = "stop"  # stop tokens end the sequence without entering its text
        elif not defer and seq.text.add(token):
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None:
            return defer
        if defer and reason == "length":
            seq.text.add(token)
        seq.text.finish()
        self.scheduler.finish(seq, reason)
        return False

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            new = slice(seq.num_reported, len(seq.output_ids))
            delta = seq.text.release(final=seq.finished)
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.text.text[: seq.text.released], delta_text=delta,
                token_ids=list(seq.output_ids), delta_token_ids=seq.output_ids[new],
                delta_logprobs=seq.logprobs[new] if seq.logprobs else [], finish_reason=seq.finish_reason,
            ))
            seq.num_reported = len(seq.output_ids)
        if request.finished:
            del self.requests[request.request_id]
        ttft = None if request.first_token_time is None else request.first_token_time - request.arrival
        return RequestOutput(request.request_id, request.prompt_ids, outputs, request.finished,
                             sum(len(s.output_ids) for s in request.seqs), ttft)

    # ---- offline use ------------------------------------------------------------------
    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion (all batched together); final outputs in prompt order."""
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{next(self._seq_ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params_list):
            self.add_request(request_id, prompt, p)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]

    def stats(self) -> dict[str, int]:
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "kv_blocks_used": self.pool.num_used,
            "kv_blocks_total": self.pool.num_blocks,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generation_tokens,
            "preemptions_total": self.num_preemptions,
        }
