#!/usr/bin/env bash
# Checks everything baton ships for operators, with tools from the package
# registries, installing what is missing (outside the clone, under
# ~/.cache/baton/):
#
#   - alert rules: `promtool check rules` and `promtool test rules` (Debian's
#     prometheus package; scripts/prereqs.sh installs it), and the compose
#     Prometheus config with `promtool check config`;
#   - Kubernetes manifests (docker/k8s): `kubernetes-validate --strict` (PyPI),
#     and the KEDA ScaledObject against KEDA's CRD schema, from the
#     `cloudcoil-models-keda` models (PyPI; generated from KEDA 2.16's CRDs);
#   - YAML style: yamllint (PyPI) over every YAML file we ship;
#   - docker/compose.yaml: `docker-compose config` (Debian's docker-compose);
#   - Grafana dashboards: up to date with scripts/dashboards.py, and
#     type-checked against Grafana's own schema (`@grafana/schema` from npm,
#     its Dashboard type, with TypeScript's compiler); a deliberately broken
#     copy must fail, so the check can fail.
#
#   scripts/validate-ops.sh
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/prereqs.sh
source "$REPO_ROOT/scripts/prereqs.sh"

CACHE="${HOME:-/root}/.cache/baton"
OPS_VENV="${BATON_OPS_VENV:-$CACHE/ops-venv}"
OPS_PACKAGES=("kubernetes-validate==1.37.0" "cloudcoil-models-keda==2.16.1.0" "jsonschema==4.26.0" "yamllint==1.38.0" "pyyaml==6.0.4")
SCHEMA_DIR="$CACHE/grafana-schema"
NPM_PACKAGES=("@grafana/schema@13.2.3" "typescript@5.9.3")

FAILED=()
check() {
    local name="$1"
    shift
    printf -- '--- %s\n' "$name"
    if "$@"; then
        printf 'ok: %s\n' "$name"
    else
        printf 'FAILED: %s\n' "$name"
        FAILED+=("$name")
    fi
}

install_prometheus
if [[ ! -x "$OPS_VENV/bin/kubernetes-validate" ]] || ! "$OPS_VENV/bin/python" -c 'import cloudcoil.models.keda, yamllint' 2>/dev/null; then
    python3 -m venv "$OPS_VENV"
    "$OPS_VENV/bin/pip" install -q "${OPS_PACKAGES[@]}"
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    install_apt_packages docker-compose || true
fi
if [[ ! -d "$SCHEMA_DIR/node_modules/@grafana/schema" || ! -x "$SCHEMA_DIR/node_modules/.bin/tsc" ]]; then
    command -v npm >/dev/null 2>&1 || install_apt_packages npm
    mkdir -p "$SCHEMA_DIR"
    (cd "$SCHEMA_DIR" && { [[ -f package.json ]] || npm init -y >/dev/null; } &&
        npm install --silent --no-audit --no-fund "${NPM_PACKAGES[@]}")
fi

# ------------------------------------------------------------------ alert rules
check "promtool check rules" promtool check rules docker/prometheus/alerts.yml
check "promtool test rules" promtool test rules docker/prometheus/alerts.test.yml
check "promtool check config" promtool check config docker/prometheus/prometheus.yml

# ------------------------------------------------------------------ kubernetes
k8s_manifests=()
for file in docker/k8s/*.yaml; do
    case "$(basename "$file")" in
        kustomization.yaml | scaledobject.yaml) ;;
        *) k8s_manifests+=("$file") ;;
    esac
done
check "kubernetes-validate --strict" "$OPS_VENV/bin/kubernetes-validate" --strict --quiet "${k8s_manifests[@]}"
check "KEDA ScaledObject schema" "$OPS_VENV/bin/python" scripts/validate-scaledobject.py docker/k8s/scaledobject.yaml docker/k8s/statefulset.yaml

# ------------------------------------------------------------------ YAML and compose
check "yamllint" "$OPS_VENV/bin/yamllint" --strict -c .yamllint.yaml docker grafana/provisioning
# Debian 12's docker-compose (1.29) predates the Compose Specification's
# top-level `name:`; it checks everything else, on a copy without that line.
compose_config() {
    local copy
    copy="$(mktemp "$REPO_ROOT/docker/.compose-check.XXXXXX.yaml")"
    grep -v '^name: ' docker/compose.yaml >"$copy"
    docker-compose -f "$copy" config -q
    local out=$?
    rm -f "$copy"
    return "$out"
}
if command -v docker-compose >/dev/null 2>&1; then
    check "docker-compose config" compose_config
else
    echo "SKIPPED: docker-compose config (Debian's docker-compose did not install)"
fi

# ------------------------------------------------------------------ dashboards
check "dashboards up to date" python3 scripts/dashboards.py --check
grafana_schema() {
    local dir out=0
    dir="$(mktemp -d "$SCHEMA_DIR/check.XXXXXX")"
    # Grafana's schema types use TypeScript enums; the JSON carries their
    # string values. Loose<T> maps every enum to its values and keeps the
    # rest (required fields, no unknown properties) as Grafana wrote it.
    cat >"$dir/loose.ts" <<'TS'
export type Loose<T> = T extends string ? `${T}` : T extends (infer U)[] ? Loose<U>[] : T extends object ? { [K in keyof T]: Loose<T[K]> } : T;
TS
    local json name
    for json in grafana/dashboards/*.json; do
        name="$(basename "$json" .json | tr -c 'a-zA-Z0-9\n' _)"
        { echo "import type { Dashboard } from '@grafana/schema';"
          echo "import type { Loose } from './loose';"
          echo "export const ${name}: Loose<Dashboard> ="
          cat "$json"
          echo ";"; } >"$dir/$name.ts"
    done
    # The check must be able to fail: a panel with a misspelled field.
    { echo "import type { Dashboard } from '@grafana/schema';"
      echo "import type { Loose } from './loose';"
      echo "export const broken: Loose<Dashboard> = { title: 'x', panels: [{ type: 'stat', gridPos: { h: 1, w: 1, x: 0, y: 0 }, titel: 'typo' }] };"; } >"$dir/broken.ts"
    ln -s "$SCHEMA_DIR/node_modules" "$dir/node_modules"
    local tsc="$SCHEMA_DIR/node_modules/.bin/tsc"
    local flags=(--noEmit --strict --skipLibCheck --moduleResolution node --module commonjs --target es2020)
    if (cd "$dir" && "$tsc" "${flags[@]}" broken.ts loose.ts >/dev/null 2>&1); then
        echo "the schema check accepted a broken dashboard"
        return 1
    fi
    local checked=()
    for json in "$dir"/*.ts; do
        case "$(basename "$json")" in broken.ts | loose.ts) ;; *) checked+=("$(basename "$json")") ;; esac
    done
    (cd "$dir" && "$tsc" "${flags[@]}" loose.ts "${checked[@]}") || out=1
    rm -rf "$dir"
    return "$out"
}
check "dashboards against @grafana/schema" grafana_schema

if [[ ${#FAILED[@]} -gt 0 ]]; then
    printf 'FAILED: %s\n' "${FAILED[*]}"
    exit 1
fi
echo "OK: alert rules, manifests, YAML, compose and dashboards"
