"""The real Prefect UI in headless Chromium: open the deployment, fill in the run form,
submit, see the run complete, and see its summary's curves (the image decoded, not only
present). Screenshots go to the test's output folder.

Needs Debian's chromium (``apt-get install chromium``) and the ``playwright`` package
(no browser download: it drives the system Chromium); skipped without them.
"""

import shutil

import pytest

from baton.tasks._common import artifact_key

from ..flows.conftest import small_config
from .test_server import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("prefect_home_ui"), ui=True)
    try:
        server.create_pool()
        server.cli(
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "deployments/prefect.yaml",
            "-n",
            "train-from-ui",
        )
        yield server
    finally:
        server.close()


def test_run_from_the_ui_form(ui_server, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    deployment = ui_server.deployment("train-pipeline/train-from-ui")
    work_dir = tmp_path / "wd"
    config_path = tmp_path / "ui.yaml"
    import yaml

    config_path.write_text(
        yaml.safe_dump(small_config(work_dir, name="ui-run", **{"train.max_epochs": 2}))
    )

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            local = ui_server.base
            # offline, and a test must not depend on it anyway: refuse every other host
            context.route(lambda url: not url.startswith(local), lambda route: route.abort())
            page = context.new_page()
            page.goto(f"{local}/v2/deployments/deployment/{deployment['id']}")
            page.get_by_role("button", name="Run", exact=True).click(timeout=60_000)
            page.get_by_role("menuitem", name="Custom run").click()
            page.wait_for_url("**/run?**", timeout=60_000)
            page.get_by_text("config (Optional)").wait_for(timeout=60_000)
            page.get_by_text("Path of a YAML file in configs/").wait_for()  # the description
            field = page.locator("textarea").first  # the config's text box
            field.fill(str(config_path))
            page.screenshot(path=str(shots / "run-form.png"), full_page=True)
            with page.expect_response(
                lambda r: "create_flow_run" in r.url and r.request.method == "POST"
            ) as info:
                page.get_by_role("button", name="Submit").click()
            response = info.value
            assert response.status == 201, response.text()
            run_id = response.json()["id"]
            assert response.json()["parameters"]["config"] == str(config_path)

            # The config file lives outside configs/: the operator allows its folder.
            ui_server.env["BATON_CONFIG_ROOTS"] = str(tmp_path)
            ui_server.serve_once()
            assert ui_server.state(run_id) == "COMPLETED"
            page.goto(f"{local}/v2/runs/flow-run/{run_id}")
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "finished-run.png"), full_page=True)

            # The run summary's curves: a PNG inside the markdown (tasks/report.py says
            # why); the UI must show it, so the image must have decoded in the browser.
            summary = _summary_artifact(ui_server, run_id, artifact_key("ui-run", "summary"))
            assert "](data:image/png;base64," in summary["data"]
            page.goto(f"{local}/v2/artifacts/artifact/{summary['id']}")
            curves = page.get_by_role("img", name="loss, accuracy and learning rate per epoch")
            curves.wait_for(timeout=60_000)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=curves.element_handle()
            )
            width, height = curves.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert width >= 400 and height >= 100, (width, height)
            curves.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "summary-curves.png"), full_page=True)
        finally:
            browser.close()
    experiment = ui_server.work_dir("train-pipeline/train-from-ui") / "ui-run"
    assert (experiment / "checkpoints" / "epoch_0002.pth").exists()
    assert sorted(p.name for p in shots.iterdir()) == [
        "finished-run.png",
        "run-form.png",
        "summary-curves.png",
    ]
    print(f"screenshots in {shots}")


def _summary_artifact(server: Server, run_id: str, key: str) -> dict:
    """The run's summary artifact (id and markdown), read from the server's API."""
    response = server.http.post(
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}},
    )
    response.raise_for_status()
    [summary] = response.json()
    return summary
