"""Checks on rendered llmq manifests (`kubectl kustomize` output) and on the Dockerfile.

Each check returns a list of problems (empty when all is well), so test_checks_catch.py can
break a copy of the manifests and see the check notice. conftest.py renders the overlays.
"""

from __future__ import annotations

import base64
import copy
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

REPO = Path(__file__).resolve().parents[2]

# The keys KEDA's redis-streams scaler reads from a trigger's metadata.
REDIS_STREAMS_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "username", "usernameFromEnv", "password", "passwordFromEnv",
    "stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
    "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl",
}
# The keys KEDA's redis (list length) scaler reads from a trigger's metadata: the room's
# backlog list of each queue (docs/kubernetes.md).
REDIS_LIST_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "username", "usernameFromEnv", "password", "passwordFromEnv",
    "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl",
}
# Keys that would switch the scaler away from stream-length (XLEN) mode: see
# overlays/keda/scaledobject.yaml for why each is wrong for llmq.
FORBIDDEN_TRIGGER_KEYS = {"consumerGroup", "lagCount", "pendingEntriesCount", "activationLagCount"}
# What a TriggerAuthentication may hand the redis-streams scaler.
REDIS_AUTH_PARAMS = {"address", "host", "port", "username", "password"}

POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume"}
# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
# The worker allows itself this long after LLMQ_GRACE to hand unfinished tasks back.
HAND_BACK_SECONDS = 30
# The keys of the Secret the scheduler may read: it calls no provider, so no API key.
SCHEDULER_SECRET_KEYS = {"REDIS_URL", "DATABASE_URL"}

# What each pod may reach (base/networkpolicy.yaml), as (protocol, port).
DNS = {("UDP", 53), ("TCP", 53)}
REDIS = {("TCP", 6379), ("TCP", 6380)}
POSTGRES = {("TCP", 5432)}
HTTPS = {("TCP", 443)}
OTLP = {("TCP", 4317), ("TCP", 4318)}
EGRESS = {
    "llmq-worker": DNS | REDIS | POSTGRES | HTTPS | OTLP,
    "llmq-scheduler": DNS | REDIS | POSTGRES | OTLP,
    "llmq": DNS | POSTGRES,
    # The web page (components/web, optional): no provider, no collector.
    "llmq web": DNS | REDIS | POSTGRES,
    # The front door (components/serve, optional): Redis, and Postgres for files and batches.
    "llmq serve": DNS | REDIS | POSTGRES,
}
PODS = {"llmq-worker": "the worker pods", "llmq-scheduler": "the scheduler pods",
        "llmq": "the migration Job's pods", "llmq web": "the web page's pods",
        "llmq serve": "the front door's pods"}
# The components an overlay may leave out.
OPTIONAL = {"llmq web", "llmq serve"}
# The keys of the Secret llmq the front door may read: Redis, and Postgres for files and
# batches; no provider key.
SERVE_SECRET_KEYS = {"REDIS_URL", "DATABASE_URL"}
# The keys of the Secret the web page may read: no provider key.
WEB_SECRET_KEYS = {"REDIS_URL", "DATABASE_URL", "LLMQ_WEB_TOKEN"}


# ---------------------------------------------------------------- access helpers

def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def named(docs, kind, name):
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return found[0] if found else None


def pod_spec(obj):
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_spec_labels(obj):
    """The labels of the pods a workload makes."""
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels")
    return obj["spec"]["template"]["metadata"].get("labels")


def workloads(docs):
    return [d for d in docs if d.get("kind") in POD_OWNERS | {"CronJob"}]


def containers(spec):
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def binary(container):
    """The program a container runs: command[0], as the manifests name it."""
    command = container.get("command") or []
    return command[0] if command else None


def workload_running(docs, program):
    """The workload whose container runs /usr/local/bin/<program> (names may carry a prefix).
    `llmq web` is the web page's, `llmq serve` the front door's; plain `llmq` any other llmq
    command's (the migration Job)."""
    name, _, sub = program.partition(" ")
    for w in workloads(docs):
        for c in containers(pod_spec(w)):
            if not binary(c) or Path(binary(c)).name != name:
                continue
            first = (c.get("args") or [None])[0]
            if name == "llmq" and (first if first in ("web", "serve") else "") != sub:
                continue
            return w, c
    return None, None


def long_running(docs, problems):
    """(program, workload, container, env) of the worker and the scheduler; a missing one is
    added to `problems` and skipped."""
    for program in ("llmq-worker", "llmq-scheduler"):
        w, c = workload_running(docs, program)
        if w is None:
            problems.append(f"no workload runs {program}")
            continue
        yield program, w, c, env_of(docs, w, c)


