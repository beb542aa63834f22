from lmcli.engine.block_manager import BlockManager
from lmcli.engine.config import SchedulerConfig
from lmcli.engine.sampling_params import SamplingParams
from lmcli.engine.scheduler import Scheduler
from lmcli.engine.sequence import Sequence, Status
from lmcli.engine.session import Session


def make(num_blocks=32, block_size=4, batch=8, budget=16):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_batch_size=batch, max_prefill_token_num=budget), bm), bm


def seq(n, start=0):
    return Sequence(list(range(start, start + n)), SamplingParams())


def run_step(sched, bm, token=7):
    """What the engine does after the model ran: count computed tokens, sample where a sequence is caught up."""
    batch = sched.schedule()
    for s, n in batch:
        s.num_computed += n
        bm.commit(s)
        if s.num_computed == s.num_tokens:
            s.token_ids.append(token)
    return [(s.seq_id, n) for s, n in batch]


def test_budget_splits_a_long_prompt_into_chunks_and_decodes_ride_along():
    sched, bm = make(budget=16)
    a, b = seq(5), seq(40, start=100)
    sched.add(a)
    sched.add(b)
    assert run_step(sched, bm) == [(a.seq_id, 5), (b.seq_id, 11)]  # b's prefill is chunked
    assert run_step(sched, bm) == [(a.seq_id, 1), (b.seq_id, 15)]  # a decodes beside b's next chunk
    assert run_step(sched, bm) == [(a.seq_id, 1), (b.seq_id, 14)]
    assert b.num_computed == 40 and b.num_tokens == 41  # caught up: one token sampled
    assert run_step(sched, bm) == [(a.seq_id, 1), (b.seq_id, 1)]


