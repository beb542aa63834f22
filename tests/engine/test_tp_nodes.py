"""Tensor parallelism across machines: two `lm` processes on loopback stand for two hosts (--nnodes 2), each
started with the same command and its own --node-rank, as a user runs them."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import LM, assert_one_line_error, run_lm
from lmcli.engine.distributed import WorkerError
from lmcli.engine.engine import Engine
from lmcli.workspace import Workspace
from test_tp import greedy_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))
from servers import LmServer, free_port, wait_for  # noqa: E402

OPTIONS = dict(dtype="float32", cache_block_seq_len=16, num_blocks=256, max_prefill_token_num=128)


def start_node(workspace, port: int, log: Path, *args) -> subprocess.Popen:
    """`lm serve api_server WS --tp 2 --nnodes 2 --node-rank 1 ...`: node 1, in a process group of its own."""
    return subprocess.Popen([str(LM), "serve", "api_server", str(workspace), "--tp", "2", "--nnodes", "2",
                             "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)


def test_two_nodes_give_the_greedy_tokens_of_one_process(smollm2_workspace, tmp_path):
    single = Engine(smollm2_workspace, **OPTIONS)
    try:
        expected = greedy_run(single)
    finally:
        single.close()
    port = free_port()
    node = start_node(smollm2_workspace, port, tmp_path / "node1.log")  # before node 0: it waits for it
    try:
        engine = Engine(smollm2_workspace, tp=2, nnodes=2, master_addr="127.0.0.1", master_port=port, **OPTIONS)
        try:
            assert engine.runner.workers == [] and list(engine.runner.remote) == [1]  # rank 1 is node 1's
            assert greedy_run(engine) == expected
            engine.check()  # the idle probe: a collective node 1 answers
        finally:
            engine.close()
        assert node.wait(60) == 0, (tmp_path / "node1.log").read_text()  # node 0's end ends node 1's ranks
        assert "node 1 of 2: tensor-parallel ranks 1..1 of 2" in (tmp_path / "node1.log").read_text()
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)


def chat(url: str, text: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": text}], "max_tokens": 12,
        "temperature": 0})


def test_a_node_that_dies_turns_health_to_503_and_fails_requests(smollm2_workspace, tmp_path):
    port = free_port()
    server = LmServer(smollm2_workspace, "--tp", 2, "--nnodes", 2, "--master-port", port, "--num-kv-blocks", 64,
                      log_dir=tmp_path)
    node = start_node(smollm2_workspace, port, tmp_path / "node1.log")  # after node 0: node 0 waits for it
    try:
        server.wait_ready()
        answer = chat(server.url, "What is the capital of France?")
        assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
        os.killpg(node.pid, signal.SIGKILL)  # the host goes away
        node.wait()
        health = wait_for(lambda: (r := httpx.get(server.url + "/health", timeout=30)).status_code == 503 and r)
        assert "another node is gone" in health.text, health.text  # the idle probe saw it at once
        refused = chat(server.url, "Hello again")
        assert refused.status_code == 503 and "another node is gone" in refused.json()["error"]["message"]
        assert server.proc.poll() is None  # node 0 keeps answering, with the reason
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        server.stop()


def test_node_options_are_checked_before_anything_starts(smollm2_workspace):
    for args, needle in ((["--tp", "3", "--nnodes", "2"], "nnodes must divide tp"),
                         (["--tp", "2", "--nnodes", "2", "--node-rank", "2"], "node_rank must be in 0..1"),
                         (["--tp", "2", "--nnodes", "2", "--master-port", "0"], "needs master_port in 1..65535")):
        assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, *args), needle)


def other_config(ws: Path) -> None:
    manifest = json.loads((ws / "lm_workspace.json").read_text())
    manifest["model"]["rope_theta"] = 10000.0  # the same shapes, another model
    (ws / "lm_workspace.json").write_text(json.dumps(manifest))


def other_weights(ws: Path) -> None:
    """The same config, a weight changed: a fine-tune. The file's last bytes are weights (the header is first)."""
    weights = ws / json.loads((ws / "lm_workspace.json").read_text())["weight_files"][-1]
    with open(weights, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        last = f.read(2)
        f.seek(-2, os.SEEK_END)
        f.write(bytes(b ^ 1 for b in last))


def test_fingerprint_tells_workspaces_apart(smollm2_workspace, tmp_path):
    same, config, weights = (tmp_path / name for name in ("same", "config", "weights"))
    for path, change in ((same, None), (config, other_config), (weights, other_weights)):
        shutil.copytree(smollm2_workspace, path)
        if change is not None:
            change(path)
    mine = Workspace.load(smollm2_workspace).fingerprint()
    assert Workspace.load(same).fingerprint() == mine
    assert Workspace.load(config).fingerprint() != mine and Workspace.load(weights).fingerprint() != mine


@pytest.mark.parametrize("change,needle", [(other_config, "is not the model rank 0 serves"),
                                           (other_weights, "but other weights, dtype or quantization")])
def test_a_node_with_another_model_or_other_weights_is_refused(smollm2_workspace, tmp_path, change, needle):
    other = tmp_path / "other"
    shutil.copytree(smollm2_workspace, other)
    change(other)
    port = free_port()
    node = start_node(other, port, tmp_path / "node1.log")
    try:
        with pytest.raises(WorkerError, match=needle):
            Engine(smollm2_workspace, tp=2, nnodes=2, master_addr="127.0.0.1", master_port=port, **OPTIONS)
        assert node.wait(60) != 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)