def secret_data(secret):
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def env_of(docs, workload, container):
    """The container's environment as Kubernetes would build it: envFrom, then env.
    Values from the downward API are None; unresolved references raise KeyError."""
    ns_docs = docs  # kustomize output: one namespace, so names are unique per kind
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = named(ns_docs, "ConfigMap", source["configMapRef"]["name"])
            if cm is None:
                raise KeyError(f"ConfigMap {source['configMapRef']['name']}")
            env.update(cm.get("data") or {})
        if "secretRef" in source:
            s = named(ns_docs, "Secret", source["secretRef"]["name"])
            if s is None:
                raise KeyError(f"Secret {source['secretRef']['name']}")
            env.update(secret_data(s))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e.get("valueFrom", {})
        for field, kind, data in (("configMapKeyRef", "ConfigMap", lambda o: o.get("data") or {}),
                                  ("secretKeyRef", "Secret", secret_data)):
            if field not in ref:
                continue
            r = ref[field]
            obj = named(ns_docs, kind, r["name"])
            values = data(obj) if obj is not None else {}
            if r["key"] in values:
                env[e["name"]] = values[r["key"]]
            elif not r.get("optional"):
                raise KeyError(f"{kind} {r['name']} key {r['key']}" if obj is not None
                               else f"{kind} {r['name']}")
            break
        else:
            env[e["name"]] = None
    return env


def secret_refs(container):
    """[(secret name, key or None for all of it)] a container's environment takes."""
    refs = [(s["secretRef"]["name"], None) for s in container.get("envFrom", []) if "secretRef" in s]
    for e in container.get("env", []):
        r = (e.get("valueFrom") or {}).get("secretKeyRef")
        if r:
            refs.append((r["name"], r["key"]))
    return refs


