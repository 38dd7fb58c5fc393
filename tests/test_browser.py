"""The real browser client in headless Chromium against the real server, with a fake webcam.

The webcam is Chromium's fake capture device playing a .y4m file the test writes (a real face moving).
Chromium comes from Debian's ``chromium`` package (CI installs it; never downloaded at run time); without
/usr/bin/chromium or the ``playwright`` package the test is skipped with the reason. ICE is pinned to
127.0.0.1 on both ends, so media never leaves the loopback interface.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import lip_config, make_model
from PIL import Image

from bench.browser import CHROMIUM_FLAGS, write_camera

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)


class ServerThread:
    """uvicorn on 127.0.0.1 with a free port, in a background thread (the browser API here is blocking)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


AVATAR_SIZE = "[document.getElementById('avatar').videoWidth, document.getElementById('avatar').videoHeight]"
SAMPLE_READY = (
    "document.getElementById('source').naturalWidth === 512 && !document.getElementById('start').disabled"
)
AVATAR_PIXELS = """() => {
  const v = document.getElementById('avatar');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0);
  return Array.from(g.getImageData(0, 0, c.width, c.height).data);
}"""


def avatar_frame(page) -> np.ndarray:
    w, h = page.evaluate(AVATAR_SIZE)
    return np.array(page.evaluate(AVATAR_PIXELS), np.uint8).reshape(h, w, 4)[..., :3]


