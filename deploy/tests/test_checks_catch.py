"""Each check notices what it is there for: break a copy of the rendered manifests (or of the
Dockerfile) one way at a time and expect the check to name the problem."""

from __future__ import annotations

import base64
import copy

import pytest

import checks


def worker(docs):
    return checks.workload_running(docs, "llmq-worker")


def scheduler(docs):
    return checks.workload_running(docs, "llmq-scheduler")


def worker_cm(docs):
    _, c = worker(docs)
    name = next(s["configMapRef"]["name"] for s in c["envFrom"] if "configMapRef" in s)
    return checks.named(docs, "ConfigMap", name)["data"]


def trigger(docs, i=0):
    return checks.by_kind(docs, "ScaledObject")[0]["spec"]["triggers"][i]


def serve(docs):
    return checks.workload_running(docs, "llmq serve")[0]


def hpa(docs):
    return checks.by_kind(docs, "HorizontalPodAutoscaler")[0]["spec"]


def set_secret(docs, key, value):
    s = checks.by_kind(docs, "Secret")[0]
    s["data"][key] = base64.b64encode(value.encode()).decode()


def csc(docs, program="llmq-worker"):
    return checks.workload_running(docs, program)[1]["securityContext"]


def psc(docs, program="llmq-worker"):
    return checks.pod_spec(checks.workload_running(docs, program)[0])


def web_env(docs, name):
    return next(e for e in checks.workload_running(docs, "llmq web")[1]["env"] if e["name"] == name)


def literal(env_var, value):
    env_var.pop("valueFrom")
    env_var["value"] = value


def drop(d, key):
    del d[key]


def policy(docs, component):
    return next(p["spec"] for p in checks.by_kind(docs, "NetworkPolicy")
                if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == component)


def without_port(rules, port):
    for rule in rules:
        rule["ports"] = [p for p in rule["ports"] if p["port"] != port]


def providers_file(docs):
    cm = next(c for c in checks.by_kind(docs, "ConfigMap") if "providers.yaml" in (c.get("data") or {}))
    return cm["data"]


def scheduler_env(docs, name, key):
    scheduler(docs)[1]["env"].append({"name": name, "valueFrom": {"secretKeyRef": {"name": "llmq", "key": key}}})


