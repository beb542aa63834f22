"""`lm serve api_client` in a real pseudo-terminal (pexpect) and in a shell pipeline, against a real server on
the real model; its errors against servers that refuse it."""

import json
import os
import re
import subprocess
import time

import httpx
import pexpect
import pytest

from conftest import assert_one_line_error, run_lm
from fake_engine import FakeEngine
from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.api_server import create_app
from lmcli.serve.state import ServerOptions
from servers import LM, LmServer, serve_in_thread


@pytest.fixture(scope="module")
def server(smollm2_workspace, tmp_path_factory):
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--session-len", "320",
                 log_dir=tmp_path_factory.mktemp("log"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def gauge(server, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(server.url + "/metrics").text, re.M).group(1))


def history(server, session_id: int) -> int:
    """The tokens the server keeps for a session (a cancel request reports them and changes nothing idle)."""
    r = httpx.post(server.url + "/v1/chat/interactive", json={"prompt": "", "session_id": session_id, "cancel": True})
    return r.json()["history_tokens"]


def spawn(url: str, tmp_path, *args) -> pexpect.spawn:
    env = {**os.environ, "LMCLI_CACHE": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
    return pexpect.spawn(str(LM), ["serve", "api_client", url, "--temperature", "0", "--max-new-tokens", "150", *args],
                         env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))


