"""The Dagster UI, used as a user uses it: ``dagster-webserver`` and ``dagster-daemon`` on localhost,
Debian's chromium driven by Playwright.

A small experiment's partition is registered (as ``./provenance run`` and the specs sensor do); then,
in the browser: *Lineage → Materialize all*, the partition picked in the launch dialog, *Launch 1
run*, the run's page.  Once the run has succeeded: the asset graph shows the lineage up to
``backdoor_report``, the report's page shows its metadata (the summary table, the top-flagged grid and
the score/ROC plots as PNG images), and the asset checks show their results.

Needs /usr/bin/chromium (Debian's ``chromium``; .ci/run installs it) and the ``playwright`` package
(``playwright install`` is not needed: the system chromium is used).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
BIN = Path(sys.executable).parent
EXP = "uitest"
from tests.test_daemon import SPEC   # noqa: E402  small enough that the whole lineage runs in about two minutes
# the core lineage up to the backdoor report, as the asset graph must show it
LINEAGE = ["raw_dataset", "training_set", "poison_truth", "loader_files", "subset_masks", "checkpoints",
           "gradient_features", "attribution_scores", "backdoor_report"]
# asset -> its checks, each of which must show a passed result for the run's materialization
CHECKS = {"backdoor_report": ["detector_flagged_something"], "checkpoints": ["models_above_chance"],
          "lds_evaluation": ["enough_heldout_models", "lds_defined"]}
UI_TIMEOUT_MS = 60_000     # any one element to appear (the UI loads its data from GraphQL)
RUN_TIMEOUT_S = 600        # the run, launched from the UI (about two minutes on 2 idle cores; more under load)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (Debian package "
                                                              f"chromium; .ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env, log: Path) -> subprocess.Popen:
    """A process in a session of its own, so that stopping it stops what it started (code servers,
    run workers and their step processes)."""
    with open(log, "w") as out:
        return subprocess.Popen([str(a) for a in args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)     # whatever of the group is left
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} is missing)"


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dagster-webserver exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/server_info", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"dagster-webserver did not answer within {timeout:.0f}s:\n{_tail(log)}")


def _wait_for_run(instance, run_id: str, daemon: subprocess.Popen, daemon_log: Path):
    from dagster import DagsterRunStatus

    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                                              DagsterRunStatus.CANCELED):
            return run
        if daemon.poll() is not None:
            raise AssertionError(f"dagster-daemon exited with {daemon.returncode}:\n{_tail(daemon_log)}")
        time.sleep(2.0)
    raise AssertionError(f"run {run_id} did not finish within {RUN_TIMEOUT_S}s "
                         f"(status {instance.get_run_by_id(run_id).status}):\n{_tail(daemon_log)}")


def _failure_messages(instance, run_id: str) -> str:
    from dagster import DagsterEventType

    records = instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE})
    return "\n".join(f"{r.step_key}: {r.dagster_event.message}" for r in records if r.dagster_event)


def _launch_materialize_all(page, base: str, sync_api) -> str:
    """Lineage → Materialize all → the experiment's partition → Launch 1 run → the run's page.
    Returns the run id from the page's address."""
    expect = sync_api.expect
    page.goto(base + "/asset-groups")
    graph = page.locator("foreignObject")
    for group in ("data", "attribution", "backdoor", "warehouse"):       # the groups of the global graph
        expect(graph.get_by_text(group, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    # a new instance's first page opens a "Join the Dagster community" dialog, a few seconds late
    skip = page.get_by_role("button", name="Skip", exact=True)
    try:
        skip.wait_for(timeout=20_000)
        skip.click()
        expect(skip).to_have_count(0)
    except sync_api.TimeoutError:
        pass
    dialog = page.get_by_role("dialog").filter(has_text=re.compile(r"Launch runs to materialize \d+ assets"))
    page.get_by_role("button", name=re.compile("Materialize all")).click()
    expect(dialog).to_be_visible()
    dialog.get_by_text("Select a partition or create one").click()
    page.locator("label").filter(has=page.get_by_text(EXP, exact=True)).click()
    dialog.get_by_text(re.compile("Launch runs to materialize")).click()     # closes the partition list
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Launch 1 run").click()
    expect(page.get_by_text(re.compile("Launched run"))).to_be_visible(timeout=UI_TIMEOUT_MS)
    page.get_by_role("link", name="View", exact=True).click()          # the toast's link to the run
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=UI_TIMEOUT_MS)
    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)


def _check_lineage(page, base: str, expect) -> None:
    """The report's whole upstream lineage in the asset graph (its Lineage tab, Upstream, depth All)."""
    page.goto(base + "/assets/backdoor_report?view=lineage")
    page.get_by_role("button", name="Upstream").click()
    page.get_by_role("button", name="All", exact=True).click()
    graph = page.locator("foreignObject")
    for name in LINEAGE:
        expect(graph.get_by_text(name, exact=True)).to_be_visible(timeout=UI_TIMEOUT_MS)


def _open_markdown(page, key: str, expect):
    """The metadata entry ``key`` of the asset page: its [Show Markdown] dialog."""
    row = page.locator("tr").filter(has=page.get_by_text(key, exact=True))
    expect(row).to_have_count(1, timeout=UI_TIMEOUT_MS)
    row.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(key, exact=True)).to_be_visible()
    return dialog


