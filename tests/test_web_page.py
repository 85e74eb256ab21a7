"""The chat page in a real browser: Debian's Chromium, headless, driven by Playwright, against `codeact web`,
a real sandbox and the scripted model server (`make test` installs Chromium; see the Makefile's `browser`)."""

from __future__ import annotations

import shutil

import pytest

from codeact_sdk.testing import Fault, ScriptedModelServer
from tests.conftest import wait_for
from tests.test_web_server import Web

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PLOT = ("<execute>\nimport matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\nprint('plotted')\n</execute>")


@pytest.fixture(scope="module")
def browser():
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's own sandbox needs user namespaces it cannot have as root in a container.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page_on(browser, tmp_path, local_sandbox):
    """A `codeact web` server on the scripted model, and a function opening a page on it."""
    model = ScriptedModelServer(chunk_size=3).start()
    web = Web(str(tmp_path / "web.sqlite3"), sandbox=local_sandbox, llm_url=model.url)
    context = browser.new_context(accept_downloads=True)
    dialogs = []

    def open_page(path: str = "/"):
        page = context.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(web.url + path)
        page.wait_for_selector("#conversations li.active")
        return page

    yield open_page, model, web, dialogs
    context.close()
    web.stop()
    model.stop()


def until(predicate, what: str, timeout: float = 10) -> None:
    """Poll from here: the page's CSP (no eval) rules out Playwright's wait_for_function."""
    wait_for(predicate, timeout, what)


def send(page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def test_a_conversation_streams_runs_code_shows_a_plot_and_is_there_after_a_reload(page_on):
    open_page, model, _, dialogs = page_on
    prose = ("Let me plot it for you, step by step: first the three values as a line, then a look at the "
             "shape, which should rise from one to three and fall back to two.\n")
    model.enqueue(Fault(text=prose + PLOT, delay=0.03),
                  "The plot is above. The answer is <solution>3</solution>.")
    page = open_page()
    send(page, "Plot 1, 3, 2")
    # Tokens arrive one chunk at a time (3 characters every 30 ms): the draft grows while the reply streams.
    page.wait_for_selector(".message.assistant.draft")
    drafts = set()
    # all_inner_texts reads what is there now; inner_text would wait 30 s for a draft that finished between
    # the count and the read (it did, once in CI).
    while texts := page.locator(".message.assistant.draft").all_inner_texts():
        drafts.update(texts)
        page.wait_for_timeout(50)
    assert len(drafts) >= 2, drafts  # seen growing at least once
    page.wait_for_selector(".cell.ok img.result-image")
    assert page.inner_text(".cell .outputs pre.stdout") == "plotted\n"
    assert page.get_attribute(".cell img.result-image", "src").startswith("data:image/png;base64,")
    page.wait_for_selector(".solution")
    assert page.inner_text(".solution") == "3"
    assert page.inner_text("#kernel") == "kernel idle" and page.is_visible("#send")
    assert "plt.plot" in page.inner_text(".cell .code")
    page.reload()
    page.wait_for_selector(".cell.ok img.result-image")
    assert page.inner_text(".message.user") == "Plot 1, 3, 2" and page.inner_text(".solution") == "3"
    page.click("#settings summary")  # the operator's part of the settings, beside the conversation's own
    assert page.inner_text("#server-config") == "No MCP servers configured (codeact web --mcp-config)."
    assert page.get_attribute("#settings-form input[name=max_executions]", "placeholder") == "5"
    assert dialogs == []


def test_stop_interrupts_the_running_code(page_on):
    open_page, model, _, _ = page_on
    model.enqueue("<execute>\nimport time\nprint('working', flush=True)\ntime.sleep(60)\n</execute>")
    page = open_page()
    send(page, "take your time")
    page.wait_for_selector(".cell.running pre.stdout")
    assert page.inner_text("#kernel") == "kernel running" and page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".cell.failed")
    assert "KeyboardInterrupt" in page.inner_text(".cell.failed")
    page.wait_for_selector("text=Stopped: stopped.")
    assert page.is_visible("#send") and not page.is_visible("#stop")


