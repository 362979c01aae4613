"""The chat page as a person uses it: a real headless Chromium (Debian's chromium +
chromium-driver, driven by selenium) on a real `gptkit serve` subprocess with an API key and
two tiny models built on the spot:

- `chat`: a chat-template checkpoint overfit to answer every message with REPLY, a text full
  of HTML (so the page must show model output as text) and Chinese;
- `plain`: no chat template (the page falls back to completion mode), a 1024-token context
  and no end-of-text token in its training text, so its replies run long enough to Stop.

Without Chromium the browser tests skip with one line, except under CI=true, where a missing
browser fails. Set GPTKIT_SCREENSHOTS=DIR to keep the screenshots (the README's come from here).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.evaluation.attention import attention_maps
from gptkit.checkpoint.format import save_checkpoint
from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT
from gptkit.server.webui import WEB
from gptkit.text.tokenizer import BPETokenizer, ChatTemplate
from gptkit.text.chat import render_chat

from live_server import serve_cli

KEY = "sk-page-key"
pytestmark = pytest.mark.slow  # a served model trained on the spot, and a browser

REPLY = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> <b>很高兴见到你</b>'
USERS = ["你好", "我有一个梦想", "hello", "what is this?", "写一首诗", "你是谁？", "tell me a story", "谢谢"]
PLAIN_TEXT = "The quick brown fox jumps over the lazy dog. 我有一个梦想：有一天，这个国家会站起来。\n" * 40


def _train(model: GPT, ids: list[int], steps: int, window: int, mask: list[int] | None = None) -> GPT:
    """Overfit on random windows of ids; with a mask, only tokens where it is 1 are targets."""
    torch.manual_seed(0)
    data = torch.tensor(ids)
    targets = data if mask is None else torch.where(torch.tensor(mask) == 1, data, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ix = torch.randint(len(data) - window - 1, (8,))
        x = torch.stack([data[i:i + window] for i in ix])
        y = torch.stack([targets[i + 1:i + window + 1] for i in ix])
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """~10 s on an idle core: `chat` learns to answer REPLY whatever the message, `plain` learns
    PLAIN_TEXT (which has no end-of-text token, so it keeps going)."""
    conversations = [[{"role": "user", "content": u}, {"role": "assistant", "content": REPLY}] for u in USERS]
    tok = BPETokenizer.train([REPLY * 20, PLAIN_TEXT, *USERS * 20], vocab_size=400)
    tok.chat_template = ChatTemplate()
    chat_ids, chat_mask = [], []
    for _ in range(12):
        for c in conversations:
            ids, mask = render_chat(tok, c, add_generation_prompt=False)
            chat_ids, chat_mask = chat_ids + ids, chat_mask + mask
    torch.manual_seed(0)
    chat = _train(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=64)),
                  chat_ids, steps=150, window=64, mask=chat_mask)
    folder = tmp_path_factory.mktemp("webui")
    out = {"chat": save_checkpoint(folder / "chat", chat, tok)}
    tok.chat_template = None
    torch.manual_seed(0)
    plain = _train(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=2, n_head=2, n_embd=64)),
                   tok.encode(PLAIN_TEXT), steps=40, window=128)
    out["plain"] = save_checkpoint(folder / "plain", plain, tok)
    return out


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory) -> str:
    args = [str(ckpts["chat"]), "--name", "chat", "--model", f"plain={ckpts['plain']}"]
    with serve_cli(args, tmp_path_factory.mktemp("webui-log") / "serve.log", {"GPTKIT_API_KEY": KEY}) as url:
        yield url


# ------------------------------------------------------------------------------------ without a browser
def test_page_files_are_package_data():
    """Every file the page needs is matched by pyproject's package-data globs (so a wheel has it)."""
    import tomllib

    globs = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["gptkit.server"]
    files = [f for f in WEB.iterdir() if f.is_file()]
    assert {f.name for f in files} >= {"index.html", "chat.js", "chat.css"}
    for f in files:
        assert any(f.relative_to(WEB.parent).match(g) for g in globs), f"{f.name} is not package data"


