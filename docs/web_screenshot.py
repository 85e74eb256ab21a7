"""Take docs/web-chat.png: `make serve`'s stack on the embedded model, one question in the chat page, in
headless Chromium.

    .venv/bin/python docs/web_screenshot.py [--model qwen2.5-coder-1.5b] [--out docs/web-chat.png]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

from model_server.stack import free_port
from model_server.supervisor import answers

QUESTION = "Plot y = x**2 - 2x for x from -3 to 5 with matplotlib and tell me where its minimum is."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "web-chat.png"))
    args = parser.parse_args()
    model_port, sandbox_port, web_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as scratch:  # the stack's logs and its conversations database
        env = {**os.environ, "TMPDIR": scratch, "XDG_DATA_HOME": scratch}
        stack = subprocess.Popen([sys.executable, "-m", "model_server.stack", "serve", "--model", args.model,
                                  "--model-port", str(model_port), "--sandbox-port", str(sandbox_port),
                                  "--web-port", str(web_port)], env=env, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while not (answers(f"http://127.0.0.1:{web_port}/") and answers(f"http://127.0.0.1:{model_port}/v1/models")):
                if stack.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the stack did not start")
                time.sleep(0.5)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1180, "height": 860})
                page.goto(f"http://127.0.0.1:{web_port}/")
                page.wait_for_selector("#conversations li.active")
                page.fill("#message", QUESTION)
                page.press("#message", "Enter")
                page.wait_for_selector(".message.user")  # the turn began (Send is hidden until it ends)
                page.wait_for_selector("#send:visible", timeout=600_000)
                page.screenshot(path=args.out)
                browser.close()
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
