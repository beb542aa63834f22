"""Third-party plugins, discovered through importlib.metadata for real: each test lays out an installed
distribution (a package and its .dist-info with entry_points.txt) on PYTHONPATH and runs `lm` in a subprocess."""

import textwrap

from conftest import run_lm


def install_fake_distribution(site, name: str, entry_points: str, modules: dict) -> None:
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


def test_third_party_command_and_serve_plugin(tmp_path):
    install_fake_distribution(tmp_path, "lm_hello", """
        [lmcli.commands]
        hello = lm_hello:hello
        tools = lm_hello:tools

        [lmcli.serve]
        echo = lm_hello:echo
        """, {"lm_hello": """
        import typer

        def hello(name: str = typer.Option("world", help="Whom to greet.")):
            '''Say hello from a plugin.'''
            print(f"hello, {name}")

        tools = typer.Typer(help="A group of tools from a plugin.")

        @tools.command()
        def count(n: int):
            print(" ".join(str(i) for i in range(n)))

        @tools.command()
        def noop():
            pass

        def echo(text: str):
            '''Echo from a serve plugin.'''
            print(text)
        """})
    env = {"PYTHONPATH": str(tmp_path)}
    top = run_lm("--help", env=env)
    assert top.returncode == 0 and "Say hello from a plugin." in top.stdout and "A group of tools" in top.stdout
    assert "convert" in top.stdout  # ours are still there
    assert run_lm("hello", "--name", "lm", env=env).stdout.strip() == "hello, lm"
    assert run_lm("tools", "count", "3", env=env).stdout.strip() == "0 1 2"
    assert "Echo from a serve plugin." in run_lm("serve", "--help", env=env).stdout
    assert run_lm("serve", "echo", "ping", env=env).stdout.strip() == "ping"


def test_broken_plugin_is_reported_in_one_line_and_the_rest_works(tmp_path):
    install_fake_distribution(tmp_path, "lm_broken", """
        [lmcli.commands]
        broken = lm_broken:main
        missing = lm_not_there:main

        [lmcli.serve]
        broken_serve = lm_broken:main
        """, {"lm_broken": "import a_module_that_does_not_exist\n"})
    done = run_lm("--help", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0
    assert "convert" in done.stdout and "serve" in done.stdout
    assert "broken" not in done.stdout
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 3, done.stderr  # broken, missing and broken_serve: one line each
    assert any("'broken'" in e and "ModuleNotFoundError" in e and "a_module_that_does_not_exist" in e for e in errors)
    assert any("'missing'" in e and "lm_not_there" in e for e in errors)
    assert any("'broken_serve'" in e and "lmcli.serve" in e for e in errors)
    serve = run_lm("serve", "--help", env={"PYTHONPATH": str(tmp_path)})
    assert serve.returncode == 0 and "api_server" in serve.stdout
