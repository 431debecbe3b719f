#!/usr/bin/env bash
# Generates the Go code of proto/cairn/ipam/v1/ipam.proto into ipam/v1/ (package ipamv1) with
# protoc and the plugin versions pinned as tools in go.mod.
#
#   clients/go/generate.sh            # rewrite the checked-in code
#   clients/go/generate.sh --check    # regenerate into a temp dir; fail if ipam/v1/ is stale
#
# The proto itself carries no go_package: the import path is given here (M flags), so the
# Rust side's proto stays language-neutral.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
module=cairn.dev/clients/go
proto=cairn/ipam/v1/ipam.proto
gopkg="$module/ipam/v1;ipamv1"

command -v protoc >/dev/null || { echo "generate.sh: protoc is required (apt install protobuf-compiler)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$here"
go build -o "$tmp/bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
go build -o "$tmp/bin/protoc-gen-go-grpc" google.golang.org/grpc/cmd/protoc-gen-go-grpc

out=$tmp/out
mkdir -p "$out"
protoc -I "$root/proto" \
  --plugin=protoc-gen-go="$tmp/bin/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$tmp/bin/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=module=$module --go_opt="M$proto=$gopkg" \
  --go-grpc_out="$out" --go-grpc_opt=module=$module --go-grpc_opt="M$proto=$gopkg" \
  "$root/proto/$proto"

if [ "${1:-}" = --check ]; then
  # The header names the protoc version that ran; another protoc release producing the same
  # code is not staleness, so that one line is left out of the comparison.
  if ! diff -r -u -I '^//[[:space:]-]*protoc[[:space:]]*v[0-9]' "$here/ipam/v1" "$out/ipam/v1"; then
    echo "clients/go/ipam/v1 is stale: run clients/go/generate.sh and commit the result" >&2
    exit 1
  fi
  echo "clients/go/ipam/v1 is up to date with $proto"
else
  rm -rf "$here/ipam/v1"
  mkdir -p "$here/ipam"
  cp -r "$out/ipam/v1" "$here/ipam/v1"
  echo "generated $(cd "$here" && ls ipam/v1/*.go | tr '\n' ' ')"
fi