SLOW = """import os, pathlib, time
time.sleep(float(os.environ.get("SLOW_START", 0)))  # every process of the node: it joins late
if os.environ.get("SLOW_LOAD"):
    import lmcli.engine.model_runner as m
    load = m.ModelRunner._load
    def slow(self, workspace):
        if os.environ.get("LOADING_MARK"):
            pathlib.Path(os.environ["LOADING_MARK"]).touch()
        time.sleep(float(os.environ["SLOW_LOAD"]))
        return load(self, workspace)
    m.ModelRunner._load = slow
"""


def slow_node(tmp_path, port: int, node: int, nodes: int, tp: int, **env) -> subprocess.Popen:
    """Node `node` of `nodes`, whose processes are slowed down by sitecustomize (SLOW_START, SLOW_LOAD)."""
    (tmp_path / "slow").mkdir(exist_ok=True)
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW)
    return subprocess.Popen([str(LM), "serve", "api_server", str(env.pop("workspace")), "--tp", str(tp), "--nnodes",
                             str(nodes), "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
                             str(port)], env=dict(os.environ, PYTHONPATH=str(tmp_path / "slow"), **env),
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"node{node}.log", "w"),
                            start_new_session=True)


def tokens_of_one_process(workspace) -> list:
    single = Engine(workspace, **OPTIONS)
    try:
        return greedy_run(single)
    finally:
        single.close()


def tokens_of_nodes(workspace, nodes: list, port: int, tmp_path, tp: int) -> list:
    """greedy_run through node 0, here, beside the other nodes' processes (node 1, 2, ...), which must then end 0."""
    try:
        engine = Engine(workspace, tp=tp, nnodes=len(nodes) + 1, master_addr="127.0.0.1", master_port=port,
                        **OPTIONS)
        try:
            tokens = greedy_run(engine)
        finally:
            engine.close()
        for k, node in enumerate(nodes, 1):
            assert node.wait(60) == 0, (tmp_path / f"node{k}.log").read_text()
        return tokens
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)


def test_a_node_that_loads_slower_than_the_collective_timeout_still_joins(smollm2_workspace, tmp_path, monkeypatch):
    """Node 1's rank loads its shard 8 s after node 0's, with collectives timing out after 3 s: every rank waits
    for the others' shards (join_timeout) before the first collective."""
    expected = tokens_of_one_process(smollm2_workspace)
    monkeypatch.setenv("LMCLI_TP_TIMEOUT", "3")
    port = free_port()
    node = slow_node(tmp_path, port, 1, 2, 2, workspace=smollm2_workspace, SLOW_LOAD="8")
    assert tokens_of_nodes(smollm2_workspace, [node], port, tmp_path, 2) == expected


def test_a_node_that_joins_late_does_not_time_out_the_others(smollm2_workspace, tmp_path, monkeypatch):
    """Three nodes, one rank each; node 2 starts 8 s late while collectives time out after 3 s: node 1's rank,
    already there, waits for every rank to join before it starts the group (it used to time out inside it)."""
    expected = tokens_of_one_process(smollm2_workspace)
    monkeypatch.setenv("LMCLI_TP_TIMEOUT", "3")
    port = free_port()
    nodes = [slow_node(tmp_path, port, 1, 3, 3, workspace=smollm2_workspace),
             slow_node(tmp_path, port, 2, 3, 3, workspace=smollm2_workspace, SLOW_START="8")]
    assert tokens_of_nodes(smollm2_workspace, nodes, port, tmp_path, 3) == expected


def test_a_node_that_dies_while_loading_is_seen_within_the_collective_timeout(smollm2_workspace, tmp_path,
                                                                               monkeypatch):
    """Node 1 is killed while its rank loads (no error written, no child of node 0's): node 0 sees its heartbeat
    stop and fails the start within LMCLI_TP_TIMEOUT (3 s here), not after the 900 s allowed for loading."""
    import threading

    monkeypatch.setenv("LMCLI_TP_TIMEOUT", "3")
    port, mark = free_port(), tmp_path / "loading"
    node = slow_node(tmp_path, port, 1, 2, 2, workspace=smollm2_workspace, SLOW_LOAD="600", LOADING_MARK=str(mark))

    def kill_when_loading():
        wait_for(mark.exists, timeout=240)
        os.killpg(node.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_loading, daemon=True)
    killer.start()
    try:
        with pytest.raises(WorkerError, match="rank 1 on node 1 stopped while the ranks were starting"):
            Engine(smollm2_workspace, tp=2, nnodes=2, master_addr="127.0.0.1", master_port=port, **OPTIONS)
        killer.join(10)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
