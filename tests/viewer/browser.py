"""Headless Chromium driven over the DevTools protocol, with the standard library only.

Chromium is started with ``--remote-debugging-pipe``: it reads protocol messages (JSON, each
ended by a NUL byte) from file descriptor 3 and writes its answers and events to descriptor
4. No port, no websocket client and no browser download are needed; the Debian ``chromium``
package is enough. One page is opened (a flattened target session) and driven with
``Runtime.evaluate``; ``Page.captureScreenshot`` gives the PNG.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Where the Debian package puts its launcher.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

#: Flags for a quiet, self-contained headless run: without the background-networking and
#: update flags Chromium tries to reach Google's services and, offline, stalls.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # WebGL (cornerstone renders with it) in software: SwiftShader, opted in explicitly, as
    # Chromium no longer falls back to it on its own. The pages are the test's own.
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
)


def _above(fd: int, lowest: int) -> int:
    """Move ``fd`` to the lowest free descriptor number >= ``lowest``; return the new number."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return moved


class BrowserError(RuntimeError):
    """Chromium exited, timed out, or answered a command with an error."""


def chromium_binary() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


class Browser:
    """One headless Chromium process and one page in it.

    ``events`` keeps the page's console messages and uncaught exceptions (as text) for
    failure messages.
    """

    def __init__(
        self, executable: str, profile: Path, width: int = 1400, height: int = 900
    ) -> None:
        self.events: list[str] = []
        self._next_id = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._closed = False
        profile.mkdir(parents=True, exist_ok=True)
        # Two pipes: we write commands into the first (Chromium's fd 3) and read from the
        # second (Chromium's fd 4). pass_fds hands Chromium's ends over under their own
        # numbers; bash then moves them onto 3 and 4 and execs Chromium.
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium's ends move above 3 and 4 so that the redirections cannot clobber them.
        to_browser_r, from_browser_w = (_above(fd, 10) for fd in (to_browser_r, from_browser_w))
        args = [
            executable,
            *CHROMIUM_FLAGS,
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        r, w = to_browser_r, from_browser_w
        script = f'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-'
        self.log_path = profile / "chromium.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", script, "chromium", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(to_browser_r, from_browser_w),
                start_new_session=True,  # its own process group: its helpers go with it
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        self.session = ""
        try:
            self._open_page(width, height)
        except BaseException:
            self.close()
            raise

    def _open_page(self, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)
        attached = self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=None,
        )
        self.session = attached["sessionId"]
        for domain in ("Runtime", "Page", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # -- protocol ----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                try:
                    message = json.loads(raw)
                except ValueError:
                    self.events.append(f"unreadable protocol message: {raw[:200]!r}")
                    continue
                self._dispatch(message)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            with self._cond:
                self._answers[message["id"]] = message
                self._cond.notify_all()
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(arg.get("value", arg.get("description", arg.get("type"))))
                for arg in params.get("args", [])
            )
            self.events.append(f"console.{params.get('type')}: {text}"[:2000])
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.events.append(f"exception: {text}"[:2000])
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            where = entry.get("url", "")
            self.events.append(f"log.{entry.get('level')}: {entry.get('text')} {where}".rstrip())

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = "",
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Send one command (to the page's session unless ``session`` is None) and wait."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        target_session = self.session if session == "" else session
        if target_session:
            message["sessionId"] = target_session
        data = memoryview(json.dumps(message).encode() + b"\0")
        try:
            while data:
                data = data[os.write(self._to_browser, data) :]
        except OSError as exc:
            raise BrowserError(f"Chromium is gone ({exc}); log:\n{self.log()}") from exc
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._answers:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"Chromium exited during {method}; log:\n{self.log()}")
                if remaining <= 0:
                    raise BrowserError(f"no answer to {method} within {timeout} s")
                self._cond.wait(remaining)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise BrowserError(f"{method} failed: {answer['error']}")
        return dict(answer.get("result", {}))

    # -- page --------------------------------------------------------------------------------

    def navigate(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": True,
                "timeout": int(timeout * 1000),
            },
            timeout=timeout + 5,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; return its value. Raises on timeout."""
        deadline = time.monotonic() + timeout
        value: Any = None
        last_error = ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
            except BrowserError as exc:
                last_error = str(exc)
                if self._closed:
                    raise
            else:
                if value:
                    return value
            time.sleep(interval)
        tail = "\n".join(self.events[-30:])
        raise BrowserError(
            f"timed out after {timeout} s waiting for {what} (last value {value!r}"
            f"{', last error ' + last_error if last_error else ''}); page events:\n{tail}"
        )

    def click(self, element: str, count: int = 1) -> None:
        """Click (``count`` = 2: double-click) the middle of an element, as a user would: real
        mouse events through the browser's input pipeline, not synthetic DOM events.

        ``element`` is a JavaScript expression giving the element (or null).
        """
        box = self.evaluate(
            f"""(() => {{
                const element = {element};
                if (!element) return null;
                element.scrollIntoView({{block: 'center'}});
                const r = element.getBoundingClientRect();
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()"""
        )
        if not box:
            raise BrowserError(f"no element for {element}")
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **box})
        for clicks in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send(
                    "Input.dispatchMouseEvent",
                    {"type": kind, "button": "left", "clickCount": clicks, **box},
                )

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the page's viewport to ``path``."""
        data = self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-40:])

    def close(self) -> None:
        """Close Chromium (politely, then by force) and the pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self.send("Browser.close", session=None, timeout=5)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Chromium's exit closes its end of the pipe: the reader sees EOF and stops.
        self._reader.join(5)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def headless_chromium(executable: str, profile: Path, **size: int) -> Iterator[Browser]:
    """A :class:`Browser` for the ``with`` block; always closed at the end."""
    browser = Browser(executable, profile, **size)
    try:
        yield browser
    finally:
        browser.close()
