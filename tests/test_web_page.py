"""The web chat page (adapters/http_static) in a real headless Chromium.

Most tests drive the page against a test double of the HTTP adapter's API (tests/web_page_server.py), which
scripts what a reply is: Markdown, hostile HTML, a replaced reply, errors, a cut connection, a 401. The
last ones serve it from the real adapter (chatforge.adapters.http) and a test bot: the page answers.

Needs Chromium (/usr/bin/chromium, or on PATH, or CHATFORGE_CHROMIUM) and Playwright's Python package, never its
downloaded browsers; without them the tests are skipped, except on CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from web_page_server import CSP, STATIC, AdapterServer, FakeChatApi

# Debian's binary; elsewhere the one on PATH (CHATFORGE_CHROMIUM names another, e.g. Chrome's).
CHROMIUM = os.environ.get("CHATFORGE_CHROMIUM") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else
    shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium")
TIMEOUT_MS = 30_000
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed: pip install playwright (its browser download is not needed)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium is not installed at {CHROMIUM}: sudo apt-get install chromium (Debian/Ubuntu)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} (CI=true: the web page's tests must run)")
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, timeout=TIMEOUT_MS,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A fresh browser context (empty localStorage) on one page, recording what went wrong in it."""

    def __init__(self, browser, **context) -> None:
        self.context = browser.new_context(**context)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        self.page.on("console", self._console)

    def _console(self, message) -> None:
        # Chromium logs each non-2xx answer as "Failed to load resource": the tests cause those on purpose.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(f"console: {message.text}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, **context options) -> a Playwright page; fails the test on any script error or CSP
    violation the page logged."""
    pages: list[Page] = []

    def open_page(url: str, **context):
        page = Page(browser, **context)
        pages.append(page)
        page.page.goto(url)
        return page.page

    yield open_page
    problems = [problem for page in pages for problem in page.problems]
    for page in pages:
        page.close()
    assert not problems, problems


@pytest.fixture
def api():
    with FakeChatApi() as server:
        yield server


def bubbles(page, role: str):
    """What each message of `role` says (its body: without the speaker's name, which is for screen readers)."""
    return page.locator(f"#messages .message.{role} > .body")


def say(page, text: str) -> None:
    """Type `text` and press Enter, as a user does."""
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def last_reply(page):
    return bubbles(page, "bot").last


def wait_idle(page) -> None:
    """Until the reply being streamed is finished (the Send button is enabled again)."""
    from playwright.sync_api import expect

    expect(page.locator("#send")).to_be_enabled()


# ---------------------------------------------------------------- no browser needed


def test_the_page_obeys_its_content_security_policy_by_construction():
    """No inline script or style, no event-handler attributes, no HTML built from strings, nothing external."""
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "event-handler attribute"
    scripts = {name: (STATIC / name).read_text() for name in ("chat.js", "markdown.js")}
    for name, source in scripts.items():
        for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                       "setAttribute(\"style\"", "DOMParser", "createContextualFragment"):
            assert banned not in source, f"{name} uses {banned}"
    for name in ("index.html", "chat.css", *scripts):
        text = (STATIC / name).read_text()
        assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", text), f"{name} loads something external"
        assert "@import" not in text and "@font-face" not in text


# ---------------------------------------------------------------- against the API's test double