def duration_seconds(text):
    """humantime-style durations as llmq takes them: "30s", "1m", "1m30s", "500ms", "2h"."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)\s*([a-z]+)", text.strip())
    if not parts or re.sub(r"\s", "", text) != "".join(n + u for n, u in parts):
        raise ValueError(f"not a duration: {text!r}")
    total = 0.0
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown unit in {text!r}")
        total += int(number) * units[unit]
    return total


def queues_of(env):
    return [q.strip() for q in (env.get("LLMQ_QUEUES") or "default").split(",") if q.strip()]


def listen_port(listen):
    return int(listen.rsplit(":", 1)[1])


def worker_settings(docs):
    """(worker deployment, container, env) or raises AssertionError."""
    w, c = workload_running(docs, "llmq-worker")
    assert w is not None, "no workload runs /usr/local/bin/llmq-worker"
    return w, c, env_of(docs, w, c)


# ---------------------------------------------------------------- checks

def check_namespace(docs):
    problems = []
    namespaces = by_kind(docs, "Namespace")
    if len(namespaces) != 1:
        return [f"expected one Namespace, found {len(namespaces)}"]
    ns = namespaces[0]
    name = ns["metadata"]["name"]
    labels = ns["metadata"].get("labels") or {}
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append("the Namespace does not enforce the restricted Pod Security Standard")
    for d in docs:
        if d["kind"] in CLUSTER_SCOPED:
            continue
        if d["metadata"].get("namespace") != name:
            problems.append(f"{d['kind']}/{d['metadata']['name']} is not in namespace {name}")
    return problems


def check_labels(docs):
    problems = []
    for d in docs:
        labels = d["metadata"].get("labels") or {}
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/part-of"):
            if key not in labels:
                problems.append(f"{d['kind']}/{d['metadata']['name']} has no label {key}")
    return problems


def check_references(docs):
    """Every ConfigMap, Secret and ServiceAccount a pod names exists, with the keys it reads."""
    problems = []
    for w in workloads(docs):
        spec = pod_spec(w)
        where = f"{w['kind']}/{w['metadata']['name']}"
        sa = spec.get("serviceAccountName")
        if sa and named(docs, "ServiceAccount", sa) is None:
            problems.append(f"{where}: ServiceAccount {sa} does not exist")
        for v in spec.get("volumes", []):
            if "configMap" in v and named(docs, "ConfigMap", v["configMap"]["name"]) is None:
                problems.append(f"{where}: volume {v['name']}: ConfigMap {v['configMap']['name']} missing")
            if "secret" in v and named(docs, "Secret", v["secret"]["secretName"]) is None:
                problems.append(f"{where}: volume {v['name']}: Secret {v['secret']['secretName']} missing")
        for c in containers(spec):
            try:
                env_of(docs, w, c)
            except (KeyError, AttributeError, TypeError) as e:
                problems.append(f"{where}/{c['name']}: unresolved reference {e}")
            if not c.get("image"):
                problems.append(f"{where}/{c['name']}: no image")
    return problems


def check_provider_file(docs):
    """LLMQ_CONFIG points into the mounted provider ConfigMap, and every ${VAR} it needs is set."""
    problems = []
    for program, w, c, env in long_running(docs, problems):
        path = env.get("LLMQ_CONFIG")
        if not path:
            problems.append(f"{program}: LLMQ_CONFIG is not set")
            continue
        directory, file = str(Path(path).parent), Path(path).name
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
        volume_name = mounts.get(directory)
        volume = next((v for v in pod_spec(w).get("volumes", []) if v["name"] == volume_name), None)
        if volume is None or "configMap" not in volume:
            problems.append(f"{program}: nothing from a ConfigMap is mounted at {directory}")
            continue
        cm = named(docs, "ConfigMap", volume["configMap"]["name"])
        text = (cm or {}).get("data", {}).get(file)
        if text is None:
            problems.append(f"{program}: the mounted ConfigMap has no key {file}")
            continue
        # llmq expands ${VAR} in the values of the parsed file (comments are gone by then).
        # The scheduler reads it without its secrets: their ${VAR}s it neither reads nor needs.
        parsed = yaml.safe_load(text)
        if program == "llmq-scheduler":
            parsed = without_secrets(parsed)
        values = " ".join(_strings(parsed))
        for var, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", values):
            if not default and not env.get(var):
                problems.append(f"{program}: the provider file needs ${{{var}}}, which is not set")
    return problems


def without_secrets(provider_file):
    """The parsed provider file without what llmq-scheduler skips (Config::load_without_secrets):
    each provider's api_key and command.env, and each check's env."""
    f = copy.deepcopy(provider_file) or {}
    for p in f.get("providers") or []:
        if isinstance(p, dict):
            p.pop("api_key", None)
            if isinstance(p.get("command"), dict):
                p["command"].pop("env", None)
    for c in (f.get("checks") or {}).values():
        if isinstance(c, dict):
            c.pop("env", None)
    return f


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def check_restricted(docs):
    """The restricted Pod Security Standard, plus a read-only root and no API token."""
    problems = []
    for w in workloads(docs):
        spec = pod_spec(w)
        where = f"{w['kind']}/{w['metadata']['name']}"
        pod = spec.get("securityContext") or {}
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(host):
                problems.append(f"{where}: {host}")
        for v in spec.get("volumes", []):
            kinds = set(v) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                problems.append(f"{where}: volume {v['name']} of type {kinds} is not allowed")
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            at = f"{where}/{c['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{at}: capabilities do not drop ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                problems.append(f"{at}: adds capabilities {caps['add']}")
            if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            uid = sc.get("runAsUser", pod.get("runAsUser"))
            if not isinstance(uid, int) or uid == 0:
                problems.append(f"{at}: runAsUser is not a non-zero number ({uid!r})")
            seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{at}: seccompProfile is {seccomp!r}, not RuntimeDefault")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem is not true")
            resources = c.get("resources") or {}
            if not (resources.get("requests") or {}).get("memory"):
                problems.append(f"{at}: no memory request")
            if not (resources.get("limits") or {}).get("memory"):
                problems.append(f"{at}: no memory limit")
    return problems


def _port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def check_probes(docs):
    """Worker and scheduler: liveness on /healthz, readiness on /readyz, both on the port the
    process listens on (LLMQ_METRICS_LISTEN), which is also the one Prometheus is told."""
    problems = []
    for program, w, c, env in long_running(docs, problems):
        listen = env.get("LLMQ_METRICS_LISTEN")
        if not listen:
            problems.append(f"{program}: LLMQ_METRICS_LISTEN is not set, so no probe can answer")
            continue
        port = listen_port(listen)
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe) or {}).get("httpGet")
            if not get:
                problems.append(f"{program}: no httpGet {probe}")
                continue
            if get.get("path") != path:
                problems.append(f"{program}: {probe} asks {get.get('path')}, not {path}")
            if _port(c, get.get("port")) != port:
                problems.append(f"{program}: {probe} port is not {port} (LLMQ_METRICS_LISTEN)")
        startup = (c.get("startupProbe") or {}).get("httpGet")
        if startup and (startup.get("path") != "/healthz" or _port(c, startup.get("port")) != port):
            problems.append(f"{program}: startupProbe is not /healthz on {port}")
        annotations = w["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/port", str(port)) != str(port):
            problems.append(f"{program}: prometheus.io/port is not {port}")
    return problems


def check_worker(docs):
    problems = []
    w, c, env = worker_settings(docs)
    spec = pod_spec(w)
    grace = duration_seconds(env.get("LLMQ_GRACE", "30s"))
    period = spec.get("terminationGracePeriodSeconds", 30)
    if period < grace + HAND_BACK_SECONDS:
        problems.append(
            f"terminationGracePeriodSeconds {period} < LLMQ_GRACE {grace:g}s + {HAND_BACK_SECONDS}s: "
            "the pod would be killed while the worker drains"
        )
    if "replicas" in w["spec"]:
        problems.append("the worker Deployment sets replicas, which every apply would reset")
    try:
        if int(env.get("LLMQ_CONCURRENCY", "")) < 1:
            problems.append("LLMQ_CONCURRENCY is below 1")
    except ValueError:
        problems.append(f"LLMQ_CONCURRENCY is not a number: {env.get('LLMQ_CONCURRENCY')!r}")
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget")
            if _selects(p["spec"].get("selector"), w["spec"]["template"]["metadata"].get("labels"))]
    if len(pdbs) != 1 or pdbs[0]["spec"].get("maxUnavailable") != 1:
        problems.append("the worker pods need one PodDisruptionBudget with maxUnavailable: 1")
    return problems


def _selects(selector, labels):
    if not selector or not labels:
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def check_scheduler(docs):
    problems = []
    s, c = workload_running(docs, "llmq-scheduler")
    if s is None:
        return ["no workload runs llmq-scheduler"]
    if s["kind"] != "Deployment" or s["spec"].get("replicas", 1) < 2:
        problems.append("the scheduler needs a Deployment of at least 2 replicas (one stands by)")
    w, _, worker_env = worker_settings(docs)
    env = env_of(docs, s, c)
    if env.get("LLMQ_QUEUES") is not None and queues_of(env) != queues_of(worker_env):
        problems.append("the scheduler's LLMQ_QUEUES differ from the workers'")
    worker_port = listen_port(worker_env.get("LLMQ_METRICS_LISTEN", "0:0"))
    if listen_port(env.get("LLMQ_METRICS_LISTEN", "0:0")) == worker_port:
        problems.append("the scheduler and the worker listen on the same metrics port")
    return problems


def check_web(docs):
    """The web page, where an overlay adds it: one replica of `llmq web` on loopback, its
    token from a Secret (never a literal), no provider key, probes that run inside the pod."""
    w, c = workload_running(docs, "llmq web")
    if w is None:
        return []
    problems = []
    if w["kind"] != "Deployment" or w["spec"].get("replicas", 1) != 1:
        problems.append("llmq web runs as a Deployment of one replica (its sessions are in memory)")
    for e in c.get("env", []):
        if e["name"] == "LLMQ_WEB_TOKEN" and "secretKeyRef" not in (e.get("valueFrom") or {}):
            problems.append("LLMQ_WEB_TOKEN is not taken from a Secret")
    for secret, key in secret_refs(c):
        if key is None or key not in WEB_SECRET_KEYS:
            problems.append(f"llmq web reads {key or 'every key'} of the Secret {secret}; "
                            f"it needs only {', '.join(sorted(WEB_SECRET_KEYS))}")
    listen = env_of(docs, w, c).get("LLMQ_WEB_LISTEN") or "127.0.0.1:8080"
    if not listen.startswith(("127.0.0.1:", "[::1]:", "localhost:")):
        problems.append(f"llmq web listens on {listen}, not loopback: put your own ingress "
                        "and authentication in front in your overlay, not here")
    want = ["/usr/local/bin/llmq", "web", "--health-check"]
    for probe in ("livenessProbe", "readinessProbe"):
        command = ((c.get(probe) or {}).get("exec") or {}).get("command")
        if command != want:
            problems.append(f"llmq web: {probe} is not `{' '.join(want)}` (the kubelet cannot "
                            "reach a loopback port)")
    return problems


def check_serve(docs):
    """The front door, where an overlay adds it: at least two replicas of `llmq serve`
    beyond loopback (it refuses that without keys), its keys a file from a Secret, only Redis
    and Postgres of the Secret llmq, /healthz probes on its port, a Service and a
    PodDisruptionBudget."""
    w, c = workload_running(docs, "llmq serve")
    if w is None:
        return []
    problems = []
    if w["kind"] != "Deployment" or w["spec"].get("replicas", 1) < 2:
        problems.append("llmq serve runs as a Deployment of two replicas at least")
    env = env_of(docs, w, c)
    for secret, key in secret_refs(c):
        if key is None or key not in SERVE_SECRET_KEYS:
            problems.append(f"llmq serve reads {key or 'every key'} of the Secret {secret}; "
                            f"it needs only {', '.join(sorted(SERVE_SECRET_KEYS))}")
    keys = env.get("LLMQ_SERVE_KEYS")
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
    volume = next((v for v in pod_spec(w).get("volumes", [])
                   if keys and v["name"] == mounts.get(str(Path(keys).parent))), None)
    if volume is None or "secret" not in volume:
        problems.append("LLMQ_SERVE_KEYS is not a file of a mounted Secret")
    port = listen_port(env.get("LLMQ_SERVE_LISTEN") or "127.0.0.1:8000")
    for probe in ("livenessProbe", "readinessProbe"):
        get = (c.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != "/healthz" or _port(c, get.get("port")) != port:
            problems.append(f"llmq serve: {probe} is not /healthz on {port}")
    labels = pod_spec_labels(w)
    services = [s for s in by_kind(docs, "Service")
                if _selects({"matchLabels": s["spec"].get("selector")}, labels)]
    if not any(_port(c, p.get("targetPort")) == port for s in services for p in s["spec"].get("ports", [])):
        problems.append(f"no Service sends to llmq serve's port {port}")
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget") if _selects(p["spec"].get("selector"), labels)]
    if not pdbs:
        problems.append("no PodDisruptionBudget keeps a replica of llmq serve up")
    return problems


def check_migration_job(docs):
    problems = []
    job, c = workload_running(docs, "llmq")
    if job is None or job["kind"] != "Job":
        return ["no Job runs /usr/local/bin/llmq"]
    if c.get("args") != ["migrate"]:
        problems.append(f"the migration Job runs llmq {c.get('args')}, not llmq migrate")
    for key in ("backoffLimit", "ttlSecondsAfterFinished"):
        if not isinstance(job["spec"].get(key), int):
            problems.append(f"the migration Job has no {key}")
    if pod_spec(job).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("the migration Job's restartPolicy must be Never or OnFailure")
    if not env_of(docs, job, c).get("DATABASE_URL"):
        problems.append("the migration Job has no DATABASE_URL")
    return problems


def _slow_scale_down(behavior):
    down = (behavior or {}).get("scaleDown") or {}
    if down.get("stabilizationWindowSeconds", 0) < 300:
        return ["scaleDown.stabilizationWindowSeconds is under 300"]
    policies = down.get("policies") or []
    if not policies:
        return ["scaleDown has no policy"]
    fast = [p for p in policies if not (p.get("type") == "Pods" and p.get("value", 99) <= 1
                                        and p.get("periodSeconds", 0) >= 60)]
    return [f"scaleDown policy faster than 1 pod a minute: {p}" for p in fast]


def redis_url_parts(env):
    url = urlsplit(env["REDIS_URL"])
    db = url.path.strip("/") or "0"
    return {
        "address": f"{url.hostname}:{url.port or 6379}",
        "password": unquote(url.password) if url.password else "",
        "username": unquote(url.username) if url.username else "",
        "db": db,
        "tls": url.scheme == "rediss",
    }


def check_keda(docs):
    problems = []
    w, _, env = worker_settings(docs)
    queues = queues_of(env)
    concurrency = env.get("LLMQ_CONCURRENCY")
    redis = redis_url_parts(env)
    objects = by_kind(docs, "ScaledObject")
    if len(objects) != 1:
        return [f"expected one ScaledObject, found {len(objects)}"]
    so = objects[0]
    # The front door's HPA (components/serve) scales its own Deployment; one on the workers
    # would fight the ScaledObject.
    worker = (so["spec"].get("scaleTargetRef") or {}).get("name")
    if any(((h.get("spec") or {}).get("scaleTargetRef") or {}).get("name") == worker
           for h in by_kind(docs, "HorizontalPodAutoscaler")):
        problems.append("an HPA beside the ScaledObject: two autoscalers would fight over the workers")
    spec = so["spec"]
    target = spec.get("scaleTargetRef") or {}
    if target.get("kind", "Deployment") != "Deployment" or target.get("name") != w["metadata"]["name"]:
        problems.append(f"the ScaledObject targets {target}, not the worker Deployment")
    if spec.get("minReplicaCount") != 0:
        problems.append("minReplicaCount is not 0")
    if not isinstance(spec.get("maxReplicaCount"), int) or spec["maxReplicaCount"] < 1:
        problems.append("maxReplicaCount is missing or below 1")
    fallback = spec.get("fallback") or {}
    if not (isinstance(fallback.get("failureThreshold"), int)
            and isinstance(fallback.get("replicas"), int) and fallback["replicas"] >= 1):
        problems.append("no fallback {failureThreshold, replicas >= 1}")
    behavior = (((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {})
                .get("behavior"))
    problems += _slow_scale_down(behavior)
    # Per queue, its stream's trigger and its room's (the backlog list of tasks with a
    # priority or tenant, which are not stream entries).
    kinds = {
        "redis-streams": ("stream", "streamLength", r"llmq:\{([^{}]+)\}:stream",
                          "llmq:{<queue>}:stream", REDIS_STREAMS_KEYS),
        "redis": ("listName", "listLength", r"llmq:\{([^{}]+)\}:room:backlog",
                  "llmq:{<queue>}:room:backlog", REDIS_LIST_KEYS),
    }
    seen = {kind: [] for kind in kinds}
    for i, t in enumerate(spec.get("triggers") or []):
        at = f"trigger {i}"
        if t.get("type") not in kinds:
            problems.append(f"{at}: type {t.get('type')!r}, not redis-streams or redis")
            continue
        name_key, length_key, pattern, shape, allowed = kinds[t["type"]]
        if t.get("metricType", "AverageValue") != "AverageValue":
            problems.append(f"{at}: metricType must be AverageValue (fallback needs it)")
        meta = t.get("metadata") or {}
        for key, value in meta.items():
            if key not in allowed:
                problems.append(f"{at}: {key} is not a {t['type']} metadata key")
            if not isinstance(value, str):
                problems.append(f"{at}: {key} is {value!r}, not a string")
        for key in sorted(FORBIDDEN_TRIGGER_KEYS & set(meta)):
            problems.append(f"{at}: {key} takes the scaler out of stream-length (XLEN) mode")
        for key in ("address", "host", "password", "username"):
            if key in meta:
                problems.append(f"{at}: {key} in metadata; it comes from the TriggerAuthentication")
        m = re.fullmatch(pattern, str(meta.get(name_key, "")))
        if not m:
            problems.append(f"{at}: {name_key} {meta.get(name_key)!r} is not {shape}")
        elif m.group(1) not in queues:
            problems.append(f"{at}: queue {m.group(1)} is not in LLMQ_QUEUES {queues}")
        else:
            seen[t["type"]].append(m.group(1))
        if meta.get(length_key) != concurrency:
            problems.append(f"{at}: {length_key} {meta.get(length_key)!r} != LLMQ_CONCURRENCY {concurrency!r}")
        if meta.get("databaseIndex", "0") != redis["db"]:
            problems.append(f"{at}: databaseIndex {meta.get('databaseIndex')!r} != REDIS_URL's {redis['db']}")
        if meta.get("enableTLS", "false") != ("true" if redis["tls"] else "false"):
            problems.append(f"{at}: enableTLS does not match REDIS_URL's scheme")
        problems += _check_trigger_auth(docs, so, t, redis, at)
    for q in queues:
        streams, rooms = seen["redis-streams"].count(q), seen["redis"].count(q)
        if streams != 1:
            problems.append(f"queue {q} has {streams} triggers, not one")
        if rooms != 1:
            problems.append(f"queue {q} has {rooms} room triggers, not one: "
                            "tasks with a priority or tenant would not size the pool")
    return problems


def _check_trigger_auth(docs, so, trigger, redis, at):
    ref = trigger.get("authenticationRef") or {}
    kind = ref.get("kind", "TriggerAuthentication")
    auth = named(docs, kind, ref.get("name"))
    if auth is None:
        return [f"{at}: authenticationRef {kind}/{ref.get('name')} does not exist"]
    if kind == "TriggerAuthentication" and auth["metadata"].get("namespace") != so["metadata"].get("namespace"):
        return [f"{at}: the TriggerAuthentication is in another namespace"]
    problems = []
    params = {}
    for r in auth["spec"].get("secretTargetRef") or []:
        secret = named(docs, "Secret", r.get("name"))
        if r.get("parameter") not in REDIS_AUTH_PARAMS:
            problems.append(f"{at}: auth parameter {r.get('parameter')!r} is not one redis-streams takes")
        if secret is None or r.get("key") not in secret_data(secret):
            problems.append(f"{at}: auth parameter {r.get('parameter')} names a missing secret key")
            continue
        params[r["parameter"]] = secret_data(secret)[r["key"]]
    if "address" not in params and "host" not in params:
        problems.append(f"{at}: the TriggerAuthentication gives no address")
    elif params.get("address", redis["address"]) != redis["address"]:
        problems.append(f"{at}: KEDA's address {params['address']} is not REDIS_URL's {redis['address']}")
    if params.get("password", "") != redis["password"]:
        problems.append(f"{at}: KEDA's Redis password is not REDIS_URL's")
    return problems


def check_static_hpa(docs):
    problems = []
    w, _, env = worker_settings(docs)
    queues = queues_of(env)
    if by_kind(docs, "ScaledObject"):
        problems.append("a ScaledObject in the static overlay")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if len(hpas) != 1:
        return problems + [f"expected one HorizontalPodAutoscaler, found {len(hpas)}"]
    spec = hpas[0]["spec"]
    if spec.get("scaleTargetRef", {}).get("name") != w["metadata"]["name"]:
        problems.append("the HPA does not target the worker Deployment")
    if spec.get("minReplicas", 1) < 1:
        problems.append("an HPA cannot go below one replica")
    problems += _slow_scale_down(spec.get("behavior"))
    seen = []
    for m in spec.get("metrics") or []:
        external = m.get("external") or {}
        metric = external.get("metric") or {}
        if m.get("type") != "External" or metric.get("name") != "llmq_queue_backlog":
            problems.append(f"metric {m} is not External llmq_queue_backlog")
            continue
        queue = ((metric.get("selector") or {}).get("matchLabels") or {}).get("queue")
        if queue not in queues:
            problems.append(f"llmq_queue_backlog selects queue {queue!r}, not one in LLMQ_QUEUES {queues}")
        seen.append(queue)
        target = external.get("target") or {}
        if target.get("type") != "AverageValue":
            problems.append("the backlog target is not AverageValue")
        if str(target.get("averageValue")) != env.get("LLMQ_CONCURRENCY"):
            problems.append(f"averageValue {target.get('averageValue')!r} != LLMQ_CONCURRENCY "
                            f"{env.get('LLMQ_CONCURRENCY')!r}")
    for q in queues:
        if seen.count(q) != 1:
            problems.append(f"queue {q} has {seen.count(q)} backlog metrics, not one")
    return problems


def check_scheduler_secrets(docs):
    """The scheduler gets REDIS_URL and DATABASE_URL from the Secret, and nothing else of it:
    no envFrom of a Secret, no provider API key, no Secret mounted."""
    s, c = workload_running(docs, "llmq-scheduler")
    if s is None:
        return ["no workload runs llmq-scheduler"]
    problems = []
    read = set()
    for secret, key in secret_refs(c):
        if key is None:
            problems.append(f"the scheduler takes every key of the Secret {secret} (envFrom), "
                            "provider API keys included")
        elif key not in SCHEDULER_SECRET_KEYS:
            problems.append(f"the scheduler reads {key} from the Secret {secret}; "
                            f"it needs only {' and '.join(sorted(SCHEDULER_SECRET_KEYS))}")
        else:
            read.add(key)
    for key in sorted(SCHEDULER_SECRET_KEYS - read):
        problems.append(f"the scheduler does not get {key} from the Secret")
    for v in pod_spec(s).get("volumes", []):
        if "secret" in v:
            problems.append(f"the scheduler mounts the Secret {v['secret']['secretName']}")
    return problems


def image_tag(image):
    """(tag, digest) of an image reference; either may be None."""
    rest, _, digest = image.partition("@")
    last = rest.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else None
    return tag, digest or None


def check_image_tags(docs):
    """Every container's image is pinned: a tag other than `latest`, or a digest."""
    problems = []
    for w in workloads(docs):
        for c in containers(pod_spec(w)):
            at = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
            tag, digest = image_tag(c.get("image") or "")
            if digest:
                continue
            if tag is None:
                problems.append(f"{at}: image {c.get('image')!r} has no tag (it would pull latest)")
            elif tag == "latest":
                problems.append(f"{at}: image {c.get('image')!r} uses the tag latest")
    return problems


