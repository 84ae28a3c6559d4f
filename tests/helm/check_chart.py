#!/usr/bin/env python3
"""Checks the Helm chart in helm/pushwire against Helm itself, Kubernetes 1.30 and the binaries.

    check_chart.py [--control-plane PATH] [--worker PATH]

The binaries default to target/debug/{control-plane,worker} (`./dev test` builds them first).
Needs, in the running Python, helm-python-sdk (Helm's own Go library: lint, schema, render;
no `helm` binary) and kubernetes-validate (offline Kubernetes JSON schemas); `./dev test`
installs both, pinned, into .tools/venv. This script installs nothing.

1. `helm lint --strict` with the default values and with every file in helm/pushwire/ci/.
2. `helm template` of each, and of VARIANTS (the template branches those leave out), every
   manifest validated against the Kubernetes 1.30 schemas in strict mode (no unknown fields);
   only the Prometheus Operator's ServiceMonitor, a CRD, has no schema there.
3. Every flag the binaries accept, read from their `--help` with its `[env: PUSHWIRE_…]`, is a
   value: controlPlane.flags.<camelCase> / worker.flags.<camelCase> (sharedFlags for flags both
   take), and no value names a flag the binary does not have. Rendering with every flag set (to
   the example in values.schema.json) puts exactly that flag's environment variable and value
   in the Deployment; so does sharedFlags in both Deployments. The only exceptions are
   MODE_FLAGS: flags that make a binary do one thing and exit (control-plane --reencrypt) are
   run by hand in a pod, not deployed; the check prints each with its reason; and SECRET_FLAGS:
   flags whose value holds a password (--delivery-store), which come from a Secret through
   secretKeyRef, never a plain value (a binary that does not have such a flag yet is noted,
   and its variable accepted).
4. In every render, the Deployments listen on all interfaces, their container ports are the
   ports of PUSHWIRE_GRPC_ADDR / PUSHWIRE_HTTP_ADDR (the binary's default when unset), the
   probes are GET /healthz and /readyz on the http port, Services target those ports, the
   workers' PUSHWIRE_CONTROL_PLANE is dns:/// of the control planes' headless Service (every
   replica, for failover), terminationGracePeriodSeconds
   exceeds the drain time, and every pod runs non-root with a read-only root filesystem. A
   control plane on etcd has an encryption key file, mounted read-only from a Secret. Each
   binary starts with its rendered environment (clap parses every value; the control plane
   reads its key file: the chart's generated Secret when the render has it, else a fresh key).
   With default values the chart generates a token Secret (admin, publisher and worker token
   and the token file of their SHA-256), kept by helm uninstall, its token file mounted into
   every component and its worker token into the workers; a tokenFile flag with extraVolumes
   replaces it. Every control plane and worker gets PUSHWIRE_DELIVERY_STORE from a Secret (the
   bundled PostgreSQL's, generated and kept by helm uninstall, or deliveryStore.existingSecret),
   except a lone control plane running the worker on the embedded store (its SQLite default).
   Chart.yaml's version and appVersion are the workspace version (Cargo.toml).
5. The chart refuses impossible values, and every value is documented (schema description,
   comment in values.yaml).
6. The documentation's install steps (the sh blocks between <!-- chart-check:install:begin -->
   and its end, and chart-check:production, in docs/kubernetes.md or README.md) run with bash
   against stand-ins for kubectl, helm and docker (this script with --fake; see FakeCluster),
   which render the chart with the values the steps give and keep the Secrets. Then the release
   runs: every control-plane and worker replica as a real process with its rendered
   environment and the files of its mounted Secrets, on loopback, a real etcd (Debian's
   etcd-server) standing for the cluster's, and a real PostgreSQL (Debian's postgresql, TLS on)
   for the delivery store: the bundled one's rendered role, password and database, or those in
   the URL of the steps' Secret, the URL's host and port rewritten to it. All must become
   ready; an integration made with the steps' $TOKEN must receive a participation published
   with their $PUBLISHER_TOKEN (grpcurl, next to this Python or on PATH), NOTES.txt must read
   the same tokens, and no token nor the database password may appear in a log. Once the
   binaries read --delivery-store, their migrations must be recorded in that PostgreSQL; until
   then the URL must log in to it. The production steps use ci/ha-values.yaml.

Ends with a `chart: N passed, N failed` line; exits non-zero on any failure.
"""

import argparse
import base64
import hashlib
import http.server
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.parse
import urllib.request

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "pushwire")
KUBE_VERSION = "1.30.0"
RELEASE = "pushwire"
NAMESPACE = "pushwire"
# Kinds from CRDs, which kubernetes-validate has no schema for.
CRD_API_GROUPS = ("monitoring.coreos.com/",)
COMPONENT_FLAGS = {"control-plane": "controlPlane", "worker": "worker"}
# Files the chart expects from mounted Secrets; not there when the binaries run here.
MOUNTED_FILES = ("PUSHWIRE_TOKEN_FILE", "PUSHWIRE_TLS_CERT", "PUSHWIRE_TLS_KEY", "PUSHWIRE_TLS_CLIENT_CA",
                 "PUSHWIRE_CONTROL_PLANE_TOKEN_FILE", "PUSHWIRE_CONTROL_PLANE_CA", "PUSHWIRE_TLS_CLIENT_CERT",
                 "PUSHWIRE_TLS_CLIENT_KEY")
# Flags that select a one-shot mode of a binary instead of configuring a deployment: no chart
# value, no environment variable. Each with the reason the check prints. Keep this list short:
# every other flag must be a value.
MODE_FLAGS = {
    "control-plane": {
        "reencrypt": "one-shot maintenance (re-encrypts every stored secret under the current key, "
                     "prints counts and exits without serving): run by hand in a pod, see "
                     "docs/kubernetes.md; as a deployment setting no replica would serve",
    },
}
# Where the chart mounts the control plane's encryption key Secret.
ENCRYPTION_DIR = "/etc/pushwire/encryption/"
# Flags whose value holds a password: not a plain value but a Secret the chart passes through
# secretKeyRef, to the binaries listed. Each with the values that give it. The binaries may not
# have such a flag yet (it lands with their own change): the check then says so, and the chart's
# variable is accepted as the one the binary will read (clap ignores unknown variables).
SECRET_FLAGS = {
    "delivery-store": {
        "env": "PUSHWIRE_DELIVERY_STORE",
        "binaries": ("control-plane", "worker"),
        "values": "deliveryStore.existingSecret or postgresql.bundled; the URL holds a password",
    },
}
DELIVERY_STORE_ENV = SECRET_FLAGS["delivery-store"]["env"]
# Debian's PostgreSQL server binaries (package postgresql).
POSTGRES_ROOT = "/usr/lib/postgresql"
# Branches of the templates that neither the default values nor ci/ take.
VARIANTS = {
    "variant: 3-member bundled etcd and bundled PostgreSQL on emptyDir, fixed workers, no PDBs, ConfigMap CA": {
        "etcd": {"bundled": {"replicas": 3, "persistence": {"enabled": False}}},
        "worker": {"autoscaling": {"enabled": False}, "replicas": 4, "pdb": {"enabled": False},
                   "preStopSleepSeconds": 0},
        "controlPlane": {"pdb": {"enabled": False}},
        "postgresql": {"bundled": {"persistence": {"enabled": False}}},
        "extraCa": {"existingConfigMap": "receivers-ca", "key": "bundle.pem"},
        "serviceAccount": {"create": False},
    },
    "variant: embedded store on emptyDir with separate workers, OTLP headers, in-flight HPA only, "
    "encryption key and delivery store URL from existing Secrets": {
        "etcd": {"bundled": {"enabled": False}},
        "postgresql": {"bundled": {"enabled": False}},
        "deliveryStore": {"existingSecret": "pushwire-db", "key": "dsn"},
        "encryption": {"existingSecret": "pushwire-keys", "key": "keys.txt"},
        "controlPlane": {"replicas": 1, "persistence": {"enabled": False}},
        "worker": {"autoscaling": {"targetCPUUtilizationPercentage": None,
                                   "inFlight": {"enabled": True}}},
        "otel": {"enabled": True, "endpoint": "http://collector:4318", "protocol": "http/protobuf",
                 "headersSecret": "otlp-headers"},
        "fullnameOverride": "pw",
    },
}


# ---------------------------------------------------------------------------------------------
# The binaries' flags


def parse_help(text):
    """{flag: {"env", "default", "takes_value"}} from clap's --help output."""
    flags = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s{2,8}(?:-\w, )?--([a-z0-9][a-z0-9-]*)(?: <([A-Z0-9_]+)>)?\s*(.*)$", line)
        if m:
            current = m.group(1)
            flags[current] = {"takes_value": m.group(2) is not None, "text": m.group(3)}
        elif current and line.startswith(" "):
            flags[current]["text"] += " " + line.strip()
        else:
            current = None
    for info in flags.values():
        env = re.search(r"\[env: ([A-Z0-9_]+)(?:=[^\]]*)?\]", info["text"])
        default = re.search(r"\[default: ([^\]]*)\]", info["text"])
        info["env"] = env.group(1) if env else None
        info["default"] = default.group(1) if default else None
    flags.pop("help", None)
    flags.pop("version", None)
    return flags


def binary_flags(path):
    if not os.access(path, os.X_OK):
        sys.exit(f"{path}: not an executable; build it first (cargo build -p pushwire-control-plane"
                 " -p pushwire-worker) or pass its path")
    # A PUSHWIRE_* variable in our environment would show up in the help as a current value.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHWIRE_")}
    out = subprocess.run([path, "--help"], check=True, capture_output=True, text=True, env=env)
    flags = parse_help(out.stdout)
    if len(flags) < 3:
        sys.exit(f"{path} --help: found only {sorted(flags)}; has the help format changed?")
    return flags


def deployable(binary, flags):
    """The flags of `binary` that are values: all but its MODE_FLAGS and SECRET_FLAGS."""
    return {f: info for f, info in flags.items() if f not in MODE_FLAGS.get(binary, {}) and f not in SECRET_FLAGS}


def camel(flag):
    head, *rest = flag.split("-")
    return head + "".join(part.capitalize() for part in rest)


# ---------------------------------------------------------------------------------------------
# Helm and Kubernetes


def load_values_file(name):
    with open(os.path.join(CHART, "ci", name)) as f:
        return yaml.safe_load(f) or {}


