"""`lm bench serve`: the ShareGPT set as vLLM and LMDeploy filter it, the measurements, the table and the JSON,
against a server on a real socket."""

import json

import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, run_lm
from fake_engine import FakeEngine
from servers import serve_in_thread
from lmcli.bench import datasets
from lmcli.bench.serve import Result, percentile, results_json, summarize
from lmcli.cli import build_app
from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.api_server import create_app


def test_summary_math():
    results = [Result(True, 10, 5, ttft=0.5, latency=1.3, itl=[0.2] * 4), Result(True, 20, 3, ttft=1.0, latency=1.4,
                                                                                  itl=[0.2, 0.2]),
               Result(False, 7, error="500: boom")]
    s = summarize(results, duration=2.0)
    assert (s["successful"], s["failed"], s["request_throughput"]) == (2, 1, 1.0)
    assert s["input_throughput"] == 15 and s["output_throughput"] == 4
    assert s["ttft"]["mean"] == pytest.approx(0.75) and s["e2e"]["median"] == pytest.approx(1.35)
    assert s["tpot"]["mean"] == pytest.approx((0.8 / 4 + 0.4 / 2) / 2) and s["itl"]["median"] == pytest.approx(0.2)
    assert s["errors"] == ["500: boom"]
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


def test_compare_puts_results_side_by_side(tmp_path):
    def write(name, duration, tokens):
        s = summarize([Result(True, 10, tokens, ttft=0.25, latency=1.0, itl=[0.5])], duration)
        (tmp_path / f"{name}.json").write_text(results_json(s, {}, []))
        return tmp_path / f"{name}.json"

    done = run_lm("bench", "compare", write("lm", 2.0, 600), write("llama-server", 2.0, 200),
                  write("transformers", 4.0, 100), env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 5}
    assert "300.0" in rows["lm"] and "1.00x" in rows["lm"]
    assert "100.0" in rows["llama-server"] and "3.00x" in rows["llama-server"]
    assert "25.0" in rows["transformers"] and "12.00x" in rows["transformers"] and "250 ms" in rows["transformers"]
    assert_one_line_error(run_lm("bench", "compare", tmp_path / "missing.json"), "cannot read")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "partial.json").write_text('{"summary": {"successful": 1}}')
    for name in ("list.json", "partial.json"):
        assert_one_line_error(run_lm("bench", "compare", tmp_path / "lm.json", tmp_path / name), "cannot read")


def test_the_real_sharegpt_file_keeps_its_complete_records():
    conversations = datasets.load_conversations(datasets.sharegpt_path())
    assert len(conversations) == 17_671 and all("conversations" in c for c in conversations)


def test_sharegpt_filter_and_random_set(smollm2_workspace, tmp_path):
    from lmcli.workspace import Workspace

    tok = Workspace.load(smollm2_workspace).tokenizer()
    path = tmp_path / "sg.json"
    turns = lambda a, b: {"conversations": [{"from": "human", "value": a}, {"from": "gpt", "value": b}]}  # noqa
    records = [turns("Tell me about the sea, please.", "The sea is large and deep and blue."),
               turns("Hi", "Hello there, how are you today?"),  # prompt under 4 tokens
               turns("What is two plus two, exactly?", "4"),  # answer under 4 tokens
               turns("word " * 1100, "A long answer of many words here."),  # prompt over 1024
               {"conversations": [{"from": "human", "value": "Only one turn here."}]},
               turns("Name three colors for me.", "Red, green and blue are three.")]
    path.write_text(json.dumps(records)[:-40])  # cut off mid-record, as the real copy is
    picked = datasets.sharegpt(tok, 10, seed=1, path=path)
    assert sorted(r.prompt for r in picked) == ["Tell me about the sea, please."]  # the last record was cut
    assert picked[0].prompt_len == len(tok("Tell me about the sea, please.").input_ids) and picked[0].output_len > 4
    assert datasets.sharegpt(tok, 10, path=path, output_len=50)[0].output_len == 50
    assert datasets.sharegpt(tok, 10, path=path, max_output_len=3)[0].output_len == 3
    assert datasets.sharegpt(tok, 10, path=path, max_output_len=100)[0].output_len == picked[0].output_len
    rnd = datasets.random_set(tok, 3, 64, 16, seed=2)
    assert len(rnd) == 3 and all(48 <= r.prompt_len <= 80 and r.output_len == 16 for r in rnd)