BREAKS = {
    # KEDA
    "consumerGroup": ("keda", checks.check_keda,
                      lambda d: trigger(d)["metadata"].update(consumerGroup="llmq"), "consumerGroup"),
    "lagCount": ("keda", checks.check_keda,
                 lambda d: trigger(d)["metadata"].update(lagCount="5"), "lagCount"),
    "pendingEntriesCount": ("keda", checks.check_keda,
                            lambda d: trigger(d)["metadata"].update(pendingEntriesCount="5"),
                            "pendingEntriesCount"),
    "activationLagCount": ("keda", checks.check_keda,
                           lambda d: trigger(d)["metadata"].update(activationLagCount="0"),
                           "activationLagCount"),
    "unknown key": ("keda", checks.check_keda,
                    lambda d: trigger(d)["metadata"].update(listLength="5"), "not a redis-streams metadata key"),
    "number, not string": ("keda", checks.check_keda,
                           lambda d: trigger(d)["metadata"].update(streamLength=64), "not a string"),
    "streamLength != concurrency": ("keda", checks.check_keda,
                                    lambda d: trigger(d)["metadata"].update(streamLength="32"),
                                    "!= LLMQ_CONCURRENCY"),
    "concurrency changed alone": ("keda", checks.check_keda,
                                  lambda d: worker_cm(d).update(LLMQ_CONCURRENCY="128"), "!= LLMQ_CONCURRENCY"),
    "stream without braces": ("keda", checks.check_keda,
                              lambda d: trigger(d)["metadata"].update(stream="llmq:default:stream"),
                              "is not llmq:{<queue>}:stream"),
    "stream of another queue": ("keda", checks.check_keda,
                                lambda d: trigger(d)["metadata"].update(stream="llmq:{other}:stream"),
                                "not in LLMQ_QUEUES"),
    "a queue without trigger": ("keda", checks.check_keda,
                                lambda d: worker_cm(d).update(LLMQ_QUEUES="default,bulk"), "bulk has 0 triggers"),
    "two triggers for a queue": ("keda", checks.check_keda,
                                 lambda d: checks.by_kind(d, "ScaledObject")[0]["spec"]["triggers"].append(
                                     copy.deepcopy(trigger(d))), "default has 2 triggers"),
    "room listLength != concurrency": ("keda", checks.check_keda,
                                       lambda d: trigger(d, 1)["metadata"].update(listLength="32"),
                                       "listLength '32' != LLMQ_CONCURRENCY"),
    "a queue without room trigger": ("keda", checks.check_keda,
                                     lambda d: checks.by_kind(d, "ScaledObject")[0]["spec"]["triggers"].pop(1),
                                     "default has 0 room triggers"),
    "room list of another key": ("keda", checks.check_keda,
                                 lambda d: trigger(d, 1)["metadata"].update(listName="llmq:{default}:stream"),
                                 "is not llmq:{<queue>}:room:backlog"),
    "minReplicaCount 1": ("keda", checks.check_keda,
                          lambda d: checks.by_kind(d, "ScaledObject")[0]["spec"].update(minReplicaCount=1),
                          "minReplicaCount"),
    "no fallback": ("keda", checks.check_keda,
                    lambda d: drop(checks.by_kind(d, "ScaledObject")[0]["spec"], "fallback"), "fallback"),
    "fast scale-down": ("keda", checks.check_keda,
                        lambda d: checks.by_kind(d, "ScaledObject")[0]["spec"]["advanced"]
                        ["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
                        .update(stabilizationWindowSeconds=0), "stabilizationWindowSeconds"),
    "wrong target": ("keda", checks.check_keda,
                     lambda d: checks.by_kind(d, "ScaledObject")[0]["spec"]["scaleTargetRef"]
                     .update(name="llmq-scheduler"), "not the worker Deployment"),
    "missing TriggerAuthentication": ("keda", checks.check_keda,
                                      lambda d: trigger(d)["authenticationRef"].update(name="nope"),
                                      "does not exist"),
    "auth key not in secret": ("keda", checks.check_keda,
                               lambda d: checks.by_kind(d, "TriggerAuthentication")[0]["spec"]
                               ["secretTargetRef"][0].update(key="redis-host"), "missing secret key"),
    "KEDA on another Redis": ("keda", checks.check_keda,
                              lambda d: set_secret(d, "redis-address", "elsewhere:6379"), "not REDIS_URL's"),
    "KEDA with another password": ("keda", checks.check_keda,
                                   lambda d: set_secret(d, "redis-password", "other"), "password"),
    "another database": ("keda", checks.check_keda,
                         lambda d: set_secret(d, "REDIS_URL", "redis://:change-me@redis:6379/3"), "databaseIndex"),
    "TLS Redis, plain KEDA": ("keda", checks.check_keda,
                              lambda d: set_secret(d, "REDIS_URL", "rediss://:change-me@redis:6379/0"), "enableTLS"),
    "an HPA beside KEDA": ("keda", checks.check_keda,
                           lambda d: d.append({"kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                                               "spec": {"scaleTargetRef": {"name": "llmq-worker"}}}),
                           "two autoscalers"),
    # the front door
    "the front door on one replica": ("example-overlay", checks.check_serve,
                                      lambda d: serve(d)["spec"].update(replicas=1), "two replicas"),
    "the front door reads every key": ("example-overlay", checks.check_serve,
                                       lambda d: checks.pod_spec(serve(d))["containers"][0].update(
                                           envFrom=[{"secretRef": {"name": "acme-llmq"}}]), "every key"),
    "the front door's keys a literal": ("example-overlay", checks.check_serve,
                                        lambda d: checks.pod_spec(serve(d))["containers"][0]["env"].append(
                                            {"name": "LLMQ_SERVE_KEYS", "value": "/tmp/keys.jsonl"}),
                                        "mounted Secret"),
    # the static HPA
    "averageValue != concurrency": ("static", checks.check_static_hpa,
                                    lambda d: hpa(d)["metrics"][0]["external"]["target"]
                                    .update(averageValue="10"), "!= LLMQ_CONCURRENCY"),
    "HPA concurrency changed alone": ("static", checks.check_static_hpa,
                                      lambda d: worker_cm(d).update(LLMQ_CONCURRENCY="16"), "!= LLMQ_CONCURRENCY"),
    "Value, not AverageValue": ("static", checks.check_static_hpa,
                                lambda d: hpa(d)["metrics"][0]["external"]["target"].update(type="Value"),
                                "not AverageValue"),
    "backlog of another queue": ("static", checks.check_static_hpa,
                                 lambda d: hpa(d)["metrics"][0]["external"]["metric"]["selector"]
                                 ["matchLabels"].update(queue="bulk"), "not one in LLMQ_QUEUES"),
    "a queue without metric": ("static", checks.check_static_hpa,
                               lambda d: worker_cm(d).update(LLMQ_QUEUES="default,bulk"), "bulk has 0 backlog"),
    "another metric": ("static", checks.check_static_hpa,
                       lambda d: hpa(d)["metrics"][0]["external"]["metric"].update(name="llmq_queue_ready"),
                       "not External llmq_queue_backlog"),
    "HPA fast scale-down": ("static", checks.check_static_hpa,
                            lambda d: hpa(d)["behavior"]["scaleDown"]["policies"][0].update(value=5),
                            "faster than 1 pod a minute"),
    # the worker
    "grace longer than the pod's": ("static", checks.check_worker,
                                    lambda d: worker_cm(d).update(LLMQ_GRACE="1m"), "terminationGracePeriodSeconds"),
    "no hand-back time": ("static", checks.check_worker,
                          lambda d: psc(d).update(terminationGracePeriodSeconds=30), "terminationGracePeriodSeconds"),
    "replicas on the worker": ("static", checks.check_worker,
                               lambda d: worker(d)[0]["spec"].update(replicas=3), "replicas"),
    "no worker PDB": ("static", checks.check_worker,
                      lambda d: d.remove(next(p for p in checks.by_kind(d, "PodDisruptionBudget")
                                              if "worker" in p["metadata"]["name"])), "PodDisruptionBudget"),
    # the scheduler
    "one scheduler": ("static", checks.check_scheduler,
                      lambda d: scheduler(d)[0]["spec"].update(replicas=1), "at least 2"),
    "scheduler on the worker's port": ("static", checks.check_scheduler,
                                       lambda d: next(e for e in scheduler(d)[1]["env"]
                                                      if e["name"] == "LLMQ_METRICS_LISTEN")
                                       .update(value="0.0.0.0:9464"), "same metrics port"),
    # what the scheduler gets of the Secret
    "scheduler takes the whole Secret": ("static", checks.check_scheduler_secrets,
                                         lambda d: scheduler(d)[1].update(envFrom=[{"secretRef": {"name": "llmq"}}]),
                                         "every key of the Secret llmq"),
    "scheduler reads an API key": ("static", checks.check_scheduler_secrets,
                                   lambda d: scheduler_env(d, "OPENAI_API_KEY", "OPENAI_API_KEY"),
                                   "reads OPENAI_API_KEY"),
    "scheduler without DATABASE_URL": ("static", checks.check_scheduler_secrets,
                                       lambda d: scheduler(d)[1].update(env=[e for e in scheduler(d)[1]["env"]
                                                                             if e["name"] != "DATABASE_URL"]),
                                       "does not get DATABASE_URL"),
    "scheduler mounts the Secret": ("static", checks.check_scheduler_secrets,
                                    lambda d: psc(d, "llmq-scheduler")["volumes"].append(
                                        {"name": "s", "secret": {"secretName": "llmq"}}), "mounts the Secret"),
    # the image
    "image latest": ("static", checks.check_image_tags,
                     lambda d: worker(d)[1].update(image="llmq:latest"), "uses the tag latest"),
    "image untagged": ("static", checks.check_image_tags,
                       lambda d: scheduler(d)[1].update(image="registry.example.com:5000/llmq"), "has no tag"),
    # network policies
    "worker cannot reach the providers": ("static", checks.check_network_policies,
                                          lambda d: without_port(policy(d, "worker")["egress"], 443),
                                          "the worker pods cannot reach port 443/TCP"),
    "scheduler may reach the providers": ("static", checks.check_network_policies,
                                          lambda d: policy(d, "scheduler")["egress"].append(
                                              {"ports": [{"protocol": "TCP", "port": 443}]}),
                                          "the scheduler pods may also reach port 443/TCP"),
    "migration Job may reach Redis": ("static", checks.check_network_policies,
                                      lambda d: policy(d, "migrate")["egress"].append(
                                          {"ports": [{"protocol": "TCP", "port": 6379}]}),
                                      "the migration Job's pods may also reach port 6379/TCP"),
    "no DNS over UDP": ("static", checks.check_network_policies,
                        lambda d: policy(d, "scheduler")["egress"][0]["ports"].pop(0), "cannot reach port 53/UDP"),
    "egress to every port": ("static", checks.check_network_policies,
                             lambda d: policy(d, "worker")["egress"].append(
                                 {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
                             "allows every port"),
    "ingress to the Job": ("static", checks.check_network_policies,
                           lambda d: policy(d, "migrate").update(ingress=[{"ports": [{"port": 8080}]}]),
                           "the migration Job's pods accept 8080/TCP, not nothing"),
    "ingress beside metrics": ("static", checks.check_network_policies,
                               lambda d: policy(d, "worker")["ingress"].append({"ports": [{"port": 22}]}),
                               "accept 22/TCP, 9464/TCP"),
    "policyTypes left out": ("static", checks.check_network_policies,
                             lambda d: drop(policy(d, "migrate"), "policyTypes"), "does not list its policyTypes"),
    "only ingress restricted": ("static", checks.check_network_policies,
                                lambda d: policy(d, "worker").update(policyTypes=["Ingress"]),
                                "restricts the egress of the worker pods"),
    "policy selects other pods": ("static", checks.check_network_policies,
                                  lambda d: policy(d, "scheduler")["podSelector"]["matchLabels"]
                                  .update({"app.kubernetes.io/component": "schedule"}),
                                  "no NetworkPolicy selects the scheduler pods"),
    # probes
    "liveness on readyz": ("static", checks.check_probes,
                           lambda d: worker(d)[1]["livenessProbe"]["httpGet"].update(path="/readyz"), "/healthz"),
    "readiness on healthz": ("static", checks.check_probes,
                             lambda d: scheduler(d)[1]["readinessProbe"]["httpGet"].update(path="/healthz"),
                             "/readyz"),
    "probe port elsewhere": ("static", checks.check_probes,
                             lambda d: worker_cm(d).update(LLMQ_METRICS_LISTEN="0.0.0.0:9999"), "port is not 9999"),
    "no readiness": ("static", checks.check_probes,
                     lambda d: drop(worker(d)[1], "readinessProbe"), "no httpGet readinessProbe"),
    # security
    "privilege escalation": ("static", checks.check_restricted,
                             lambda d: csc(d).update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    "writable root": ("static", checks.check_restricted,
                      lambda d: csc(d, "llmq-scheduler").update(readOnlyRootFilesystem=False),
                      "readOnlyRootFilesystem"),
    "capabilities kept": ("static", checks.check_restricted,
                          lambda d: csc(d).update(capabilities={"drop": ["NET_RAW"]}), "drop ALL"),
    "root": ("static", checks.check_restricted,
             lambda d: (csc(d).update(runAsUser=0)), "runAsUser"),
    "root by default": ("static", checks.check_restricted,
                        lambda d: (drop(csc(d), "runAsNonRoot"), drop(psc(d)["securityContext"], "runAsNonRoot")),
                        "runAsNonRoot"),
    "no seccomp": ("static", checks.check_restricted,
                   lambda d: (drop(csc(d), "seccompProfile"), drop(psc(d)["securityContext"], "seccompProfile")),
                   "seccompProfile"),
    "token mounted": ("static", checks.check_restricted,
                      lambda d: psc(d, "llmq").update(automountServiceAccountToken=True),
                      "automountServiceAccountToken"),
    "hostPath": ("static", checks.check_restricted,
                 lambda d: psc(d)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "not allowed"),
    "no memory limit": ("static", checks.check_restricted,
                        lambda d: drop(worker(d)[1]["resources"], "limits"), "memory limit"),
    # wiring
    "missing ConfigMap": ("static", checks.check_references,
                          lambda d: d.remove(checks.by_kind(d, "ConfigMap")[0]), "missing"),
    "missing secret key": ("static", checks.check_references,
                           lambda d: checks.workload_running(d, "llmq")[1]["env"][0]["valueFrom"]["secretKeyRef"]
                           .update(key="NOPE"), "unresolved"),
    "an API key missing": ("static", checks.check_provider_file,
                           lambda d: checks.by_kind(d, "Secret")[0]["data"].pop("GEMINI_API_KEY"),
                           "llmq-worker: the provider file needs ${GEMINI_API_KEY}"),
    # The scheduler skips api_key, but not a ${VAR} anywhere else.
    "a variable the scheduler needs": ("static", checks.check_provider_file,
                                       lambda d: providers_file(d).update(
                                           {"providers.yaml": providers_file(d)["providers.yaml"]
                                            .replace("max_wait: 1h", "max_wait: ${LLMQ_MAX_WAIT}")}),
                                       "llmq-scheduler: the provider file needs ${LLMQ_MAX_WAIT}"),
    "provider file elsewhere": ("static", checks.check_provider_file,
                                lambda d: worker_cm(d).update(LLMQ_CONFIG="/config/providers.yaml"),
                                "nothing from a ConfigMap"),
    "outside the namespace": ("static", checks.check_namespace,
                              lambda d: d.append({"kind": "Service", "metadata": {"name": "x"}}),
                              "not in namespace"),
    "namespace not restricted": ("static", checks.check_namespace,
                                 lambda d: checks.by_kind(d, "Namespace")[0]["metadata"]["labels"]
                                 .update({"pod-security.kubernetes.io/enforce": "baseline"}), "restricted"),
    "no common labels": ("static", checks.check_labels,
                         lambda d: checks.by_kind(d, "Job")[0]["metadata"]["labels"]
                         .pop("app.kubernetes.io/part-of"), "app.kubernetes.io/part-of"),
    "job runs something else": ("static", checks.check_migration_job,
                                lambda d: checks.workload_running(d, "llmq")[1].update(args=["status"]),
                                "not llmq migrate"),
    "web token literal": ("example-overlay", checks.check_web,
                          lambda d: literal(web_env(d, "LLMQ_WEB_TOKEN"), "x"), "not taken from a Secret"),
    "web off loopback": ("example-overlay", checks.check_web,
                         lambda d: web_env(d, "LLMQ_WEB_LISTEN").update(value="0.0.0.0:8080"), "not loopback"),
    "web gets a provider key": ("example-overlay", checks.check_web,
                                lambda d: checks.workload_running(d, "llmq web")[1].update(
                                    envFrom=[{"secretRef": {"name": "acme-llmq"}}]), "every key"),
    "web probe over http": ("example-overlay", checks.check_web,
                            lambda d: checks.workload_running(d, "llmq web")[1].update(
                                livenessProbe={"httpGet": {"path": "/healthz", "port": 8080}}), "livenessProbe"),
    "web open to the cluster": ("example-overlay", checks.check_network_policies,
                                lambda d: policy(d, "web").update(ingress=[{"ports": [{"protocol": "TCP",
                                                                                        "port": 8080}]}]),
                                "the web page's pods accept"),
    "job without ttl": ("static", checks.check_migration_job,
                        lambda d: drop(checks.workload_running(d, "llmq")[0]["spec"], "ttlSecondsAfterFinished"),
                        "ttlSecondsAfterFinished"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_the_check_notices(rendered, name):
    overlay, check, breaks, expected = BREAKS[name]
    docs = copy.deepcopy(rendered[overlay])
    assert not check(docs), "the check fails on the unbroken manifests"
    breaks(docs)
    problems = check(docs)
    assert any(expected in p for p in problems), f"{name}: expected {expected!r} in {problems}"


DOCKER_BREAKS = {
    "root user": (("USER 65532:65532", "USER 0"), "runs as root"),
    "named user": (("USER 65532:65532", "USER nonroot"), "not numeric"),
    "no user": (("USER 65532:65532\n", ""), "no USER"),
    "scheduler not copied": (("COPY --from=builder /src/target/release/llmq-scheduler "
                              "/usr/local/bin/llmq-scheduler\n", ""), "does not copy"),
    "scheduler not built": (("-p llmq-worker -p llmq-scheduler\n\n", "-p llmq-worker\n\n"), "is not built"),
    "unlocked build": (("cargo build --release --locked", "cargo build --release"), "without --locked"),
    "test tool shipped": (("ENTRYPOINT", "COPY --from=builder /src/target/release/llmq-mock /usr/local/bin/\n"
                           "ENTRYPOINT"), "test tool"),
}


@pytest.mark.parametrize("name", list(DOCKER_BREAKS))
def test_the_dockerfile_check_notices(rendered, dockerfile, name):
    (old, new), expected = DOCKER_BREAKS[name]
    programs = checks.programs_run(*rendered.values())
    assert not checks.check_dockerfile(dockerfile, programs)
    assert old in dockerfile, f"{name}: the Dockerfile no longer has {old!r}; update this test"
    problems = checks.check_dockerfile(dockerfile.replace(old, new, 1), programs)
    assert any(expected in p for p in problems), f"{name}: expected {expected!r} in {problems}"