def render(values, name=RELEASE, namespace=NAMESPACE):
    """(manifests, notes): the rendered objects, each with the template it came from."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or None, name=name, namespace=namespace)
    objects, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((path, doc))
    return objects, notes


def find(objects, kind, component=None):
    found = []
    for _, doc in objects:
        if doc.get("kind") != kind:
            continue
        meta = doc.get("metadata", {})
        if component and meta.get("labels", {}).get("app.kubernetes.io/component") != component:
            continue
        found.append(doc)
    return found


def one(objects, kind, component):
    found = find(objects, kind, component)
    assert len(found) == 1, f"expected one {kind} of {component}, found {len(found)}"
    return found[0]


def control_plane_url(objects):
    """The workers' default --control-plane: dns:/// of the headless Service selecting the
    control-plane pods, on its grpc port."""
    svc = one(objects, "Service", "control-plane-peers")
    assert svc["spec"].get("clusterIP") == "None", "the control planes' peer Service is not headless"
    cp = one(objects, "Service", "control-plane")
    assert svc["spec"]["selector"] == cp["spec"]["selector"], "the headless Service selects other pods"
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    return f"dns:///{svc['metadata']['name']}:{port}"


def container(deployment, name):
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"{deployment['metadata']['name']}: no container {name}")


def mounted_secret(dep, c, path):
    """(Secret name, key) of the Secret volume holding file `path` of container `c`, or
    (None, None) when no Secret volume is mounted there. The mount must be read-only."""
    for m in c.get("volumeMounts", []):
        base = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(base):
            continue
        assert m.get("readOnly") is True, f"{c['name']}: {m['mountPath']} is not mounted read-only"
        vol = next(v for v in dep["spec"]["template"]["spec"].get("volumes", []) if v["name"] == m["name"])
        if "secret" not in vol:
            return None, None
        name, rel = vol["secret"]["secretName"], path[len(base):]
        items = vol["secret"].get("items")
        if items is None:
            return name, rel
        key = next((i["key"] for i in items if i["path"] == rel), None)
        assert key, f"{c['name']}: {path}: no item of Secret {name} is mounted there"
        return name, key
    return None, None


def rendered_secret(objects, name):
    return next((s for s in find(objects, "Secret") if s["metadata"]["name"] == name), None)


def env_of(c):
    out = {}
    for e in c.get("env", []):
        assert e["name"] not in out, f"{c['name']}: {e['name']} set twice"
        out[e["name"]] = e.get("value")
    return out


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparsed duration {duration!r}"
    return sum(int(n) * units[u] for n, u in parts)


def port_of(addr):
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+)", addr)
    assert m, f"not an IP:port address: {addr!r}"
    return m.group(1), int(m.group(2))


def node_ref_parts(ref):
    assert ref.startswith("#/"), ref
    return ref[2:].split("/")


def deref(schema, node):
    while "$ref" in node:
        target = schema
        for part in node_ref_parts(node["$ref"]):
            target = target[part]
        node = target
    return node


def env_text(value):
    """How the chart passes a value: lists comma-separated, booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# The install steps of the documentation, run against stand-ins for kubectl, helm and docker
#
# The steps run with bash, as written, in a scratch directory (with `helm/` linked to the
# chart). `kubectl`, `helm` and `docker` there are this script (`--fake TOOL ...`), keeping a
# small cluster in a JSON file: namespaces, Secrets, the installed release (rendered by Helm's
# library, as `helm install` would; `lookup` finds nothing, as on a first install) and the
# images built and pushed. They know only the commands the documentation uses and refuse any
# other, so that steps drifting from what the chart needs fail here.

STATE_ENV = "CHART_CHECK_STATE"


class Refused(Exception):
    pass


class FakeCluster:
    def __init__(self, path):
        self.path = path
        if os.path.exists(path):
            with open(path) as f:
                self.state = json.load(f)
        else:
            self.state = {"namespaces": ["default"], "secrets": {}, "releases": {},
                          "built": [], "pushed": []}

    def save(self):
        with open(os.open(self.path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.state, f)
        os.replace(self.path + ".new", self.path)

    def need_namespace(self, ns):
        if ns not in self.state["namespaces"]:
            raise Refused(f'Error from server (NotFound): namespaces "{ns}" not found')

    def secret(self, ns, name):
        """The data of Secret `name` (key: base64), or None."""
        return self.state["secrets"].get(f"{ns}/{name}")

    def create_secret(self, ns, name, data):
        self.need_namespace(ns)
        if f"{ns}/{name}" in self.state["secrets"]:
            raise Refused(f'Error from server (AlreadyExists): secrets "{name}" already exists')
        self.state["secrets"][f"{ns}/{name}"] = data

    def release(self):
        """(namespace, release) of the one installed release."""
        releases = self.state["releases"]
        assert len(releases) == 1, f"the install steps installed {len(releases)} releases, expected 1"
        key, rel = next(iter(releases.items()))
        return key.split("/")[0], rel


def split_namespace(args):
    ns, rest, i = "default", [], 0
    while i < len(args):
        a = args[i]
        if a in ("-n", "--namespace"):
            ns, i = args[i + 1], i + 2
            continue
        if a.startswith("--namespace="):
            ns = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return ns, rest


def fake_kubectl(cluster, args):
    ns, rest = split_namespace(args)
    if rest[:2] == ["create", "namespace"] and len(rest) == 3:
        if rest[2] in cluster.state["namespaces"]:
            raise Refused(f'Error from server (AlreadyExists): namespaces "{rest[2]}" already exists')
        cluster.state["namespaces"].append(rest[2])
        print(f"namespace/{rest[2]} created")
        return
    if rest[:3] == ["create", "secret", "generic"] and len(rest) >= 4:
        data = {}
        for opt in rest[4:]:
            if opt.startswith("--from-file="):
                key, sep, path = opt[len("--from-file="):].partition("=")
                if not sep:
                    key, path = os.path.basename(key), key
                with open(path, "rb") as f:
                    value = f.read()
            elif opt.startswith("--from-literal="):
                key, sep, text = opt[len("--from-literal="):].partition("=")
                if not sep:
                    raise Refused(f"error: invalid literal source {opt}, expected key=value")
                value = text.encode()
            else:
                raise Refused(f"kubectl create secret generic: option {opt!r} is not simulated")
            if key in data:
                raise Refused(f"error: cannot add key {key}, another key by that name already exists")
            data[key] = base64.b64encode(value).decode()
        cluster.create_secret(ns, rest[3], data)
        print(f"secret/{rest[3]} created")
        return
    if rest[:2] == ["get", "secret"] and len(rest) >= 3:
        opts = rest[3:]
        if len(opts) == 2 and opts[0] in ("-o", "--output"):
            output = opts[1]
        elif len(opts) == 1 and opts[0].startswith(("-o", "--output=")):
            output = opts[0].split("=", 1)[1] if opts[0].startswith("--") else opts[0][2:]
        else:
            raise Refused(f"kubectl get secret: options {opts} are not simulated (use -o jsonpath=...)")
        m = re.fullmatch(r"jsonpath=\{\.data\.((?:[^\\}]|\\.)+)\}", output)
        if not m:
            raise Refused(f"kubectl get secret: output {output!r} is not simulated (only {{.data.KEY}})")
        data = cluster.secret(ns, rest[2])
        if data is None:
            raise Refused(f'Error from server (NotFound): secrets "{rest[2]}" not found')
        # As kubectl: a missing key prints nothing; no newline after the value.
        sys.stdout.write(data.get(m.group(1).replace("\\.", "."), ""))
        return
    raise Refused(f"kubectl {' '.join(args)}: not a command the chart check simulates")


def deep_merge(base, extra):
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def fake_helm(cluster, args):
    if not args or args[0] != "install":
        raise Refused(f"helm {' '.join(args)}: only `helm install` is simulated")
    ns, rest = split_namespace(args[1:])
    positional, files, sets, create_ns, i = [], [], [], False, 0
    while i < len(rest):
        a = rest[i]
        if a == "--create-namespace":
            create_ns = True
        elif a in ("-f", "--values", "--set", "--set-string"):
            (files if a in ("-f", "--values") else sets).append((a, rest[i + 1]))
            i += 1
        elif a.startswith(("--values=", "--set=", "--set-string=")):
            flag, value = a.split("=", 1)
            (files if flag == "--values" else sets).append((flag, value))
        elif a.startswith("-"):
            raise Refused(f"helm install: option {a!r} is not simulated")
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise Refused(f"helm install: expected NAME CHART, got {positional}")
    name, chart = positional
    helm.validate_release_name(name)
    if os.path.realpath(chart) != os.path.realpath(CHART):
        raise Refused(f"helm install: chart {chart!r} is not helm/pushwire")
    if create_ns and ns not in cluster.state["namespaces"]:
        cluster.state["namespaces"].append(ns)
    cluster.need_namespace(ns)
    if f"{ns}/{name}" in cluster.state["releases"]:
        raise Refused("Error: INSTALLATION FAILED: cannot re-use a name that is still in use")
    values = {}
    for _, path in files:  # helm: the files in order, then --set and --set-string in order
        with open(path) as f:
            deep_merge(values, yaml.safe_load(f) or {})
    for flag, expr in sets:
        parse = helm.parse_set_string if flag == "--set" else helm.parse_set_string_values
        deep_merge(values, parse(expr))
    objects, notes = render(values, name=name, namespace=ns)
    for _, doc in objects:
        if doc.get("kind") == "Secret":
            cluster.create_secret(ns, doc["metadata"]["name"], dict(doc.get("data") or {}))
    cluster.state["releases"][f"{ns}/{name}"] = {
        "values": values, "objects": [doc for _, doc in objects], "notes": notes}
    print(f"NAME: {name}\nNAMESPACE: {ns}\nSTATUS: deployed\nREVISION: 1\nNOTES:\n{notes}")


def fake_docker(cluster, args):
    if len(args) == 4 and args[0] == "build" and args[1] == "-t":
        cluster.state["built"].append(args[2])
        return
    if len(args) == 2 and args[0] == "push":
        if args[1] not in cluster.state["built"]:
            raise Refused(f"An image does not exist locally with the tag: {args[1]}")
        cluster.state["pushed"].append(args[1])
        return
    raise Refused(f"docker {' '.join(args)}: not a command the chart check simulates")


def fake_main(argv):
    """`check_chart.py --fake kubectl|helm|docker ARGS`: one command against the cluster in
    $CHART_CHECK_STATE."""
    tools = {"kubectl": fake_kubectl, "helm": fake_helm, "docker": fake_docker}
    cluster = FakeCluster(os.environ[STATE_ENV])
    try:
        tools[argv[0]](cluster, argv[1:])
    except (Refused, helm.HelmError, OSError) as e:
        print(f"{argv[0]} (chart check stand-in): {e}", file=sys.stderr)
        return 1
    cluster.save()
    return 0


def run_steps(script, workdir, state_path):
    """Runs `script` with bash (-euo pipefail) in `workdir` against the stand-ins; returns the
    variables it leaves set."""
    bindir = os.path.join(os.path.dirname(state_path), "bin")
    os.makedirs(bindir, exist_ok=True)
    for tool in ("kubectl", "helm", "docker"):
        shim = os.path.join(bindir, tool)
        with open(shim, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.abspath(__file__)}" --fake {tool} "$@"\n')
        os.chmod(shim, 0o755)
    out = os.path.join(os.path.dirname(state_path), "variables")
    env = {"PATH": bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir,
           STATE_ENV: state_path, "LC_ALL": "C"}
    proc = subprocess.run(["bash", "-c", f'set -euo pipefail\n{script}\nenv -0 > "{out}"\n'],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the steps failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
    with open(out) as f:
        pairs = [item.split("=", 1) for item in f.read().split("\0") if "=" in item]
    os.unlink(out)
    return dict(pairs)


def documented_steps(section):
    """(shell script, file) of the steps between <!-- chart-check:SECTION:begin/end -->."""
    for rel in ("docs/kubernetes.md", "README.md"):
        path = os.path.join(ROOT, rel)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        m = re.search(rf"<!-- chart-check:{section}:begin -->(.*?)<!-- chart-check:{section}:end -->", text, re.S)
        if m:
            blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", m.group(1), re.S)
            assert blocks, f"{rel}: chart-check:{section} has no sh block"
            return "\n".join(blocks), rel
    raise AssertionError(f"no <!-- chart-check:{section}:begin --> in docs/kubernetes.md or README.md")


# ---------------------------------------------------------------------------------------------
# Pods of the installed release, as local processes on loopback


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, deadline, what, log_path):
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what}: {url} not 200 in time:\n{tail(log_path)}")