def answer(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect(r"(\d+) tokens, [\d.]+ tokens/s")
    out = child.before
    child.expect(">>>")
    return out


def test_a_conversation_in_a_terminal(server, tmp_path):
    child = spawn(server.url, tmp_path)
    child.expect(r"session (\d+)\.")
    sid = int(child.match.group(1))
    child.expect(">>>")
    assert "Ada" in answer(child, "My name is Ada.")
    first = history(server, sid)
    answer(child, "What is my name?")
    second = history(server, sid)
    assert second > first > 0  # the server keeps the conversation; the terminal sends only the new message
    # multi-line input: a trailing backslash continues on the next line
    child.send("Repeat these two lines:\\\r")
    child.send("apple\r")
    child.expect(r"tokens/s")
    assert "... apple" in child.before
    child.expect(">>>")
    # Ctrl-C mid-answer stops it on the server; the session goes on
    child.sendline("Write a very long story about dragons and knights.")
    child.expect_exact("\x1b[?2004l")  # the prompt is done
    child.expect(r"\w")  # the answer started
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(">>>")
    deadline = time.monotonic() + 60  # the server ends the request when it sees the disconnect: wait for that
    while gauge(server, "lm_requests_running") != 0:
        assert time.monotonic() < deadline, "the stopped answer still runs on the server"
        time.sleep(0.05)
    stopped = history(server, sid)
    answer(child, "Thanks.")
    assert history(server, sid) > stopped
    # /help, an unknown command, /reset ends the session on the server
    child.sendline("/help")
    child.expect("/system TEXT")
    child.expect(">>>")
    child.sendline("/nope")
    child.expect("unknown command")
    child.expect(">>>")
    child.sendline("/reset")
    child.expect(r"a new conversation, session (\d+)")
    new_sid = int(child.match.group(1))
    child.expect(">>>")
    assert new_sid != sid and history(server, sid) == 0
    child.sendline("/system You are a pirate.")
    child.expect("with that system prompt")
    child.expect(">>>")
    answer(child, "Hello!")
    child.sendline("/json")  # answers as JSON objects, enforced by the server, until /json again
    child.expect(r"answers as JSON objects")
    child.expect(">>>")
    shown = answer(child, "Describe a ship.").split("\x1b[?2004l")[-1]  # after the prompt's own escapes
    assert isinstance(json.loads(shown[:shown.rindex("}") + 1]), dict), shown
    child.sendline("/json")
    child.expect(r"answers as text")
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and gauge(server, "lm_sessions") == 0  # leaving ended the session


def test_history_is_kept_across_runs_and_ctrl_c_quits(server, tmp_path):
    child = spawn(server.url, tmp_path)
    child.expect(">>>")
    answer(child, "Remember the word zebra.")
    child.sendintr()  # Ctrl-C at an empty prompt quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Remember the word zebra." in (tmp_path / "api_client_history").read_text()
    again = spawn(server.url, tmp_path)
    again.expect(">>>")
    again.send("\x1b[A")  # Up: the last prompt of the earlier run
    again.expect("Remember the word zebra.")
    again.sendintr()  # Ctrl-C with text on the line clears it, a second one quits
    again.sendintr()
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0


def test_piped_in_a_shell_pipeline(server):
    script = (f"printf 'What is the capital of France?\\n\\nWhat is the capital of Italy?\\n' | "
              f"{LM} serve api_client {server.url} --temperature 0 --max-new-tokens 24 | tr a-z A-Z")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and "PARIS" in lines[0] and "ROME" in lines[1]
    assert gauge(server, "lm_sessions") == 0


def test_piped_json_answers_parse(server):
    done = subprocess.run([str(LM), "serve", "api_client", server.url, "--json", "--temperature", "0",
                           "--max-new-tokens", "120"], input="Describe a cat.\nAnd a dog.\n", capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]  # each answer one line of JSON
    assert len(answers) == 2 and all(isinstance(a, dict) for a in answers)


def test_a_full_session_says_so(server):
    lines = "".join(f"Tell me fact number {i} about the sea.\n" for i in range(12))
    done = run_lm("serve", "api_client", server.url, "--temperature", "0", "--max-new-tokens", "60", input=lines,
                  timeout=300)
    assert_one_line_error(done, "is full")  # a script learns it from the exit code
    answers = done.stdout.splitlines()
    assert 2 <= len(answers) < 12 and all(answers)  # one line per answer until then
    assert gauge(server, "lm_sessions") == 0


def test_refused_turns_and_odd_input_keep_the_terminal_going(server, tmp_path):
    child = spawn(server.url, tmp_path, "--session-id", "4242")
    child.expect(">>>")
    child.sendline("/foo[/]")  # rich markup in an unknown command
    child.expect("unknown command")
    child.expect(">>>")
    # the session is busy with another client's turn: one red line, and the prompt comes back
    busy = subprocess.Popen(["curl", "-sN", server.url + "/v1/chat/interactive", "-d",
                             '{"prompt": "Count to a thousand.", "session_id": 4242, "interactive_mode": true, '
                             '"stream": true, "ignore_eos": true, "request_output_len": 300}'],
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while gauge(server, "lm_requests_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.sendline("Hello?")
        child.expect("error: session 4242 is busy")
        child.expect(">>>")
    finally:
        busy.kill()
    child.send("abc\\")
    child.send("\x1b[D\x1b[D\r")  # Enter with the cursor before the backslash: a plain character; it sends
    child.expect(r"tokens/s")
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before
    assert history(server, 4242) == 0  # ended on the way out
    assert_one_line_error(run_lm("serve", "api_client", "http://[::1", input=""), "not a URL")


def test_errors_are_one_line(tmp_path):
    assert_one_line_error(run_lm("serve", "api_client", "http://127.0.0.1:9", input=""), "cannot reach")
    app = create_app(AsyncEngine(FakeEngine()), ServerOptions(api_keys=("right",)))
    with serve_in_thread(app) as url:
        assert_one_line_error(run_lm("serve", "api_client", url, "--api-key", "wrong", input="hi\n"), "API key")
        done = run_lm("serve", "api_client", url, input="hi\n", env={"LM_API_KEY": "right"})
        assert done.returncode == 0 and done.stdout.startswith("Hello from the fake engine")
        assert_one_line_error(run_lm("serve", "api_client", url + "/nothing", "--api-key", "right", input=""),
                              "not an lm api_server")


def test_help_lists_every_option():
    from typer.testing import CliRunner

    from lmcli.cli import build_app

    result = CliRunner().invoke(build_app(), ["serve", "api_client", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--api-key", "--session-id", "--system", "--temperature", "--top-p", "--top-k",
                   "--max-new-tokens", "--json", "LM_API_KEY", "piped"):
        assert option in result.output, option
