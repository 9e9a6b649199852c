"""The owner's consent service in a real browser: Debian's chromium driven by Selenium (chromium-driver)
signs in, allows, and withdraws, while a real agent sends and then erases, and the owner's page shows the
car's verified erasure receipt. Skipped, saying why, where chromium or chromedriver is not installed (`make
test-deps` installs them).

``VGW_SCREENSHOTS=DIR`` keeps the consent page and the owner's page as PNGs in DIR (README's pictures come
from here: ``VGW_SCREENSHOTS=docs/images``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from vgw_sim.broker import Mosquitto
from vgw_sim.pki import TestPKI

from tests.agentkit import agent_process, connected_cloud, vgw, wait_until, write_config
from tests.faultkit import record_trace
from tests.servicekit import DEVICE, OWNER, PASSWORD, authorize_url, make_service_dir, service_process

CHROMIUM = next((p for b in ("chromium", "chromium-browser") if (p := shutil.which(b))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (`make test-deps`, or "
           "apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,1000",
                "--disable-dev-shm-usage", "--force-device-scale-factor=1",
                # its own profile: chromium refuses a second instance on a profile another one holds
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(DRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, path: Path) -> None:
    """The whole page, as tall as it is."""
    for _ in range(2):  # the second pass measures the page at its new size (no scroll bar any more)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(900, max(600, int(height) + 140))  # + the window's own frame
    driver.save_screenshot(str(path))
    keep = os.environ.get("VGW_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def _button(driver: Any, text: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, f"//button[normalize-space()='{text}']")


def test_owner_signs_in_allows_and_withdraws_in_a_browser(tmp_path: Path, pki: TestPKI, broker: Mosquitto,
                                                          browser: Any) -> None:
    from selenium.webdriver.common.by import By

    sd = make_service_dir(tmp_path, pki, broker.port)
    fleet_key = sd.root / "keys" / "recipients" / "insurer.pub.json"
    fleet = vgw("cloud", "app", "add", "--config", str(sd.config), "--id", "com.example.fleet", "--name",
                "Fleet Care", "--redirect-uri", sd.redirect_uri, "--recipient", str(fleet_key),
                "--purpose", "Reminds you when the car is due for service")
    assert fleet.returncode == 0, fleet.stderr
    trace = record_trace(tmp_path, 20.0)
    cfg = write_config(tmp_path, pki, broker.port, sd.trust,
                       can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True})
    from vgw.cloud.cloudkit import load_recipient_keys

    app_key = load_recipient_keys([sd.app_key])["insurer"]
    with service_process(sd), connected_cloud(broker, pki) as app_side, agent_process(cfg):
        # The app sends the owner's browser to the authorization endpoint; the service asks to sign in first.
        client = sd.client(scope="read_speedometer read_odometer read_location")
        url, state, verifier = authorize_url(sd, client)
        browser.get(url)
        assert "Sign in" in browser.title
        browser.find_element(By.NAME, "username").send_keys(OWNER)
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        _button(browser, "Sign in").click()
        assert wait_until(lambda: "asks to read data from your car" in browser.page_source, 20)
        assert "Pay-as-you-drive insurance premium" in browser.page_source
        assert "position rounded to 100 m" in browser.page_source
        _screenshot(browser, tmp_path / "consent-page.png")
        _button(browser, "Allow").click()
        # back at the app's redirect URI (nothing listens there in this test: the URL is what counts)
        assert wait_until(lambda: browser.current_url.startswith(sd.redirect_uri), 20), browser.current_url
        callback = browser.current_url
        assert parse_qs(urlsplit(callback).query)["state"] == [state]
        token = client.fetch_token(f"{sd.issuer}/token", authorization_response=callback, code_verifier=verifier,
                                   state=state)
        gid = token["grant_id"]
        assert token["device"] == DEVICE
        app_side.add_recipient(gid, app_key)
        assert app_side.wait_for(lambda: len(app_side.batches(DEVICE, gid)) >= 1, 40)

        # a second app, allowed in the same browser session (no second sign-in)
        fleet_client = sd.client(scope="read_fuel read_odometer")
        fleet_client.client_id = "com.example.fleet"
        furl, _fstate, _fverifier = authorize_url(sd, fleet_client)
        browser.get(furl)
        assert wait_until(lambda: "Fleet Care asks" in browser.page_source, 20)
        _button(browser, "Allow").click()
        assert wait_until(lambda: browser.current_url.startswith(sd.redirect_uri), 20)

        # the owner's page: both apps; withdraw the insurer
        browser.get(f"{sd.issuer}/")
        assert "Example Insurance" in browser.page_source and "Fleet Care" in browser.page_source
        form = browser.find_element(By.XPATH, f"//input[@name='grant' and @value='{gid}']/..")
        form.find_element(By.XPATH, ".//button[normalize-space()='Withdraw']").click()

        def receipt_shown() -> bool:
            browser.get(f"{sd.issuer}/")
            return "signature verified" in browser.page_source

        assert wait_until(receipt_shown, 40, 0.5), browser.page_source
        # and the car's own word on the newest document: applied (its signed consent-applied receipt)
        assert wait_until(lambda: (browser.get(f"{sd.issuer}/"), "applied by your car" in browser.page_source)[1],
                          20, 0.5), browser.page_source
        erased = [r for r in app_side.receipts(DEVICE, "erasure") if r.claims.get("grant") == gid]
        assert erased, "the car's erasure receipt reached the app side too"
        _screenshot(browser, tmp_path / "owner-page.png")
