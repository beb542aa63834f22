"""`lm serve api_server` as a user types it: help, and wrong input that must be one clear line."""

import socket

from typer.testing import CliRunner

from conftest import assert_one_line_error, run_lm
from lmcli.cli import build_app

OPTIONS = ("--server-name", "--server-port", "--tp", "--session-len", "--max-batch-size", "--cache-max-entry-count",
           "--cache-block-seq-len", "--max-prefill-token-num", "--enable-prefix-caching", "--dtype", "--quantization",
           "--quant-policy", "--device", "--eager",
           "--model-name", "--chat-template", "--meta-instruction", "--api-keys", "--allow-origins",
           "--allow-credentials", "--allow-methods", "--allow-headers", "--ssl", "--max-concurrent-requests",
           "--max-output-len", "--log-level", "--proxy-url")


def test_help_lists_every_option():
    result = CliRunner().invoke(build_app(), ["serve", "api_server", "--help"], env={"COLUMNS": "240"})
    assert result.exit_code == 0
    for option in OPTIONS:
        assert option in result.output, option
    assert "23333" in result.output and "0.0.0.0" in result.output


def test_user_errors_are_one_line(tmp_path, smollm2_workspace):
    assert_one_line_error(run_lm("serve", "api_server", tmp_path / "missing"), "missing")
    assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--server-port", "70000"), "--server-port")
    assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--ssl", env={"SSL_KEYFILE": ""}),
                          "SSL_KEYFILE")
    assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--chat-template", "{% if %}"),
                          "template")
    assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--max-output-len", "0"),
                          "--max-output-len")
    assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--device", "tpu"), "cuda:N")
    import torch

    if not torch.cuda.is_available():  # asked for a GPU that is not there: said so, not a CUDA traceback
        assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--device", "cuda"), "no CUDA GPU")
    bad = run_lm("serve", "api_server", smollm2_workspace, "--quantization", "int3")  # typer's usage error
    assert bad.returncode == 2 and "--quantization" in bad.stderr and "int8" in bad.stderr and "int4" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run_lm("serve", "api_server", smollm2_workspace, "--server-name", "127.0.0.1",
                                     "--server-port", port), f"127.0.0.1:{port}")
    from servers import free_port

    # found while loading (after the "loading" line): the server stops with the reason, no traceback
    done = run_lm("serve", "api_server", smollm2_workspace, "--session-len", "100000", "--server-port", free_port(),
                  timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("lm serve api_server: error: loading the model failed: "
                                                           "session_len must be in")
    done = run_lm("serve", "api_server", smollm2_workspace, "--quant-policy", "4", "--server-port", free_port(),
                  timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("not 4; the 4-bit KV cache is not built")


def test_gradio_help_and_a_server_that_is_not_there():
    result = CliRunner().invoke(build_app(), ["serve", "gradio", "--help"], env={"COLUMNS": "240"})
    assert result.exit_code == 0
    for option in ("--server-name", "--server-port", "--share", "--api-key", "6006"):
        assert option in result.output, option
    assert_one_line_error(run_lm("serve", "gradio", "http://127.0.0.1:9"), "cannot reach")
