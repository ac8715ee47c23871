"""The rendered overlays hold together: what each check guards is in checks.py."""

from __future__ import annotations

import pytest
import yaml

import checks
from conftest import KEDA_RENDERS, RENDERS

ALL = list(RENDERS)


def ok(problems):
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", ALL)
def test_everything_is_in_the_restricted_namespace(rendered, overlay):
    ok(checks.check_namespace(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_every_object_carries_the_common_labels(rendered, overlay):
    ok(checks.check_labels(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_every_configmap_secret_and_key_a_pod_reads_exists(rendered, overlay):
    ok(checks.check_references(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_the_provider_file_is_mounted_and_its_variables_are_set(rendered, overlay):
    ok(checks.check_provider_file(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_every_pod_meets_the_restricted_pod_security_standard(rendered, overlay):
    ok(checks.check_restricted(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_liveness_is_healthz_and_readiness_readyz_on_the_metrics_port(rendered, overlay):
    ok(checks.check_probes(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_the_worker_pod_outlives_its_drain(rendered, overlay):
    ok(checks.check_worker(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_the_scheduler_has_a_standby(rendered, overlay):
    ok(checks.check_scheduler(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_a_job_runs_llmq_migrate(rendered, overlay):
    ok(checks.check_migration_job(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_the_web_page_is_on_loopback_with_its_token_from_the_secret(rendered, overlay):
    ok(checks.check_web(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_the_front_door_has_two_replicas_keys_from_a_secret_and_a_service(rendered, overlay):
    ok(checks.check_serve(rendered[overlay]))


def test_the_operator_overlay_adds_the_front_door(rendered):
    w, c = checks.workload_running(rendered["example-overlay"], "llmq serve")
    assert w is not None and c["args"] == ["serve"]
    assert checks.workload_running(rendered["example-overlay"], "llmq web")[1]["args"] == ["web"]


def test_the_operator_overlay_adds_the_web_page(rendered):
    w, c = checks.workload_running(rendered["example-overlay"], "llmq web")
    assert w is not None and c["args"] == ["web"]
    job, _ = checks.workload_running(rendered["example-overlay"], "llmq")
    assert job["kind"] == "Job", "plain `llmq` still names the migration Job"


@pytest.mark.parametrize("overlay", ALL)
def test_the_scheduler_gets_no_provider_key(rendered, overlay):
    ok(checks.check_scheduler_secrets(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_a_network_policy_fences_each_pod(rendered, overlay):
    ok(checks.check_network_policies(rendered[overlay]))


@pytest.mark.parametrize("overlay", ALL)
def test_every_image_is_pinned(rendered, overlay):
    ok(checks.check_image_tags(rendered[overlay]))


@pytest.mark.parametrize("overlay", ["keda", "static"])
def test_our_image_tag_is_the_workspace_version(rendered, overlay):
    version = checks.workspace_version()
    for w in checks.workloads(rendered[overlay]):
        for c in checks.containers(checks.pod_spec(w)):
            assert c["image"] == f"llmq:{version}", \
                f"{c['image']}: set newTag in base/kustomization.yaml to {version}, Cargo.toml's version"


@pytest.mark.parametrize("overlay", KEDA_RENDERS)
def test_keda_scales_on_stream_length_per_queue(rendered, overlay):
    ok(checks.check_keda(rendered[overlay]))


def test_the_static_hpa_targets_the_backlog_per_queue(rendered):
    ok(checks.check_static_hpa(rendered["static"]))


def test_the_operator_overlay_replaces_the_secret_and_the_image(rendered):
    docs = rendered["example-overlay"]
    secret = [s for s in checks.by_kind(docs, "Secret") if s["metadata"]["name"] == "acme-llmq"]
    assert len(secret) == 1
    assert "example-password" in checks.secret_data(secret[0])["REDIS_URL"]
    for w in checks.workloads(docs):
        for c in checks.containers(checks.pod_spec(w)):
            assert c["image"] == "registry.example.com/llmq:0.1.0"


def test_the_image_runs_as_a_non_root_user_and_holds_every_binary_the_manifests_run(rendered, dockerfile):
    programs = checks.programs_run(*rendered.values())
    assert programs == {"/usr/local/bin/llmq", "/usr/local/bin/llmq-worker", "/usr/local/bin/llmq-scheduler"}
    ok(checks.check_dockerfile(dockerfile, programs))


def test_the_manifests_run_as_the_images_user(rendered, dockerfile):
    image, _, final = checks.dockerfile_stages(dockerfile)[-1]
    user = [rest for word, rest in final if word == "USER"][-1].split(":")[0]
    assert checks.run_as_users(*rendered.values()) == {int(user)}


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("1m", 60), ("1m30s", 90), ("500ms", 0.5), ("2h", 7200)])
def test_durations_parse_as_llmq_reads_them(text, seconds):
    assert checks.duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["30", "", "1 fortnight", "s30"])
def test_durations_that_are_not_durations_are_refused(text):
    with pytest.raises(ValueError):
        checks.duration_seconds(text)


def test_the_prometheusrule_holds_the_alert_rules_and_the_podmonitor_finds_every_metrics_port(rendered):
    """components/monitoring: the PrometheusRule holds deploy/monitoring/alerts.yaml's groups
    as they are (python3 deploy/monitoring/to_prometheusrule.py regenerates it), and the
    PodMonitor's selector and port name every pod that serves /metrics."""
    docs = rendered["example-overlay"]
    rules = yaml.safe_load((checks.REPO / "deploy/monitoring/alerts.yaml").read_text())
    [rule] = checks.by_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == rules["groups"]
    [monitor] = checks.by_kind(docs, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    scraped = 0
    for w in checks.workloads(docs):
        pod_labels = w["spec"]["template"]["metadata"].get("labels", {})
        metrics = [
            p for c in checks.containers(checks.pod_spec(w)) for p in c.get("ports", []) if p.get("name") == "metrics"
        ]
        if metrics:
            assert all(pod_labels.get(k) == v for k, v in selector.items()), w["metadata"]["name"]
            assert ports == {"metrics"}
            scraped += 1
    assert scraped >= 2, "the workers and the schedulers serve /metrics"