def _matches(selector, labels):
    """Whether a label selector selects these labels ({} selects everything)."""
    if selector is None:
        return False
    labels = labels or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        if (op == "In" and labels.get(key) not in values) \
                or (op == "NotIn" and key in labels and labels[key] in values) \
                or (op == "Exists" and key not in labels) \
                or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _rule_ports(rule, container, where, problems):
    """{(protocol, port)} a rule opens; a rule without ports opens every port (a problem)."""
    if not rule.get("ports"):
        problems.append(f"{where} allows every port")
        return set()
    opened = set()
    for p in rule["ports"]:
        port = p.get("port")
        if p.get("endPort") is not None:
            problems.append(f"{where} allows the range {port}-{p['endPort']}")
        if isinstance(port, str) and container is not None:
            port = _port(container, port) or port
        if port is None:
            problems.append(f"{where} allows every port of {p.get('protocol', 'TCP')}")
            continue
        opened.add((p.get("protocol", "TCP"), port))
    return opened


def _describe(ports):
    return ", ".join(f"{port}/{proto}" for proto, port in sorted(ports, key=lambda x: (str(x[1]), x[0])))


def check_network_policies(docs):
    """A NetworkPolicy isolates the worker, scheduler and migration pods both ways: ingress
    only on the metrics port (none for the Job), egress only on the ports of EGRESS."""
    problems = []
    policies = by_kind(docs, "NetworkPolicy")
    for program, egress in EGRESS.items():
        w, c = workload_running(docs, program)
        if w is None:
            if program not in OPTIONAL:
                problems.append(f"no workload runs {program}")
            continue
        pods = PODS[program]
        labels = pod_spec_labels(w)
        selecting = [p for p in policies if _matches(p["spec"].get("podSelector"), labels)]
        if not selecting:
            problems.append(f"no NetworkPolicy selects {pods}")
            continue
        ingress, egress_open = set(), set()
        isolated = set()
        for p in selecting:
            where = f"NetworkPolicy/{p['metadata']['name']}"
            types = p["spec"].get("policyTypes")
            if not types:
                problems.append(f"{where} does not list its policyTypes")
                types = ["Ingress"] + (["Egress"] if "egress" in p["spec"] else [])
            isolated |= set(types)
            if "Ingress" in types:
                for i, rule in enumerate(p["spec"].get("ingress") or []):
                    ingress |= _rule_ports(rule, c, f"{where} ingress[{i}]", problems)
            if "Egress" in types:
                for i, rule in enumerate(p["spec"].get("egress") or []):
                    egress_open |= _rule_ports(rule, None, f"{where} egress[{i}]", problems)
        for kind in ("Ingress", "Egress"):
            if kind not in isolated:
                problems.append(f"no NetworkPolicy restricts the {kind.lower()} of {pods}")
        if program in ("llmq", "llmq web"):  # the Job, and the page on loopback
            expected_in = set()
        elif program == "llmq serve":  # its callers, probes and Prometheus, on one port
            env = env_of(docs, w, c)
            expected_in = {("TCP", listen_port(env.get("LLMQ_SERVE_LISTEN") or "0:8000"))}
        else:
            env = env_of(docs, w, c)
            expected_in = {("TCP", listen_port(env.get("LLMQ_METRICS_LISTEN", "0:0")))}
        if "Ingress" in isolated and ingress != expected_in:
            problems.append(f"{pods} accept {_describe(ingress) or 'nothing'}, "
                            f"not {_describe(expected_in) or 'nothing'}")
        if "Egress" in isolated:
            for missing in sorted(egress - egress_open):
                problems.append(f"{pods} cannot reach port {_describe({missing})}")
            for extra in sorted(egress_open - egress, key=str):
                problems.append(f"{pods} may also reach port {_describe({extra})}")
    return problems


