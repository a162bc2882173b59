"""
The plain install as a new user gets it: run by the Python of a new venv
that has had ``pip install .`` and nothing else (standard library only here).

1. ``twistd -n trainstream --demo`` on ``tcp:0`` listeners with
   ``--ports-file``: ``/api/health`` says ok, the dashboard page and its
   script load, the demo run is listed with points, SSE streams its events;
   SIGTERM stops it with no traceback.
2. The README's embedded snippet (the first ``python`` block under
   "## Embedded"), exactly as written, runs to the end with no traceback.

Usage: VENV/bin/python .ci/smoke.py VENV
Prints one line per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(what: str, output: str = "") -> None:
    print(f"smoke: FAILED: {what}")
    if output:
        print(output[-3000:])
    sys.exit(1)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def twistd_demo(venv: str, home: str) -> None:
    ports_file = os.path.join(home, "ports.json")
    log_path = os.path.join(home, "twistd.log")
    env = dict(os.environ, HOME=home)
    env.pop("PYTHONPATH", None)  # the installed package, not the checkout
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [
                os.path.join(venv, "bin", "twistd"),
                "-n",
                "--pidfile=",
                "trainstream",
                "--demo",
                "--sse=tcp:0:interface=127.0.0.1",
                "--ws=tcp:0:interface=127.0.0.1",
                "--rest=tcp:0:interface=127.0.0.1",
                f"--ports-file={ports_file}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            env=env,
        )

    def output() -> str:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ports_file):
            if child.poll() is not None:
                fail(f"twistd trainstream exited with {child.returncode}", output())
            if time.monotonic() > deadline:
                fail("twistd trainstream did not write its ports file in 30 s", output())
            time.sleep(0.05)
        with open(ports_file, encoding="utf-8") as f:
            urls = json.load(f)
        status, body = get(urls["rest"] + "/health")
        health = json.loads(body)
        if status != 200 or health.get("status") != "ok":
            fail(f"/api/health answered {status} {body[:200]!r}", output())
        print(f"smoke: /api/health ok (version {health.get('version')})")
        status, page = get(urls["dashboard"])
        if status != 200 or b"<html" not in page.lower():
            fail(f"the dashboard page answered {status}", output())
        scripts = re.findall(rb'src="([^"]+\.js)"', page)
        if not scripts:
            fail("the dashboard page names no script", page.decode(errors="replace"))
        for src in scripts:
            status, _ = get(urls["dashboard"].rstrip("/") + "/" + src.decode().lstrip("/"))
            if status != 200:
                fail(f"the dashboard's {src.decode()} answered {status}")
        print(f"smoke: dashboard page and {len(scripts)} scripts load")
        run = None
        while time.monotonic() < deadline:
            runs = json.loads(get(urls["rest"] + "/runs")[1])["runs"]
            demo = [r for r in runs if r["run"].startswith("demo-") and r.get("last_step")]
            if demo:
                run = demo[0]
                break
            time.sleep(0.1)
        if run is None:
            fail("no demo run with points appeared in /api/runs in 30 s", output())
        print(f"smoke: demo run {run['run']} at step {run['last_step']}")
        with urllib.request.urlopen(urls["sse"] + "?after=0", timeout=5) as stream:
            seen = b""
            while b"\ndata:" not in seen and b"\n\ndata:" not in seen:
                line = stream.readline()
                if not line:
                    fail("the SSE stream ended before its first event")
                seen += line
        print("smoke: SSE streams the demo's events")
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                fail("twistd trainstream did not stop within 15 s of SIGTERM", output())
    text = output()
    if "Traceback" in text:
        fail("twistd trainstream printed a traceback", text)
    print("smoke: twistd stopped on SIGTERM without a traceback")


def tls_without_extra(venv: str, home: str) -> None:
    """An ssl: endpoint on the plain install says which extra it needs."""
    env = dict(os.environ, HOME=home)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [
            os.path.join(venv, "bin", "twistd"),
            *("-n", "--pidfile=", "trainstream", "--memory"),
            "--listen=ssl:0:privateKey=key.pem:certKey=cert.pem",
        ],
        capture_output=True,
        text=True,
        cwd=home,
        env=env,
        timeout=30,
    )
    both = done.stdout + done.stderr
    if done.returncode == 0 or "trainstream[tls]" not in both or "Traceback" in both:
        fail("an ssl: endpoint without the tls extra did not say what to install", both)
    print("smoke: an ssl: endpoint without the tls extra names it")


def readme_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Embedded", 1)
    if len(section) != 2:
        fail("README.md has no '## Embedded' section")
    match = re.search(r"```python\n(.*?)```", section[1], re.DOTALL)
    if match is None:
        fail("README.md's Embedded section has no python block")
    return match.group(1)


def embedded(venv: str, home: str) -> None:
    script = os.path.join(home, "embedded.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(readme_snippet())
    env = dict(os.environ, HOME=home)
    env.pop("PYTHONPATH", None)
    try:
        done = subprocess.run(
            [os.path.join(venv, "bin", "python"), script],
            capture_output=True,
            text=True,
            cwd=home,
            env=env,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        fail("the README's embedded snippet did not end within 60 s")
    both = done.stdout + done.stderr
    if done.returncode != 0 or "Traceback" in both:
        fail(f"the README's embedded snippet exited with {done.returncode}", both)
    print(f"smoke: the README's embedded snippet ran ({done.stdout.strip().splitlines()[0]})")


def main() -> None:
    venv = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="trainstream-smoke-") as home:
        twistd_demo(venv, home)
        tls_without_extra(venv, home)
    with tempfile.TemporaryDirectory(prefix="trainstream-smoke-") as home:
        embedded(venv, home)
    print("smoke: the plain install works")


if __name__ == "__main__":
    main()