def test_page_opens_without_the_key_and_the_api_does_not(server):
    for path in ("/", "/chat"):
        r = httpx.get(server + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/static/chat.js">' in r.text
        csp = r.headers["content-security-policy"]  # only this server's files and API; never framed elsewhere
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and r.headers["x-frame-options"] == "DENY"
    for name in ("chat.js", "chat.css"):
        assert httpx.get(f"{server}/static/{name}").status_code == 200
    for f in WEB.iterdir():  # nothing is fetched from outside (no CDN)
        assert "http://" not in f.read_text() and "https://" not in f.read_text(), f.name
    assert "content-security-policy" in httpx.get(f"{server}/static/chat.js").headers
    assert httpx.post(f"{server}/v1/attention", json={"text": "hi"}).status_code == 401
    assert httpx.get(f"{server}/static/nothing.js").status_code == 401  # only the page's own files are open


def test_tokenizer_info_says_which_models_have_a_chat_template(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    has = {m: httpx.get(f"{server}/tokenizer_info", params={"model": m}, headers=auth).json()["has_chat_template"]
           for m in ("chat", "plain")}
    assert has == {"chat": True, "plain": False}


def test_attention_endpoint_returns_the_models_weights(server, ckpts):
    text = "我有一个梦想"
    r = httpx.post(f"{server}/v1/attention", json={"model": "chat", "text": text, "layer": 0},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    body = r.json()
    model = open_checkpoint(ckpts["chat"]).model
    expected = attention_maps(model.eval(), open_tokenizer(ckpts["chat"]), text)
    assert body["tokens"] == expected.tokens and body["token_ids"] == expected.token_ids
    assert (body["n_layer"], body["n_head"], body["layer"]) == (2, 2, 0)
    np.testing.assert_allclose(np.array(body["weights"]), expected.weights[0], atol=1e-4)
    bad = httpx.post(f"{server}/v1/attention", json={"model": "chat", "text": text, "layer": 5},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "layers 0..1" in bad.json()["error"]["message"]


# ------------------------------------------------------------------------------------ in Chromium
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Chromium is not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs the browser tests: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gptkit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout}s; page notice: "
                         f"{driver.find_element('id', 'notice').text!r}")


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("GPTKIT_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["GPTKIT_SCREENSHOTS"]) / name)
    return path


def _open(driver, server: str):
    """Open the page with nothing stored, give it the key when it asks, and pick greedy decoding."""
    driver.get(server + "/")
    driver.execute_script("sessionStorage.clear(); localStorage.clear();")
    driver.get(server + "/chat")
    by = "css selector"
    _wait(driver, lambda d: d.find_element(by, "#key-form").is_displayed(), what="the key form")
    driver.find_element(by, "#key").send_keys(KEY + "\n")
    _wait(driver, lambda d: len(d.find_elements(by, "#model option")) == 2, what="the model list")
    driver.find_element(by, "#settings-toggle").click()
    temperature = driver.find_element(by, "#temperature")
    temperature.clear()
    temperature.send_keys("0")
    driver.find_element(by, "#settings-toggle").click()  # a click elsewhere fires `change`: saved


def _last_reply(driver):
    return driver.find_elements("css selector", ".msg.assistant")[-1]


def _stored(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('gptkit.conversations')"))


def _replies(driver, n: int):
    return _wait(driver, lambda d: len(d.find_elements("css selector", ".msg.assistant[data-finish]")) == n
                 and d.find_elements("css selector", ".msg.assistant[data-finish]"), what=f"{n} finished replies")


def test_chat_in_chinese_html_as_text_attention_over_the_conversation(browser, server, ckpts, tmp_path):
    d, by = browser, "css selector"
    _open(d, server)
    assert d.find_element(by, "#mode").text == "chat" and not d.find_element(by, "#notice").is_displayed()
    box = d.find_element(by, "#input")
    # IME: Enter that confirms a composition candidate must not send
    box.send_keys("我有")
    d.execute_script("arguments[0].dispatchEvent(new KeyboardEvent('keydown', "
                     "{key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))", box)
    time.sleep(0.3)
    assert not d.find_elements(by, ".msg") and box.get_attribute("value") == "我有"
    box.send_keys("一个梦想，你好\n")
    reply = _replies(d, 1)[-1]
    assert d.find_element(by, ".msg.user .text").text == "我有一个梦想，你好"
    assert reply.get_attribute("data-finish") in ("stop", "length")
    text = reply.find_element(by, ".text").get_attribute("textContent")
    assert text.startswith('<script>window.pwned = 1</script><img src=x onerror="window.pwned')  # HTML as text ...
    assert not d.find_elements(by, "#messages script, #messages img, #messages b")  # ... never parsed
    assert d.execute_script("return window.pwned") is None
    meta = reply.find_element(by, ".meta").text
    assert "prompt tokens" in meta and "tokens/s" in meta, meta  # the usage chunk arrived
    # the conversation and its settings are kept in the browser, titled by its first message
    [conv] = _stored(d)
    assert conv["title"] == "我有一个梦想，你好" and conv["settings"]["temperature"] == "0"
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    content = conv["messages"][1]["content"]  # as streamed (the page shows it as markdown: paragraphs)
    assert content.split() == text.split() or content.replace("\n", "") == text, (content, text)
    assert d.find_element(by, "#conversations li.current .open").text == "我有一个梦想，你好"

    reply.find_element(by, "button.copy").click()
    _wait(d, lambda d: reply.find_element(by, "button.copy").text == "Copied", 5, "the copy confirmation")
    # attention over the whole conversation as the model saw it, the reply's rows marked
    reply.find_element(by, "button.show-attention").click()
    panel = _wait(d, lambda d: reply.find_elements(by, ".attention[data-tokens]"), what="the attention map")[0]
    tok = open_tokenizer(ckpts["chat"])
    ids, mask = render_chat(tok, [{"role": "user", "content": "我有一个梦想，你好"}, {"role": "assistant", "content": content}],
                            add_generation_prompt=False)
    assert int(panel.get_attribute("data-tokens")) == len(ids)
    start, end = map(int, panel.get_attribute("data-marked").split(","))
    # the reply's content and its <|im_end|>: what the model wrote (the template's newline after it is not)
    assert mask[start:end] == [1] * (end - start) and not mask[start - 1] and 1 not in mask[end:] and start > 5
    assert "layer 1 · head 0" in panel.find_element(by, ".caption").text
    assert f"rows {start}–{end - 1} (marked) are the reply" in panel.find_element(by, ".caption").text
    d.set_window_size(1100, 1250)  # tall enough for the whole map
    d.execute_script("arguments[0].scrollIntoView({block: 'end'})", panel)
    _screenshot(d, tmp_path, "webui-chat.png")
    d.set_window_size(1100, 900)

    # Regenerate replaces the last reply (greedy: the same text again)
    _last_reply(d).find_element(by, "button.regenerate").click()
    again = _replies(d, 1)[-1]
    assert _stored(d)[0]["messages"][1]["content"] == content and len(_stored(d)[0]["messages"]) == 2
    assert again.find_element(by, ".text").get_attribute("textContent") == text
    # a second turn keeps the conversation
    d.find_element(by, "#input").send_keys("谢谢\n")
    _replies(d, 2)
    assert len(_stored(d)[0]["messages"]) == 4
    # edit-and-resend: the first message changed, what followed it replaced by the new reply
    d.find_elements(by, ".msg.user")[0].find_element(by, "button.edit").click()
    area = d.find_element(by, ".msg.user .edit-input")
    area.clear()
    area.send_keys("你是谁？")
    d.find_element(by, ".msg.user button.resend").click()
    _replies(d, 1)
    assert [m["content"] for m in _stored(d)[0]["messages"]][0] == "你是谁？" and len(_stored(d)[0]["messages"]) == 2


def test_conversation_list_new_rename_delete_and_reload(browser, server):
    d, by = browser, "css selector"
    _open(d, server)
    d.find_element(by, "#input").send_keys("hello\n")
    _replies(d, 1)
    d.find_element(by, "#new").click()
    assert not d.find_elements(by, ".msg")
    d.find_element(by, "#input").send_keys("谢谢\n")
    _replies(d, 1)
    assert [c["title"] for c in _stored(d)] == ["谢谢", "hello"]  # the newest first
    # rename the older one; it opens with its own messages
    older = d.find_elements(by, "#conversations li")[1]
    d.execute_script("arguments[0].click()", older.find_element(by, "button.rename"))
    field = d.find_element(by, "#conversations .rename-input")
    field.send_keys("\ue009a")  # Ctrl+A, then the new title replaces the old one
    field.send_keys("问候\n")
    assert [c["title"] for c in _stored(d)] == ["谢谢", "问候"]
    d.find_elements(by, "#conversations li .open")[1].click()
    assert d.find_element(by, ".msg.user .text").text == "hello"
    # a reload keeps both; delete removes one for good
    d.refresh()
    _wait(d, lambda d: len(d.find_elements(by, "#conversations li")) == 2, what="the stored conversations")
    first = d.find_elements(by, "#conversations li")[0]
    d.execute_script("arguments[0].click()", first.find_element(by, "button.delete"))
    assert [c["title"] for c in _stored(d)] == ["问候"]
    assert len(d.find_elements(by, "#conversations li")) == 1


MARKDOWN = ("# Title\nSome **bold**, *italic* and `x < y` code.\n\n- one\n- two <b>not bold</b>\n\n"
            "1. first\n2. second\n\n> a quote\n\n```python\nprint('<script>alert(1)</script>')\n```\n"
            "[safe](https://example.org/a?b=1) [bad](javascript:window.pwned=3) [data](data:text/html,x)\n"
            '<img src=x onerror="window.pwned=4"><script>window.pwned=5</script>')


def test_markdown_is_rendered_and_never_runs(browser, server, tmp_path):
    d, by = browser, "css selector"
    _open(d, server)
    conv = {"id": "md", "title": "markdown", "model": "chat", "updated": 1,
            "settings": {"system": "", "temperature": "0", "top_p": "1", "max_tokens": ""},
            "messages": [{"role": "user", "content": "<i>show</i> me"},
                         {"role": "assistant", "content": MARKDOWN, "mode": "chat"}]}
    d.execute_script("localStorage.setItem('gptkit.conversations', arguments[0])", json.dumps([conv]))
    d.refresh()
    reply = _wait(d, lambda d: d.find_elements(by, ".msg.assistant"), what="the stored reply")[0]
    body = reply.find_element(by, ".text")
    assert body.find_element(by, "h3").text == "Title"
    assert body.find_element(by, "strong").text == "bold" and body.find_element(by, "em").text == "italic"
    assert [li.text for li in body.find_elements(by, "ul li")] == ["one", "two <b>not bold</b>"]
    assert [li.text for li in body.find_elements(by, "ol li")] == ["first", "second"]
    assert body.find_element(by, "blockquote").text == "a quote"
    assert body.find_element(by, "pre code.lang-python").get_attribute("textContent") == \
        "print('<script>alert(1)</script>')"
    links = body.find_elements(by, "a")
    assert [(a.text, a.get_attribute("href"), a.get_attribute("rel")) for a in links] == [
        ("safe", "https://example.org/a?b=1", "noopener noreferrer nofollow")]
    assert "[bad](javascript:window.pwned=3)" in body.text and "[data](data:text/html,x)" in body.text
    assert not d.find_elements(by, "#messages script, #messages img, #messages b, #messages i, #messages iframe")
    assert d.find_element(by, ".msg.user .text").text == "<i>show</i> me"
    _screenshot(d, tmp_path, "webui-markdown.png")
    for a in links:
        a.click()  # opens in a new tab; nothing runs here
    assert d.execute_script("return window.pwned") is None
    for handle in d.window_handles[1:]:
        d.switch_to.window(handle)
        d.close()
    d.switch_to.window(d.window_handles[0])


def test_dark_theme_follows_the_system_and_the_menu(browser, server, tmp_path):
    d, by = browser, "css selector"
    _open(d, server)
    d.find_element(by, "#input").send_keys("hello\n")
    _replies(d, 1)
    background = lambda: d.execute_script("return getComputedStyle(document.body).backgroundColor")  # noqa: E731
    light = background()
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        dark = background()
        assert light == "rgb(247, 247, 248)" and dark == "rgb(15, 17, 21)"
        _screenshot(d, tmp_path, "webui-dark.png")
        from selenium.webdriver.support.ui import Select

        Select(d.find_element(by, "#theme")).select_by_value("light")  # the menu overrides the system
        assert background() == light and d.execute_script("return localStorage.getItem('gptkit.theme')") == "light"
        Select(d.find_element(by, "#theme")).select_by_value("auto")
        assert background() == dark
    finally:
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_completion_mode_stop_and_phone_width(browser, server, tmp_path):
    d, by = browser, "css selector"
    _open(d, server)
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(by, "#model")).select_by_value("plain")
    _wait(d, lambda d: d.find_element(by, "#mode").text == "completion mode", 10, "completion mode")
    assert "no chat template" in d.find_element(by, "#notice").text
    d.find_element(by, "#input").send_keys("The quick brown fox\n")
    reply = _wait(d, lambda d: d.find_elements(by, ".msg.assistant.streaming"), what="a reply")[-1]
    _wait(d, lambda d: len(reply.find_element(by, ".text").get_attribute("textContent")) > 20, what="streamed text")
    d.find_element(by, "#stop").click()
    reply = _replies(d, 1)[-1]
    assert reply.get_attribute("data-finish") == "stopped"
    assert "stopped by you" in reply.find_element(by, ".meta").text
    shown = reply.find_element(by, ".text").get_attribute("textContent")
    assert 0 < len(httpx.post(f"{server}/tokenize", json={"model": "plain", "prompt": shown},
                              headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]) < 900
    # the server cancelled the request when the page aborted it
    health = lambda: httpx.get(f"{server}/health").json()["models"]["plain"]  # noqa: E731
    _wait(d, lambda d: health()["running"] == 0 and health()["queued"] == 0, 10, "the server-side cancel")
    time.sleep(0.5)
    assert _last_reply(d).find_element(by, ".text").get_attribute("textContent") == shown  # nothing after Stop
    assert _stored(d)[0]["messages"][1]["content"] == shown
    # attention over prompt + continuation: the continuation's rows marked
    _last_reply(d).find_element(by, "button.show-attention").click()
    panel = _wait(d, lambda d: d.find_elements(by, ".attention[data-tokens]"), what="the attention map")[0]
    start, end = map(int, panel.get_attribute("data-marked").split(","))
    assert 0 < start < end == int(panel.get_attribute("data-tokens"))

    d.set_window_size(390, 844)  # a phone
    time.sleep(0.3)
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    for name in ("#send", "#stop", "#input", "#model", "#list-toggle"):
        rect = d.find_element(by, name).rect
        assert rect["x"] >= 0 and rect["x"] + rect["width"] <= 390, name
    assert not d.find_element(by, "#sidebar").is_displayed()  # the list folds away behind ☰
    _screenshot(d, tmp_path, "webui-phone.png")
    d.find_element(by, "#list-toggle").click()
    assert d.find_element(by, "#sidebar").is_displayed()
    _screenshot(d, tmp_path, "webui-phone-list.png")
    d.set_window_size(1100, 900)


def test_attention_endpoint_marks_the_reply_and_checks_its_input(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "很高兴见到你"}]
    body = httpx.post(f"{server}/v1/attention", json={"model": "chat", "messages": chat}, headers=auth).json()
    start, end = body["marked"]
    assert "".join(body["tokens"][start:end]) == "很高兴¹兴²见¹见²到¹到²你<|im_end|>" and end == len(body["tokens"]) - 1
    for bad, param in (({"messages": chat[:1]}, "messages.0"), ({"text": "a", "messages": chat}, "text"), ({}, "text")):
        r = httpx.post(f"{server}/v1/attention", json={"model": "chat", **bad}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
