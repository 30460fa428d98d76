"""The chat page of `herd serve`, end to end: headless Chromium (Debian's `chromium`, driven by
Playwright for Python) against a real `herd serve` process with the real SmolLM2 model.

Screenshots go to test-artifacts/ui/. Without Playwright or Chromium these tests are skipped,
except in CI (`CI` set), where they must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
from herdserver import HerdServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
CHROMIUM = os.environ.get("HERD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 90_000  # two shared CPU cores: a model load plus a reply can take a while
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 800}


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: .ci/run installs them)")
    pytest.skip(reason)


# -- a real `herd serve` ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def herd(tmp_path_factory, smollm2_path):
    """The server, with SmolLM2 stored as `smol` and again as `smol-copy` (the same blob)."""
    pytest.importorskip("fastapi")
    from llamaherd.store import Store

    home = tmp_path_factory.mktemp("herd-home")
    store = Store(home)
    store.create("smol", f"FROM {smollm2_path}")
    store.copy("smol", "smol-copy")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = HerdServer(home, ARTIFACTS / "herd-serve.log")
    try:
        server.start()
        server.api("POST", "/api/chat", json={"model": "smol"}).raise_for_status()  # load it once, up front
        yield server
    finally:
        server.stop()


# -- the browser ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, herd):
    """open_page(viewport=..., seed=[chats]): a fresh browser profile on the chat page."""
    contexts = []

    def open_(viewport=DESKTOP, seed=None, theme="light"):
        context = browser.new_context(viewport=viewport, accept_downloads=True, color_scheme=theme)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        if seed is not None:
            page.add_init_script(f"if (!sessionStorage.seeded) {{ sessionStorage.seeded = 1; "
                                 f"localStorage.setItem('llamaherd.chats', {json.dumps(json.dumps(seed))}); }}")
        page.goto(herd.url + "/")
        page.wait_for_selector("body[data-ready]")
        return page

    yield open_
    for page in (p for c in contexts for p in c.pages):
        assert page.errors == [], page.errors  # no uncaught script errors on any page
    for c in contexts:
        c.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def set_options(page, **options) -> None:
    """Fill the conversation settings (system prompt and parameters)."""
    page.click("#settings-toggle")
    for key, value in options.items():
        page.fill("#system" if key == "system" else f"#opt-{key}", str(value))
    page.click("#settings-toggle")


def send(page, text: str):
    """Type a message and press Enter; return the /api/chat request it made."""
    page.fill("#input", text)
    with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as request:
        page.press("#input", "Enter")
    return request.value


def watch_streaming(page) -> None:
    """Record, at each change of the page, the streaming reply's text length and which buttons show."""
    page.evaluate("""() => {
        window.frames_seen = [];
        new MutationObserver(() => {
            const body = document.querySelector('.message.streaming .body');
            if (body) window.frames_seen.push({length: body.textContent.length,
                                               stop: !document.querySelector('#stop').hidden,
                                               send: !document.querySelector('#send').hidden});
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
    }""")


def wait_reply(page):
    """Wait for the streaming reply to end; return the last reply's node."""
    page.wait_for_selector(".message.streaming", state="detached")
    return page.locator(".message.assistant").last


def stored_chats(page) -> list[dict]:
    return page.evaluate("JSON.parse(localStorage.getItem('llamaherd.chats'))")


# -- no browser: the routes -----------------------------------------------------------------------

