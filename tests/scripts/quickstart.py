#!/usr/bin/env python3
"""Runs the README's quick start verbatim against the real control-plane binary.

Every shell block between `<!-- quickstart:begin -->` and `<!-- quickstart:end -->` in
README.md is run in order with bash (grpcurl must be on PATH) while the control plane runs on
its default addresses with a fresh embedded store. Fails on the first command that fails, and
checks a few answers a reader relies on. Finally SIGTERM must stop the binary cleanly.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
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


def main():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = blocks(f.read())
    if not commands:
        sys.exit("quickstart section holds no shell block")
    for port in (50051, 8081):
        if not port_free(port):
            sys.exit(f"port {port} is in use; the quick start needs the default ports")
    subprocess.run(["cargo", "build", "--quiet", "-p", "pushwire-control-plane", "--bin", "control-plane"],
                   cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "debug", "control-plane")
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen([binary, "--data-dir", data], stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(proc, time.time() + 30)
            outputs = []
            for n, block in enumerate(commands, 1):
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True,
                                     timeout=60)
                if run.returncode != 0:
                    sys.exit(f"quickstart block {n} failed ({run.returncode}):\n{block}\n{run.stdout}{run.stderr}")
                outputs.append(run.stdout)
            text = "\n".join(outputs)
            for needle in ["pushwire.v1.IntegrationService", "pushwire.v1.PushScopeService",
                           "pushwire.v1.ConfigService", "pushwire.v1.IngestService",
                           "Manages integrations", '"decidedBy": "accounts/42/pushScopes/news-site"']:
                if needle not in text:
                    sys.exit(f"quickstart output lacks {needle!r}:\n{text}")
            print(f"quickstart: {len(commands)} blocks ran verbatim")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                sys.exit("control plane did not stop within 15 s of SIGTERM")
            stderr = proc.stderr.read()
        if code != 0:
            sys.exit(f"control plane exited with {code} after SIGTERM:\n{stderr}")
        for secret in ("quickstart-token", "quickstart-signing-secret"):
            if secret in stderr:
                sys.exit(f"a secret reached the logs: {secret}")
    print("quickstart: passed")


if __name__ == "__main__":
    main()
