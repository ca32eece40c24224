"""Scheduler: chunked prefill, decode-first batching, preemption/resume and prefix reuse, without a model.

A fake KV store (one token id per slot) is written through the block tables every step and
read back for every scheduled sequence, so a block table that points at the wrong block,
or a shared block that gets overwritten, fails the check. The fake model's next token
depends on the whole sequence, so resuming from the wrong state changes the outputs.
"""
import pytest

from qwen_int4.engine.block_pool import BlockPool
from qwen_int4.engine.request import Request, SamplingParams, Sequence, SequenceStatus
from qwen_int4.engine.scheduler import Scheduler


def make_seqs(prompts, max_tokens):
    seqs = []
    for i, prompt in enumerate(prompts):
        request = Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens))
        seq = Sequence(i, request, 0, text=None)
        seq.ntk_alpha = 1.0
        request.seqs.append(seq)
        seqs.append(seq)
    return seqs


def next_token(tokens):
    return sum((i + 1) * t for i, t in enumerate(tokens)) % 997


class Simulation:
    def __init__(self, num_blocks, block_size, budget, max_seqs=64, prefix=True):
        self.pool = BlockPool(num_blocks, prefix)
        self.sched = Scheduler(self.pool, block_size, max_seqs, budget)
        self.bs = block_size
        self.store = [None] * (num_blocks * block_size)  # the "KV" of each slot: the token id there
        self.steps = []

    def slot(self, seq, p):
        return seq.block_table[p // self.bs] * self.bs + p % self.bs

    def run(self, seqs, max_tokens, max_steps=10_000):
        for seq in seqs:
            self.sched.add(seq)
        while self.sched.has_unfinished():
            assert len(self.steps) < max_steps, "no progress"
            out = self.sched.schedule()
            self.check(out)
            for seq, n in out.scheduled.items():  # "run the model": write the new tokens' KV
                for p in range(seq.num_computed, seq.num_computed + n):
                    self.store[self.slot(seq, p)] = seq.token_ids[p]
            self.sched.commit(out)
            for seq, n in out.scheduled.items():  # every scheduled sequence reads its whole context
                assert [self.store[self.slot(seq, p)] for p in range(seq.num_computed)] == seq.token_ids[:seq.num_computed]
            for seq in out.scheduled:
                if seq.num_computed == seq.num_tokens:  # "sample"
                    seq.output_ids.append(next_token(seq.token_ids))
                    if len(seq.output_ids) == max_tokens:
                        self.sched.finish(seq, "length")
            self.steps.append({s.seq_id: n for s, n in out.scheduled.items()})
        assert self.pool.num_used == 0, "blocks leaked"
        return [s.output_ids for s in seqs]

    def check(self, out):
        assert out.num_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        holders = {}
        for seq in self.sched.running:
            for b in seq.block_table:
                holders[b] = holders.get(b, 0) + 1
        for b in range(self.pool.num_blocks):
            assert self.pool.ref_counts[b] == holders.get(b, 0), f"block {b}: ref count != holders"
        for seq, n in out.scheduled.items():
            assert seq.status is SequenceStatus.RUNNING and 1 <= n <= seq.num_tokens - seq.num_computed
            assert len(seq.block_table) * self.bs >= seq.num_computed + n


PROMPTS = [list(range(1, 21)), list(range(100, 107)), list(range(200, 237)), list(range(300, 303)), list(range(1, 13))]


def reference(prompts, max_tokens):
    outs = []
    for prompt in prompts:
        tokens, out = list(prompt), []
        for _ in range(max_tokens):
            out.append(next_token(tokens))
            tokens.append(out[-1])
        outs.append(out)
    return outs


def test_unconstrained_run_matches_the_reference_loop():
    sim = Simulation(num_blocks=100, block_size=4, budget=1000)
    assert sim.run(make_seqs(PROMPTS, 12), 12) == reference(PROMPTS, 12)
    assert len(sim.steps) == 12  # one prefill step for all, then one decode step per token


@pytest.mark.parametrize("prefix", [True, False])
def test_chunked_prefill_and_preemption_produce_the_same_tokens(prefix):
    sim = Simulation(num_blocks=16, block_size=4, budget=9, prefix=prefix)  # 64 slots for 5 sequences of up to 55
    seqs = make_seqs(PROMPTS, 18)
    assert sim.run(seqs, 18) == reference(PROMPTS, 18)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert max(sum(step.values()) for step in sim.steps) <= 9


def test_a_long_prompt_is_chunked_while_decodes_continue():
    sim = Simulation(num_blocks=100, block_size=4, budget=8)
    seqs = make_seqs([[1, 2, 3], list(range(10, 40))], 10)
    sim.sched.add(seqs[0])
    first = sim.sched.schedule()  # the short prompt alone
    sim.sched.commit(first)
    seqs[0].output_ids.append(5)
    sim.sched.add(seqs[1])
    steps = []
    while seqs[1].num_computed < seqs[1].num_tokens:
        out = sim.sched.schedule()
        steps.append([out.scheduled.get(s, 0) for s in seqs])
        sim.sched.commit(out)
        seqs[0].output_ids.append(5)  # the decode samples every step
    # the decode goes first every step; the 30-token prompt gets the remaining 7 tokens per step
    assert steps == [[1, 7], [1, 7], [1, 7], [1, 7], [1, 2]]


def test_prefix_blocks_are_reused_not_recomputed():
    sim = Simulation(num_blocks=100, block_size=8, budget=1000)
    shared = list(range(1, 41))  # 40 tokens: 5 full blocks
    a, b, c = make_seqs([shared, shared + [77, 78], shared[:32]], 4)
    sim.sched.add(a)
    out = sim.sched.schedule()
    sim.sched.commit(out)
    assert out.scheduled[a] == 40
    sim.sched.add(b)
    sim.sched.add(c)
    out = sim.sched.schedule()
    assert out.scheduled[b] == 2  # 5 cached blocks, then its own 2 tokens
    assert out.scheduled[c] == 8  # a fully cached prompt recomputes its last block (the last token must run)
    assert b.block_table[:5] == a.block_table[:5] and c.block_table[:3] == a.block_table[:3]
    assert c.block_table[3] != a.block_table[3]
    assert sim.pool.ref_counts[a.block_table[0]] == 3


def test_max_num_seqs_bounds_the_batch():
    sim = Simulation(num_blocks=100, block_size=4, budget=1000, max_seqs=2)
    seqs = make_seqs(PROMPTS, 5)
    assert sim.run(seqs, 5) == reference(PROMPTS, 5)
    assert all(len(step) <= 2 for step in sim.steps)


def test_a_sequence_larger_than_the_pool_ends_with_length():
    sim = Simulation(num_blocks=2, block_size=4, budget=100)
    (seq,) = make_seqs([[1, 2, 3, 4, 5, 6]], 20)
    sim.sched.add(seq)
    for _ in range(10):
        out = sim.sched.schedule()
        if out.finished:
            break
        sim.sched.commit(out)
        seq.output_ids.append(1)
    assert seq.finish_reason == "length" and seq.num_tokens == 9  # 8 slots computed, the 9th had no room
    assert sim.pool.num_used == 0


def test_finish_frees_blocks_and_a_waiting_sequence_holds_none():
    sim = Simulation(num_blocks=10, block_size=4, budget=100)
    a, b = make_seqs([list(range(1, 10)), list(range(1, 5))], 5)
    sim.sched.add(a)
    sim.sched.commit(sim.sched.schedule())
    sim.sched.add(b)
    assert sim.pool.num_used == 3
    sim.sched.finish(b, "abort")  # still waiting
    sim.sched.finish(a, "abort")
    assert sim.pool.num_used == 0 and not sim.sched.has_unfinished()
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "abort"


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="must be >= 1"):
        Scheduler(BlockPool(4), block_size=0, max_num_seqs=1, max_num_batched_tokens=1)