def test_a_message_streams_its_reply_and_the_page_sends_what_the_contract_says(api, open_page):
    from playwright.sync_api import expect

    page = open_page(api.url)
    expect(page.locator("#bot-name")).to_have_text("testbot")
    expect(page).to_have_title("testbot")

    say(page, "hello wörld 你好 🙂")  # each event is split mid-character by the server
    expect(bubbles(page, "user")).to_have_text(["hello wörld 你好 🙂"])
    expect(last_reply(page)).to_have_text("echo: hello wörld 你好 🙂")
    wait_idle(page)
    expect(page.locator("#input")).to_have_value("")

    page.locator("#input").fill("line one")
    page.locator("#input").press("Shift+Enter")  # a new line, not a send
    page.locator("#input").press_sequentially("line two")
    expect(bubbles(page, "user")).to_have_count(1)
    page.locator("#send").click()
    expect(page.locator("#input")).to_be_focused()  # back to the input, to type the next message
    expect(last_reply(page)).to_have_text("echo: line one\nline two", use_inner_text=True)  # a <br> between the lines
    expect(bubbles(page, "user").last).to_have_text("line one\nline two")
    wait_idle(page)

    first, second = api.chats()
    for chat in (first, second):
        assert chat.headers["Content-Type"] == "application/json"
        assert "Authorization" not in chat.headers  # no key asked for, none sent
        assert chat.body["model"] == "testbot" and chat.body["stream"] is True
    # Only the new message each time: the server remembers the conversation, named by one random id.
    assert first.body["messages"] == [{"role": "user", "content": "hello wörld 你好 🙂"}]
    assert second.body["messages"] == [{"role": "user", "content": "line one\nline two"}]
    conversation = first.headers["X-Chatforge-Conversation"]
    assert UUID.match(conversation) and second.headers["X-Chatforge-Conversation"] == conversation
    assert page.evaluate("localStorage.getItem('chatforge.conversation')") == conversation

    # A reload keeps the conversation and shows what was said; "New chat" starts another one.
    page.reload()
    expect(bubbles(page, "bot")).to_have_text(["echo: hello wörld 你好 🙂", "echo: line one\nline two"],
                                              use_inner_text=True)
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("#messages .message")).to_have_count(0)
    say(page, "again")
    expect(last_reply(page)).to_have_text("echo: again")
    fresh = api.chats()[-1].headers["X-Chatforge-Conversation"]
    assert UUID.match(fresh) and fresh != conversation


def test_the_command_list_fills_the_input(api, open_page):
    from playwright.sync_api import expect

    page = open_page(api.url)
    commands = page.locator("#commands")
    expect(commands).to_be_hidden()
    page.get_by_role("button", name="Commands").click()
    expect(commands.locator(".signature")).to_have_text(["/help", "/roll <dice>"])
    expect(commands.locator(".help")).to_have_text(["list the commands", "roll dice, e.g. 2d6"])

    commands.get_by_role("button", name="/roll").click()
    expect(commands).to_be_hidden()
    expect(page.locator("#input")).to_have_value("/roll <dice>")
    expect(page.locator("#input")).to_be_focused()
    page.keyboard.type("2d6")  # the placeholder was selected: typing replaces it
    expect(page.locator("#input")).to_have_value("/roll 2d6")

    # Typing "/" lists the commands that match what is typed so far.
    page.locator("#input").fill("")
    page.locator("#input").press_sequentially("/h")
    expect(commands.locator(".signature")).to_have_text(["/help"])
    page.locator("#input").press("Escape")
    expect(commands).to_be_hidden()


MARKDOWN = """# Title
Some **bold**, *italic*, _also italic_, `x = 1`, a snake_case_name and 2*3*4.
Second line of the same paragraph.

- one
- two with [a link](https://example.org/a_(b)?q=1)
  - nested

3. three
4. four

> quoted **text**

```python
print("<b>not bold</b>")
```

## Sub
### Subsub
---
[bad](javascript:alert(1)) [data](data:text/html,x) \\*not italic\\*"""