def test_browsers_get_the_page_and_api_clients_get_ollamas_answer(herd):
    r = httpx.get(herd.url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    for accept in ("*/*", "application/json"):  # curl, the ollama client
        r = httpx.get(herd.url + "/", headers={"Accept": accept})
        assert (r.status_code, r.text) == (200, "Ollama is running")
    assert httpx.head(herd.url + "/").status_code == 200

    page = httpx.get(herd.url + "/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in page.text and "default-src 'self'" in page.text
    assets = ["style.css", "theme.js", "app.js", "vendor/marked.js", "vendor/purify.min.js",
              "vendor/highlight.min.js"]
    for asset in assets:
        assert f'"{asset}"' in page.text
        assert httpx.get(f"{herd.url}/ui/{asset}").status_code == 200, asset
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another host
    assert httpx.get(herd.url + "/ui/nothing.js").status_code == 404


def test_the_wheel_ships_every_asset():
    """Each file of the page matches the package-data globs in pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    import llamaherd.server.ui as ui

    package = Path(ui.__file__).parent
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][ui.__name__]
    shipped = {p for g in globs for p in package.glob(g) if p.is_file()}
    assets = {p for p in ui.STATIC.rglob("*") if p.is_file()}
    assert assets and assets <= shipped, sorted(str(p) for p in assets - shipped)


# -- in the browser -------------------------------------------------------------------------------

def test_a_reply_streams_in_with_its_stats(open_page, herd):
    page = open_page()
    assert page.url == herd.url + "/ui/"
    expect_models = {"smol:latest", "smol-copy:latest"}
    assert expect_models <= set(page.locator("#model option").all_inner_texts())
    page.select_option("#model", "smol:latest")
    set_options(page, system="You are a terse assistant.", temperature=0, top_p=0.9, top_k=40, num_ctx=2048,
                seed=7, num_predict=24)
    watch_streaming(page)
    request = send(page, "Name three colors.")
    body = request.post_data_json
    assert body["model"] == "smol:latest" and body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "You are a terse assistant."},
                                {"role": "user", "content": "Name three colors."}]
    assert body["options"] == {"temperature": 0, "top_p": 0.9, "top_k": 40, "num_ctx": 2048, "seed": 7,
                               "num_predict": 24}

    # The text grows while the reply streams (with the stop button up), then it completes.
    reply = wait_reply(page)
    frames = page.evaluate("window.frames_seen")
    assert len({f["length"] for f in frames if f["length"]}) >= 2, frames
    assert all(f["stop"] and not f["send"] for f in frames)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    stats = reply.locator(".stats").inner_text()
    assert "tokens/s" in stats and "prompt" in stats
    shot(page, "desktop-light-reply")

    # Greedy: the page shows exactly what the API answers for the same request.
    content = stored_chats(page)[0]["messages"][1]["content"]
    alone = herd.api("POST", "/api/chat", json={**body, "stream": False}).json()
    assert content == alone["message"]["content"]
    assert stats.startswith(f"{alone['eval_count']} tokens")


def test_stop_ends_the_reply_and_the_server_keeps_serving(open_page, herd):
    page = open_page()
    set_options(page, temperature=0, num_predict=400)
    aborted = []
    page.on("requestfailed", lambda r: aborted.append(r.failure) if r.url.endswith("/api/chat") else None)
    send(page, "Write a long story about a dragon who learns to paint.")
    page.wait_for_function("() => { const b = document.querySelector('.message.streaming .body');"
                           " return b && b.textContent.trim().length > 0 }")
    page.keyboard.press("Escape")  # Esc stops, as the stop button does
    reply = wait_reply(page)
    assert reply.locator(".stopped").inner_text() == "stopped"
    assert aborted and "ABORTED" in aborted[0].upper()  # the connection was closed: the server frees the slot
    text = reply.locator(".body").inner_text()
    shot(page, "desktop-light-stopped")
    page.wait_for_timeout(1500)
    assert reply.locator(".body").inner_text() == text
    stats = reply.locator(".stats").inner_text()  # a stopped reply keeps what the page counted
    assert re.match(r"[1-9]\d* tokens · [\d.]+ tokens/s", stats) and "counted by this page" in stats, stats

    # The server goes on: a next message gets its whole (short) reply, with the stopped one as history.
    set_options(page, num_predict=6)
    request = send(page, "Thanks!")
    assert [m["role"] for m in request.post_data_json["messages"]] == ["user", "assistant", "user"]
    assert "tokens/s" in wait_reply(page).locator(".stats").inner_text()


def test_conversations_persist_and_can_be_renamed_exported_and_deleted(open_page, herd, tmp_path):
    page = open_page()
    set_options(page, temperature=0, num_predict=8, seed=3)
    send(page, "Hi there")
    wait_reply(page)
    page.fill("#chat-title", "Greetings")
    assert page.inner_text(".chat-item.current .open") == "Greetings"
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert "Chatting with smol" in page.inner_text(".empty")
    shot(page, "desktop-light-new-chat")
    set_options(page, num_predict=4)
    send(page, "Second conversation")
    wait_reply(page)

    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator(".chat-item .open").all_inner_texts() == ["Second conversation", "Greetings"]
    page.click(".chat-item >> text=Greetings")
    assert page.input_value("#chat-title") == "Greetings"
    assert page.inner_text(".message.user .body") == "Hi there"
    assert page.locator(".message.assistant .stats").count() == 1
    page.click("#settings-toggle")
    assert (page.input_value("#opt-num_predict"), page.input_value("#opt-seed")) == ("8", "3")

    with page.expect_download() as download:
        page.click("#export-json")
    assert download.value.suggested_filename == "Greetings.json"
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["title"] == "Greetings" and exported["options"] == {"temperature": 0, "num_predict": 8, "seed": 3}
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["stats"]["eval_count"] >= 1
    with page.expect_download() as download:
        page.click("#export-md")
    markdown = Path(download.value.path()).read_text()
    assert download.value.suggested_filename == "Greetings.md"
    assert markdown.startswith("# Greetings\n") and "## You\n\nHi there\n" in markdown
    assert exported["messages"][1]["content"] in markdown

    page.once("dialog", lambda d: d.accept())
    page.click("#delete-chat")
    assert page.locator(".chat-item .open").all_inner_texts() == ["Second conversation"]
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator(".chat-item .open").all_inner_texts() == ["Second conversation"]


def test_regenerate_edit_and_keyboard(open_page):
    page = open_page()
    set_options(page, temperature=0, num_predict=8)
    page.locator("#input").press_sequentially("Say hello")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("in French")
    assert page.input_value("#input") == "Say hello\nin French"
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as first:
        page.keyboard.press("Enter")
    assert first.value.post_data_json["messages"][-1]["content"] == "Say hello\nin French"
    text = wait_reply(page).locator(".body").inner_text()

    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as again:
        page.click(".message.assistant .regenerate")
    assert again.value.post_data_json["messages"] == first.value.post_data_json["messages"]
    assert wait_reply(page).locator(".body").inner_text() == text  # greedy: the same reply
    assert page.locator(".message").count() == 2

    page.click(".message.user .edit-message")
    page.fill(".message.edit textarea", "Say goodbye")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as edited:
        page.click(".message.edit .save-edit")
    assert edited.value.post_data_json["messages"] == [{"role": "user", "content": "Say goodbye"}]
    wait_reply(page)
    assert page.locator(".message").count() == 2
    assert page.inner_text(".message.user .body") == "Say goodbye"

    page.click(".message.assistant .copy")
    # The label changes once the clipboard write resolves: wait for it (reading it at once raced).
    page.wait_for_selector(".message.assistant .copy:text-is('Copied')")


def test_switching_models_and_seeing_them_loaded(open_page, herd):
    page = open_page()
    set_options(page, temperature=0, num_predict=4)
    page.select_option("#model", "smol-copy:latest")
    request = send(page, "Hello")
    assert request.post_data_json["model"] == "smol-copy:latest"
    reply = wait_reply(page)
    assert reply.locator(".role").inner_text() == "smol-copy:latest"
    assert "tokens/s" in reply.locator(".stats").inner_text()
    page.wait_for_function("() => document.querySelector('#installed li.is-loaded[data-name=\"smol-copy:latest\"]')")
    assert page.locator("#installed li.is-loaded[data-name='smol:latest']").count() == 1

    page.select_option("#model", "smol:latest")  # the same conversation goes on with another model
    request = send(page, "And again")
    assert request.post_data_json["model"] == "smol:latest"
    assert wait_reply(page).locator(".role").inner_text() == "smol:latest"
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.input_value("#model") == "smol:latest"
    assert page.locator(".message.assistant .role").all_inner_texts() == ["smol-copy:latest", "smol:latest"]


def test_an_unknown_model_is_an_error_in_the_conversation(open_page, herd):
    herd.api("POST", "/api/copy", json={"source": "smol", "destination": "doomed"}).raise_for_status()
    page = open_page()
    set_options(page, temperature=0, num_predict=4)
    page.select_option("#model", "doomed:latest")
    herd.api("DELETE", "/api/delete", json={"model": "doomed"}).raise_for_status()
    send(page, "Are you there?")
    error = wait_reply(page).locator(".error")
    assert "not found" in error.inner_text() and "404" in error.inner_text()
    shot(page, "desktop-light-error")

    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator("#model option:checked").inner_text() == "doomed:latest (not installed)"
    assert "not found" in page.inner_text(".message.assistant .error")  # kept with the conversation
    page.select_option("#model", "smol:latest")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as request:
        page.click(".message.assistant .regenerate")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "Are you there?"}]
    reply = wait_reply(page)
    assert reply.locator(".error").count() == 0 and "tokens/s" in reply.locator(".stats").inner_text()


def test_pull_shows_progress_and_adds_the_model(open_page):
    page = open_page()
    assert "smollm2:135m" not in page.locator("#model option").all_inner_texts()
    page.fill("#pull-name", "smollm2:135m")  # its file is in the store already: only the manifest is new
    page.click("#pull-button")
    # the stream's last event reads "success"; the page's own "<name>: success" comes after the model list refreshed
    page.wait_for_function("() => document.querySelector('#pull-status').textContent === 'smollm2:135m: success'")
    assert page.evaluate("document.querySelector('#pull-progress').value") == 1
    assert page.input_value("#model") == "smollm2:135m"  # the empty conversation takes it
    assert "Chatting with smollm2:135m" in page.inner_text(".empty")
    assert "smollm2:135m" in page.locator("#model option").all_inner_texts()
    shot(page, "desktop-light-pulled")

    page.fill("#pull-name", "nosuchmodel:1b")
    page.click("#pull-button")
    page.wait_for_selector("#pull-status.error")
    status = page.inner_text("#pull-status")  # in the page's words: no `herd create` to type here
    assert status.startswith("Could not pull nosuchmodel:1b: “nosuchmodel:1b” is not a model this server can pull.")
    assert "herd" not in status and "smollm2:135m" in status
    assert not page.locator("#pull-progress").is_visible()  # no bar stuck at the failed pull

ARABIC = "مرحبا بالعالم، كيف حالك اليوم؟"
KOREAN = "안녕하세요, 오늘 날씨가 좋네요."
MARKDOWN = f"""## Answer

Here is *Python* with `inline code`:

```python
def greet(name: str) -> str:
    # say hello
    return f"Hello, {{name}}!"
```

- {KOREAN}
- second item

{ARABIC}

| language | hello |
| --- | --- |
| Korean | 안녕 |

<img src="x" onerror="window.__xss = 1"><script>window.__xss = 2</script>
[a link](https://example.com)
"""
SEEDED = [{
    "id": "seeded", "title": "Scripts and code", "model": "smol:latest", "system": "", "options": {},
    "created": 1, "updated": 1,
    "messages": [
        {"role": "user", "content": KOREAN},
        {"role": "assistant", "content": MARKDOWN, "model": "smol:latest",
         "stats": {"done_reason": "stop", "eval_count": 42, "eval_duration": 1_400_000_000,
                   "prompt_eval_count": 17, "prompt_eval_duration": 200_000_000,
                   "total_duration": 1_700_000_000, "load_duration": 1_000_000}},
        {"role": "user", "content": ARABIC},
        {"role": "assistant", "content": "", "model": "smol:latest",
         "error": "Lost the connection to the server — was it stopped or restarted? (network error)"},
    ],
}]


def test_markdown_code_and_any_script_render_safely(open_page):
    page = open_page(seed=SEEDED)
    reply = page.locator(".message.assistant").first
    code = reply.locator("pre code.hljs")
    assert code.get_attribute("data-language") == "python"
    assert code.locator(".hljs-keyword").first.inner_text() == "def"
    assert reply.locator("h2").inner_text() == "Answer" and reply.locator("table td").count() == 2
    assert page.evaluate("window.__xss") is None  # sanitized: no event handlers, no scripts
    assert page.locator(".messages script, .messages [onerror]").count() == 0
    assert reply.locator("a").get_attribute("rel") == "noopener noreferrer"
    assert reply.locator("text=42 tokens · 30.0 tokens/s · prompt 17 tokens · 1.70 s").count() == 1

    def direction(selector: str) -> str:
        return page.eval_on_selector(selector, "e => e.matches(':dir(rtl)') ? 'rtl' : 'ltr'")

    assert direction(".message.user:nth-child(1) .body") == "ltr"
    assert direction(".message.user:nth-child(3) .body") == "rtl"  # Arabic reads right to left
    assert page.locator(f".message.assistant p:text-is('{ARABIC}')").evaluate("e => e.matches(':dir(rtl)')")
    assert page.locator(f".message.assistant li:text-is('{KOREAN}')").evaluate("e => e.matches(':dir(ltr)')")
    assert direction(".message.assistant pre") == "ltr"
    assert "Lost the connection" in page.inner_text(".message.assistant .error")
    shot(page, "desktop-light-markdown")
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    shot(page, "desktop-dark-markdown")

    # Typed Arabic goes to the server as it is and shows right to left; the failed reply is no history.
    set_options(page, num_predict=4)
    request = send(page, ARABIC)
    assert [m["content"] for m in request.post_data_json["messages"]] == [KOREAN, MARKDOWN, ARABIC, ARABIC]
    wait_reply(page)
    assert page.locator(".message.user").last.evaluate("e => e.querySelector('.body').matches(':dir(rtl)')")


def test_phone_sized_screen_and_dark_theme(open_page):
    page = open_page(viewport=PHONE, seed=SEEDED)
    sidebar = page.locator("#sidebar")
    page.wait_for_timeout(300)
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # off screen
    assert page.locator("#input").bounding_box()["width"] > 250
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    shot(page, "phone-light-chat")
    page.click("#open-sidebar")
    page.wait_for_timeout(400)  # the slide
    assert sidebar.bounding_box()["x"] == 0
    shot(page, "phone-light-sidebar")
    page.click("#theme-toggle")
    page.click(".chat-item >> text=Scripts and code")  # choosing a conversation closes the side bar
    page.wait_for_timeout(400)
    assert sidebar.bounding_box()["x"] < 0
    shot(page, "phone-dark-chat")
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"  # remembered
    page.click("#settings-toggle")
    shot(page, "phone-dark-settings")


def test_a_server_restart_mid_reply_shows_in_the_conversation(open_page, herd):
    """Kill the server while it streams, start it again: the page says what happened, then goes on.
    (Last in this file: it restarts the module's server.)"""
    page = open_page()
    set_options(page, temperature=0, num_predict=400)
    send(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function("() => { const b = document.querySelector('.message.streaming .body');"
                           " return b && b.textContent.trim().length > 0 }")
    herd.kill()
    error = wait_reply(page).locator(".error")
    assert "connection" in error.inner_text().lower()
    shot(page, "desktop-light-server-gone")

    herd.start()
    set_options(page, num_predict=4)
    send(page, "Are you back?")
    assert "tokens/s" in wait_reply(page).locator(".stats").inner_text()


# -- the first hour (issue 21): installed models, hover actions, the settings drawer, branches ------

def test_the_side_bar_lists_installed_models_and_deletes_one(open_page, herd):
    herd.api("POST", "/api/copy", json={"source": "smol", "destination": "spare"}).raise_for_status()
    page = open_page()
    names = page.locator("#installed li").evaluate_all("items => items.map(li => li.dataset.name)")
    assert {"smol:latest", "smol-copy:latest", "spare:latest"} <= set(names)  # installed, loaded or not
    assert "MB" in page.inner_text("#installed li[data-name='spare:latest'] .size")
    page.click("#installed li[data-name='spare:latest'] .use")  # choosing one sets the conversation's model
    assert page.input_value("#model") == "spare:latest"
    shot(page, "desktop-light-models")
    page.once("dialog", lambda d: d.accept())
    page.click("#installed li[data-name='spare:latest'] .delete-model")
    page.wait_for_selector("#installed li[data-name='spare:latest']", state="detached")
    assert "spare:latest" not in {m["name"] for m in herd.api("GET", "/api/tags").json()["models"]}


def test_actions_are_icons_shown_on_hover_and_always_on_touch(open_page, browser, herd):
    page = open_page(seed=SEEDED)
    first = page.locator(".message.assistant").first
    actions = first.locator(".actions")
    page.mouse.move(1, 1)
    assert actions.evaluate("a => getComputedStyle(a).opacity") == "0"  # not the last reply: hidden...
    first.hover()
    page.wait_for_function("() => getComputedStyle(document.querySelector('.message.assistant .actions')).opacity === '1'")
    copy = first.locator("button.copy")  # ...until the pointer is over it; an icon with a name
    assert copy.locator("svg.icon-copy").count() == 1 and copy.get_attribute("aria-label") == "Copy"
    assert copy.evaluate("b => getComputedStyle(b).borderStyle") in ("none", "hidden")
    shot(page, "desktop-light-hover")

    context = browser.new_context(viewport=PHONE, has_touch=True, is_mobile=True)
    try:
        phone = context.new_page()
        phone.add_init_script(f"localStorage.setItem('llamaherd.chats', {json.dumps(json.dumps(SEEDED))})")
        phone.goto(herd.url + "/")
        phone.wait_for_selector("body[data-ready]")
        opacity = phone.locator(".message.assistant .actions").first.evaluate("a => getComputedStyle(a).opacity")
        assert opacity == "1"  # no hover on a touch screen: always shown
        phone.screenshot(path=str(ARTIFACTS / "phone-touch-actions.png"))
    finally:
        context.close()


def test_settings_open_in_a_drawer_that_does_not_move_the_conversation(open_page):
    for viewport, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page = open_page(viewport=viewport, seed=SEEDED)
        before = page.locator(".message").first.bounding_box()
        page.click("#settings-toggle")
        drawer = page.locator("#settings").bounding_box()
        assert page.locator(".message").first.bounding_box() == before  # not pushed down
        assert drawer["x"] + drawer["width"] == pytest.approx(viewport["width"], abs=1)
        shot(page, f"{name}-light-settings-drawer")
        page.keyboard.press("Escape")
        assert page.locator("#settings").is_hidden()


def test_editing_keeps_the_old_branch(open_page):
    page = open_page()
    set_options(page, temperature=0, num_predict=6)
    send(page, "Say hello")
    first = wait_reply(page).locator(".body").inner_text()
    page.click(".message.user .edit-message")
    page.fill(".message.edit textarea", "Say goodbye")
    page.click(".message.edit .save-edit")
    second = wait_reply(page).locator(".body").inner_text()
    assert page.inner_text(".message.user .branch-index") == "2/2"
    shot(page, "desktop-light-branches")

    page.click(".message.user .prev-branch")  # ‹ : the first version and its reply come back
    assert page.inner_text(".message.user .branch-index") == "1/2"
    assert page.inner_text(".message.user .body") == "Say hello"
    assert page.locator(".message.assistant .body").inner_text() == first
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as request:
        send_text = "And in French?"
        page.fill("#input", send_text)
        page.press("#input", "Enter")
    assert [m["content"] for m in request.value.post_data_json["messages"]] == ["Say hello", first, send_text]
    wait_reply(page)
    page.click(".message.user .next-branch")  # › : the second version, with only its own reply
    assert page.inner_text(".message.user .body") == "Say goodbye"
    assert page.locator(".message").count() == 2 and page.locator(".message.assistant .body").inner_text() == second
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.inner_text(".message.user .branch-index") == "2/2"  # kept with the conversation