def test_page_streams_an_avatar(tmp_path, grace_hopper):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    from dagan.samples import driving_frames
    from engine.torch_backend import TorchEngine
    from server.app import create_app
    from server.settings import ServerSettings

    camera = tmp_path / "camera.y4m"
    write_camera(camera, driving_frames(grace_hopper, num_frames=50, size=240))
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(grey)
    engine = TorchEngine(make_model(lip_config(2.5)), device="cpu")  # lips named: the page shows its slider
    token = "browser-test-token"  # the page takes it from its link (#token=) and sends it on every call
    settings = ServerSettings(max_sessions=1, ice_host_addresses=("127.0.0.1",), access_token=token)
    flags = [*CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={camera}"]
    screenshot = tmp_path / "browser.png"
    app = create_app(settings, engine)
    with ServerThread(app) as base, sync_api.sync_playwright() as pw:
        # The page's CSP (script-src 'self') also forbids the eval that Playwright's wait_for_function
        # polls with, so this context bypasses it; the strict context below checks the page under it.
        strict = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        try:
            csp_page = strict.new_page()
            violations: list[str] = []
            csp_page.on(
                "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
            )
            csp_page.goto(base + f"/#token={token}")
            deadline = time.monotonic() + 15
            while not csp_page.evaluate(SAMPLE_READY):  # evaluate goes through DevTools, not eval
                assert time.monotonic() < deadline, csp_page.inner_text("#message")
                time.sleep(0.1)
            assert not violations, violations
        finally:
            strict.close()
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=flags,
            bypass_csp=True,
        )
        try:
            page = context.new_page()
            page.goto(base + f"/#token={token}")
            # The sample photo loads by itself and enables Start.
            page.wait_for_function(SAMPLE_READY, timeout=15_000)
            page.check("#depth")  # avatar with the depth map beside it
            page.click("#start")
            page.wait_for_function(
                "(() => { const v = document.getElementById('avatar');"
                " return v.videoWidth > 0 && v.currentTime > 1 && !v.paused; })()",
                timeout=30_000,
            )
            assert page.locator("#message").is_hidden(), page.inner_text("#message")
            assert page.evaluate("document.getElementById('local').videoWidth") == 240
            size = page.evaluate(AVATAR_SIZE)
            assert size == [512, 256], size
            frame = avatar_frame(page)
            avatar, depth = frame[:, :256].astype(np.float32), frame[:, 256:].astype(np.float32)
            assert avatar.mean() > 40, "avatar half is black"  # the tiny random model gives a flat grey
            assert depth.std() > 20, "depth panel is blank"
            # The video keeps playing: the depth of a moving face changes from frame to frame.
            time.sleep(0.5)
            later = avatar_frame(page)
            assert later.shape == frame.shape and np.abs(later[:, 256:].astype(np.float32) - depth).mean() > 3
            # Live stats come from getStats.
            page.wait_for_function(
                "!document.getElementById('stats').textContent.startsWith('fps: –')", timeout=5_000
            )
            assert "round trip" in page.inner_text("#stats")

            page.screenshot(path=str(screenshot), full_page=True)
            box = page.locator("#avatar").bounding_box()

            # The depth switch goes over the data channel: the avatar video becomes square again.
            page.uncheck("#depth")
            page.wait_for_function("document.getElementById('avatar').videoWidth === 256", timeout=10_000)
            # The mouth slider starts at the model's gain, which the session was created with; a change
            # reaches the server as one message and the worker's engine session takes it.
            assert page.is_visible("#mouth") and page.input_value("#mouth") == "2.5"
            (live,) = app.state.service.registry.snapshot()
            assert live.mouth_gain == 2.5
            page.fill("#mouth", "1.2")
            assert page.inner_text("#mouth-value") == "1.2×"
            deadline = time.monotonic() + 10
            while live.engine_session.mouth_gain != 1.2:
                assert time.monotonic() < deadline, live.engine_session.mouth_gain
                time.sleep(0.05)
            page.click("#recalibrate")
            page.wait_for_function("document.getElementById('state').textContent.startsWith('recalibrated')")
            # ...and the status line goes back to the connection state.
            page.wait_for_function(
                "document.getElementById('state').textContent === 'connected'", timeout=6_000
            )
            assert "token" not in page.url  # the token was taken out of the address bar

            # Without the token link the page says what is missing.
            stranger = context.new_page()
            stranger.goto(base + "/")
            stranger.wait_for_selector("#message:has-text('needs an access token')", timeout=10_000)
            stranger.close()

            # A second viewer while the only slot is taken: "server busy".
            other = context.new_page()
            other.goto(base + f"/#token={token}")
            other.wait_for_function("!document.getElementById('start').disabled", timeout=15_000)
            other.click("#start")
            other.wait_for_selector("#message:has-text('Server busy')", timeout=10_000)
            assert other.locator("#start").is_enabled()

            # The first viewer stops: the stats are cleared. The second picks a photo without a face: it
            # is refused on selection (before any camera or session) and not kept.
            page.click("#stop")
            page.wait_for_function("document.getElementById('state').textContent === 'idle'")
            assert page.inner_text("#stats").startswith("fps: –")
            other.set_input_files("#file", str(grey))
            other.wait_for_selector("#message:has-text('No face found in the photo')", timeout=15_000)
            assert other.locator("#start").is_disabled()
            assert (
                other.evaluate("window.dagan.photo") is None
                and other.evaluate("window.dagan.sessionId") is None
            )
            assert not other.get_attribute("#source", "src")

            # A person who refuses the camera: the browser rejects getUserMedia with NotAllowedError (the
            # fake-UI flag always grants, so the refusal is injected at that one call).
            denied = context.new_page()
            denied.add_init_script(
                "navigator.mediaDevices.getUserMedia = () => "
                "Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
            )
            denied.goto(base + f"/#token={token}")
            denied.wait_for_function(SAMPLE_READY, timeout=15_000)
            denied.click("#start")
            denied.wait_for_selector("#message:has-text('Camera permission denied')", timeout=5_000)
            assert denied.evaluate("window.dagan.sessionId") is None  # no session was reserved
        finally:
            context.close()

    shot = np.asarray(Image.open(screenshot).convert("RGB")).astype(np.float32)
    assert shot.shape[0] > 300 and shot.shape[1] > 600
    assert shot.std() > 20, "screenshot is blank"
    x, y, w, h = (round(box[k]) for k in ("x", "y", "width", "height"))
    shown = shot[y : y + h, x : x + w]
    assert shown.size and shown.std() > 15, "the avatar video shows nothing in the screenshot"
    # Keep a copy next to the test output for people looking at CI artifacts.
    shutil.copy(screenshot, tmp_path / "avatar-page.png")