def test_markdown_is_rendered_as_it_streams(api, open_page):
    from playwright.sync_api import expect

    api.script("markdown please", stream=[MARKDOWN[i:i + 7] for i in range(0, len(MARKDOWN), 7)])
    page = open_page(api.url)
    say(page, "markdown please")
    wait_idle(page)
    reply = last_reply(page)
    # h1 is the page's title: "#" is an h2 in a reply
    expect(reply.locator("h2")).to_have_text("Title")
    expect(reply.locator("h3")).to_have_text("Sub")
    expect(reply.locator("h4")).to_have_text("Subsub")
    expect(reply.locator("strong")).to_have_text(["bold", "text"])
    expect(reply.locator("em")).to_have_text(["italic", "also italic"])
    expect(reply.locator("p code")).to_have_text("x = 1")
    first = reply.locator("p").first
    expect(first).to_contain_text("a snake_case_name and 2*3*4.")
    expect(first.locator("br")).to_have_count(1)
    expect(reply.locator("ul > li")).to_have_count(3)
    expect(reply.locator("ul ul > li")).to_have_text("nested")
    expect(reply.locator("ol > li")).to_have_text(["three", "four"])
    assert reply.locator("ol").get_attribute("start") == "3"
    expect(reply.locator("blockquote strong")).to_have_text("text")
    expect(reply.locator(".code-lang")).to_have_text("python")
    expect(reply.locator("pre code")).to_have_text('print("<b>not bold</b>")')
    expect(reply.locator("pre b")).to_have_count(0)
    expect(reply.locator("hr")).to_have_count(1)
    link = reply.locator("a")
    expect(link).to_have_count(1)
    expect(link).to_have_text("a link")
    assert link.get_attribute("href") == "https://example.org/a_(b)?q=1"
    assert link.get_attribute("rel") == "noopener noreferrer" and link.get_attribute("target") == "_blank"
    expect(reply.locator("p").last).to_have_text("[bad](javascript:alert(1)) [data](data:text/html,x) *not italic*")


XSS = [
    "<script>window.__xss = 1</script>",
    "<img src=x onerror=\"window.__xss = 2\">",
    "<svg onload=\"window.__xss = 3\"></svg>",
    "<iframe src=\"javascript:window.__xss = 4\"></iframe>",
    "[click](javascript:window.__xss=5)",
    "[click](JaVaScRiPt:window.__xss=6)",
    "[click]( javascript:window.__xss=7)",
    "[click](vbscript:x)",
    "**<b onmouseover=\"window.__xss=8\">bold</b>**",
    "`<script>window.__xss = 9</script>`",
    "```html\n<script>window.__xss = 10</script>\n```",
    "> <a href=\"javascript:window.__xss=11\">quote</a>",
    "- <style>body{display:none}</style>",
    "&lt;script&gt; &amp; &#60;img&#62;",
    "[x](https://example.org/\" onclick=\"window.__xss=12)",
]


def test_html_in_a_reply_or_a_message_stays_text(api, open_page):
    from playwright.sync_api import expect

    page = open_page(api.url)
    # Straight through the renderer: what each payload becomes.
    rendered = page.evaluate("""async (payloads) => {
        const { renderMarkdown } = await import("./static/markdown.js");
        return payloads.map((text) => {
            const box = document.createElement("div");
            box.appendChild(renderMarkdown(text));
            return { text: box.textContent,
                     tags: [...box.querySelectorAll("*")].map((node) => node.tagName.toLowerCase()),
                     hrefs: [...box.querySelectorAll("a")].map((a) => a.href),
                     attributes: [...box.querySelectorAll("*")].flatMap((node) => node.getAttributeNames()) };
        });
    }""", XSS)
    allowed = {"p", "br", "strong", "em", "code", "pre", "div", "blockquote", "ul", "ol", "li", "a"}
    for payload, result in zip(XSS, rendered):
        assert set(result["tags"]) <= allowed, (payload, result)
        assert set(result["attributes"]) <= {"class", "href", "rel", "target", "data-lang", "start"}, (payload, result)
        assert all(href.startswith("https://") for href in result["hrefs"]), (payload, result)
    by_payload = dict(zip(XSS, rendered))
    assert by_payload[XSS[0]]["text"] == XSS[0]
    assert by_payload[XSS[1]]["text"] == XSS[1]
    assert by_payload["&lt;script&gt; &amp; &#60;img&#62;"]["text"] == "&lt;script&gt; &amp; &#60;img&#62;"
    # A quote cannot end the URL and start an attribute: not a link at all.
    assert by_payload[XSS[-1]]["tags"] == ["p"] and by_payload[XSS[-1]]["text"] == XSS[-1]

    # And through the page: streamed as a reply, and typed by the user.
    hostile = "\n\n".join(XSS)
    api.script(hostile, stream=[hostile[i:i + 5] for i in range(0, len(hostile), 5)])
    say(page, hostile)
    wait_idle(page)
    messages = page.locator("#messages")
    expect(messages.locator("script, img, svg, iframe, style, b")).to_have_count(0)
    expect(bubbles(page, "user")).to_have_text(hostile)
    expect(last_reply(page)).to_contain_text("<img src=x onerror=\"window.__xss = 2\">")
    expect(last_reply(page)).to_contain_text("<script>window.__xss = 1</script>")
    assert messages.locator("a").evaluate_all("links => links.map(a => a.protocol)") == []
    # (A handler or script that got into the page would be blocked by the CSP, and the violation fail the test
    # through open_page: see test_a_blocked_inline_handler_fails_the_test. Here: none got into the DOM at all.)
    handlers = messages.evaluate("""box => [...box.querySelectorAll("*")].flatMap((node) =>
        node.getAttributeNames().filter((name) => name.startsWith("on") || name === "style"))""")
    assert handlers == []


