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
from prometheus_client.parser import text_string_to_metric_families

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
    assert '<script src="static/markdown-it.min.js" defer>' in response.text
    assert '<script type="module" src="static/app.js">' in response.text
    assert '<link rel="stylesheet" href="static/style.css">' in response.text


@pytest.mark.parametrize(("name", "content_type"), [
    ("app.js", "text/javascript; charset=utf-8"),
    ("api.js", "text/javascript; charset=utf-8"),
    ("markdown.js", "text/javascript; charset=utf-8"),
    ("store.js", "text/javascript; charset=utf-8"),
    ("markdown-it.min.js", "text/javascript; charset=utf-8"),
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


def test_the_vendored_markdown_library_names_its_version_and_license() -> None:
    head = (web.STATIC_DIR / "markdown-it.min.js").read_text(encoding="utf-8")[:3000]
    assert head.startswith("/*! markdown-it 15.0.3 ")
    assert "MIT license" in head and "Permission is hereby granted, free of charge" in head
    assert "markdown-it 15.0.3" in (Path(__file__).parents[1] / "README.md").read_text("utf-8")


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


#: The Markdown a user types to the echo model, which answers with the same text.
MARKDOWN = """## Plan

1. first **bold**
2. second `inline`

- apples
- pears

| Fruit | Qty |
|-------|----:|
| apple | 3 |
| pear | 10 |

```js
const tag = "<b>";
```

See [the docs](https://example.org/docs)."""
#: Model output that would run script if it ever became HTML (each sets window.owned).
PAYLOAD = """<script>window.owned = 1</script>
<img src=x onerror="window.owned = 2"> <svg onload="window.owned = 3"></svg>
[click me](javascript:window.owned=4) ![pixel](http://127.0.0.1:9/pixel.png)
<iframe srcdoc="<script>parent.owned = 5</script>"></iframe>"""


@pytest.fixture(scope="module")
def chat_models() -> dict[str, FakeChatModel]:
    return {
        "chat": RecordingFake("chat", pieces=PIECES, delay=PIECE_DELAY,
                              description="A scripted model"),
        "demo": FakeChatModel("demo", description=DEMO_DESCRIPTION),
        "slow": FakeChatModel("slow", reply="z" * 400, delay=0.02),
        "echo": FakeChatModel("echo", piece_chars=4, delay=0.02),
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


def wait_answered(page: Any, count: int) -> None:
    """Wait until the page shows ``count`` answers and none is streaming."""
    page.wait_for_function(
        f"document.querySelectorAll('.msg-assistant').length === {count}"
        " && !document.querySelector('.msg-assistant[data-state=streaming]')", timeout=20_000)


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
        samples.append(answer.evaluate(ANSWER_TEXT))
        assert time.monotonic() < deadline, "the answer never finished"
        time.sleep(PIECE_DELAY / 3)
    samples.append(answer.evaluate(ANSWER_TEXT))
    return samples


#: The answer's text as rendered so far: textContent, not innerText (the layout's line breaks
#: come and go as Markdown blocks close), without the code blocks' headers (a language name and
#: a Copy button are not answer text) and the newlines between blocks that may still grow.
ANSWER_TEXT = """content => {
    const copy = content.cloneNode(true);
    copy.querySelectorAll('.code-head').forEach((head) => head.remove());
    return copy.textContent.replace(/\\s+$/, '');
}"""


def running(url: str, model: str) -> float:
    """The ``chatglm_gateway_requests_running`` gauge of ``model`` on ``/metrics``."""
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "chatglm_gateway_requests_running" \
                    and sample.labels.get("model") == model:
                return float(sample.value)
    raise AssertionError(f"no running gauge for {model!r} on /metrics")


def test_chat_streams_keeps_history_renders_markdown_and_starts_over(
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
    assert code.text_content() == "print('hi')\n"  # the fence's lines, as written
    assert code.get_attribute("class") == "language-python"
    assert answer.locator(".code-lang").inner_text() == "python"
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

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert page.evaluate("window.chatPage.history()") == []
    stream_reply(page, "new start")
    assert fake.conversations[-1] == [("user", "new start")]


def test_markdown_answers_render_while_streaming(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    open_chat(page, chat_url, "echo")
    # What the answer looked like at each render, noted in the page as it happens.
    page.evaluate("""() => {
        window.renders = [];
        new MutationObserver(() => {
            const answer = document.querySelector('.msg-assistant');
            if (answer && answer.dataset.state === 'streaming') window.renders.push(
                [...answer.querySelectorAll('.content h2, .content table')].map(e => e.tagName));
        }).observe(document.querySelector('#log'), {childList: true, subtree: true});
    }""")
    page.fill("#prompt", MARKDOWN)
    page.press("#prompt", "Enter")
    wait_answered(page, 1)
    # Rendered as it streams, not once at the end: the heading was a heading before the table
    # had arrived, and the table a table before the answer ended.
    renders = page.evaluate("window.renders")
    assert ["H2"] in renders and ["H2", "TABLE"] in renders, renders

    answer = page.locator(".msg-assistant .content")
    assert answer.locator("h2").inner_text() == "Plan"
    assert answer.locator("ol > li").all_inner_texts() == ["first bold", "second inline"]
    assert answer.locator("ol strong").inner_text() == "bold"
    assert answer.locator("ol code").inner_text() == "inline"
    assert answer.locator("ul > li").all_inner_texts() == ["apples", "pears"]
    assert answer.locator("table th").all_inner_texts() == ["Fruit", "Qty"]
    assert answer.locator("table tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))") \
        == [["apple", "3"], ["pear", "10"]]
    assert answer.locator("table td").nth(1).evaluate("c => getComputedStyle(c).textAlign") \
        == "right"  # the "----:" column
    code = answer.locator(".code-block pre > code")
    assert code.text_content() == 'const tag = "<b>";\n'
    assert code.get_attribute("class") == "language-js"
    assert answer.locator(".code-block button.copy").is_visible()
    link = answer.get_by_role("link", name="the docs")
    assert link.get_attribute("href") == "https://example.org/docs"
    assert link.get_attribute("target") == "_blank"
    assert link.get_attribute("rel") == "noopener noreferrer"
    # The user's own message is shown as typed, not rendered.
    assert page.locator(".msg-user .content").inner_text() == MARKDOWN
    assert page.locator(".msg-user .content h2").count() == 0


def test_the_end_of_a_long_answer_stays_in_view(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    open_chat(page, chat_url, "echo")
    stream_reply(page, "\n".join(f"line {i}" for i in range(40)))
    assert page.evaluate("(() => { const log = document.querySelector('#log');"
                         " return log.scrollHeight > log.clientHeight; })()")  # it overflows
    # The counts and the Regenerate button under it are in view without scrolling.
    in_view = """() => {
        const log = document.querySelector('#log').getBoundingClientRect();
        const end = document.querySelector('.msg-assistant:last-child').getBoundingClientRect();
        return end.bottom <= log.bottom + 1;
    }"""
    assert page.evaluate(in_view)
    page.reload()  # the same for a stored conversation, once the model list has come in
    page.wait_for_function("document.querySelector('#model').value === 'echo'")
    page.wait_for_function(in_view)


def test_model_output_never_becomes_live_html(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_chat(page, chat_url, "echo")
    stream_reply(page, PAYLOAD)
    answer = page.locator(".msg-assistant .content")

    def inert() -> None:
        page.wait_for_timeout(300)  # time for an onerror/onload to have fired, had it existed
        assert page.evaluate("window.owned") is None
        assert answer.locator("script, img, svg, iframe, [onerror], [onload]").count() == 0
        assert answer.locator("a[href^='javascript' i]").count() == 0
        text = answer.inner_text()
        assert "<script>window.owned = 1</script>" in text  # shown, as text
        assert '<img src=x onerror="window.owned = 2">' in text
        assert "[click me](javascript:window.owned=4)" in text
        assert not [u for u in requested if "pixel.png" in u or u.endswith("/x")], requested

    inert()
    assert answer.get_by_role("link", name="pixel").get_attribute("href") \
        == "http://127.0.0.1:9/pixel.png"  # an image is a link, never loaded
    page.reload()  # rendered again from the stored conversation
    page.wait_for_selector(".msg-assistant .content p")
    inert()


def test_renderer_escapes_html_in_markdown(page: Any, chat_url: str) -> None:
    page.goto(chat_url + "/")
    page.wait_for_function("window.chatPage !== undefined")
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
    assert "<pre><code>&lt;script&gt;window.owned=1&lt;/script&gt;\n</code></pre>" in html
    assert "<em>em</em> <code>&lt;b&gt;</code>" in html
    assert page.evaluate("window.owned") is None


def test_copy_button_puts_the_code_on_the_clipboard(
    page: Any, browser_context: Any, chat_url: str,
) -> None:
    browser_context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat_url)
    open_chat(page, chat_url, "echo")
    stream_reply(page, "Two blocks:\n\n```\nfirst\n```\n\n```sh\necho 'second' | wc -c\n```")
    copy = page.locator(".msg-assistant .code-block").nth(1).get_by_role("button",
                                                                          name="Copy code")
    copy.click()
    # without the final newline, which would run a command pasted into a terminal
    assert page.evaluate("navigator.clipboard.readText()") == "echo 'second' | wc -c"
    assert copy.inner_text() == "Copied"
    assert page.locator("#announce").inner_text() == "Code copied to the clipboard."
    page.wait_for_function("document.querySelectorAll('button.copy')[1].textContent === 'Copy'")

    # Plain http from another host has no Clipboard API; the selection-based fallback copies.
    page.evaluate("Object.defineProperty(window, 'isSecureContext', {value: false})")
    assert page.evaluate("window.isSecureContext") is False
    page.locator(".msg-assistant .code-block").first.get_by_role("button", name="Copy code").click()
    page.wait_for_function("document.querySelector('button.copy').textContent !== 'Copy'")
    assert page.locator("button.copy").first.inner_text() == "Copied"
    assert page.evaluate("navigator.clipboard.readText()") == "first"
    assert page.locator(".offscreen").count() == 0  # the helper selection is gone again


def test_stop_cancels_the_stream_on_the_server_and_keeps_the_partial_answer(
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
    assert page.locator(".msg-assistant .status").count() == 0  # not "(stopped)" yet
    assert page.locator(".msg-assistant").get_attribute("aria-busy") == "true"
    assert running(chat_url, "slow") == 1
    page.click("#stop")
    page.wait_for_selector(".msg-assistant .status")
    partial = answer.inner_text()
    assert 0 < len(partial) < 400
    assert page.locator(".msg-assistant").get_attribute("aria-busy") is None
    assert page.locator(".msg-assistant .status").inner_text() == "(stopped)"
    history = page.evaluate("window.chatPage.history()")
    assert history == [{"role": "user", "content": "go"},
                       {"role": "assistant", "content": partial}]
    assert page.locator("#stop").is_hidden() and page.locator("#send").is_enabled()
    wait_until(lambda: running(chat_url, "slow") == 0, "the running gauge never went back to 0")
    wait_until(lambda: slow.counters.cancelled == cancelled + 1, "the server never cancelled")
    produced = slow.counters.produced
    time.sleep(0.2)  # ten pieces' time: a generation still running would have produced more
    assert slow.counters.produced == produced


def test_regenerate_asks_again_for_the_last_answer(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    echo = chat_models["echo"]
    open_chat(page, chat_url, "echo")
    stream_reply(page, "first")
    stream_reply(page, "second")
    regenerate = page.get_by_role("button", name="Regenerate")
    assert regenerate.count() == 1  # on the last answer only
    assert page.locator(".msg-assistant").last.locator("button.regenerate").count() == 1
    asked = len(echo.requests)
    regenerate.click()
    wait_answered(page, 2)
    # The same question again, without the answer it replaces.
    assert len(echo.requests) == asked + 1
    assert echo.conversations[-1] == [("user", "first"), ("assistant", "first"),
                                      ("user", "second")]
    assert page.locator(".msg").count() == 4
    assert page.locator(".msg-assistant .content").all_inner_texts() == ["first", "second"]
    assert page.evaluate("window.chatPage.history()")[-1] == {"role": "assistant",
                                                              "content": "second"}


def test_regenerate_replaces_a_stopped_answer(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    slow = chat_models["slow"]
    open_chat(page, chat_url, "slow")
    page.fill("#prompt", "go")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .content').textContent.length > 5")
    assert page.locator("button.regenerate").count() == 0  # not while streaming
    page.click("#stop")
    page.wait_for_selector(".msg-assistant .status")
    asked = len(slow.requests)

    page.get_by_role("button", name="Regenerate").click()
    # The stopped answer is gone; a new one streams in its place.
    assert page.locator(".msg-assistant").count() == 1
    assert page.locator(".msg-assistant[data-state=streaming]").count() == 1
    assert page.locator(".msg-assistant .status").count() == 0
    wait_until(lambda: len(slow.requests) == asked + 1, "no second request")
    assert slow.conversations[-1] == [("user", "go")]  # without the partial answer
    page.click("#stop")
    page.wait_for_selector(".msg-assistant .status")
    assert page.locator(".msg").count() == 2
    wait_until(lambda: running(chat_url, "slow") == 0, "the running gauge never went back to 0")


def test_answers_show_token_counts_and_speed(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    fake = chat_models["chat"]
    open_chat(page, chat_url, "chat")
    stream_reply(page, "stats please")
    stats = page.locator(".msg-assistant .stats")
    text = stats.inner_text()
    prompt_tokens = len("user: stats please")  # the fake's tokens are the prompt's characters
    assert f"{len(PIECES)} tokens" in text and f"prompt {prompt_tokens} tokens" in text, text
    stats_kept = page.evaluate("window.chatPage.messages()[1].stats")
    assert stats_kept["completion_tokens"] == len(PIECES)
    assert stats_kept["prompt_tokens"] == prompt_tokens
    # Measured, not made up: the fake sleeps PIECE_DELAY before every piece, so the answer
    # took at least that long in all; tok/s is the pieces after the first over the time after
    # the first.
    seconds, first = stats_kept["seconds"], stats_kept["first_token_seconds"]
    assert seconds >= len(PIECES) * PIECE_DELAY and 0 < first < seconds
    shown = re.search(r"([\d.]+) tok/s · .* first token after ([\d.]+) s", text)
    assert shown, text
    assert float(shown.group(1)) == pytest.approx((len(PIECES) - 1) / (seconds - first), abs=0.06)
    assert float(shown.group(2)) == pytest.approx(first, abs=0.006)
    assert fake.conversations[-1] == [("user", "stats please")]


def test_settings_are_remembered_and_sent_with_each_request(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    echo = chat_models["echo"]
    open_chat(page, chat_url, "echo")
    toggle = page.get_by_role("button", name="Settings")
    assert page.locator("#settings").is_hidden()
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true"
    assert page.evaluate("document.activeElement.id") == "system-prompt"
    page.get_by_label("System prompt").fill("Answer in French.")
    page.get_by_label("Temperature").fill("0.3")
    page.get_by_label("Top p").fill("0.8")
    page.get_by_label("Max tokens").fill("3")
    page.keyboard.press("Escape")  # closes the panel, focus back on its button
    assert page.locator("#settings").is_hidden()
    assert page.evaluate("document.activeElement.id") == "settings-toggle"

    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'echo'")
    assert "active" in (toggle.get_attribute("class") or "")  # shows that settings apply
    values = {label: page.get_by_label(label).input_value()
              for label in ("System prompt", "Temperature", "Top p", "Max tokens")}
    assert values == {"System prompt": "Answer in French.", "Temperature": "0.3",
                      "Top p": "0.8", "Max tokens": "3"}

    stream_reply(page, "abcdefghijklmnop")
    request = echo.requests[-1]
    assert echo.conversations[-1] == [("system", "Answer in French."),
                                      ("user", "abcdefghijklmnop")]
    assert (request.params.temperature, request.params.top_p, request.params.max_tokens) \
        == (0.3, 0.8, 3)
    # max_tokens 3 = three of the echo fake's 4-character pieces
    assert page.locator(".msg-assistant .content").inner_text() == "abcdefghijkl"

    # Out of range: nothing is sent, the panel opens on the bad field.
    toggle.click()
    page.get_by_label("Temperature").fill("5")
    toggle.click()
    asked = len(echo.requests)
    page.fill("#prompt", "too hot")
    page.press("#prompt", "Enter")
    error = page.locator("#error").inner_text()  # (the middle is the browser's own wording)
    assert error.startswith("Error: Temperature: ") and error.endswith(" Fix it in Settings."), error
    assert page.locator("#settings").is_visible()
    assert len(echo.requests) == asked and page.input_value("#prompt") == "too hot"

    page.get_by_role("button", name="Reset").click()
    page.wait_for_function("!document.querySelector('#settings-toggle').classList.contains('active')")
    page.fill("#prompt", "")
    stream_reply(page, "plain")
    assert echo.conversations[-1][0] == ("user", "abcdefghijklmnop")  # no system message
    assert echo.requests[-1].params.max_tokens is None
    page.reload()
    assert page.get_by_label("System prompt").input_value() == ""


def test_the_conversation_survives_a_reload_until_a_new_chat(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    echo = chat_models["echo"]
    open_chat(page, chat_url, "echo")
    stream_reply(page, "**one**")
    stream_reply(page, "- two")
    before = page.evaluate("window.chatPage.messages()")

    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'echo'")
    assert page.evaluate("window.chatPage.messages()") == before
    assert page.locator(".msg").count() == 4
    assert page.locator(".msg-assistant .content strong").inner_text() == "one"  # rendered
    assert page.locator(".msg-assistant .content li").inner_text() == "two"
    assert page.locator(".msg-assistant .stats").count() == 2  # counts kept too
    assert page.locator("#empty").is_hidden()
    stream_reply(page, "three")  # the next turn continues the stored conversation
    assert echo.conversations[-1] == [("user", "**one**"), ("assistant", "**one**"),
                                      ("user", "- two"), ("assistant", "- two"),
                                      ("user", "three")]

    page.get_by_role("button", name="New chat").click()
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    page.reload()
    page.wait_for_function("window.chatPage !== undefined")
    assert page.locator(".msg").count() == 0
    assert page.evaluate("window.chatPage.history()") == []


def test_each_conversation_is_named_in_its_requests(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    """The page names its conversation (``X-Session-Id``, what a gateway with replicas routes
    by): every turn, after a reload too, carries the same name; New chat starts another."""
    echo = chat_models["echo"]
    open_chat(page, chat_url, "echo")
    stream_reply(page, "one")
    stream_reply(page, "two")
    first, second = (p.affinity for p in echo.prompts[-2:])
    assert first and first == second
    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'echo'")
    stream_reply(page, "three")
    assert echo.prompts[-1].affinity == first
    page.get_by_role("button", name="New chat").click()
    stream_reply(page, "four")
    assert echo.prompts[-1].affinity not in ("", first)


def test_new_chat_while_streaming_cancels_the_answer(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    open_chat(page, chat_url, "slow")
    page.fill("#prompt", "go")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .content').textContent.length > 5")
    page.get_by_role("button", name="New chat").click()
    wait_until(lambda: running(chat_url, "slow") == 0, "the running gauge never went back to 0")
    assert page.locator(".msg").count() == 0 and page.locator("#send").is_enabled()
    page.reload()
    page.wait_for_function("window.chatPage !== undefined")
    assert page.evaluate("window.chatPage.history()") == []  # the cut-off turn is not kept


def test_a_reload_while_streaming_keeps_the_part_that_arrived(
    page: Any, chat_url: str, chat_models: dict[str, FakeChatModel],
) -> None:
    slow = chat_models["slow"]
    cancelled = slow.counters.cancelled
    open_chat(page, chat_url, "slow")
    page.fill("#prompt", "go")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .content').textContent.length > 5")
    page.reload()
    page.wait_for_function("window.chatPage !== undefined")
    kept = page.evaluate("window.chatPage.messages()")
    assert kept[0] == {"role": "user", "content": "go"}
    assert kept[1]["stopped"] is True and 5 < len(kept[1]["content"]) < 400
    assert page.locator(".msg-assistant .status").inner_text() == "(stopped)"
    wait_until(lambda: running(chat_url, "slow") == 0, "the reload did not cancel the answer")
    assert slow.counters.cancelled == cancelled + 1


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
    page.reload()  # a failed turn is not remembered either
    page.wait_for_function("window.chatPage !== undefined")
    assert page.locator(".msg").count() == 0


def test_demo_models_carry_a_visible_notice(page: Any, chat_url: str) -> None:
    open_chat(page, chat_url, "demo")
    notice = page.locator("#demo-notice")
    assert notice.is_visible()
    assert "demo model" in notice.inner_text()
    page.select_option("#model", "chat")
    assert notice.is_hidden()


def test_controls_are_labelled_and_reachable_by_keyboard(page: Any, chat_url: str) -> None:
    open_chat(page, chat_url, "chat")
    for label, element_id in (("Model", "model"), ("API key", "api-key"), ("Message", "prompt"),
                              ("System prompt", "system-prompt"), ("Temperature", "temperature"),
                              ("Top p", "top-p"), ("Max tokens", "max-tokens")):
        assert page.get_by_label(label, exact=True).get_attribute("id") == element_id
    for name in ("New chat", "Settings", "Send"):
        assert page.get_by_role("button", name=name).is_visible()
    assert page.get_by_role("log", name="Conversation").count() == 1
    assert page.locator("#settings-toggle").get_attribute("aria-controls") == "settings"
    page.focus("#model")
    for expected in ("api-key", "new-chat", "settings-toggle"):
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == expected
    page.keyboard.press("Enter")  # opens the settings, the first field focused
    assert page.evaluate("document.activeElement.id") == "system-prompt"


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

