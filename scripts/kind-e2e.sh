#!/usr/bin/env bash
# End-to-end run on a throw-away kind cluster, for machines with Docker and kind:
#   1. create the cluster (pinned node image) and install the Gateway API CRDs
#      (standard channel, pinned release);
#   2. build the image from the repository's Dockerfile and load it into kind;
#   3. start two PostgreSQL servers (blue with data, green empty), two app
#      Deployments and an HTTPRoute splitting between them;
#   4. install the Helm chart and run one release Job from its CronJob;
#   5. check that the route sends 100 % to green and green has the migrations.
# Without Docker (or kind, or kubectl) it prints "skipped: ..." and exits 0, so
# the script is safe to call from any test run. KEEP_CLUSTER=1 keeps the cluster.
set -euo pipefail

# Only shell builtins until the tools are known to be there.
skip() {
  printf 'skipped: needs Docker and kind (%s)\n' "$1"
  exit 0
}
command -v docker >/dev/null 2>&1 || skip "docker not found"
command -v kind >/dev/null 2>&1 || skip "kind not found"
command -v kubectl >/dev/null 2>&1 || skip "kubectl not found"
docker info >/dev/null 2>&1 || skip "the Docker daemon is not reachable"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${ORCHESTRATE_E2E_CLUSTER:-orchestrate-e2e}"
NS="shop"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"
GATEWAY_API_VERSION="v1.3.0"
GATEWAY_API_URL="https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"
PG_IMAGE="${PG_IMAGE:-postgres:17}"
APP_IMAGE="registry.k8s.io/e2e-test-images/agnhost:2.53"
IMAGE_REPO="ghcr.io/orchestrate/orchestrate"
IMAGE_TAG="e2e"
JOB="e2e-release"
JOB_TIMEOUT_S="${JOB_TIMEOUT_S:-1200}"

HELM="${HELM:-$ROOT/.cache/helm/helm}"
if [ ! -x "$HELM" ]; then
  HELM="$(command -v helm || true)"
fi
if [ -z "$HELM" ]; then
  echo "helm not found: run ./scripts/setup.sh" >&2
  exit 1
fi

log() { printf '\033[1m[kind-e2e]\033[0m %s\n' "$*"; }
kc() { kubectl --context "kind-$CLUSTER" -n "$NS" "$@"; }

WORK="$(mktemp -d)"
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    log "failed (exit $rc); job logs and events follow"
    kc logs "job/$JOB" --all-containers --tail=200 2>/dev/null || true
    kc get events --sort-by=.lastTimestamp 2>/dev/null | tail -30 || true
  fi
  rm -rf "$WORK"
  if [ "${KEEP_CLUSTER:-0}" != "1" ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else
    log "keeping cluster $CLUSTER (kubectl --context kind-$CLUSTER)"
  fi
  exit "$rc"
}
trap cleanup EXIT

random_password() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

log "creating kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 180s

log "installing Gateway API CRDs $GATEWAY_API_VERSION (standard channel)"
kubectl --context "kind-$CLUSTER" apply --server-side -f "$GATEWAY_API_URL"
kubectl --context "kind-$CLUSTER" wait --for=condition=Established \
  crd/httproutes.gateway.networking.k8s.io --timeout=120s

log "building $IMAGE_REPO:$IMAGE_TAG from $ROOT/Dockerfile"
docker build -t "$IMAGE_REPO:$IMAGE_TAG" "$ROOT"
kind load docker-image "$IMAGE_REPO:$IMAGE_TAG" --name "$CLUSTER"

log "namespace $NS, secrets, PostgreSQL (blue, green), app and route"
kubectl --context "kind-$CLUSTER" create namespace "$NS"
kc create secret generic orchestrate-db \
  --from-literal=blue-password="$(random_password)" \
  --from-literal=green-password="$(random_password)"
kc create secret generic orchestrate-webhook --from-literal=token="$(random_password)"
if [ -d "$ROOT/examples/demo/migrations" ]; then
  kc create configmap orchestrate-migrations --from-file="$ROOT/examples/demo/migrations"
fi

for colour in blue green; do
  cat >"$WORK/db-$colour.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop-db-$colour