def _close(dialog, expect) -> None:
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_have_count(0)


def _check_report_metadata(page, base: str, expect) -> None:
    page.goto(base + "/assets/backdoor_report")
    expect(page.get_by_text("Latest materialization")).to_be_visible(timeout=UI_TIMEOUT_MS)
    for key in ("flagged", "strongest_feature_precision", "strongest_feature_auroc", "path"):
        expect(page.locator("tr").filter(has=page.get_by_text(key, exact=True))).to_have_count(1)

    dialog = _open_markdown(page, "summary", expect)           # the detectors' summary table
    table = dialog.locator("table")
    expect(table).to_have_count(1)
    for column in ("method", "n_flagged", "precision", "recall", "auroc"):
        expect(table.locator("th").filter(has_text=re.compile(f"^{column}$"))).to_have_count(1)
    expect(table.locator("td").filter(has_text=re.compile("^strongest_feature$"))).to_have_count(1)
    assert table.locator("tbody tr").count() >= 2, "the summary table has no baseline detector rows"
    _close(dialog, expect)

    for key in ("top_flagged", "scores_and_roc"):            # the plots, as PNG images in the markdown
        dialog = _open_markdown(page, key, expect)
        img = dialog.locator("img[src^='data:image/png;base64,']")
        expect(img).to_have_count(1)
        page.wait_for_function("e => e.complete", arg=img.element_handle(), timeout=UI_TIMEOUT_MS)
        width, height = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        assert width > 100 and height > 100, f"{key}: the image did not decode ({width}x{height})"
        expect(img).to_be_visible()
        _close(dialog, expect)


def _check_asset_checks(page, base: str, expect) -> None:
    for asset, names in CHECKS.items():
        page.goto(f"{base}/assets/{asset}?view=checks")
        expect(page.get_by_text(f"Checks ({len(names)})", exact=True)).to_be_visible(timeout=UI_TIMEOUT_MS)
        for name in names:
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        # the list of checks: one status each; the selected check's latest evaluation
        expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(names), timeout=UI_TIMEOUT_MS)
        expect(page.get_by_text("Passed", exact=True).first).to_be_visible()


def test_ui_materializes_an_experiment_and_shows_lineage_report_and_checks(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from dagster import DagsterInstance

    from assets.common import experiments_partitions

    home, exps = tmp_path / "home", tmp_path / "experiments"
    exps.mkdir()
    (exps / f"{EXP}.yaml").write_text(yaml.safe_dump(SPEC))
    env = {**os.environ, "PROVENANCE_HOME": str(home), "PROVENANCE_EXPERIMENTS": str(exps),
           "PROVENANCE_DEVICE": "cpu", "PROVENANCE_EXECUTOR": "multiprocess", "OMP_NUM_THREADS": "1"}
    dagster_home = subprocess.run([sys.executable, "cli.py", "dagster-home"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, check=True).stdout.strip()
    env["DAGSTER_HOME"] = dagster_home
    instance = DagsterInstance.from_config(dagster_home)
    # the experiment's partition, as `./provenance run` and the specs sensor add it; the run is the UI's
    instance.add_dynamic_partitions(experiments_partitions.name, [EXP])

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    web_log, daemon_log = tmp_path / "webserver.log", tmp_path / "daemon.log"
    procs = []
    try:
        procs.append(_start([BIN / "dagster-webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", port],
                            env, web_log))
        daemon = _start([BIN / "dagster-daemon", "run", "-w", "workspace.yaml"], env, daemon_log)
        procs.append(daemon)
        _wait_for_server(base, procs[0], web_log)

        expect = sync_api.expect
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)
                # should the "Join the Dagster community" dialog come back later: skipped
                page.add_locator_handler(page.get_by_role("button", name="Skip", exact=True),
                                         lambda skip: skip.click())
                step = "launch from the UI"
                try:
                    run_id = _launch_materialize_all(page, base, sync_api)
                    step = "the run"
                    run = _wait_for_run(instance, run_id, daemon, daemon_log)
                    assert run.status.value == "SUCCESS", (
                        f"run {run_id}: {run.status.value}\n{_failure_messages(instance, run_id)}\n"
                        f"{_tail(daemon_log)}")
                    assert run.tags.get("dagster/from_ui") == "true" and run.tags.get("dagster/partition") == EXP
                    selected = {k.to_user_string() for k in run.asset_selection or ()}
                    assert set(LINEAGE) | {"warehouse", "lds_evaluation"} <= selected, selected
                    # the run's page, as the user left it, says so
                    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
                    expect(page.get_by_text(f"partition: {EXP}")).to_be_visible()
                    step = "the lineage graph"
                    _check_lineage(page, base, expect)
                    step = "the backdoor report's metadata"
                    _check_report_metadata(page, base, expect)
                    step = "the asset checks"
                    _check_asset_checks(page, base, expect)
                except Exception as e:
                    shot = tmp_path / "failure.png"
                    try:
                        page.screenshot(path=str(shot), full_page=True)
                    except Exception:
                        pass
                    raise AssertionError(f"UI test failed at: {step} (screenshot {shot}, page {page.url}; "
                                         f"logs {web_log}, {daemon_log})") from e
            finally:
                browser.close()
    finally:
        for proc in reversed(procs):      # the daemon first: its run workers are in its process group
            _stop(proc)
        instance.dispose()
