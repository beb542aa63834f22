import subprocess
import sys

from typer.testing import CliRunner

from conftest import run_lm
from lmcli import __version__
from lmcli.cli import build_app

runner = CliRunner()
SERVE_COMMANDS = ("api_server", "api_client", "gradio", "proxy")


def test_help_lists_subcommands_through_clirunner():
    result = runner.invoke(build_app(), ["--help"])
    assert result.exit_code == 0
    assert "convert" in result.output and "serve" in result.output


def test_serve_help_lists_its_plugins_through_clirunner():
    result = runner.invoke(build_app(), ["serve", "--help"])
    assert result.exit_code == 0
    for name in SERVE_COMMANDS:
        assert name in result.output


def test_help_in_a_real_subprocess():
    done = run_lm("--help")
    assert done.returncode == 0
    assert "Convert a Hugging Face model folder or a GGUF file" in done.stdout
    assert "Serve a workspace over HTTP" in done.stdout
    done = run_lm("serve", "-h")
    assert done.returncode == 0
    for name in SERVE_COMMANDS:
        assert name in done.stdout


def test_help_does_not_import_torch():
    code = ("import sys\nfrom lmcli.cli import build_app\n"
            "try:\n    build_app()(['--help'], prog_name='lm')\nexcept SystemExit:\n    pass\n"
            "try:\n    build_app()(['serve', '--help'], prog_name='lm')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'gguf', 'safetensors') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_version():
    done = run_lm("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"lm {__version__}"


def test_the_proxy_help_describes_every_option():
    result = runner.invoke(build_app(), ["serve", "proxy", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--server-name", "--server-port", "--routing-strategy", "--node", "--config", "--api-keys",
                   "--node-api-key", "--max-outstanding", "--max-queue-len", "--queue-timeout", "--session-timeout",
                   "--allow-origins", "--log-level", "prefix_aware"):
        assert option in result.output
    result = runner.invoke(build_app(), ["serve", "proxy", "--node", "localhost:1", "--server-port", "0"])
    assert result.exit_code != 0 and "give the api_server's URL" in result.output


def test_each_command_help_describes_every_option():
    result = runner.invoke(build_app(), ["convert", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--dst-path", "--dtype", "--model-name", "--chat-template", "--force"):
        assert option in result.output
    assert "float32" in result.output and "bfloat16" in result.output