def test_a_csv_goes_up_and_the_file_the_agent_writes_comes_down(page_on, tmp_path):
    open_page, model, _, _ = page_on
    model.enqueue("<execute>\nimport pandas as pd\ndf = pd.read_csv('sales.csv')\n"
                  "df.assign(revenue=df.units * df.price).to_csv('revenue.csv', index=False)\n"
                  "print(int((df.units * df.price).sum()))\n</execute>", "Total: <solution>31</solution>")
    page = open_page()
    upload = tmp_path / "sales.csv"
    upload.write_text("month,units,price\njan,3,5\nfeb,4,4\n")
    page.set_input_files("#upload", str(upload))
    page.wait_for_selector("#files a:text('sales.csv')")
    send(page, "What is the revenue? Write it per month to revenue.csv.")
    page.wait_for_selector("#files a:text('revenue.csv')")
    assert page.inner_text(".solution") == "31"
    with page.expect_download() as caught:
        page.click("#files a:text('revenue.csv')")
    download = caught.value
    assert download.suggested_filename == "revenue.csv"
    with open(download.path()) as handle:
        assert handle.read() == "month,units,price,revenue\njan,3,5,15\nfeb,4,4,16\n"


def test_two_conversations_in_two_tabs_at_once(page_on):
    open_page, model, _, _ = page_on
    model.enqueue(Fault(text="<execute>\nimport time; time.sleep(1); print('first tab')\n</execute>", delay=0.01),
                  Fault(text="<execute>\nprint('second tab')\n</execute>", delay=0.01),
                  "<solution>one</solution>", "<solution>two</solution>")
    first = open_page()
    second = open_page()
    second.click("#new")
    until(lambda: second.locator("#conversations li").count() == 2, "the second conversation listed")
    send(first, "first")
    send(second, "second")
    for page in (first, second):
        page.wait_for_selector(".solution")
    outputs = {first.inner_text(".cell pre.stdout"), second.inner_text(".cell pre.stdout")}
    assert outputs == {"first tab\n", "second tab\n"}
    assert first.url != second.url


def test_model_text_cannot_inject_script_into_the_page(page_on):
    open_page, model, _, dialogs = page_on
    model.enqueue('Look: <img src=x onerror="alert(1)"> <script>alert(2)</script> '
                  "[click](javascript:alert(3)) **bold** `<b>code</b>` <solution><i>x</i></solution>")
    page = open_page()
    send(page, "try to break the page")
    page.wait_for_selector(".solution")
    reply = page.locator(".message.assistant").last
    assert reply.locator("img, script, i, b").count() == 0 and reply.locator("a").count() == 0
    assert '<img src=x onerror="alert(1)">' in reply.inner_text()
    assert reply.locator("strong").inner_text() == "bold" and reply.locator("code").inner_text() == "<b>code</b>"
    page.wait_for_timeout(300)
    assert dialogs == []


def test_a_phone_width_screen_keeps_the_conversation_usable(browser, page_on):
    open_page, model, _, _ = page_on
    model.enqueue("<solution>small</solution>")
    page = open_page()
    page.set_viewport_size({"width": 390, "height": 800})
    def sidebar() -> dict:
        return page.locator("#sidebar").bounding_box()

    # The list slides away (a short transition); a button brings it back.
    until(lambda: sidebar()["x"] + sidebar()["width"] <= 0, "the list out of sight")
    page.click("#open-sidebar")
    until(lambda: sidebar()["x"] >= 0, "the list in sight")
    page.click("#close-sidebar")
    until(lambda: sidebar()["x"] + sidebar()["width"] <= 0, "the list out of sight again")
    send(page, "hello from a phone")
    page.wait_for_selector(".solution")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways: {width}px"