def test_a_blocked_inline_handler_fails_the_test(browser, api):
    """The hook that open_page relies on: a CSP violation is logged, and recorded as a problem."""
    page = Page(browser)
    try:
        page.page.goto(api.url)
        page.page.evaluate("""() => {
            const box = document.createElement("div");
            box.innerHTML = '<img src="data:," onerror="window.__xss = 1">';
            document.body.appendChild(box);
        }""")
        page.page.wait_for_function("() => document.querySelector('img') !== null")
        for _ in range(50):
            if page.problems:
                break
            page.page.wait_for_timeout(100)
        assert any("Content Security Policy" in problem for problem in page.problems), page.problems
        assert page.page.evaluate("window.__xss") is None
    finally:
        page.close()


def test_markdown_stays_fast_on_text_made_to_be_slow(api, open_page):
    """Re-rendered at every frame while it streams: unmatched markers and deep nesting must cost linear time
    (60 kB of "*a " took about 16 s when each opener searched the rest of the text for its closer)."""
    page = open_page(api.url)
    seconds = page.evaluate("""async () => {
        const { renderMarkdown } = await import("./static/markdown.js");
        const texts = ["*a ".repeat(20000), "_a ".repeat(20000), "`a ".repeat(20000), "[".repeat(20000),
                       "[".repeat(3000) + "x" + "](https://a.b)".repeat(3000), ">".repeat(20000) + " deep",
                       Array.from({ length: 2000 }, (_, i) => " ".repeat(i % 300) + "- x").join("\\n")];
        return texts.map((text) => {
            const start = performance.now();
            renderMarkdown(text);
            return (performance.now() - start) / 1000;
        });
    }""")
    assert len(seconds) == 7 and max(seconds) < 3, seconds


def test_a_replace_chunk_becomes_the_whole_reply(api, open_page):
    from playwright.sync_api import expect

    api.script("shout", stream=["a draft", " that streamed"], replace="the **final** reply")
    page = open_page(api.url)
    say(page, "shout")
    wait_idle(page)
    expect(last_reply(page)).to_have_text("the final reply")
    expect(last_reply(page).locator("strong")).to_have_text("final")