def test_bench_serve_against_a_server(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Question number {i}?"},
                                                   {"from": "gpt", "value": f"Answer number {i} is here."}]}
                                for i in range(6)]))
    with serve_in_thread(create_app(AsyncEngine(FakeEngine()))) as url:
        out = tmp_path / "out.json"
        for backend in ("chat", "completions"):
            done = run_lm("bench", "serve", url, "--dataset-path", path, "--num-prompts", "5", "--concurrency", "2",
                          "--request-rate", "50", "--backend", backend, "--ignore-eos", "--output", out,
                          env={"COLUMNS": "160"})
            assert done.returncode == 0, done.stderr
            for label in ("successful requests", "5 / 5", "output tokens/s", "TTFT mean / median / p99", "TPOT",
                          "ITL", "end-to-end latency"):
                assert label in done.stdout, label
            data = json.loads(out.read_text())
            s = data["summary"]
            # the answers' lengths (24 characters, one token each here) are asked for, and generated (ignore_eos)
            assert s["successful"] == 5 and s["total_output_tokens"] == 5 * 24 and s["total_input_tokens"] > 5 * 15
            assert data["config"]["backend"] == backend and len(data["requests"]) == 5
            assert all(r["ttft"] > 0 and len(r["itl"]) == 23 for r in data["requests"])
    assert_one_line_error(run_lm("bench", "serve", "http://127.0.0.1:9"), "cannot reach")


def test_help():
    result = CliRunner().invoke(build_app(), ["bench", "serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--dataset", "--num-prompts", "--concurrency", "--request-rate", "--seed", "--ignore-eos",
                   "--backend", "--output", "--tokenizer", "--api-key"):
        assert option in result.output, option


def test_bench_sessions_against_a_server(tmp_path):
    path = tmp_path / "sg.json"
    chat = lambda i: {"conversations": [x for k in range(4) for x in (  # noqa: E731
        {"from": "human", "value": f"Conversation {i}, message {k}."}, {"from": "gpt", "value": "Sure."})]}
    path.write_text(json.dumps([chat(i) for i in range(3)] + [{"conversations": []}]))
    engine = FakeEngine()
    with serve_in_thread(create_app(AsyncEngine(engine))) as url:
        out = tmp_path / "sessions.json"
        done = run_lm("bench", "sessions", url, "--dataset-path", path, "--num-sessions", "2", "--turns", "3",
                      "--output-len", "5", "--output", out, env={"COLUMNS": "160"})
        assert done.returncode == 0, done.stderr
        assert "TTFT by turn" in done.stdout and "vs turn 1" in done.stdout
        data = json.loads(out.read_text())
        assert [len(x) for x in data["interactive"]] == [3, 3] and len(data["stateless_median"]) == 3
        sessions = [a for a in engine.added if a[3] is not None]
        stateless = [a for a in engine.added if a[3] is None][1:]  # after the warm-up
        assert len(sessions) == 6 and len({a[3] for a in sessions}) == 2  # two server sessions, three turns each
        assert all("message 0" not in "".join(map(chr, a[1])) for a in sessions if "message 2" in "".join(map(chr, a[1])))
        assert any("message 0" in "".join(map(chr, a[1])) and "message 2" in "".join(map(chr, a[1]))
                   for a in stateless)  # the stateless third turn resends the first
        assert not engine.sessions  # every session ended
        engine.added.clear()
        done = run_lm("bench", "sessions", url, "--message", "Same words.", "--num-sessions", "1", "--turns", "3",
                      "--output-len", "5", "--dataset-path", tmp_path / "missing.json")  # no ShareGPT needed
        assert done.returncode == 0, done.stderr
        sessions = [a for a in engine.added if a[3] is not None]
        assert len(sessions) == 3 and all("".join(map(chr, a[1])).count("Same words.") == 1 for a in sessions)
    done = run_lm("bench", "sessions", "http://127.0.0.1:9")
    assert_one_line_error(done, "cannot reach")
