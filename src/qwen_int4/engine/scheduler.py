"""Continuous-batching scheduler: each step, {sequence: number of its tokens to run}.

Prefill, chunked prefill and decode are one notion: a sequence has `num_tokens` tokens of
which `num_computed` are in the KV cache, and a step runs up to the rest. Running
sequences go first, oldest first (a decode is 1 token; a prompt being prefilled takes what
the token budget leaves, so a long prompt is cut into chunks and never stalls the
decodes); then waiting sequences join while budget, blocks and `max_num_seqs` allow.
When blocks run out, the newest running sequence is preempted by recompute: its blocks
are freed (full ones stay in the prefix cache) and it goes back to the front of the queue,
to be resumed later with its generated tokens as part of its prompt.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_pool import BlockPool, hash_block
from .request import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: dict[Sequence, int]  # sequence -> tokens to run this step, in batch order
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler ("length": no room)

    @property
    def num_tokens(self) -> int:
        return sum(self.scheduled.values())


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"block_size ({block_size}), max_num_seqs ({max_num_seqs}) and "
                             f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= 1")
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(scheduled={})
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._grow(seq, n):
                victim = self.running[-1]  # the newest; never one already scheduled (those are older)
                if victim is seq and len(self.running) == 1:  # alone and still no room: the pool is too small
                    self.finish(seq, "length")
                    out.finished.append(seq)
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was preempted or ended: everything after it is newer and gone too
            out.scheduled[seq] = n
            budget -= n
            i += 1
        if not out.preempted:  # after a preemption, new work would only make it worse
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                n = self._admit(seq, budget)
                if n == 0:
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled[seq] = n
                budget -= n
        return out

    def schedule_ahead(self, seqs: list[Sequence]) -> SchedulerOutput | None:
        """The decode step after the one in flight, planned before its tokens are on the host:
        each of `seqs` (the in-flight step's sampling sequences) runs the token it is sampling.

        Given only when it is what `schedule` would give once those tokens are appended (and
        no sequence ended): `seqs` are the running sequences in order, all computed, nothing
        waiting could join, the token budget holds them and no one is preempted for blocks.
        Else None. Commit it after the tokens are appended (block hashes need their values).
        """
        if (seqs != self.running or len(seqs) > self.max_num_batched_tokens
                or (self.waiting and len(seqs) < self.max_num_seqs)
                or any(seq.num_computed != seq.num_tokens for seq in seqs)):
            return None
        needed = sum(max(0, self._blocks_for(seq.num_computed + 1) - len(seq.block_table)) for seq in seqs)
        if needed > self.pool.num_free:
            return None
        for seq in seqs:
            self._grow(seq, 1)
        return SchedulerOutput(scheduled=dict.fromkeys(seqs, 1))

    def commit(self, out: SchedulerOutput) -> None:
        """After the model ran `out`: the tokens are in the cache; register newly full blocks.
        Sequences that ended meanwhile (a chained step's, see schedule_ahead) are left alone."""
        for seq, n in out.scheduled.items():
            if seq.finished:
                continue
            seq.num_computed += n
            self._register_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (running or waiting) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- blocks -----------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Give a running sequence the blocks for its next `n` tokens; False if not enough are free."""
        needed = self._blocks_for(seq.num_computed + n) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.pool.num_free:
            return False
        seq.block_table += self.pool.allocate(needed)
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Blocks for a waiting sequence's first chunk, reusing cached prefix blocks; tokens to run, or 0."""
        hits = self._prefix_hits(seq)
        computed = len(hits) * self.block_size
        n = min(seq.num_tokens - computed, budget)
        needed = self._blocks_for(computed + n) - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)  # cached blocks leaving the free queue
        if needed > self.pool.num_free - revived:
            return 0
        for block in hits:
            self.pool.take(block)
        seq.block_table = hits + self.pool.allocate(needed)
        seq.num_computed = computed
        seq.num_cached_blocks = len(hits)
        return n

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to the sequence's leading full blocks; the last token always runs."""
        if not self.pool.enable_prefix_caching:
            return []
        self._update_hashes(seq)
        hits = []
        for block_hash in seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _update_hashes(self, seq: Sequence) -> None:
        tokens, bs = seq.token_ids, self.block_size
        for j in range(len(seq.block_hashes), len(tokens) // bs):
            parent = seq.block_hashes[j - 1] if j else None
            seq.block_hashes.append(hash_block(parent, tokens[j * bs:(j + 1) * bs], salt=f"ntk={seq.ntk_alpha}"))

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed // self.block_size
        if not self.pool.enable_prefix_caching or full <= seq.num_cached_blocks:
            return
        self._update_hashes(seq)
        for j in range(seq.num_cached_blocks, full):
            self.pool.cache(seq.block_table[j], seq.block_hashes[j])
        seq.num_cached_blocks = full

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.free(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed = 0
        seq.num_cached_blocks = 0