def test_max_batch_size_caps_running_sequences():
    sched, bm = make(batch=2, budget=64)
    seqs = [seq(3, start=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert [i for i, _ in run_step(sched, bm)] == [seqs[0].seq_id, seqs[1].seq_id]
    sched.finish(seqs[0], "stop")
    assert [i for i, _ in run_step(sched, bm)] == [seqs[1].seq_id, seqs[2].seq_id]
    assert bm.num_free == bm.num_blocks - len(seqs[1].block_table) - len(seqs[2].block_table)


def test_preemption_takes_the_newest_and_recomputes_it_first():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    old, new = seq(8), seq(8, start=50)
    sched.add(old)
    sched.add(new)
    run_step(sched, bm)  # both prefilled: 2 blocks each, 9 tokens each now
    assert bm.num_free == 0
    batch = run_step(sched, bm)  # old needs a third block: the newest running sequence is preempted
    assert batch == [(old.seq_id, 1)]
    assert new.status is Status.WAITING and new.block_table == [] and new.num_computed == 0
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    assert new.num_tokens == 9  # its sampled token is kept, so recomputing gives the same continuation
    sched.finish(old, "stop")
    # recomputed from all its tokens, less its first block, which the prefix cache still held
    assert run_step(sched, bm) == [(new.seq_id, 5)] and new.num_cached_tokens == 4
    bm.check()


def test_a_sequence_too_big_for_the_pool_finishes_instead_of_deadlocking():
    sched, bm = make(num_blocks=2, block_size=4, budget=64)
    s = seq(8)
    sched.add(s)
    run_step(sched, bm)
    run_step(sched, bm)  # 9 tokens need a third block that does not exist
    assert s.finished and s.finish_reason == "length" and "too small" in s.finish_message
    assert sched.dropped == [s] and bm.num_free == 2 and not sched.has_work
    big = seq(20)
    sched.add(big)
    assert run_step(sched, bm) == [] and big.finish_reason == "length"


def test_prefix_hit_is_reported_and_skips_computed_tokens():
    sched, bm = make(budget=64)
    a = seq(10)
    sched.add(a)
    run_step(sched, bm)
    b = seq(10)
    sched.add(b)
    assert run_step(sched, bm) == [(a.seq_id, 1), (b.seq_id, 2)]
    assert b.num_cached_tokens == 8


def test_session_keeps_blocks_between_turns_and_is_evicted_under_pressure():
    sched, bm = make(num_blocks=6, block_size=4, budget=64)
    session = Session(1)
    sched.sessions[1] = session
    turn = seq(6)
    turn.session = session
    session.busy = True
    sched.add(turn)
    run_step(sched, bm)  # 6 computed, 7 tokens
    sched.finish(turn, "stop")
    assert session.token_ids == turn.token_ids and session.num_computed == 6 and len(session.block_table) == 2
    assert bm.num_free == 4  # the session still holds its blocks

    turn2 = Sequence(session.token_ids + [1, 2, 3], SamplingParams())
    turn2.session = session
    sched.add(turn2)
    assert run_step(sched, bm) == [(turn2.seq_id, 4)]  # only the new tokens and the last answer token
    assert turn2.num_cached_tokens == 6
    sched.finish(turn2, "stop")

    other = seq(20, start=300)  # needs 6 blocks: the idle session gives its blocks back
    sched.add(other)
    assert run_step(sched, bm) == [(other.seq_id, 20)]
    assert sched.num_session_evictions == 1 and session.block_table == [] and session.num_computed == 0
    sched.finish(other, "stop")
    sched.end_session(1)
    assert bm.num_free == 6
    bm.check()


def test_abort_while_waiting_or_running_frees_everything():
    sched, bm = make()
    a, b = seq(9), seq(9, start=40)
    sched.add(a)
    run_step(sched, bm)
    sched.add(b)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_work and bm.num_free == bm.num_blocks


def session_turn(sched, session, tokens):
    turn = Sequence(tokens, SamplingParams())
    turn.session, session.busy = session, True
    sched.add(turn)
    return turn


def ran_session(sched, bm, num_tokens):
    """A session whose first turn ran and ended; it keeps its blocks."""
    session = sched.sessions[1] = Session(1)
    first = session_turn(sched, session, list(range(100, 100 + num_tokens)))
    run_step(sched, bm)
    sched.finish(first, "stop")
    return session


def test_a_session_whose_turn_waits_gives_its_blocks_back_instead_of_dropping_others():
    sched, bm = make(num_blocks=8, block_size=4, budget=64)
    session = ran_session(sched, bm, 20)  # it keeps 5 blocks
    other = seq(7, start=200)
    sched.add(other)
    run_step(sched, bm)  # other takes 2 blocks; 1 is free
    session_turn(sched, session, session.token_ids + list(range(300, 308)))  # waits; its session keeps its blocks
    for _ in range(12):
        run_step(sched, bm)
        assert sched.dropped == [] and other.finish_reason is None
    assert other.num_tokens == 7 + 13  # it grew past the free block, with the waiting session's blocks
    bm.check()


def test_a_turn_that_never_ran_leaves_the_history_alone():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    session = ran_session(sched, bm, 6)
    history = list(session.token_ids)
    big = session_turn(sched, session, history + list(range(40)))  # can never fit in 4 blocks
    run_step(sched, bm)
    assert big.finish_reason == "length" and not big.admitted
    assert session.token_ids == history and not session.busy
    bm.check()


def test_an_aborted_turn_that_never_ran_leaves_no_kv_of_its_prompt_in_the_session():
    """A turn waiting for room has a prefix match that reaches into its new prompt; it is aborted before it runs.
    Its session must not keep K/V for tokens of that prompt as if they were history (its next turn would read
    them): it gives its blocks back and rebuilds from its history."""
    sched, bm = make(num_blocks=12, block_size=4, budget=64)
    history, prompt = list(range(8)), list(range(100, 108))
    cached = Sequence(history + prompt + [0], SamplingParams())  # caches history + prompt
    sched.add(cached)
    run_step(sched, bm)
    sched.finish(cached, "stop")
    big = seq(35, start=50)  # holds 9 of the 12 blocks, enough for its next token too
    sched.add(big)
    run_step(sched, bm)
    session = sched.sessions[1] = Session(1)
    session.token_ids = list(history)
    turn = session_turn(sched, session, history + prompt)
    run_step(sched, bm)  # its 16-token prefix match needs 4 blocks; 3 are free: it waits
    assert not turn.admitted and session.num_computed == 12 > len(history)  # the match, kept while it waits
    sched.finish(turn, "abort")
    assert session.num_computed <= len(session.token_ids) == len(history)
    bm.check()
