"""`lm serve gradio` in real headless Chromium (Playwright, Debian's chromium): a chat against the real model
that streams, stops, regenerates and resets, offline, one server session per tab; errors shown in the page."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fake_engine import FakeEngine
from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.api_server import create_app
from servers import LM, LmServer, free_port, serve_in_thread, wait_for

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")


class GradioPage:
    def __init__(self, api_url: str, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"gradio-{self.port}.log"
        self.proc = subprocess.Popen([str(LM), "serve", "gradio", api_url, "--server-name", "127.0.0.1",
                                      "--server-port", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"), start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str):
    """A new tab (its own browser context) that records any request leaving this machine, and refuses it."""
    page = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
    page.outside = []

    def route(r):
        if re.match(r"^(https?|wss?)://(127\.0\.0\.1|localhost)[:/]", r.request.url) or r.request.url.startswith("data:"):
            return r.continue_()
        page.outside.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    page.locator("#message textarea").wait_for()
    return page


def is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def bot_messages(page) -> list[str]:
    return page.locator("#chat [data-testid='bot']").all_inner_texts()


def set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def send(page, text: str) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


def metric(api_url: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(api_url + "/metrics").text, re.M).group(1))


@pytest.fixture(scope="module")
def api(smollm2_workspace, tmp_path_factory):
    server = LmServer(smollm2_workspace, "--dtype", "bfloat16", log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield server
    server.stop()


def test_chat_in_the_browser(api, browser, tmp_path):
    ui = GradioPage(api.url, tmp_path)
    try:
        page = open_page(browser, ui.url)
        assert page.locator("#model input").input_value() == "SmolLM2-135M-Instruct"  # from /v1/models
        set_slider(page, "temperature", 0)
        set_slider(page, "max_new_tokens", 48)
        send(page, "What is the capital of France?")
        seen = set()
        wait_for(lambda: (seen.add(len(t := (bot_messages(page) or [""])[-1])), "Paris" in t
                          and metric(api.url, "lm_requests_running") == 0)[1], step=0.05)
        assert len(seen - {0}) >= 2  # the answer grew in steps: it streamed
        assert metric(api.url, "lm_sessions") == 1
        first_answer = bot_messages(page)[-1]

        # Stop: a long answer stops growing and the server stops generating
        set_slider(page, "max_new_tokens", 600)
        send(page, "Write a very long story about a dragon.")
        wait_for(lambda: len(bot_messages(page)) == 2 and len(bot_messages(page)[-1]) > 40)
        page.locator("#stop").click()
        wait_for(lambda: metric(api.url, "lm_requests_running") == 0, timeout=10)
        stopped = bot_messages(page)[-1]
        time.sleep(1.0)
        assert bot_messages(page)[-1] == stopped and 40 < len(stopped) < 2500

        # Regenerate: a new answer to the last message, in place of the old one
        set_slider(page, "max_new_tokens", 32)
        page.locator("#regenerate").click()
        wait_for(lambda: bot_messages(page)[-1] not in ("", stopped))  # the new answer is coming
        wait_for(lambda: metric(api.url, "lm_requests_running") == 0)
        assert len(bot_messages(page)) == 2 and bot_messages(page)[0] == first_answer
        page.screenshot(path=str(Path(os.environ.get("LM_SCREENSHOTS", tmp_path)) / "gradio.png"))

        # a second tab has its own server session
        other = open_page(browser, ui.url)
        set_slider(other, "max_new_tokens", 8)
        send(other, "Hello!")
        wait_for(lambda: bot_messages(other) and bot_messages(other)[-1])
        wait_for(lambda: metric(api.url, "lm_requests_running") == 0)
        assert metric(api.url, "lm_sessions") == 2
        # JSON output: the answer is a JSON object, enforced by the server
        other.locator("#json_mode input").check()
        set_slider(other, "temperature", 0)  # greedy: sampled, a small model's object may outrun max_new_tokens
        set_slider(other, "max_new_tokens", 200)
        send(other, "Describe a cat.")
        wait_for(lambda: len(bot_messages(other)) == 2 and is_object(bot_messages(other)[-1]))  # all shown: it parses
        wait_for(lambda: metric(api.url, "lm_requests_running") == 0)

        # Reset: the page and this tab's server session are cleared
        page.locator("#reset").click()
        wait_for(lambda: not bot_messages(page) and metric(api.url, "lm_sessions") == 1)
        assert page.outside == [] and other.outside == []  # nothing fetched from outside this machine
        other.context.close()  # a closed tab ends its server session
        wait_for(lambda: metric(api.url, "lm_sessions") == 0, timeout=30)
    finally:
        ui.stop()


def test_tabs_answer_at_once_typing_survives_and_reset_stops_an_answer(api, browser, tmp_path):
    ui = GradioPage(api.url, tmp_path)
    try:
        long_tab, short_tab = open_page(browser, ui.url), open_page(browser, ui.url)
        before = metric(api.url, "lm_sessions")  # an earlier test that failed may have left its own
        set_slider(long_tab, "max_new_tokens", 400)
        set_slider(short_tab, "max_new_tokens", 6)
        send(long_tab, "Write a very long story about a dragon.")
        wait_for(lambda: bot_messages(long_tab) and len(bot_messages(long_tab)[-1]) > 20)
        long_tab.locator("#message textarea").fill("my next question")  # typed while the answer streams
        send(short_tab, "Hello!")
        wait_for(lambda: bot_messages(short_tab) and bot_messages(short_tab)[-1], timeout=20)
        assert metric(api.url, "lm_requests_running") >= 1  # the short tab did not wait for the long answer
        time.sleep(0.5)
        assert long_tab.locator("#message textarea").input_value() == "my next question"
        long_tab.locator("#reset").click()  # during the answer: it stops, the page and the session are cleared
        wait_for(lambda: not bot_messages(long_tab) and metric(api.url, "lm_requests_running") == 0, timeout=20)
        wait_for(lambda: metric(api.url, "lm_sessions") == before + 1, timeout=20)  # only the short tab's
    finally:
        ui.stop()


def test_errors_show_in_the_page(browser, tmp_path):
    app = create_app(AsyncEngine(FakeEngine(max_len=80)))
    with serve_in_thread(app) as url:
        ui = GradioPage(url, tmp_path)
        try:
            page = open_page(browser, ui.url)
            send(page, "Hi")
            wait_for(lambda: bot_messages(page) and "Hello from the fake engine." in bot_messages(page)[-1])
            send(page, "Tell me more about everything you know.")
            wait_for(lambda: "session is full" in page.locator("#status").inner_text())
        except BaseException:
            ui.stop()
            raise
    try:  # the api_server is gone now
        send(page, "Still there?")
        wait_for(lambda: "cannot reach" in page.locator("#status").inner_text() or
                 "failed" in page.locator("#status").inner_text())
    finally:
        ui.stop()


def test_the_api_docs_page_renders_offline(browser):
    """The api_server's / is a Swagger UI that draws every endpoint from /openapi.json with local files only."""
    with serve_in_thread(create_app(AsyncEngine(FakeEngine()))) as url:
        page = open_page_plain(browser, url)
        page.locator(".opblock").first.wait_for(timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/encode",
                     "/health", "/metrics"):
            assert any(path == p.replace("\u200b", "") for p in paths), (path, paths)
        assert page.outside == []


def open_page_plain(browser, url: str):
    page = browser.new_context().new_page()
    page.outside = []
    page.on("request", lambda r: None if re.match(r"^(https?://(127\.0\.0\.1|localhost)[:/]|data:)", r.url)
            else page.outside.append(r.url))
    page.goto(url, wait_until="load")
    return page
