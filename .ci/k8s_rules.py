"""The rules of deploy/kubernetes that no schema or checkov knows, checked on one rendered overlay.

usage: k8s_rules.py RENDERED.yaml CHECKOV.json   (run by .ci/k8s with the deploy virtualenv's python)

- every checkov skip (checkov.io/skip* annotation) carries its reason, and checkov saw the same skips;
- every container with the proxy image: its proxy.toml (from the ConfigMap it mounts) listens on
  0.0.0.0 on the container's proxy and admin ports, the probes hit the admin port, every secret comes
  from a file under a mounted Secret (no secret = / *_env), the container has no env at all, and the
  pod's terminationGracePeriodSeconds covers preStop + 2 x shutdown_grace (drain, then audit flush);
- the hardening every container has (non-root, read-only root, no privilege escalation, ALL dropped,
  RuntimeDefault seccomp, requests and limits) and no host namespaces, no service account token.
"""

import json
import re
import sys
import tomllib

import yaml

PROXY_IMAGE = re.compile(r"(^|/)mcp-tenant-proxy(:|@|$)")
SECRET_ENV_FIELDS = {"secret", "secret_env", "password_env", "token_env", "master_key_env"}
FILE_FIELDS = {"secret_file", "password_file", "token_file", "master_key_file"}
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert match, f"unhandled duration {text!r}"
    value, unit = int(match[1]), match[2]
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


def walk(table, path=""):
    """(dotted path, key, value) for every leaf of a TOML document."""
    if isinstance(table, dict):
        for key, value in table.items():
            yield from walk(value, f"{path}.{key}" if path else key) if isinstance(value, (dict, list)) else [
                (f"{path}.{key}" if path else key, key, value)
            ]
    elif isinstance(table, list):
        for i, value in enumerate(table):
            yield from walk(value, f"{path}[{i}]")


def main():
    rendered, checkov_json = sys.argv[1], sys.argv[2]
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}

    annotated = set()
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                if len(reason.strip()) < 20:
                    problem(name, f"checkov skip {check} without a written reason")
                annotated.add((name, check))
    report = json.load(open(checkov_json))
    reports = report if isinstance(report, list) else [report]
    skipped = {
        (c["resource"].split(".")[0] + "/" + c["resource"].split(".")[-1], c["check_id"])
        for r in reports
        for c in r["results"].get("skipped_checks", [])
    }
    for name, check in skipped - annotated:
        problem(name, f"checkov skipped {check} without an annotation here")

    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        name = f"Deployment/{doc['metadata']['name']}"
        pod = doc["spec"]["template"]["spec"]
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(field):
                problem(name, f"{field} is on")
        if pod.get("automountServiceAccountToken") is not False:
            problem(name, "automountServiceAccountToken is not false")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name} container {container['name']}"
            sc = container.get("securityContext", {})
            wanted = {
                "runAsNonRoot": True,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
            }
            for field, value in wanted.items():
                if sc.get(field) is not value:
                    problem(where, f"securityContext.{field} is not {value}")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problem(where, "capabilities do not drop ALL")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problem(where, "seccompProfile is not RuntimeDefault")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        problem(where, f"no {kind}.{resource}")
            if PROXY_IMAGE.search(container["image"]):
                check_proxy(where, pod, container, volumes, configmaps)
    return problems


def check_proxy(where, pod, container, volumes, configmaps):
    sc = container["securityContext"]
    if sc.get("runAsUser") != 65532 or sc.get("runAsGroup") != 65532:
        problem(where, "the proxy does not run as 65532:65532")
    if container.get("env") or container.get("envFrom"):
        problem(where, "the proxy container has env: secrets and settings come from files")
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
    if any(m.get("subPath") for m in container.get("volumeMounts", [])):
        problem(where, "a subPath mount: the kubelet never updates it")
    config_path = container["args"][container["args"].index("--config") + 1]
    config_dir, _, config_file = config_path.rpartition("/")
    volume = mounts.get(config_dir)
    if not volume or "configMap" not in volume:
        problem(where, f"{config_dir} is not a mounted ConfigMap")
        return
    config = tomllib.loads(configmaps[volume["configMap"]["name"]]["data"][config_file])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    proxy_port, admin_port = sorted(ports.items(), key=lambda kv: kv[1])
    if config["server"]["listen"] != f"0.0.0.0:{proxy_port[1]}":
        problem(where, f"server.listen {config['server']['listen']} is not 0.0.0.0:{proxy_port[1]}")
    if config["admin"]["listen"] != f"0.0.0.0:{admin_port[1]}":
        problem(where, f"admin.listen {config['admin']['listen']} is not 0.0.0.0:{admin_port[1]}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = container.get(probe, {}).get("httpGet", {}).get("port")
        if port not in (admin_port[0], admin_port[1]):
            problem(where, f"{probe} is not on the admin port")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        problem(where, "readiness is not /readyz")
    if container["livenessProbe"]["httpGet"]["path"] != "/healthz":
        problem(where, "liveness is not /healthz")
    secret_dirs = [path for path, v in mounts.items() if "secret" in v]
    for path, key, value in walk(config):
        if key in SECRET_ENV_FIELDS:
            problem(where, f"proxy.toml {path}: secrets come from files (secret_file, password_file, ...)")
        if key in FILE_FIELDS and not any(value.startswith(d + "/") for d in secret_dirs):
            problem(where, f"proxy.toml {path} = {value} is not under a mounted Secret")
    grace = seconds(config["server"].get("shutdown_grace", "30s"))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if pod.get("terminationGracePeriodSeconds", 30) <= pre_stop + 2 * grace:
        problem(where, f"terminationGracePeriodSeconds does not cover preStop + 2 x shutdown_grace ({grace}s)")


if __name__ == "__main__":
    found = main()
    for line in found:
        print(line, file=sys.stderr)
    sys.exit(1 if found else 0)