@pytest.mark.parametrize("status, headers, message, shown", [
    (429, {"Retry-After": "7"}, "You are sending messages too fast.", "You are sending messages too fast. (try again in 7 s)"),
    (503, {"Retry-After": "12"}, "The bot is busy.", "The bot is busy. (try again in 12 s)"),
    (413, {}, "The message is too long (at most 4000 characters).", "The message is too long (at most 4000 characters)."),
    (400, {}, "messages: the last message must be the user's.", "messages: the last message must be the user's."),
])
def test_a_refused_message_shows_why_and_gives_the_text_back(api, open_page, status, headers, message, shown):
    from playwright.sync_api import expect

    api.script("refused", status=status, headers=headers, message=message, code="x")
    page = open_page(api.url)
    say(page, "refused")
    expect(page.locator("#error")).to_have_text(shown)
    expect(page.locator("#messages .message")).to_have_count(0)  # the server never took it
    expect(page.locator("#input")).to_have_value("refused")  # to edit, or to send again
    wait_idle(page)
    say(page, "and now?")  # the next message clears the error
    expect(last_reply(page)).to_have_text("echo: and now?")
    expect(page.locator("#error")).to_be_hidden()


def test_a_reply_that_fails_midway_keeps_its_start_and_shows_the_error(api, open_page):
    from playwright.sync_api import expect

    api.script("fail", stream=["I was saying"], error="The model crashed.")
    api.script("cut", stream=["half a"], cut=True)
    page = open_page(api.url)
    say(page, "fail")
    expect(page.locator("#error")).to_have_text("The model crashed.")
    expect(last_reply(page)).to_have_text("I was saying")
    expect(page.locator("#messages .message.bot").last).to_have_class(re.compile(r"\bfailed\b"))
    wait_idle(page)
    say(page, "cut")
    expect(page.locator("#error")).to_contain_text("before the reply was complete")
    expect(last_reply(page)).to_have_text("half a")
    expect(bubbles(page, "user")).to_have_text(["fail", "cut"])


def test_the_page_asks_for_an_api_key_on_401_and_keeps_it(open_page):
    from playwright.sync_api import expect

    with FakeChatApi(api_key="s3cret-key") as api:
        page = open_page(api.url)
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#bot-name")).to_have_text("chatforge")  # nothing loaded yet
        page.locator("#key-input").fill("wrong-key")
        page.locator("#key-input").press("Enter")
        # Retried once with it, refused: said so, and the refused key is not kept.
        expect(page.locator("#error")).to_have_text("That API key was refused.")
        expect(dialog).to_be_hidden()
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") is None

        say(page, "hi")  # asks again
        expect(dialog).to_be_visible()
        page.locator("#key-input").fill("s3cret-key")
        page.get_by_role("button", name="Save key").click()
        expect(last_reply(page)).to_have_text("echo: hi")
        expect(page.locator("#bot-name")).to_have_text("testbot")
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") == "s3cret-key"
        assert api.chats()[-1].headers["Authorization"] == "Bearer s3cret-key"

        page.reload()  # the key is remembered
        expect(page.locator("#bot-name")).to_have_text("testbot")
        expect(dialog).to_be_hidden()
        expect(page.get_by_role("button", name="Commands")).to_be_visible()

        # Cancelling the prompt gives the message back with the reason.
        page.evaluate("localStorage.removeItem('chatforge.apiKey')")
        page.reload()
        expect(dialog).to_be_visible()
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#error")).to_have_text("An API key is needed to chat.")


