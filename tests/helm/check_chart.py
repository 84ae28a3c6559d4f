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
   run by hand in a pod, not deployed; the check prints each with its reason.
4. In every render, the Deployments listen on all interfaces, their container ports are the
   ports of PUSHWIRE_GRPC_ADDR / PUSHWIRE_HTTP_ADDR (the binary's default when unset), the
   probes are GET /healthz and /readyz on the http port, Services target those ports, the
   workers' PUSHWIRE_CONTROL_PLANE is the control-plane Service, terminationGracePeriodSeconds
   exceeds the drain time, and every pod runs non-root with a read-only root filesystem. A
   control plane on etcd has an encryption key file, mounted read-only from a Secret. Each
   binary starts with its rendered environment (clap parses every value; the control plane
   reads its key file: the chart's generated Secret when the render has it, else a fresh key).
   With default values the chart generates a token Secret (admin, publisher and worker token
   and the token file of their SHA-256), kept by helm uninstall, its token file mounted into
   every component and its worker token into the workers; a tokenFile flag with extraVolumes
   replaces it. Chart.yaml's version and appVersion are the workspace version (Cargo.toml).
5. The chart refuses impossible values, and every value is documented (schema description,
   comment in values.yaml).

Ends with a `chart: N passed, N failed` line; exits non-zero on any failure.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import tomllib
import traceback

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
                     "prints counts and exits without serving): run by hand in a pod, see README "
                     "\"Deploying on Kubernetes\"; as a deployment setting no replica would serve",
    },
}
# Where the chart mounts the control plane's encryption key Secret.
ENCRYPTION_DIR = "/etc/pushwire/encryption/"
# Branches of the templates that neither the default values nor ci/ take.
VARIANTS = {
    "variant: 3-member bundled etcd on emptyDir, fixed workers, no PDBs, ConfigMap CA": {
        "etcd": {"bundled": {"replicas": 3, "persistence": {"enabled": False}}},
        "worker": {"autoscaling": {"enabled": False}, "replicas": 4, "pdb": {"enabled": False},
                   "preStopSleepSeconds": 0},
        "controlPlane": {"pdb": {"enabled": False}},
        "extraCa": {"existingConfigMap": "receivers-ca", "key": "bundle.pem"},
        "serviceAccount": {"create": False},
    },
    "variant: embedded store on emptyDir with separate workers, OTLP headers, in-flight HPA only, "
    "encryption key from an existing Secret": {
        "etcd": {"bundled": {"enabled": False}},
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
    """The flags of `binary` that configure a deployment: all but its MODE_FLAGS."""
    return {f: info for f, info in flags.items() if f not in MODE_FLAGS.get(binary, {})}


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
                name, port = services["control-plane"]
                want = f"http://{name}:{port}"
                assert got == want, f"worker PUSHWIRE_CONTROL_PLANE={got!r}, expected the Service {want!r}"
        for pod_owner in find(objects, "Deployment") + find(objects, "StatefulSet"):
            self.hardened(pod_owner)
        return ", ".join(checked)

    def deployment(self, label, objects, binary, dep):
        flags = self.bins[binary]
        envs = {info["env"] for info in flags.values()}
        c = container(dep, binary)
        env = env_of(c)
        unknown = sorted(n for n in env if n.startswith("PUSHWIRE_") and n not in envs)
        assert not unknown, f"{binary}: env vars that are no flag of the binary: {unknown}"
        if binary == "control-plane":
            self.encryption_key(objects, dep, c, env)

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
        addresses (free loopback ports), the store (an embedded one in a temporary directory),
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
                    ("PodDisruptionBudget", "control-plane", 1), ("PodDisruptionBudget", "worker", 1),
                    ("Service", "worker", 1), ("Service", "control-plane", 1)])
    if "ci/ha-values.yaml" in checks.renders:
        checks.run("ci/ha-values.yaml: external etcd, ServiceMonitors, no bundled etcd, existing key and "
                   "token Secrets", checks.expected_objects, "ci/ha-values.yaml",
                   [("StatefulSet", "etcd", 0), ("Secret", "control-plane", 0), ("Secret", "tokens", 0),
                    ("ServiceMonitor", "control-plane", 1),
                    ("ServiceMonitor", "worker", 1), ("HorizontalPodAutoscaler", "worker", 1)])
    if "ci/minimal-values.yaml" in checks.renders:
        checks.run("ci/minimal-values.yaml: one control plane with its worker, embedded store on a PVC",
                   checks.expected_objects, "ci/minimal-values.yaml",
                   [("Deployment", "control-plane", 1), ("Deployment", "worker", 0),
                    ("PersistentVolumeClaim", "control-plane", 1), ("StatefulSet", "etcd", 0),
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
    checks.run("refuses a misspelt flag", checks.refuses,
               {"worker": {"flags": {"retryWindw": "1m"}}}, "retryWindw")
    checks.run("refuses a host name as a listen address", checks.refuses,
               {"worker": {"flags": {"grpcAddr": "localhost:50052"}}}, "grpcAddr")
    checks.run("every value is documented", checks.documented)

    print(f"chart: {checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