def tail(path, lines=15):
    with open(path, errors="replace") as f:
        return "\n".join(f.read().splitlines()[-lines:])


class Processes:
    """Processes started for one install; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.running = []  # (label, proc, log path)
        self.dirs = []  # removed by stop(), once their processes are gone

    def start(self, label, argv, env, cwd, user=None):
        log_path = os.path.join(self.tmp, f"{label}.log")
        with open(log_path, "w") as log:
            if user:
                os.chown(log_path, user[0], user[1])
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    user=user[0] if user else None, group=user[1] if user else None)
        self.running.append((label, proc, log_path))
        return proc, log_path

    def stop(self, timeout=30):
        """Stops them, last started first; returns those that did not exit 0 on SIGTERM."""
        bad = []
        for label, proc, log_path in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    bad.append(f"{label}: still running {timeout} s after SIGTERM")
                    continue
            if proc.returncode != 0 and not label.startswith("etcd"):
                bad.append(f"{label}: exit {proc.returncode}:\n{tail(log_path)}")
        self.running = []
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.dirs = []
        return bad

    def logs(self):
        out = {}
        for label, _, log_path in self.running:
            with open(log_path, errors="replace") as f:
                out[label] = f.read()
        return out


def start_etcd(procs, tmp):
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    assert os.access(etcd, os.X_OK), "no etcd binary (Debian package etcd-server)"
    proc, log_path = procs.start("etcd", [
        etcd, "--name", "chart-check", "--data-dir", os.path.join(tmp, "etcd"),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"chart-check={peer_url}", "--initial-cluster-state", "new",
    ], {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, tmp)
    wait_http(f"{client_url}/health", proc, time.time() + 30, "etcd", log_path)
    return client_url


class Postgres:
    """A throw-away PostgreSQL (Debian's postgresql package) standing for the release's delivery
    store: a cluster made with initdb in a temporary directory, served on a free loopback port with password
    authentication (scram-sha-256) over TCP and TLS on (a self-signed certificate, enough for
    sslmode=require), fsync off. initdb refuses to run as root: as root the cluster belongs to the
    `postgres` system user, which runs the server. Stopped with the other processes."""

    SUPERUSER = "chart_check"

    def __init__(self, procs):
        majors = sorted((d for d in os.listdir(POSTGRES_ROOT) if d.isdigit()), key=int) \
            if os.path.isdir(POSTGRES_ROOT) else []
        assert majors, f"no PostgreSQL server in {POSTGRES_ROOT} (Debian package postgresql)"
        self.bin = os.path.join(POSTGRES_ROOT, majors[-1], "bin")
        self.version = majors[-1]
        # Its own directory: the server's user must reach it, and `tmp` is root's alone.
        self.dir = tempfile.mkdtemp(prefix="chart-check-pg-")
        procs.dirs.append(self.dir)
        self.user = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self.user = (entry.pw_uid, entry.pw_gid)
            os.chown(self.dir, *self.user)
        self.password = base64.b64encode(os.urandom(24)).decode().translate(str.maketrans("+/", "xy"))
        pwfile = self.own_file("pwfile", self.password + "\n")
        run = dict(capture_output=True, text=True, user=self.user[0] if self.user else None,
                   group=self.user[1] if self.user else None)
        out = subprocess.run([os.path.join(self.bin, "initdb"), "-D", os.path.join(self.dir, "data"),
                              "-U", self.SUPERUSER, f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale",
                              "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"], **run)
        assert out.returncode == 0, f"initdb failed:\n{out.stdout}{out.stderr}"
        cert, key = os.path.join(self.dir, "server.crt"), os.path.join(self.dir, "server.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1"],
                       check=True, capture_output=True)
        for path in (cert, key):
            os.chmod(path, 0o600)
            if self.user:
                os.chown(path, *self.user)
        self.port = free_port()
        self.proc, self.log_path = procs.start("postgres", [
            os.path.join(self.bin, "postgres"), "-D", os.path.join(self.dir, "data"), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
            "-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}",
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
        ], {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}, self.dir, user=self.user)
        deadline = time.time() + 30
        while subprocess.run([os.path.join(self.bin, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            assert time.time() < deadline, f"postgres not accepting connections in time:\n{tail(self.log_path)}"
            time.sleep(0.2)

    def own_file(self, name, text):
        path = os.path.join(self.dir, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        if self.user:
            os.chown(path, *self.user)
        return path

    def psql(self, sql, user=None, password=None, database="postgres", sslmode="disable"):
        """Runs `sql` (on stdin, so no value of it is on a command line): as the superuser over
        the Unix socket, or as `user` with `password` over TCP (the password in PGPASSWORD)."""
        if user is None:
            conn, env = ["-h", self.dir, "-U", self.SUPERUSER], {}
        else:
            conn, env = ["-h", "127.0.0.1", "-U", user], {"PGPASSWORD": password, "PGSSLMODE": sslmode}
        out = subprocess.run([os.path.join(self.bin, "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                              "-p", str(self.port), *conn, "-d", database], input=sql, capture_output=True,
                             text=True, env=dict(os.environ, **env))
        assert out.returncode == 0, f"psql: {out.stderr.strip()}"
        return out.stdout.strip()

    def create_owner(self, user, password, database):
        """The role `user` (LOGIN, `password`) and its own database, as a reader's DBA makes them."""
        ident = '"' + user.replace('"', '""') + '"'
        literal = "'" + password.replace("'", "''") + "'"
        self.psql(f"CREATE ROLE {ident} LOGIN PASSWORD {literal};")
        self.psql(f'CREATE DATABASE "{database.replace(chr(34), chr(34) * 2)}" OWNER {ident};')


def parse_store_url(url):
    """(user, password, host, port, database, query dict) of a postgres:// URL."""
    u = urllib.parse.urlsplit(url)
    assert u.scheme in ("postgres", "postgresql"), f"delivery store URL scheme {u.scheme!r}, expected postgres://"
    assert u.username and u.password is not None and u.hostname, \
        "the delivery store URL lacks a user, password or host (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
    return (urllib.parse.unquote(u.username), urllib.parse.unquote(u.password), u.hostname, u.port or 5432,
            urllib.parse.unquote(u.path.lstrip("/")) or urllib.parse.unquote(u.username),
            dict(urllib.parse.parse_qsl(u.query)))


def local_store_url(url, port):
    """`url` with its host and port replaced by 127.0.0.1:`port`, everything else as written."""
    u = urllib.parse.urlsplit(url)
    userinfo = u.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit((u.scheme, f"{userinfo}@127.0.0.1:{port}", u.path, u.query, u.fragment))


def pod_files(cluster, ns, dep, c, root):
    """Writes the pod's volumes the container mounts under `root`: {mountPath: local dir}."""
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {}
    for m in c.get("volumeMounts", []):
        vol = volumes[m["name"]]
        local = os.path.join(root, m["name"])
        os.makedirs(local, exist_ok=True)
        if "secret" in vol:
            name = vol["secret"]["secretName"]
            data = cluster.secret(ns, name)
            assert data is not None, \
                f"{c['name']}: Secret {name} is not in the cluster the steps made: the pod would not start"
            items = vol["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                assert item["key"] in data, \
                    f"{c['name']}: Secret {name} has no key {item['key']!r}: the pod would not start"
                path = os.path.join(local, item["path"])
                mode = item.get("mode", vol["secret"].get("defaultMode", 0o644))
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(base64.b64decode(data[item["key"]]))
                os.chmod(path, mode)
        elif not ({"emptyDir", "persistentVolumeClaim"} & set(vol)):
            raise AssertionError(f"{c['name']}: volume {m['name']}: only Secret, emptyDir and PVC "
                                 "volumes are simulated")
        mounts[m["mountPath"].rstrip("/")] = local
    return mounts


def pod_env(cluster, ns, c, pod_name, mounts):
    """The container's environment as the kubelet gives it, mount paths made local."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                           lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            data = cluster.secret(ns, ref["name"]) or {}
            assert ref["key"] in data, f"{c['name']}: {e['name']}: no Secret {ref['name']} key {ref['key']}"
            value = base64.b64decode(data[ref["key"]]).decode()
        elif "fieldRef" in e.get("valueFrom", {}):
            value = {"metadata.name": pod_name, "metadata.namespace": ns}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"{c['name']}: {e['name']}: valueFrom {e.get('valueFrom')} is not simulated")
        env[e["name"]] = value
    for path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        for key, value in env.items():
            if value == path or value.startswith(path + "/"):
                env[key] = local + value[len(path):]
    return env


class Receiver:
    """A loopback HTTP receiver answering 204 and keeping what it got."""

    def __init__(self):
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                got.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def grpcurl(addr, token, method, body):
    tool = shutil.which("grpcurl", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert tool, "no grpcurl (./dev test puts one in .tools/venv/bin)"
    # The schema from proto/ rather than server reflection; the token through the environment,
    # not the command line.
    protos = [a for name in ("integrations", "push_scopes", "ingest")
              for a in ("-proto", f"pushwire/v1/{name}.proto")]
    return subprocess.run([tool, "-plaintext", "-max-time", "30", "-import-path", os.path.join(ROOT, "proto"),
                           *protos, "-expand-headers",
                           "-rpc-header", "authorization: Bearer ${CHART_CHECK_TOKEN}",
                           "-d", json.dumps(body), addr, method], capture_output=True, text=True,
                          env=dict(os.environ, CHART_CHECK_TOKEN=token))


def make_ca(path):
    """A CA certificate (PEM) standing for the receivers' private CA the reader brings."""
    key = path + ".key"
    assert shutil.which("openssl"), "no openssl (Debian package openssl) to make the receivers' CA"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", path, "-days", "2", "-subj", "/CN=receivers-ca"],
                   check=True, capture_output=True)
    os.unlink(key)


# ---------------------------------------------------------------------------------------------
# The checks


class Checks:
    def __init__(self, args):
        self.passed = 0
        self.failed = 0
        self.paths = {"control-plane": os.path.abspath(args.control_plane), "worker": os.path.abspath(args.worker)}
        self.bins = {binary: binary_flags(path) for binary, path in self.paths.items()}
        with open(os.path.join(CHART, "values.schema.json")) as f:
            self.schema = json.load(f)
        self.value_sets = {"default values": {}}
        for name in sorted(os.listdir(os.path.join(CHART, "ci"))):
            if name.endswith(".yaml"):
                self.value_sets[f"ci/{name}"] = load_values_file(name)
        self.renders = {}
        with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
            self.version = tomllib.load(f)["workspace"]["package"]["version"]

    def run(self, name, fn, *args):
        try:
            detail = fn(*args)
        except (AssertionError, helm.HelmError) as e:
            self.failed += 1
            print(f"FAIL  {name}\n      {str(e).replace(chr(10), chr(10) + '      ')}")
        except Exception:
            self.failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
        else:
            self.passed += 1
            print(f"ok    {name}" + (f": {detail}" if detail else ""))

    # 1. lint

    def lint(self, values):
        report = helm.lint(CHART, values or None, strict=True, kube_version="v" + KUBE_VERSION)
        bad = [m for m in report["messages"] if m["severity"] >= 2]
        assert not bad and not report["errors"], "\n".join(
            [f"[{m['severity']}] {m['path']}: {m['error']}" for m in bad] + report["errors"])
        infos = [m["error"] for m in report["messages"] if m["severity"] < 2]
        return "; ".join(infos) if infos else None

    # 2. render + Kubernetes schemas

    def render_validate(self, label, values):
        objects, notes = render(values)
        self.renders[label] = (objects, notes, values)
        counts, skipped = {}, []
        for path, doc in objects:
            kind = doc.get("kind")
            if doc.get("apiVersion", "").startswith(CRD_API_GROUPS):
                skipped.append(kind)
                continue
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                at = ".".join(str(p) for p in e.path)
                raise AssertionError(f"{path}: {kind} {doc['metadata']['name']}: {at}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                raise AssertionError(f"{path}: {e.message}")
            counts[kind] = counts.get(kind, 0) + 1
        assert "grpcurl" in notes, "NOTES.txt does not say how to reach the API with grpcurl"
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        if skipped:
            summary += f"; not in the Kubernetes schemas (CRD): {', '.join(skipped)}"
        return summary

    def expected_objects(self, label, want):
        objects = self.renders[label][0]
        for kind, component, count in want:
            got = len(find(objects, kind, component))
            assert got == count, f"{label}: {got} {kind} of {component}, expected {count}"

    def etcd_members(self, label):
        """The control plane is given every member of the bundled etcd by its stable name
        (pod.headless-service), not the Service: it fails over between members itself."""
        objects = self.renders[label][0]
        etcd = one(objects, "StatefulSet", "etcd")
        name, replicas = etcd["metadata"]["name"], etcd["spec"]["replicas"]
        peers = etcd["spec"]["serviceName"]
        env = env_of(container(one(objects, "Deployment", "control-plane"), "control-plane"))
        got = (env.get("PUSHWIRE_ETCD_ENDPOINTS") or "").split(",")
        want = [f"http://{name}-{i}.{peers}.{NAMESPACE}.svc:2379" for i in range(replicas)]
        assert got == want, f"{label}: PUSHWIRE_ETCD_ENDPOINTS {got}, expected every member {want}"

    # 3. flags

    def flag_schema(self, section):
        node = self.schema
        for part in section.split("."):
            node = deref(self.schema, node)["properties"][part]
        return deref(self.schema, node)["properties"]

    def flags_match_schema(self, binary):
        section = COMPONENT_FLAGS[binary] + ".flags"
        props = self.flag_schema(section)
        modes = MODE_FLAGS.get(binary, {})
        for flag in modes:
            assert flag in self.bins[binary], \
                f"MODE_FLAGS names --{flag}, which {binary} does not have: remove it from the list"
            assert not self.bins[binary][flag]["env"], \
                f"{binary} --{flag} is in MODE_FLAGS but has an environment variable " \
                f"({self.bins[binary][flag]['env']}), which a pod could set: make it a value"
            assert camel(flag) not in props, \
                f"{section}.{camel(flag)}: --{flag} is a one-shot mode (MODE_FLAGS), not a value"
        want = {camel(f): f for f in deployable(binary, self.bins[binary])}
        missing = sorted(f"--{want[k]}" for k in set(want) - set(props))
        invented = sorted(set(props) - set(want))
        assert not missing, f"{binary} flags with no value {section}.<name>: {missing}"
        assert not invented, f"{section} has keys that are no flag of {binary}: {invented}"
        for key, flag in want.items():
            info = self.bins[binary][flag]
            assert info["env"], f"{binary} --{flag} has no [env: ...]; the chart passes flags as env"
            node = deref(self.schema, props[key])
            assert node.get("examples"), f"{section}.{key}: no example in values.schema.json"
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            is_bool = "boolean" in types
            assert is_bool == (not info["takes_value"]), \
                f"{section}.{key} is {types} but --{flag} {'takes' if info['takes_value'] else 'takes no'} value"
        detail = f"{len(want)} flags, each a value"
        for flag, reason in modes.items():
            detail += f"; not a value: --{flag}, {reason}"
        for flag, info in SECRET_FLAGS.items():
            if binary not in info["binaries"]:
                continue
            assert camel(flag) not in props, \
                f"{section}.{camel(flag)}: --{flag} holds a password, it comes from a Secret ({info['values']})"
            if flag in self.bins[binary]:
                got = self.bins[binary][flag]["env"]
                assert got == info["env"], f"{binary} --{flag} reads {got}, the chart sets {info['env']}"
                detail += f"; from a Secret: --{flag} ({info['values']})"
            else:
                detail += (f"; --{flag} is not in this {binary}'s --help yet: the chart sets {info['env']} "
                           "from a Secret for when it is (re-run this check with the binaries that have it)")
        return detail

    def shared_flags_match(self):
        props = self.flag_schema("sharedFlags")
        both = {camel(f) for f in self.bins["control-plane"]} & {camel(f) for f in self.bins["worker"]}
        extra = sorted(set(props) - both)
        assert not extra, f"sharedFlags has keys that are not flags of both binaries: {extra}"
        for key in props:
            for binary in self.bins:
                assert key in self.flag_schema(COMPONENT_FLAGS[binary] + ".flags"), \
                    f"sharedFlags.{key} is not settable in {COMPONENT_FLAGS[binary]}.flags"
        return f"{len(props)} shared flags"

    def every_flag_set(self):
        """Render with every flag of both binaries set to its example; check each env var."""
        values = {"etcd": {"bundled": {"enabled": False}}}
        expected = {}
        for binary, component in COMPONENT_FLAGS.items():
            props = self.flag_schema(component + ".flags")
            flags = {}
            expected[binary] = {}
            for flag, info in deployable(binary, self.bins[binary]).items():
                assert camel(flag) in props, f"--{flag} of {binary}: no value {component}.flags.{camel(flag)}"
                example = deref(self.schema, props[camel(flag)])["examples"][0]
                flags[camel(flag)] = example
                expected[binary][info["env"]] = env_text(example)
            values[component] = {"flags": flags}
        self.render_validate("every flag set", values)
        objects = self.renders["every flag set"][0]
        for binary, want in expected.items():
            env = env_of(container(one(objects, "Deployment", binary), binary))
            for name, value in want.items():
                assert name in env, f"{binary}: {name} not in the rendered Deployment"
                assert env[name] == value, f"{binary}: {name}={env[name]!r}, expected {value!r}"
        return ", ".join(f"{b}: {len(w)} env vars" for b, w in expected.items())

    def shared_flags_set(self):
        props = self.flag_schema("sharedFlags")
        shared = {k: deref(self.schema, v)["examples"][0] for k, v in props.items()}
        objects, _ = render({"sharedFlags": shared})
        for binary in self.bins:
            env = env_of(container(one(objects, "Deployment", binary), binary))
            for key, value in shared.items():
                flag = next(f for f in self.bins[binary] if camel(f) == key)
                name = self.bins[binary][flag]["env"]
                assert env.get(name) == env_text(value), \
                    f"sharedFlags.{key}: {binary} has {name}={env.get(name)!r}, expected {env_text(value)!r}"
        # A component's own value wins over sharedFlags.
        objects, _ = render({"sharedFlags": {"concurrency": 8}, "worker": {"flags": {"concurrency": 99}}})
        w = env_of(container(one(objects, "Deployment", "worker"), "worker"))
        cp = env_of(container(one(objects, "Deployment", "control-plane"), "control-plane"))
        assert w["PUSHWIRE_CONCURRENCY"] == "99" and cp["PUSHWIRE_CONCURRENCY"] == "8", \
            f"override: worker {w.get('PUSHWIRE_CONCURRENCY')}, control plane {cp.get('PUSHWIRE_CONCURRENCY')}"
        return f"{len(shared)} flags in both Deployments; component values win"

    # 4. Deployments against the binaries

    def deployments(self, label):
        objects, _, values = self.renders[label]
        checked = []
        services = {}
        for binary in self.bins:
            for dep in find(objects, "Deployment", binary):
                services[binary] = self.deployment(label, objects, binary, dep)
                checked.append(binary)
        assert checked, f"{label}: no Deployment"
        if "worker" in services:
            wflags = (values.get("worker") or {}).get("flags") or {}
            if not wflags.get("controlPlane"):
                dep = one(objects, "Deployment", "worker")
                got = env_of(container(dep, "worker")).get("PUSHWIRE_CONTROL_PLANE")
                want = control_plane_url(objects)
                assert got == want, f"worker PUSHWIRE_CONTROL_PLANE={got!r}, expected the headless Service {want!r}"
        for pod_owner in find(objects, "Deployment") + find(objects, "StatefulSet"):
            self.hardened(pod_owner)
        return ", ".join(checked)

    def deployment(self, label, objects, binary, dep):
        flags = self.bins[binary]
        envs = {info["env"] for info in flags.values()}
        envs |= {info["env"] for info in SECRET_FLAGS.values() if binary in info["binaries"]}
        c = container(dep, binary)
        env = env_of(c)
        unknown = sorted(n for n in env if n.startswith("PUSHWIRE_") and n not in envs)
        assert not unknown, f"{binary}: env vars that are no flag of the binary: {unknown}"
        if binary == "control-plane":
            self.encryption_key(objects, dep, c, env)
        self.delivery_store_env(objects, binary, dep, c, env)

        def effective(flag):
            return env.get(flags[flag]["env"], flags[flag]["default"])

        ports = {}
        for flag, port_name in (("grpc-addr", "grpc"), ("http-addr", "http")):
            host, port = port_of(effective(flag))
            assert host not in ("127.0.0.1", "[::1]"), \
                f"{binary} --{flag} {effective(flag)} is loopback: unreachable in a pod"
            ports[port_name] = port
        declared = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert declared == ports, f"{binary}: container ports {declared}, flags say {ports}"

        def probe_port(probe):
            port = probe["httpGet"]["port"]
            return declared[port] if isinstance(port, str) else port

        for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            probe = c.get(kind)
            assert probe and "httpGet" in probe, f"{binary}: no HTTP {kind}"
            assert probe["httpGet"]["path"] == path, f"{binary}: {kind} path {probe['httpGet']['path']}"
            assert probe_port(probe) == ports["http"], \
                f"{binary}: {kind} on port {probe_port(probe)}, --http-addr port is {ports['http']}"

        svc = one(objects, "Service", binary)
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            target = declared[target] if isinstance(target, str) else target
            assert target == ports[p["name"]], f"{binary} Service port {p['name']} targets {target}"
        if binary == "worker":
            assert svc["spec"].get("clusterIP") == "None", "the workers' Service is not headless"

        spec = dep["spec"]["template"]["spec"]
        drain = seconds(effective("shutdown-grace"))
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > drain + sleep, \
            f"{binary}: terminationGracePeriodSeconds {grace} <= shutdown grace {drain} + preStop {sleep}"
        res = c.get("resources", {})
        assert res.get("requests") and res.get("limits"), f"{binary}: resources need requests and limits"
        grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        return svc["metadata"]["name"], grpc_port

    def delivery_store_env(self, objects, binary, dep, c, env):
        """PUSHWIRE_DELIVERY_STORE comes from a Secret (secretKeyRef), never a plain value; only a
        control plane running the worker alone on the embedded store (its data volume mounted)
        goes without, on its SQLite default. No ConfigMap holds a database URL."""
        entry = next((e for e in c.get("env", []) if e["name"] == DELIVERY_STORE_ENV), None)
        if entry:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            assert ref and "value" not in entry, f"{binary}: {DELIVERY_STORE_ENV} is not from a Secret (secretKeyRef)"
            secret = rendered_secret(objects, ref["name"])
            if secret:
                assert ref["key"] in secret.get("data", {}), f"Secret {ref['name']} has no key {ref['key']!r}"
        else:
            data_dir = env.get("PUSHWIRE_DATA_DIR", "")
            mounted = any(m["mountPath"].rstrip("/") == data_dir.rstrip("/") for m in c.get("volumeMounts", []))
            assert binary == "control-plane" and env.get("PUSHWIRE_WITH_WORKER") == "true" \
                and not find(objects, "Deployment", "worker") and not env.get("PUSHWIRE_ETCD_ENDPOINTS") \
                and mounted, f"{binary}: no {DELIVERY_STORE_ENV}: only a control plane running the worker alone " \
                             "on the embedded store (its dataDir on a volume) may use its SQLite default"
        for cm in find(objects, "ConfigMap"):
            assert not any("postgres" in str(v) for v in (cm.get("data") or {}).values()), \
                f"ConfigMap {cm['metadata']['name']} holds a database URL"

    def encryption_key(self, objects, dep, c, env):
        """On etcd the control plane refuses to start without a key; the key file the chart
        mounts comes read-only from a Secret holding that item."""
        key_file = env.get("PUSHWIRE_ENCRYPTION_KEY_FILE")
        if env.get("PUSHWIRE_ETCD_ENDPOINTS"):
            assert key_file, \
                "control plane on etcd without PUSHWIRE_ENCRYPTION_KEY_FILE: it would refuse to start"
        if key_file and key_file.startswith(ENCRYPTION_DIR):
            name, key = mounted_secret(dep, c, key_file)
            assert name, f"control plane: {key_file} is not mounted from a Secret"
            secret = rendered_secret(objects, name)
            if secret:
                assert key in secret.get("data", {}), f"Secret {name} has no key {key!r} for {key_file}"

    def hardened(self, owner):
        spec = owner["spec"]["template"]["spec"]
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, \
            f"{owner['metadata']['name']}: service account token mounted"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{owner['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{where}: may run as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities kept"

    def binary_accepts(self, label):
        """Starts each binary with its rendered PUSHWIRE_* environment: clap and the delivery
        settings must accept every value. Only what points elsewhere is replaced: listen
        addresses (free loopback ports), the store (an embedded one in a temporary directory), the
        delivery store (an SQLite file there; the documented installs below use a real PostgreSQL),
        the control plane's URL (a closed loopback port), the CA file and the token and TLS files
        (MOUNTED_FILES: not mounted here). The control plane's encryption key file is replaced by a
        private copy of the chart's generated Secret when the render has it, else by a fresh key."""
        objects = self.renders[label][0]
        started = []
        for binary, path in self.paths.items():
            for dep in find(objects, "Deployment", binary):
                env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHWIRE_")}
                env.update({k: v for k, v in env_of(container(dep, binary)).items()
                            if k.startswith("PUSHWIRE_") and v is not None})
                for name in ("PUSHWIRE_ETCD_ENDPOINTS", "PUSHWIRE_EXTRA_CA_FILE", *MOUNTED_FILES):
                    env.pop(name, None)
                with tempfile.TemporaryDirectory() as tmp:
                    env.update(PUSHWIRE_GRPC_ADDR="127.0.0.1:0", PUSHWIRE_HTTP_ADDR="127.0.0.1:0",
                               PUSHWIRE_CONTROL_PLANE="http://127.0.0.1:1",
                               PUSHWIRE_DATA_DIR=os.path.join(tmp, "data"))
                    if binary == "control-plane":
                        env.pop("PUSHWIRE_CONTROL_PLANE")
                    if any(e["name"] == DELIVERY_STORE_ENV for e in container(dep, binary).get("env", [])):
                        # From a Secret (no value here): an SQLite file stands for the PostgreSQL.
                        env[DELIVERY_STORE_ENV] = "sqlite://" + os.path.join(tmp, "deliveries.db")
                    if env.get("PUSHWIRE_ENCRYPTION_KEY_FILE"):
                        text, origin = self.key_file_text(objects, dep, env["PUSHWIRE_ENCRYPTION_KEY_FILE"])
                        key_path = os.path.join(tmp, "encryption.key")
                        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                            f.write(text)
                        env["PUSHWIRE_ENCRYPTION_KEY_FILE"] = key_path
                        binary_label = f"{binary} (key file: {origin})"
                    else:
                        binary_label = binary
                    log_path = os.path.join(tmp, "log")
                    with open(log_path, "w") as log:
                        proc = subprocess.Popen([path], env=env, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT)
                    try:
                        proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(timeout=20)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                            raise AssertionError(f"{binary} did not stop within 20 s of SIGTERM")
                        started.append(binary_label)
                        continue
                    with open(log_path) as log:
                        raise AssertionError(f"{binary} refused its rendered environment "
                                             f"(exit {proc.returncode}):\n{log.read().strip()}")
        return "ran " + ", ".join(started)

    def key_file_text(self, objects, dep, path):
        """(content, origin) of the key file the control plane reads at `path`."""
        name, key = mounted_secret(dep, container(dep, "control-plane"), path)
        secret = rendered_secret(objects, name) if name else None
        if secret:
            return base64.b64decode(secret["data"][key]).decode(), f"the chart's Secret {name}"
        return f"chart-check:{base64.b64encode(os.urandom(32)).decode()}\n", "a fresh key"

    def generated_key(self, label):
        """The chart's generated key Secret: one key line the binary takes, kept by uninstall."""
        objects = self.renders[label][0]
        secrets = find(objects, "Secret", "control-plane")
        assert len(secrets) == 1, f"{label}: {len(secrets)} control-plane Secrets, expected 1"
        secret = secrets[0]
        annotations = secret["metadata"].get("annotations") or {}
        assert annotations.get("helm.sh/resource-policy") == "keep", \
            f"Secret {secret['metadata']['name']} is not kept by helm uninstall (helm.sh/resource-policy)"
        assert len(secret["data"]) == 1, f"Secret {secret['metadata']['name']}: keys {sorted(secret['data'])}"
        text = base64.b64decode(next(iter(secret["data"].values()))).decode()
        m = re.fullmatch(r"(helm-[0-9]{8}):([A-Za-z0-9+/]+=*)\n", text)
        assert m, f"Secret {secret['metadata']['name']}: not one line key-id:base64"
        assert len(base64.b64decode(m.group(2))) == 32, "the generated key is not 32 bytes"
        dep = one(objects, "Deployment", "control-plane")
        c = container(dep, "control-plane")
        name, _ = mounted_secret(dep, c, env_of(c).get("PUSHWIRE_ENCRYPTION_KEY_FILE", "-"))
        assert name == secret["metadata"]["name"], \
            f"the control plane reads its key from {name}, not the Secret"
        return f"Secret {name}, key id {m.group(1)}, helm.sh/resource-policy: keep"

    def version_follows_project(self):
        with open(os.path.join(CHART, "Chart.yaml")) as f:
            chart = yaml.safe_load(f)
        got = (str(chart["version"]), str(chart["appVersion"]))
        assert got == (self.version, self.version), \
            f"Chart.yaml version {got[0]}, appVersion {got[1]}: not the workspace version {self.version} (Cargo.toml)"
        return self.version

    def generated_tokens(self, label):
        """The chart's generated token Secret: an admin, a publisher and a worker token, the token
        file accepting exactly them by SHA-256, kept by uninstall; its token file mounted into
        every component, its worker token into the workers only, and nothing else mounted."""
        objects = self.renders[label][0]
        secret = one(objects, "Secret", "tokens")
        name = secret["metadata"]["name"]
        annotations = secret["metadata"].get("annotations") or {}
        assert annotations.get("helm.sh/resource-policy") == "keep", f"Secret {name} is not kept by helm uninstall"
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert sorted(data) == ["admin-token", "publisher-token", "tokens.json", "worker-token"], \
            f"Secret {name}: keys {sorted(data)}"
        entries = json.loads(data["tokens.json"])["tokens"]
        hashes = {}
        for e in entries:
            assert set(e) == {"name", "sha256", "role", "accounts"} and e["accounts"] == "*", f"token file entry {e}"
            hashes[e["role"]] = e["sha256"]
        assert sorted(hashes) == ["admin", "publisher", "worker"] and len(entries) == 3, f"roles {sorted(hashes)}"
        for role, digest in hashes.items():
            token = data[f"{role}-token"]
            assert re.fullmatch(r"pwt_[A-Za-z0-9]{43}", token), f"{role}-token: not pwt_ and 43 letters and digits"
            assert hashlib.sha256(token.encode()).hexdigest() == digest, f"the token file's {role} hash is not {role}-token's"
        assert len({data[f"{r}-token"] for r in hashes}) == 3, "two generated tokens are the same"
        for binary, want in (("control-plane", ["tokens.json"]), ("worker", ["tokens.json", "worker-token"])):
            for dep in find(objects, "Deployment", binary):
                c = container(dep, binary)
                env = env_of(c)
                files = {"PUSHWIRE_TOKEN_FILE": "tokens.json"}
                if binary == "worker":
                    files["PUSHWIRE_CONTROL_PLANE_TOKEN_FILE"] = "worker-token"
                for var, key in files.items():
                    assert env.get(var), f"{binary}: no {var}"
                    got = mounted_secret(dep, c, env[var])
                    assert got == (name, key), f"{binary}: {var} {env[var]} is {got}, not Secret {name} key {key}"
                mounted = sorted(i["key"] for v in dep["spec"]["template"]["spec"]["volumes"]
                                 if v.get("secret", {}).get("secretName") == name for i in v["secret"]["items"])
                assert mounted == want, f"{binary} mounts {mounted} of Secret {name}, expected {want}"
        return f"Secret {name}: admin, publisher, worker token and their token file, helm.sh/resource-policy: keep"

    def own_token_file(self):
        """A tokenFile flag with extraVolumes (the route from before the token Secret) turns the
        chart's tokens off: nothing generated or mounted, the workers' token left to the user."""
        mount = {"extraVolumes": [{"name": "my-tokens", "secret": {"secretName": "my-tokens"}}],
                 "extraVolumeMounts": [{"name": "my-tokens", "mountPath": "/etc/my-tokens", "readOnly": True}]}
        objects, notes = render({
            "sharedFlags": {"tokenFile": "/etc/my-tokens/tokens.json"}, "controlPlane": mount,
            "worker": dict(mount, extraEnv=[{"name": "PUSHWIRE_CONTROL_PLANE_TOKEN", "valueFrom": {
                "secretKeyRef": {"name": "my-tokens", "key": "worker-token"}}}])})
        assert not find(objects, "Secret", "tokens"), "a token Secret was generated beside tokenFile"
        for binary in ("control-plane", "worker"):
            dep = one(objects, "Deployment", binary)
            c = container(dep, binary)
            env = env_of(c)
            assert env.get("PUSHWIRE_TOKEN_FILE") == "/etc/my-tokens/tokens.json", f"{binary}: {env.get('PUSHWIRE_TOKEN_FILE')}"
            assert "PUSHWIRE_CONTROL_PLANE_TOKEN_FILE" not in env, f"{binary}: the chart set a worker token file"
            assert mounted_secret(dep, c, "/etc/my-tokens/tokens.json")[0] == "my-tokens"
            names = [v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]]
            assert "tokens" not in names, f"{binary}: the chart's token volume is mounted too"
        assert "/etc/my-tokens/tokens.json" in notes, "NOTES.txt does not name the token file"
        return None

    def bundled_postgresql(self, label):
        """The bundled PostgreSQL: the official image at a pinned tag, one replica on a PVC, probed
        with pg_isready, non-root (checked with every pod owner); its Secret (kept by uninstall)
        holds a generated password and the URL of its Service, user and database, which every
        control plane and worker gets through secretKeyRef."""
        objects = self.renders[label][0]
        sts = one(objects, "StatefulSet", "postgresql")
        c = container(sts, "postgresql")
        repo, _, tag = c["image"].rpartition(":")
        assert repo == "postgres" and tag and tag != "latest", f"image {c['image']}: not the official one, pinned"
        assert sts["spec"]["replicas"] == 1, "the bundled PostgreSQL is single-instance"
        claims = sts["spec"].get("volumeClaimTemplates") or []
        assert [t["metadata"]["name"] for t in claims] == ["data"], "no PVC for the data"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        pgdata = next(e["value"] for e in c["env"] if e["name"] == "PGDATA")
        assert mounts.get("/var/lib/postgresql/data") == "data" and pgdata.startswith("/var/lib/postgresql/data/"), \
            f"PGDATA {pgdata} is not below the data volume"
        for path in ("/var/run/postgresql", "/tmp"):
            assert path in mounts, f"{path} is not a volume (the root filesystem is read-only)"
        pod = sts["spec"]["template"]["spec"].get("securityContext", {})
        assert not pod.get("fsGroup") or pod.get("fsGroupChangePolicy") == "OnRootMismatch", \
            "fsGroup changes at every mount would give PGDATA group permissions, which PostgreSQL refuses"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c.get(probe, {}).get("exec", {}).get("command", [""])[0] == "pg_isready", f"no pg_isready {probe}"
        res = c.get("resources", {})
        assert res.get("requests") and res.get("limits"), "PostgreSQL resources need requests and limits"
        secret = one(objects, "Secret", "postgresql")
        name = secret["metadata"]["name"]
        assert (secret["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep", \
            f"Secret {name} is not kept by helm uninstall"
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert sorted(data) == ["password", "url"], f"Secret {name}: keys {sorted(data)}"
        assert re.fullmatch(r"[A-Za-z0-9]{32}", data["password"]), "the generated password is not 32 letters and digits"
        penv = {e["name"]: e for e in c["env"]}
        assert penv["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "password"}, \
            "POSTGRES_PASSWORD is not the Secret's password"
        svc = one(objects, "Service", "postgresql")
        user, password, host, port, database, _ = parse_store_url(data["url"])
        assert (user, password, host, port, database) == (penv["POSTGRES_USER"]["value"], data["password"],
                                                          svc["metadata"]["name"], 5432, penv["POSTGRES_DB"]["value"]), \
            "the Secret's url is not the bundled PostgreSQL's user, password, Service and database"
        for binary in ("control-plane", "worker"):
            ref = self.store_ref(one(objects, "Deployment", binary), binary)
            assert ref == {"name": name, "key": "url"}, f"{binary}: {DELIVERY_STORE_ENV} from {ref}, not Secret {name} url"
        return f"postgres:{tag}, Secret {name} (password, url), helm.sh/resource-policy: keep"

    def store_ref(self, dep, binary):
        entry = next((e for e in container(dep, binary).get("env", []) if e["name"] == DELIVERY_STORE_ENV), None)
        assert entry, f"{binary}: no {DELIVERY_STORE_ENV}"
        return (entry.get("valueFrom") or {}).get("secretKeyRef")

    def existing_store(self, label):
        """deliveryStore.existingSecret: every control plane and worker gets that Secret's key;
        nothing bundled, nothing generated."""
        objects, _, values = self.renders[label]
        want = {"name": values["deliveryStore"]["existingSecret"], "key": values["deliveryStore"].get("key", "url")}
        assert not find(objects, "StatefulSet", "postgresql") and not find(objects, "Secret", "postgresql"), \
            "a bundled PostgreSQL beside existingSecret"
        for binary in ("control-plane", "worker"):
            for dep in find(objects, "Deployment", binary):
                ref = self.store_ref(dep, binary)
                assert ref == want, f"{binary}: {DELIVERY_STORE_ENV} from {ref}, expected {want}"
        return f"Secret {want['name']} key {want['key']}"

    def key_from_env(self):
        """PUSHWIRE_ENCRYPTION_KEY in controlPlane.extraEnv replaces the key file: no Secret
        generated, none mounted (the binary refuses both at once)."""
        extra = [{"name": "PUSHWIRE_ENCRYPTION_KEY",
                  "valueFrom": {"secretKeyRef": {"name": "pushwire-key", "key": "key"}}}]
        objects, _ = render({"controlPlane": {"extraEnv": extra}})
        assert not find(objects, "Secret", "control-plane"), "a key Secret was generated although extraEnv gives the key"
        dep = one(objects, "Deployment", "control-plane")
        c = container(dep, "control-plane")
        assert "PUSHWIRE_ENCRYPTION_KEY_FILE" not in env_of(c), "PUSHWIRE_ENCRYPTION_KEY_FILE set as well"
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert not any(p.startswith(ENCRYPTION_DIR.rstrip("/")) for p in mounts), \
            f"key Secret mounted: {mounts}"
        return None

    # 6. the documented install steps, then the system they make delivers

    def installed_delivers(self, section, values_file):
        """Runs the documented steps of `section` against the stand-ins, then starts what the
        release would run: every control-plane and worker replica (the HPA's minimum) as a real
        process with its rendered environment and its mounted Secrets' files, on loopback, with a
        real etcd in place of the cluster's. The test set-up changes only what points elsewhere:
        listen addresses (free loopback ports), the etcd endpoints, the workers' control-plane
        URL (a control plane's loopback port, replicas taken in turn as the Service would),
        the OTLP endpoint (a closed loopback port), and receivers on plain http:// loopback
        (--allow-insecure-http, 127.0.0.0/8 added to --allow-cidr). All must become ready; then
        an integration made with $TOKEN of the steps receives a participation published with
        $PUBLISHER_TOKEN, an unknown token is refused, and no token appears in any log."""
        script, source = documented_steps(section)
        with tempfile.TemporaryDirectory(prefix="chart-check-") as tmp:
            work = os.path.join(tmp, "work")
            os.makedirs(work)
            os.symlink(os.path.join(ROOT, "helm"), os.path.join(work, "helm"))
            if "receivers-ca.pem" in script:
                make_ca(os.path.join(work, "receivers-ca.pem"))
            state_path = os.path.join(tmp, "cluster.json")
            variables = run_steps(script, work, state_path)
            cluster = FakeCluster(state_path)
            ns, rel = cluster.release()
            want = load_values_file(values_file) if values_file else {}
            got = {k: v for k, v in rel["values"].items() if values_file or k != "image"}
            assert got == want, f"{source}: the steps install with values {got}, not {values_file or 'the defaults'}"
            objects = [(None, doc) for doc in rel["objects"]]
            tokens = {}
            for var in ("TOKEN", "PUBLISHER_TOKEN"):
                tokens[var] = variables.get(var, "")
                assert re.fullmatch(r"pwt_[A-Za-z0-9]{20,}", tokens[var]), \
                    f"{source}: after the steps ${var} is not a token (empty or malformed)"
            notes = [line.strip() for line in rel["notes"].splitlines()
                     if re.match(r"\s*export [A-Z_]+=\$\(kubectl .*\)\s*$", line)]
            assert notes, "NOTES.txt does not say how to read the tokens (export ...=$(kubectl ...))"
            from_notes = run_steps("\n".join(notes), work, state_path)
            for var in tokens:
                assert from_notes.get(var) == tokens[var], f"NOTES.txt's command for ${var} reads another value"

            for dep in find(objects, "Deployment"):
                for c in dep["spec"]["template"]["spec"]["containers"]:
                    image = c["image"]
                    if cluster.state["pushed"]:
                        assert image in cluster.state["pushed"], \
                            f"{c['name']} runs {image}, the steps pushed {cluster.state['pushed']}"
                    if "@" not in image:
                        assert image.rsplit(":", 1)[1] == self.version, \
                            f"{c['name']} runs {image}: not the project's version {self.version}"

            procs = Processes(tmp)
            receiver = Receiver()
            try:
                result = self.run_release(cluster, ns, objects, tokens, procs, receiver, tmp)
            finally:
                receiver.close()
                logs = procs.logs()
                stopped = procs.stop()
            secrets = list(tokens.values()) + [
                base64.b64decode(v).decode() for data in cluster.state["secrets"].values()
                for k, v in data.items() if k.endswith("-token")]
            leaked = sorted(label for label, text in logs.items() if any(s and s in text for s in secrets))
            assert not leaked, f"a token appears in the log of {leaked}"
            assert not stopped, "not stopped cleanly:\n" + "\n".join(stopped)
            return result

    def start_delivery_store(self, cluster, ns, objects, procs):
        """Starts a real PostgreSQL for the release's delivery store: the URL every control plane
        and worker gets (the same for all, from its Secret) names the bundled PostgreSQL's Service
        and its rendered user, password and database when the chart has one, else the reader's
        PostgreSQL, whose role and database the check makes as their DBA would. Then that user
        logs in to it with the URL's password and sslmode. Returns what the pods need."""
        urls = {}
        for dep in find(objects, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                if any(e["name"] == DELIVERY_STORE_ENV for e in c.get("env", [])):
                    urls[c["name"]] = pod_env(cluster, ns, c, c["name"], {})[DELIVERY_STORE_ENV]
        assert urls, f"no Deployment gets {DELIVERY_STORE_ENV}"
        assert len(set(urls.values())) == 1, "the control planes and workers get different delivery store URLs"
        url = next(iter(urls.values()))
        user, password, host, port, database, query = parse_store_url(url)
        bundled = find(objects, "StatefulSet", "postgresql")
        if bundled:
            c = container(bundled[0], "postgresql")
            penv = pod_env(cluster, ns, c, f"{bundled[0]['metadata']['name']}-0", {})
            svc = one(objects, "Service", "postgresql")
            svc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "postgresql")
            assert (host, port) == (svc["metadata"]["name"], svc_port["port"]), \
                f"the delivery store URL names {host}:{port}, not the bundled PostgreSQL's Service"
            assert svc_port["targetPort"] in [p["name"] for p in c["ports"]] + [p["containerPort"] for p in c["ports"]], \
                f"the PostgreSQL Service targets {svc_port['targetPort']}, no port of the container"
            assert (user, database) == (penv.get("POSTGRES_USER"), penv.get("POSTGRES_DB")), \
                f"the URL's user and database ({user}, {database}) are not the bundled PostgreSQL's"
            assert password == penv.get("POSTGRES_PASSWORD"), "the URL's password is not the bundled PostgreSQL's"
            where = f"the bundled PostgreSQL's ({c['image']})"
        else:
            where = f"the reader's PostgreSQL's ({host}:{port})"
        pg = Postgres(procs)
        pg.create_owner(user, password, database)
        sslmode = query.get("sslmode", "prefer")
        got = pg.psql("SELECT current_user || ' ' || current_database();", user, password, database, sslmode)
        assert got == f"{user} {database}", f"logged in as {got!r}"
        return {"url": url, "local": local_store_url(url, pg.port), "pg": pg, "user": user, "password": password,
                "database": database, "sslmode": sslmode, "where": where}

    def run_release(self, cluster, ns, objects, tokens, procs, receiver, tmp):
        etcd_url = start_etcd(procs, tmp)
        store = self.start_delivery_store(cluster, ns, objects, procs)
        # Checked with the tokens: the database password must not appear in a log either.
        tokens["DELIVERY_STORE_PASSWORD"] = store["password"]
        ready = {}  # component: [(grpc address, label)]
        cp_dep = one(objects, "Deployment", "control-plane")
        workers = find(objects, "Deployment", "worker")
        cp_url = control_plane_url(objects)
        for binary, dep in [("control-plane", cp_dep)] + [("worker", w) for w in workers]:
            replicas = dep["spec"].get("replicas")
            if replicas is None:
                hpa = one(objects, "HorizontalPodAutoscaler", binary)
                replicas = hpa["spec"].get("minReplicas", 1)
            c = container(dep, binary)
            command = c.get("command") or []
            assert command and os.path.basename(command[0]) == binary, f"{binary}: command {command}"
            started = []
            for i in range(replicas):
                label = f"{binary}-{i}"
                root = os.path.join(tmp, label)
                os.makedirs(root)
                mounts = pod_files(cluster, ns, dep, c, os.path.join(root, "volumes"))
                env = pod_env(cluster, ns, c, label, mounts)
                grpc_port, http_port = free_port(), free_port()
                env.update(PUSHWIRE_GRPC_ADDR=f"127.0.0.1:{grpc_port}", PUSHWIRE_HTTP_ADDR=f"127.0.0.1:{http_port}",
                           PUSHWIRE_DATA_DIR=os.path.join(root, "data"),
                           PUSHWIRE_ALLOW_CIDR=",".join(filter(None, [env.get("PUSHWIRE_ALLOW_CIDR"), "127.0.0.0/8"])))
                if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:1"
                if binary == "control-plane":
                    assert env.get("PUSHWIRE_ETCD_ENDPOINTS"), "the control plane is not on etcd"
                    env.update(PUSHWIRE_ETCD_ENDPOINTS=etcd_url, PUSHWIRE_ALLOW_INSECURE_HTTP="true")
                else:
                    assert env.get("PUSHWIRE_CONTROL_PLANE") == cp_url, \
                        f"worker: PUSHWIRE_CONTROL_PLANE={env.get('PUSHWIRE_CONTROL_PLANE')!r}, not {cp_url}"
                    # Every replica, as the headless Service's name stands for; each worker
                    # starts with another.
                    cps = ready["control-plane"]
                    k = i % len(cps)
                    env["PUSHWIRE_CONTROL_PLANE"] = ",".join("http://" + cp[0] for cp in cps[k:] + cps[:k])
                assert env.get(DELIVERY_STORE_ENV) == store["url"], f"{label}: not the release's delivery store URL"
                env[DELIVERY_STORE_ENV] = store["local"]
                proc, log_path = procs.start(label, [self.paths[binary]] + (c.get("args") or []), env, root)
                started.append((proc, log_path, http_port, grpc_port, label))
            deadline = time.time() + 90
            for proc, log_path, http_port, _, label in started:
                wait_http(f"http://127.0.0.1:{http_port}/readyz", proc, deadline, f"{label} /readyz", log_path)
            ready[binary] = [(f"127.0.0.1:{g}", label) for _, _, _, g, label in started]
        assert ready.get("worker"), "no workers"

        admin, cp = tokens["TOKEN"], ready["control-plane"][0][0]
        out = grpcurl(cp, admin, "pushwire.v1.IntegrationService/CreateIntegration", {
            "parent": "accounts/42", "integrationId": "receiver",
            "integration": {"displayName": "chart check", "url": f"http://127.0.0.1:{receiver.port}/webhooks",
                            "secret": "whsec_Y2hhcnQtY2hlY2stc2lnbmluZy1zZWNyZXQtMzItYnl0ZXM=",
                            "signatureSchemes": ["SIGNATURE_SCHEME_STANDARD_WEBHOOKS"]}})
        assert out.returncode == 0, f"CreateIntegration with $TOKEN: {out.stderr.strip()}"
        out = grpcurl(cp, admin, "pushwire.v1.PushScopeService/CreatePushScope", {
            "parent": "accounts/42", "pushScopeId": "all",
            "pushScope": {"integration": "accounts/42/integrations/receiver", "level": "PUSH_SCOPE_LEVEL_ACCOUNT"}})
        assert out.returncode == 0, f"CreatePushScope with $TOKEN: {out.stderr.strip()}"

        with open(os.path.join(ROOT, "common", "tests", "data", "participation-v2-completed.json")) as f:
            participation = f.read()
        request = {"account": "accounts/42", "participationJson": participation}
        worker = ready["worker"][-1][0]
        out = grpcurl(worker, "pwt_" + "x" * 43, "pushwire.v1.IngestService/PublishOne", request)
        assert out.returncode != 0 and "Unauthenticated" in out.stderr, \
            f"an unknown token was not refused with UNAUTHENTICATED: {out.stdout}{out.stderr}"
        assert not receiver.got, "the refused participation was delivered"
        # The workers learn of the new integration over WatchConfig: until then nothing matches.
        deadline = time.time() + 60
        while True:
            out = grpcurl(worker, tokens["PUBLISHER_TOKEN"], "pushwire.v1.IngestService/PublishOne", request)
            assert out.returncode == 0, f"PublishOne with $PUBLISHER_TOKEN: {out.stderr.strip()}"
            deliveries = json.loads(out.stdout).get("deliveries", [])
            if deliveries:
                break
            assert time.time() < deadline, "the workers never matched the new integration"
            time.sleep(0.5)
        assert [(d["integration"], d["outcome"]) for d in deliveries] == \
            [("accounts/42/integrations/receiver", "DELIVERY_OUTCOME_DELIVERED")], f"deliveries: {deliveries}"
        assert len(receiver.got) == 1, f"the receiver got {len(receiver.got)} requests, expected 1"
        path, headers, body = receiver.got[0]
        pid = json.loads(participation)["id"]
        assert path == "/webhooks" and str(pid) in body.decode(), f"the receiver got {path} without participation {pid}"
        assert any(k.lower() == "webhook-signature" for k in headers), "the delivery is not signed"
        pg = store["pg"]
        if all("delivery-store" in self.bins[b] for b in SECRET_FLAGS["delivery-store"]["binaries"]):
            # Every replica started at once, each running the migrations.
            try:
                n = pg.psql("SELECT count(*) FROM pushwire_schema_migrations;", store["user"], store["password"],
                            store["database"], store["sslmode"])
            except AssertionError as e:
                raise AssertionError(f"the binaries read --delivery-store but recorded no migration in it: {e}")
            assert int(n) > 0, "no migration recorded in the delivery store"
            store_note = (f"delivery store: {store['where']} URL used by every replica, "
                          f"{n} migration(s) recorded in PostgreSQL {pg.version}")
        else:
            store_note = (f"delivery store: {store['where']} URL logs in to PostgreSQL {pg.version} "
                          f"(sslmode={store['sslmode']}); these binaries do not read --delivery-store yet")
        return (f"{len(ready['control-plane'])} control planes and {len(ready['worker'])} workers ready "
                f"on etcd; participation {pid} published with $PUBLISHER_TOKEN reached the receiver; {store_note}")

    # 5. refusals and documentation

    def refuses(self, values, fragment):
        try:
            render(values)
        except helm.HelmError as e:
            assert fragment in str(e), f"refused, but not saying {fragment!r}: {e}"
            return
        raise AssertionError(f"rendered although {values} is impossible")

    def documented(self):
        undocumented = []

        def walk(node, path):
            node = deref(self.schema, node)
            for key, child in node.get("properties", {}).items():
                if key == "global":
                    continue
                target = deref(self.schema, child)
                if not target.get("description"):
                    undocumented.append(f"schema {path}{key}")
                walk(child, f"{path}{key}.")

        walk(self.schema, "")
        # Every leaf of values.yaml that the schema declares has a comment right above it.
        with open(os.path.join(CHART, "values.yaml")) as f:
            lines = f.read().splitlines()
        stack = []
        for i, line in enumerate(lines):
            m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
            if not m:
                continue
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            node = self.schema
            for _, key in stack:
                props = deref(self.schema, node).get("properties")
                if props is None or key not in props:
                    node = None
                    break
                node = props[key]
            if node is None or "properties" in deref(self.schema, node):
                continue  # inside a free-form value, or an object documented by its keys
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if not prev.startswith("#"):
                undocumented.append(f"values.yaml line {i + 1}: {'.'.join(k for _, k in stack)}")
        assert not undocumented, "undocumented values:\n" + "\n".join(undocumented)
        return None


def main():
    if sys.argv[1:2] == ["--fake"]:
        return fake_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control-plane", default=os.path.join(ROOT, "target", "debug", "control-plane"))
    parser.add_argument("--worker", default=os.path.join(ROOT, "target", "debug", "worker"))
    checks = Checks(parser.parse_args())
    print(f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
          f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {KUBE_VERSION} strict")

    for label, values in checks.value_sets.items():
        checks.run(f"helm lint --strict ({label})", checks.lint, values)
    for label, values in checks.value_sets.items():
        checks.run(f"helm template + Kubernetes {KUBE_VERSION} strict ({label})",
                   checks.render_validate, label, values)
    for label, values in VARIANTS.items():
        checks.run(f"helm template + Kubernetes {KUBE_VERSION} strict ({label})",
                   checks.render_validate, label, values)
    if "default values" in checks.renders:
        checks.run("default values: bundled etcd, control plane, autoscaled workers, encryption key and token Secrets",
                   checks.expected_objects, "default values",
                   [("Deployment", "control-plane", 1), ("Deployment", "worker", 1),
                    ("StatefulSet", "etcd", 1), ("HorizontalPodAutoscaler", "worker", 1),
                    ("Secret", "control-plane", 1), ("Secret", "tokens", 1),
                    ("StatefulSet", "postgresql", 1), ("Service", "postgresql", 1), ("Secret", "postgresql", 1),
                    ("PodDisruptionBudget", "control-plane", 1), ("PodDisruptionBudget", "worker", 1),
                    ("Service", "worker", 1), ("Service", "control-plane", 1),
                    ("Service", "control-plane-peers", 1)])
    for label in ("default values", *VARIANTS):
        if label in checks.renders and find(checks.renders[label][0], "StatefulSet", "etcd"):
            checks.run(f"bundled etcd: the control plane is given every member ({label})",
                       checks.etcd_members, label)
    if "ci/ha-values.yaml" in checks.renders:
        checks.run("ci/ha-values.yaml: external etcd and PostgreSQL, ServiceMonitors, no bundled etcd or "
                   "PostgreSQL, existing key, token and delivery store Secrets", checks.expected_objects,
                   "ci/ha-values.yaml",
                   [("StatefulSet", "etcd", 0), ("Secret", "control-plane", 0), ("Secret", "tokens", 0),
                    ("StatefulSet", "postgresql", 0), ("Secret", "postgresql", 0),
                    ("ServiceMonitor", "control-plane", 1),
                    ("ServiceMonitor", "worker", 1), ("HorizontalPodAutoscaler", "worker", 1)])
    if "ci/minimal-values.yaml" in checks.renders:
        checks.run("ci/minimal-values.yaml: one control plane with its worker, embedded store and SQLite "
                   "delivery store on a PVC", checks.expected_objects, "ci/minimal-values.yaml",
                   [("Deployment", "control-plane", 1), ("Deployment", "worker", 0),
                    ("PersistentVolumeClaim", "control-plane", 1), ("StatefulSet", "etcd", 0),
                    ("StatefulSet", "postgresql", 0), ("Secret", "postgresql", 0),
                    ("Secret", "control-plane", 0), ("Secret", "tokens", 1)])
    if "default values" in checks.renders:
        checks.run("the generated encryption key (default values): one key line, kept by helm uninstall",
                   checks.generated_key, "default values")
    checks.run("PUSHWIRE_ENCRYPTION_KEY in controlPlane.extraEnv replaces the key file", checks.key_from_env)
    for label in ("default values", "ci/minimal-values.yaml"):
        if label in checks.renders:
            checks.run(f"the generated tokens ({label}): token file, worker token mounted, kept by helm uninstall",
                       checks.generated_tokens, label)
    checks.run("a tokenFile flag with extraVolumes replaces the token Secret", checks.own_token_file)
    if "default values" in checks.renders:
        checks.run("the bundled PostgreSQL (default values): generated password kept by helm uninstall, "
                   "its URL to every control plane and worker from the Secret, PVC, probes",
                   checks.bundled_postgresql, "default values")
    for label in ("ci/ha-values.yaml", "variant: embedded store on emptyDir with separate workers, OTLP headers, "
                  "in-flight HPA only, encryption key and delivery store URL from existing Secrets"):
        if label in checks.renders:
            checks.run(f"the delivery store URL from an existing Secret ({label})", checks.existing_store, label)
    checks.run("Chart.yaml version and appVersion are the workspace version", checks.version_follows_project)

    for binary in checks.bins:
        checks.run(f"every {binary} flag is a value, and no value is an invented flag",
                   checks.flags_match_schema, binary)
    checks.run("sharedFlags are flags of both binaries", checks.shared_flags_match)
    checks.run("every flag set: its PUSHWIRE_* variable and value in the Deployment", checks.every_flag_set)
    checks.run("sharedFlags reach both Deployments", checks.shared_flags_set)

    for label in list(checks.renders):
        checks.run(f"ports, probes, env, grace, security match the binaries ({label})",
                   checks.deployments, label)

    for label in list(checks.renders):
        checks.run(f"the binaries start with the rendered environment ({label})",
                   checks.binary_accepts, label)

    checks.run("refuses the embedded store with 2 control planes", checks.refuses,
               {"etcd": {"bundled": {"enabled": False}}, "controlPlane": {"replicas": 2}},
               "exactly 1 replica")
    checks.run("refuses external etcd together with the bundled one", checks.refuses,
               {"controlPlane": {"flags": {"etcdEndpoints": ["http://etcd:2379"]}}}, "choose one")
    checks.run("refuses etcd without an encryption key", checks.refuses,
               {"encryption": {"generate": False}}, "no encryption key")
    checks.run("refuses two encryption key sources", checks.refuses,
               {"encryption": {"existingSecret": "pushwire-encryption"},
                "controlPlane": {"extraEnv": [{"name": "PUSHWIRE_ENCRYPTION_KEY", "value": "k1:x"}]}},
               "two key sources")
    checks.run("refuses tokens.existingSecret together with a tokenFile flag", checks.refuses,
               {"tokens": {"existingSecret": "pushwire-tokens"}, "worker": {"flags": {"tokenFile": "/t.json"}}},
               "both give the token file")
    checks.run("refuses the bundled PostgreSQL together with deliveryStore.existingSecret", checks.refuses,
               {"deliveryStore": {"existingSecret": "pushwire-delivery-store"}}, "choose one")
    checks.run("refuses workers with no delivery store", checks.refuses,
               {"postgresql": {"bundled": {"enabled": False}}}, "no delivery store")
    checks.run("refuses a control plane running the worker on etcd with no delivery store", checks.refuses,
               {"postgresql": {"bundled": {"enabled": False}}, "worker": {"enabled": False},
                "controlPlane": {"flags": {"withWorker": True}}}, "no delivery store")
    checks.run("refuses the delivery store URL as a plain extraEnv value", checks.refuses,
               {"worker": {"extraEnv": [{"name": "PUSHWIRE_DELIVERY_STORE", "value": "postgres://u:p@db/d"}]}},
               "deliveryStore.existingSecret")
    checks.run("refuses a misspelt flag", checks.refuses,
               {"worker": {"flags": {"retryWindw": "1m"}}}, "retryWindw")
    checks.run("refuses a host name as a listen address", checks.refuses,
               {"worker": {"flags": {"grpcAddr": "localhost:50052"}}}, "grpcAddr")
    checks.run("every value is documented", checks.documented)

    for section, values_file in (("install", None), ("production", "ha-values.yaml")):
        checks.run(f"the documented {section} steps ({'ci/' + values_file if values_file else 'default values'}) "
                   "make a release that delivers", checks.installed_delivers, section, values_file)

    print(f"chart: {checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