def test_the_page_fits_a_phone(api, open_page):
    from playwright.sync_api import expect

    long_word = "x" * 300
    api.script("long", stream=[f"{long_word} https://example.org/{long_word}\n\n```\n{long_word}\n```"])
    page = open_page(api.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                     device_scale_factor=3)

    def say_on_phone(text: str) -> None:
        # A touch keyboard has no Shift+Enter: Enter is a new line there, and the Send button sends.
        page.locator("#input").fill(text)
        page.locator("#input").press("Enter")
        assert page.locator("#input").input_value() == text + "\n"
        page.locator("#input").fill(text)
        page.locator("#send").tap()

    say_on_phone("long")
    wait_idle(page)
    expect(last_reply(page).locator("pre")).to_have_count(1)
    for _ in range(12):  # enough messages to scroll
        say_on_phone(f"message {long_word}")
        wait_idle(page)
    sizes = page.evaluate("""() => ({ scroll: document.documentElement.scrollWidth,
                                      width: document.documentElement.clientWidth,
                                      bodyScroll: document.body.scrollWidth,
                                      messages: document.getElementById('messages').scrollWidth,
                                      messagesWidth: document.getElementById('messages').clientWidth })""")
    assert sizes["scroll"] <= sizes["width"] == 390 and sizes["bodyScroll"] <= 390, sizes
    assert sizes["messages"] <= sizes["messagesWidth"], sizes  # the code block scrolls, not the page
    for selector in ("#input", "#send", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, \
            (selector, box)
    for selector in ("#send", "#new-chat", "#commands-button"):  # big enough for a finger
        assert page.locator(selector).bounding_box()["height"] >= 44, selector
    expect(page.locator("#input")).not_to_be_focused()  # Send gives no focus back: no keyboard popping up
    # The newest reply is scrolled into view above the input.
    reply = last_reply(page).bounding_box()
    assert reply["y"] + reply["height"] <= page.locator("#input").bounding_box()["y"], reply


def render(page, texts: list[str]) -> list[str]:
    """Each Markdown text as the renderer's HTML (read back from the DOM it built, to compare)."""
    return page.evaluate("""async (texts) => {
        const { renderMarkdown } = await import("./static/markdown.js");
        return texts.map((text) => {
            const box = document.createElement("div");
            box.appendChild(renderMarkdown(text));
            return box.innerHTML;
        });
    }""", texts)


def test_emphasis_nests_both_ways(api, open_page):
    page = open_page(api.url)
    assert render(page, ["*Note: **x** y*", "**a *b* c**", "*a **b***", "***both***"]) == [
        "<p><em>Note: <strong>x</strong> y</em></p>",
        "<p><strong>a <em>b</em> c</strong></p>",
        "<p><em>a <strong>b</strong></em></p>",
        "<p><strong><em>both</em></strong></p>",
    ]


def test_no_link_inside_a_link_and_no_url_with_a_user_name(api, open_page):
    page = open_page(api.url)
    nested, userinfo, password, fine = render(page, [
        "[[b](https://in)](https://out)", "[bank](https://bank.com@evil.com)",
        "[x](https://user:pass@example.org/)", "[ok](https://example.org/@user)"])
    assert nested == ('<p><a href="https://out/" rel="noopener noreferrer" target="_blank">'
                      "[b](https://in)</a></p>"), nested
    assert userinfo == "<p>[bank](https://bank.com@evil.com)</p>", userinfo
    assert password == "<p>[x](https://user:pass@example.org/)</p>", password
    assert 'href="https://example.org/@user"' in fine, fine  # an @ in the path is no user name


def test_a_key_that_cannot_be_sent_is_refused_in_the_dialog_and_a_saved_key_can_be_forgotten(open_page):
    """A pasted key with an invisible or curly character made fetch throw building its headers: the page said
    "Cannot reach the server", kept the key, and never asked again."""
    from playwright.sync_api import expect

    with FakeChatApi(api_key="s3cret-key") as api:
        page = open_page(api.url)
        dialog, problem, forget = page.locator("#key-dialog"), page.locator("#key-problem"), \
            page.get_by_role("button", name="Forget key")
        expect(dialog).to_be_visible()
        expect(forget).to_be_hidden()  # no key saved
        page.locator("#key-input").fill("s3cret\u200b-key")  # a zero-width space, pasted with it
        page.locator("#key-input").press("Enter")
        expect(problem).to_contain_text("U+200B")
        expect(dialog).to_be_visible()
        expect(page.locator("#key-input")).to_have_attribute("aria-invalid", "true")
        page.locator("#key-input").fill("\u201cs3cret-key\u201d")  # curly quotes
        page.get_by_role("button", name="Save key").click()
        expect(problem).to_contain_text("\u201c")
        expect(dialog).to_be_visible()
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") is None
        expect(page.locator("#error")).to_be_hidden()

        page.locator("#key-input").fill("s3cret-key")
        page.locator("#key-input").press("Enter")
        expect(page.locator("#bot-name")).to_have_text("testbot")
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") == "s3cret-key"
        expect(forget).to_be_visible()
        forget.click()
        expect(forget).to_be_hidden()
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") is None
        say(page, "hi")  # asks again
        expect(dialog).to_be_visible()
        expect(problem).to_be_hidden()  # a new dialog, no old complaint
        page.get_by_role("button", name="Cancel").click()

        # A bad key saved by an older page is not sent, and is dropped: the page asks for a key.
        page.evaluate("localStorage.setItem('chatforge.apiKey', 'old\u200bkey')")
        page.reload()
        expect(dialog).to_be_visible()
        expect(page.locator("#error")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") is None


def test_screen_readers_hear_whole_messages_with_who_said_them(api, open_page):
    from playwright.sync_api import expect

    api.script("slowly", stream=["the first part"], pause=2.0)
    page = open_page(api.url)
    messages = page.locator("#messages")
    expect(messages).to_have_attribute("role", "log")
    assert messages.get_attribute("aria-live") is None  # role=log is polite already
    expect(page.locator("main")).to_have_count(1)  # still a main landmark, around the log
    say(page, "slowly")
    expect(last_reply(page)).to_have_text("the first part")
    expect(messages).to_have_attribute("aria-busy", "true")  # read once it is complete, not every frame
    wait_idle(page)
    expect(messages).not_to_have_attribute("aria-busy", "true")
    speakers = page.locator("#messages .message .speaker")
    expect(speakers).to_have_text(["You:", "testbot:"])
    box = speakers.first.bounding_box()
    assert box is None or (box["width"] <= 1 and box["height"] <= 1), box  # heard, not seen
    assert page.locator("#composer").get_attribute("aria-busy") is None


def _contrast(first: str, second: str) -> float:
    def luminance(color: str) -> float:
        channels = [int(value) / 255 for value in re.findall(r"\d+", color)[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_on_the_accent_colour_is_readable(api, open_page, scheme):
    from playwright.sync_api import expect

    api.script("link", stream=["[a link](https://example.org/)"])
    page = open_page(api.url, color_scheme=scheme)
    say(page, "link")
    expect(last_reply(page).locator("a")).to_have_count(1)
    colors = page.evaluate("""() => {
        const style = (selector) => getComputedStyle(document.querySelector(selector));
        return { send: [style("#send").color, style("#send").backgroundColor],
                 user: [style(".message.user").color, style(".message.user").backgroundColor],
                 link: [style(".message.bot a").color, style(".message.bot").backgroundColor] };
    }""")
    for name, (fg, bg) in colors.items():
        assert _contrast(fg, bg) >= 4.5, (name, fg, bg, round(_contrast(fg, bg), 2))


def test_an_error_before_any_text_gives_the_message_back(api, open_page):
    from playwright.sync_api import expect

    api.script("unlucky", error="The model is not loaded.")
    page = open_page(api.url)
    say(page, "unlucky")
    expect(page.locator("#error")).to_have_text("The model is not loaded.")
    expect(page.locator("#messages .message")).to_have_count(0)
    expect(page.locator("#input")).to_have_value("unlucky")
    wait_idle(page)
    page.reload()  # nor is it in the transcript
    expect(page.locator("#bot-name")).to_have_text("testbot")
    expect(page.locator("#messages .message")).to_have_count(0)


@pytest.mark.parametrize("data", ["null", "42", '"text"', "[1, 2]"])
def test_a_chunk_that_is_not_an_object_is_a_bad_answer(api, open_page, data):
    from playwright.sync_api import expect

    api.script("odd", stream=["so far"], raw=[data])
    page = open_page(api.url)
    say(page, "odd")
    expect(page.locator("#error")).to_have_text("The server sent a reply this page cannot read.")
    expect(last_reply(page)).to_have_text("so far")


# ---------------------------------------------------------------- the real adapter


def _adapter_available() -> str | None:
    path = Path(__file__).resolve().parent.parent / "adapters" / "http.py"
    if not path.is_file() or "class HttpAdapter" not in path.read_text():
        return "adapters/http.py (HttpAdapter) is not there yet"
    return None


@pytest.fixture(scope="module")
def adapter(browser):
    missing = _adapter_available()
    if missing:
        pytest.skip(missing)
    with AdapterServer() as server:
        yield server


def test_the_page_answers_in_a_headless_browser(adapter, open_page):
    """The issue's done-when: the real adapter serves the page, which streams the bot's reply."""
    from playwright.sync_api import expect

    bot = adapter.bot
    page = open_page(adapter.url)
    response = page.context.request.get(adapter.url)
    assert response.headers["content-security-policy"] == CSP
    model = page.evaluate("fetch('v1/models').then((r) => r.json())")["data"][0]["id"]
    expect(page.locator("#bot-name")).to_have_text(model)

    say(page, "hello there")
    expect(last_reply(page)).to_have_text("echo: hello there")
    wait_idle(page)
    say(page, "and again")
    expect(last_reply(page)).to_have_text("echo: and again")
    wait_idle(page)
    # The second message came with the first exchange as its history: the page kept one conversation.
    history, text = bot.generator.calls[-1]
    assert text == "and again"
    assert [turn.text for turn in history][-2:] == ["hello there", "echo: hello there"]
    expect(page.locator("#error")).to_be_hidden()


def test_help_runs_from_the_command_list_on_the_real_adapter(adapter, open_page):
    from playwright.sync_api import expect

    page = open_page(adapter.url)
    page.get_by_role("button", name="Commands").click()
    page.locator("#commands .signature").get_by_text("/help", exact=True).click()
    expect(page.locator("#input")).to_have_value("/help")
    page.locator("#input").press("Enter")
    wait_idle(page)
    expect(last_reply(page)).to_contain_text("/help")
    expect(page.locator("#error")).to_be_hidden()


def test_the_real_adapter_asks_the_page_for_its_key(open_page):
    from playwright.sync_api import expect

    with AdapterServer(api_keys=["page-test-key-0123456789"]) as server:
        page = open_page(server.url)
        expect(page.locator("#key-dialog")).to_be_visible()
        page.locator("#key-input").fill("page-test-key-0123456789")
        page.locator("#key-input").press("Enter")
        expect(page.locator("#bot-name")).to_have_text(server.adapter.model_id)
        say(page, "with a key")
        expect(last_reply(page)).to_have_text("echo: with a key")
        wait_idle(page)
        expect(page.locator("#error")).to_be_hidden()


def test_the_real_adapters_refusals_reach_the_page(open_page):
    from playwright.sync_api import expect

    with AdapterServer({"limits": {"rate_per_minute": 1, "rate_burst": 1, "max_message_chars": 40}}) as server:
        page = open_page(server.url)
        expect(page.locator("#bot-name")).to_have_text(server.adapter.model_id)
        say(page, "x" * 41)
        expect(page.locator("#error")).to_contain_text("40")  # too long: the limit is said
        expect(page.locator("#input")).to_have_value("x" * 41)
        say(page, "first")
        expect(last_reply(page)).to_have_text("echo: first")
        wait_idle(page)
        say(page, "second")  # beyond the burst: 429 with Retry-After
        expect(page.locator("#error")).to_contain_text(re.compile(r"\b\d+ s\b"))
        expect(page.locator("#input")).to_have_value("second")
        expect(bubbles(page, "user")).to_have_text(["first"])
