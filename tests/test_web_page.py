"""The browser chat page: its routes over HTTP, then the page itself in a real headless chromium.

The browser tests drive Debian's ``/usr/bin/chromium`` through Playwright (``scripts/install-browser.sh``
installs it; ``playwright install`` is never used) against a real uvicorn server serving fakes.
They skip with the reason when the browser or the ``playwright`` package is missing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapters.base import InvalidRequest
from adapters.demo import DEMO_DESCRIPTION
from gateway.app import create_app
from gateway.routes import web
from gateway.settings import ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

logger = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: The scripted answer: Chinese, an emoji and a fenced code block, streamed piece by piece.
PIECES = ("你好", "，", "世界", "！😀", "\n\n", "Here is **code**:\n\n", "```python\n",
          "print('hi')\n", "```", "\n\n", "- one\n", "- two")
ANSWER = "".join(PIECES)
PIECE_DELAY = 0.08
API_KEY = "sk-test-key"


# FakeChatModel records every conversation it prepares (``.conversations``).
RecordingFake = FakeChatModel


def build_app(models: dict[str, FakeChatModel], **settings: Any) -> FastAPI:
    return create_app(ServerSettings(**settings), models=models)


# --------------------------------------------------------------------------- routes over HTTP


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with running_server(build_app({"m": FakeChatModel("m")})) as url:
        yield url


def test_index_is_the_chat_page(http_url: str) -> None:
    response = httpx.get(f"{http_url}/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="static/app.js"' in response.text
    assert '<link rel="stylesheet" href="static/style.css">' in response.text


@pytest.mark.parametrize(("name", "content_type"), [
    ("app.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"),
    ("index.html", "text/html; charset=utf-8"),
])
def test_static_assets_have_their_content_types(http_url: str, name: str,
                                                content_type: str) -> None:
    response = httpx.get(f"{http_url}/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (web.STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize("name", ["nope.js", "..%2Fapp.py", "..%2F..%2Fpyproject.toml",
                                  "%2E%2E%2Fcli.py", ".hidden.js", "app"])
def test_unknown_static_files_are_openai_404s(http_url: str, name: str) -> None:
    response = httpx.get(f"{http_url}/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_page_loads_nothing_from_outside_the_gateway() -> None:
    for path in web.STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        # No absolute or protocol-relative URL in a src/href/url()/@import or a fetch.
        assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", text), path.name
        assert not re.search(r"""(url\(|@import|fetch\()\s*["']?(https?:)?//""", text), path.name


# --------------------------------------------------------------------------- the page in chromium


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the browser tests need the 'playwright' package (pip install -e '.[test]')",
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium not found at {CHROMIUM} (run scripts/install-browser.sh)")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user data dir
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 760}, locale="zh-CN",
        )
        context.set_default_timeout(10_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture()
def page(browser_context: Any) -> Iterator[Any]:
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        if page.url.startswith("http"):  # the key and model choice must not leak into the next test
            page.evaluate("localStorage.clear()")
        page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def chat_models() -> dict[str, FakeChatModel]:
    return {
        "chat": RecordingFake("chat", pieces=PIECES, delay=PIECE_DELAY,
                              description="A scripted model"),
        "demo": FakeChatModel("demo", description=DEMO_DESCRIPTION),
        "slow": FakeChatModel("slow", reply="z" * 400, delay=0.02),
        "picky": FakeChatModel("picky", prepare_error=InvalidRequest(
            "Tool messages are not supported by this model.", param="messages")),
    }


@pytest.fixture(scope="module")
def chat_url(chat_models: dict[str, FakeChatModel]) -> Iterator[str]:
    with running_server(build_app(chat_models)) as url:
        yield url


def open_chat(page: Any, url: str, model: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model option[value]').length > 1")
    page.select_option("#model", model)


def stream_reply(page: Any, text: str) -> list[str]:
    """Type ``text``, press Enter, and sample the newest answer until it has finished."""
    before = page.locator(".msg-assistant").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    answer = page.locator(".msg-assistant .content").last
    # (a fast reply may already have finished: wait for the message, not for its streaming)
    page.wait_for_function(f"document.querySelectorAll('.msg-assistant').length > {before}")
    samples = []
    deadline = time.monotonic() + 20
    while page.locator(".msg-assistant[data-state=streaming]").count():
        # textContent, not innerText: the rendered text without the layout's line breaks, which
        # come and go as Markdown blocks close.
        samples.append(answer.text_content())
        assert time.monotonic() < deadline, "the answer never finished"
        time.sleep(PIECE_DELAY / 3)
    samples.append(answer.text_content())
    return samples


def test_chat_streams_keeps_history_renders_markdown_and_clears(
    page: Any, chat_url: str, chat_models: dict[str, RecordingFake], tmp_path: Path,
) -> None:
    fake = chat_models["chat"]
    assert isinstance(fake, RecordingFake)
    open_chat(page, chat_url, "chat")
    assert page.locator("#demo-notice").is_hidden()
    assert page.evaluate("document.activeElement.id") == "prompt"  # ready to type

    samples = stream_reply(page, "你好，请写一段代码 😀")
    distinct = [s for i, s in enumerate(samples) if s and (i == 0 or s != samples[i - 1])]
    assert len(distinct) >= 4, f"the answer did not grow piece by piece: {distinct}"
    assert all(b.startswith(a) for a, b in zip(distinct, distinct[1:], strict=False)), distinct
    assert distinct[0].startswith("你好")

    answer = page.locator(".msg-assistant .content").last
    code = answer.locator("pre > code")
    assert code.inner_text() == "print('hi')"
    assert code.get_attribute("class") == "language-python"
    assert answer.locator("strong").inner_text() == "code"
    assert answer.locator("ul > li").all_inner_texts() == ["one", "two"]
    assert "你好，世界！😀" in answer.locator("p").first.inner_text()
    assert page.locator(".msg-user .content").inner_text() == "你好，请写一段代码 😀"

    # Shift+Enter is a new line, not a send.
    page.fill("#prompt", "second")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line")
    assert page.locator(".msg-user").count() == 1
    assert page.input_value("#prompt") == "second\nline"
    page.fill("#prompt", "")

    stream_reply(page, "再来一次")
    assert fake.conversations[-1] == [
        ("user", "你好，请写一段代码 😀"), ("assistant", ANSWER), ("user", "再来一次"),
    ]
    assert page.locator(".msg").count() == 4
    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    logger.info("screenshot of the chat page: %s", shot)

    page.click("#clear")
    assert page.locator(".msg").count() == 0
    assert page.evaluate("window.chatPage.history()") == []
    stream_reply(page, "new start")
    assert fake.conversations[-1] == [("user", "new start")]


def test_stop_cancels_the_stream_and_keeps_the_partial_answer(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    slow = chat_models["slow"]
    cancelled = slow.counters.cancelled
    open_chat(page, chat_url, "slow")
    page.fill("#prompt", "go")
    page.click("#send")
    answer = page.locator(".msg-assistant .content").last
    page.wait_for_function(
        "document.querySelector('.msg-assistant .content').textContent.length > 5")
    assert page.locator("#send").is_disabled()
    page.click("#stop")
    page.wait_for_selector(".msg-assistant .status")
    partial = answer.inner_text()
    assert 0 < len(partial) < 400
    history = page.evaluate("window.chatPage.history()")
    assert history == [{"role": "user", "content": "go"},
                       {"role": "assistant", "content": partial}]
    assert page.locator("#stop").is_hidden() and page.locator("#send").is_enabled()
    wait_until(lambda: slow.counters.cancelled == cancelled + 1, "the server never cancelled")


def test_openai_errors_are_shown_and_the_turn_is_given_back(page: Any, chat_url: str) -> None:
    open_chat(page, chat_url, "picky")
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "Error 400" in error.inner_text()
    assert "Tool messages are not supported by this model." in error.inner_text()
    assert page.locator(".msg").count() == 0
    assert page.input_value("#prompt") == "hello"  # ready to retry
    assert page.evaluate("window.chatPage.history()") == []


def test_demo_models_carry_a_visible_notice(page: Any, chat_url: str) -> None:
    open_chat(page, chat_url, "demo")
    notice = page.locator("#demo-notice")
    assert notice.is_visible()
    assert "demo model" in notice.inner_text()
    page.select_option("#model", "chat")
    assert notice.is_hidden()


def test_controls_are_labelled_and_reachable_by_keyboard(page: Any, chat_url: str) -> None:
    open_chat(page, chat_url, "chat")
    for label, element_id in (("Model", "model"), ("API key", "api-key"), ("Message", "prompt")):
        assert page.get_by_label(label, exact=True).get_attribute("id") == element_id
    for name in ("Clear", "Send"):
        assert page.get_by_role("button", name=name).is_visible()
    assert page.get_by_role("log", name="Conversation").count() == 1
    page.focus("#model")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "clear"


def test_markdown_never_turns_model_text_into_html(page: Any, chat_url: str) -> None:
    page.goto(chat_url + "/")
    html = page.evaluate("""text => {
        const box = document.createElement('div');
        box.append(window.chatPage.renderMarkdown(text));
        return box.innerHTML;
    }""", '<img src=x onerror="window.owned=1"> [a](javascript:alert(1)) [b](https://x.org)\n'
          "```\n<script>window.owned=1</script>\n```\n*em* `<b>`")
    assert "<img" not in html and "<script" not in html
    assert 'href="javascript' not in html and "[a](javascript:alert(1))" in html  # kept as text
    assert "&lt;img src=x" in html
    assert '<a href="https://x.org" target="_blank" rel="noopener noreferrer">b</a>' in html
    assert "<pre><code>&lt;script&gt;window.owned=1&lt;/script&gt;</code></pre>" in html
    assert "<em>em</em> <code>&lt;b&gt;</code>" in html
    assert page.evaluate("window.owned") is None


# --------------------------------------------------------------------------- API key


def test_api_key_is_stored_and_sent_as_bearer(page: Any) -> None:
    fake = RecordingFake("keyed", reply="ok")
    with running_server(build_app({"keyed": fake}, api_keys=(API_KEY,))) as url:
        page.goto(url + "/")
        error = page.locator("#error")
        error.wait_for(state="visible")
        assert "Error 401 (invalid_api_key)" in error.inner_text()
        assert "Enter a valid API key above." in error.inner_text()

        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Tab")  # change event -> saved, models reloaded with the key
        page.wait_for_function("document.querySelector('#model').value === 'keyed'")
        assert error.is_hidden()
        assert page.evaluate("localStorage.getItem('chatglm-gateway.api-key')") == API_KEY

        page.reload()
        assert page.input_value("#api-key") == API_KEY
        page.wait_for_function("document.querySelector('#model').value === 'keyed'")
        stream_reply(page, "hi")
        assert fake.conversations == [[("user", "hi")]]
        assert page.locator(".msg-assistant .content").inner_text() == "ok"


def wait_until(condition: Callable[[], bool], message: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)

