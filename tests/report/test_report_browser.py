"""report.html in a real browser: headless Chromium loads it from disk, and the test checks that
it rendered (no console error, every plot image decoded, the tables present and sortable) and
keeps a screenshot as an artifact.

Skipped, with the reason, only where Chromium is not installed (`.ci/run` installs Debian's
chromium package when it is missing)."""
import json
import os
import re
import shutil
import subprocess

import pytest

from robcomp.study.runner import run_study
from robcomp.study.spec import quick_spec

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and os.path.exists(p)),
                None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (`apt-get install -y chromium`; "
                                                          ".ci/run installs it when it can)")

# injected into a copy of the report: records script errors, then after load checks every image
# and table and writes the result into the DOM for --dump-dom to return
_PROBE_HEAD = """<script>window.__errors=[];window.addEventListener('error',function(e){
window.__errors.push(String(e.message||e.type)+' '+(e.filename||(e.target&&e.target.src||'').slice(0,40)));},true);
</script>"""
_PROBE_TAIL = """<script>window.addEventListener('load',function(){
var imgs=Array.prototype.slice.call(document.images);
var t=document.querySelector('table.sortable');var th=t&&t.querySelectorAll('thead th')[0];var sorted=false;
if(th){th.click();sorted=th.classList.contains('asc');}
var r={images:imgs.length,decoded:imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length,
 sizes:imgs.map(function(i){return [i.naturalWidth,i.naturalHeight];}),
 tables:document.querySelectorAll('table').length,rows:document.querySelectorAll('tbody tr').length,
 sections:document.querySelectorAll('section').length,sorted:sorted,errors:window.__errors};
var pre=document.createElement('pre');pre.id='robcomp-check';pre.textContent=JSON.stringify(r);
document.body.appendChild(pre);});</script>"""


def _chromium(*args, user_dir, timeout=90):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={user_dir}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "out"
    run_study(quick_spec(), out, progress=False, echo=lambda *a: None)
    return out / "report.html"


def test_report_renders_in_headless_chromium(report, tmp_path):
    html = report.read_text()
    probe = tmp_path / "report-probe.html"
    probe.write_text(html.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_TAIL + "</body>", 1))
    dom = None
    for attempt in range(3):  # a loaded machine can make Chromium dump the DOM before the load event
        res = _chromium(f"--virtual-time-budget={15000 * (attempt + 1)}", "--dump-dom", probe.as_uri(),
                        user_dir=tmp_path / f"profile-dom-{attempt}")
        dom = res.stdout
        if 'id="robcomp-check"' in dom:
            break
    match = re.search(r'<pre id="robcomp-check">(.*?)</pre>', dom or "", re.S)
    assert match, f"the page did not finish loading in Chromium; stderr: {res.stderr[-2000:]}"
    check = json.loads(match.group(1).replace("&quot;", '"'))
    n_img = html.count("<img ")
    assert check["images"] == n_img >= 6
    assert check["decoded"] == n_img, check  # complete with a natural size: the PNG decoded
    assert all(w > 300 and h > 200 for w, h in check["sizes"]), check["sizes"]
    assert check["tables"] >= 7 and check["rows"] > 20 and check["sections"] >= 7
    assert check["sorted"], "clicking a header did not sort the table"
    assert check["errors"] == [], check["errors"]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console

    # the screenshot of the report as shipped (no probe), kept as a test artifact
    shot = tmp_path / "report-screenshot.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars",
                    "--virtual-time-budget=5000", report.as_uri(), user_dir=tmp_path / "profile-shot")
    assert shot.exists() and shot.stat().st_size > 20000, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not errors, errors
    print(f"\nscreenshot of report.html: {shot}")