def workspace_version():
    """[workspace.package] version of the root Cargo.toml: what the image is tagged with."""
    return tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]


# ---------------------------------------------------------------- the Dockerfile

def dockerfile_stages(text):
    """[(from, name, [instructions])] with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    stages = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            parts = rest.split()
            image = next(p for p in parts if not p.startswith("--"))
            name = parts[parts.index(image) + 2] if "AS" in [p.upper() for p in parts] else None
            stages.append((image, name, []))
        elif stages:
            stages[-1][2].append((word.upper(), rest.strip()))
    return stages


def cargo_binaries():
    """{binary name: package name} for the workspace's members."""
    root = tomllib.loads((REPO / "Cargo.toml").read_text())
    found = {}
    for member in root["workspace"]["members"]:
        manifest = tomllib.loads((REPO / member / "Cargo.toml").read_text())
        for b in manifest.get("bin", []):
            found[b["name"]] = manifest["package"]["name"]
    return found


def check_dockerfile(text, programs):
    """The final stage runs as a numeric non-root user and holds every program the manifests
    run, built with --locked from the packages that own them."""
    problems = []
    stages = dockerfile_stages(text)
    if not stages:
        return ["no FROM in the Dockerfile"]
    image, _, final = stages[-1]
    users = [rest for word, rest in final if word == "USER"]
    if not users:
        problems.append("the final stage has no USER (it would run as root)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit():
            problems.append(f"USER {uid} is not numeric: runAsNonRoot cannot check a name")
        elif int(uid) == 0:
            problems.append("the final stage runs as root")
    copied = {}
    for word, rest in final:
        if word == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources, dest = args[:-1], args[-1]
            for s in sources:
                path = dest + Path(s).name if dest.endswith("/") else dest
                copied[path] = Path(s).name
    bins = cargo_binaries()
    built = set()
    for _, _, instructions in stages[:-1]:
        for word, rest in instructions:
            if word == "RUN" and "cargo build" in rest:
                args = shlex.split(rest)
                if "--locked" not in args:
                    problems.append(f"cargo build without --locked: {rest}")
                built |= {args[i + 1] for i, a in enumerate(args) if a in ("-p", "--package")}
    for program in sorted(programs):
        if program not in copied:
            problems.append(f"the manifests run {program}, which the final stage does not copy")
            continue
        name = copied[program]
        if bins.get(name) not in built:
            problems.append(f"{name} is copied but its package {bins.get(name)} is not built")
    for path, name in copied.items():
        if name in ("llmq-mock", "llmq-bench"):
            problems.append(f"the image ships the test tool {name}")
    return problems


def programs_run(*renders):
    return {binary(c) for docs in renders for w in workloads(docs)
            for c in containers(pod_spec(w)) if binary(c)}


def run_as_users(*renders):
    users = set()
    for docs in renders:
        for w in workloads(docs):
            spec = pod_spec(w)
            for c in containers(spec):
                users.add((c.get("securityContext") or {}).get("runAsUser",
                          (spec.get("securityContext") or {}).get("runAsUser")))
    return users