spec:
  replicas: 1
  selector:
    matchLabels: {app: shop-db, colour: $colour}
  template:
    metadata:
      labels: {app: shop-db, colour: $colour}
    spec:
      containers:
        - name: postgres
          image: $PG_IMAGE
          args: ["-c", "wal_level=logical", "-c", "max_replication_slots=10",
                 "-c", "max_wal_senders=10"]
          env:
            - {name: POSTGRES_USER, value: orchestrate}
            - {name: POSTGRES_DB, value: shop}
            - name: POSTGRES_PASSWORD
              valueFrom:
                secretKeyRef: {name: orchestrate-db, key: $colour-password}
          ports: [{containerPort: 5432}]
          readinessProbe:
            exec: {command: ["pg_isready", "-U", "orchestrate", "-d", "shop"]}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: shop-db-$colour
spec:
  selector: {app: shop-db, colour: $colour}
  ports: [{port: 5432, targetPort: 5432}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-$colour
spec:
  replicas: 1
  selector:
    matchLabels: {app: web, colour: $colour}
  template:
    metadata:
      labels: {app: web, colour: $colour}
    spec:
      containers:
        - name: web
          image: $APP_IMAGE
          args: ["netexec", "--http-port=8080"]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: web-$colour
spec:
  selector: {app: web, colour: $colour}
  ports: [{port: 8080, targetPort: 8080}]
EOF
  kc apply -f "$WORK/db-$colour.yaml"
done

# No Gateway controller is needed: the router only reads and patches the route.
cat >"$WORK/route.yaml" <<'EOF'
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs: [{name: public}]
  hostnames: ["shop.example.com"]
  rules:
    - matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs:
        - {name: web-blue, port: 8080, weight: 100}
        - {name: web-green, port: 8080, weight: 0}
EOF
kc apply -f "$WORK/route.yaml"

kc rollout status deployment/shop-db-blue --timeout=300s
kc rollout status deployment/shop-db-green --timeout=300s

log "seeding blue"
kc exec deploy/shop-db-blue -- psql -v ON_ERROR_STOP=1 -U orchestrate -d shop -c "
  CREATE TABLE IF NOT EXISTS public.orders (
    id bigserial PRIMARY KEY,
    customer text NOT NULL,
    amount_cents integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
  );
  INSERT INTO public.orders (customer, amount_cents)
    SELECT 'customer-' || g, (g * 37) % 10000 FROM generate_series(1, 5000) AS g;"

log "installing the chart"
cat >"$WORK/values.yaml" <<'EOF'
image:
  pullPolicy: Never
webhook:
  enabled: false
release:
  suspend: true
config:
  release:
    name: kind-e2e
    version: e2e
  blue:
    app_role: null
  backup:
    timeout: 10m
  sync:
    initial_copy_timeout: 10m
    catchup_timeout: 2m
  canary:
    interval: 2s
    window: 10s
    stages:
      - {weight: 0, duration: 2s}
      - {weight: 5, duration: 5s}
      - {weight: 20, duration: 5s}
      - {weight: 100, duration: 5s}
    checks: []
    allow_unanalysed: true
  rollback:
    window: 0s
EOF
"$HELM" install orchestrate "$ROOT/helm/orchestrate" \
  --kube-context "kind-$CLUSTER" --namespace "$NS" \
  --values "$WORK/values.yaml" --set image.tag="$IMAGE_TAG" --wait --timeout 5m

log "running one release"
kc create job "$JOB" --from=cronjob/orchestrate-release
deadline=$((SECONDS + JOB_TIMEOUT_S))
while :; do
  state="$(kc get job "$JOB" -o jsonpath='{.status.conditions[?(@.status=="True")].type}')"
  case "$state" in
    *Complete*) break ;;
    *Failed*)
      echo "release job failed" >&2
      exit 1
      ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "release job did not finish within ${JOB_TIMEOUT_S}s" >&2
    exit 1
  fi
  sleep 5
done
kc logs "job/$JOB" --tail=50

log "checking the result"
weights="$(kc get httproute web -o jsonpath='{.spec.rules[0].backendRefs[*].weight}')"
if [ "$weights" != "0 100" ]; then
  echo "expected the route at blue 0 / green 100, got weights: $weights" >&2
  exit 1
fi
rows="$(kc exec deploy/shop-db-green -- psql -tA -U orchestrate -d shop \
  -c "SELECT count(*) FROM public.orders")"
if [ "$rows" -lt 5000 ]; then
  echo "green has $rows orders, expected at least 5000" >&2
  exit 1
fi
log "ok: traffic on green, $rows orders replicated"
