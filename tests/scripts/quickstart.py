#!/usr/bin/env python3
"""Runs the README's quick start verbatim against the README's run command (`./dev run`).

Every shell block between `<!-- quickstart:begin -->` and `<!-- quickstart:end -->` in
README.md is run in order with bash (grpcurl must be on PATH) from the top of the repository,
while `./dev run` serves on its default addresses with a fresh embedded store. A block whose
first line is `# in a second terminal:` is started in the background instead (the sink) and
stopped at the end. Fails on the first command that fails, and checks the answers a reader
relies on, the sink's signature verdicts among them. Finally SIGTERM must stop the binary
cleanly, with no secret of the quick start in its logs.

As a reader does, the blocks get the admin token that `./dev run` prints on its first start
(the line `export TOKEN=...` on its stderr) in the environment variable TOKEN; the token must
appear on stderr exactly once, that line.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def blocks(readme):
    section = re.search(r"<!-- quickstart:begin -->(.*?)<!-- quickstart:end -->", readme, re.S)
    if not section:
        sys.exit("README.md has no quickstart section")
    return re.findall(r"```(?:sh|bash)\n(.*?)```", section.group(1), re.S)


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


BACKGROUND = "# in a second terminal:"


def wait_port(port, proc, deadline, what):
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with {proc.returncode}")
        if not port_free(port):
            return
        time.sleep(0.1)
    sys.exit(f"{what} not listening on {port} in time")


def wait_ready(proc, deadline):
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"control plane exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen("http://127.0.0.1:8081/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("control plane not ready within 30 s")


TOKEN_LINE = re.compile(r"^\s*export TOKEN=(\S+)\s*$")


def read_stderr(proc, lines, token):
    """Collects the binary's stderr; sets token[0] from the first `export TOKEN=` line."""
    for line in proc.stderr:
        lines.append(line)
        m = TOKEN_LINE.match(line)
        if m and not token:
            token.append(m.group(1))


def main():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = blocks(f.read())
    if not commands:
        sys.exit("quickstart section holds no shell block")
    for port in (50051, 8081, 9000):
        if not port_free(port):
            sys.exit(f"port {port} is in use; the quick start needs the default ports")
    # Built first so that the readiness wait below does not include compiling.
    subprocess.run(["cargo", "build", "--quiet", "-p", "pushwire-control-plane", "-p", "pushwire-tests", "--bins"],
                   cwd=ROOT, check=True)
    background = []
    with tempfile.TemporaryDirectory() as data:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHWIRE_")}
        proc = subprocess.Popen([os.path.join(ROOT, "dev"), "run", "--data-dir", data], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True, env=env)
        stderr_lines, token = [], []
        reader = threading.Thread(target=read_stderr, args=(proc, stderr_lines, token), daemon=True)
        reader.start()
        try:
            wait_ready(proc, time.time() + 60)
            if not token:
                sys.exit("./dev run printed no `export TOKEN=...` line on its first start:\n"
                         + "".join(stderr_lines))
            env["TOKEN"] = token[0]
            outputs = []
            for n, block in enumerate(commands, 1):
                if block.startswith(BACKGROUND):
                    log = open(os.path.join(data, f"block-{n}.log"), "w+", encoding="utf-8")
                    bg = subprocess.Popen(["bash", "-c", "exec " + block[len(BACKGROUND):].strip()], cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
                    background.append((bg, log))
                    wait_port(9000, bg, time.time() + 120, f"quickstart block {n}")
                    continue
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, capture_output=True,
                                     text=True, timeout=60, env=env)
                if run.returncode != 0:
                    sys.exit(f"quickstart block {n} failed ({run.returncode}):\n{block}\n{run.stdout}{run.stderr}")
                outputs.append(run.stdout)
            text = "\n".join(outputs)
            for needle in ["pushwire.v1.IntegrationService", "pushwire.v1.PushScopeService",
                           "pushwire.v1.ConfigService", "pushwire.v1.IngestService",
                           "Manages integrations", '"decidedBy": "accounts/42/pushScopes/news-site"',
                           '"statusCode": 200', '"outcome": "DELIVERY_OUTCOME_DELIVERED"',
                           '"outcome": "DELIVERY_OUTCOME_SKIPPED"', '"state": "DELIVERY_STATE_DELIVERED"',
                           '"campaignId": "418207"', '"redelivered": "1"']:
                if needle not in text:
                    sys.exit(f"quickstart output lacks {needle!r}:\n{text}")
            # The same call without the token is refused.
            bare = subprocess.run(["grpcurl", "-plaintext", "-d", '{"parent": "accounts/42"}', "127.0.0.1:50051",
                                   "pushwire.v1.IntegrationService/ListIntegrations"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
            if bare.returncode == 0 or "Unauthenticated" not in bare.stdout + bare.stderr:
                sys.exit(f"a call without a token was not refused with Unauthenticated:\n{bare.stdout}{bare.stderr}")
            # The test webhook, the published participation and its redelivery (made by the
            # worker's retry loop from the delivery store, so it may come a moment later), each
            # verified with both schemes.
            deadline = time.monotonic() + 20
            while True:
                sink = ""
                for _, log in background:
                    log.seek(0)
                    sink += log.read()
                counts = [sink.count(v) for v in ("qualifio signature:          OK",
                                                  "standard webhooks signature: OK")]
                if counts == [3, 3] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if counts != [3, 3]:
                sys.exit(f"the sink did not print both verdicts three times ({counts}):\n{sink}")
            if "MISMATCH" in sink:
                sys.exit(f"the sink saw a bad signature:\n{sink}")
            print(f"quickstart: {len(commands)} blocks ran verbatim")
        finally:
            for bg, log in background:
                bg.terminate()
                bg.wait(timeout=10)
                log.close()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                sys.exit("control plane did not stop within 30 s of SIGTERM")
            reader.join(timeout=10)
            stderr = "".join(stderr_lines)
        if code != 0:
            sys.exit(f"control plane exited with {code} after SIGTERM:\n{stderr}")
        for secret in (
            "quickstart-token",
            "cXVpY2tzdGFydC1jcm0tc2lnbmluZy1zZWNyZXQtMzI",
            "cXVpY2tzdGFydC1zaW5rLXNpZ25pbmctc2VjcmV0MzI",
        ):
            if secret in stderr:
                sys.exit(f"a secret reached the logs: {secret}")
        if token and stderr.count(token[0]) != 1:
            sys.exit(f"the admin token is on stderr {stderr.count(token[0])} times; only its one print may show it")
    print("quickstart: passed")


if __name__ == "__main__":
    main()
