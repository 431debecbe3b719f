package main

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.dev/clients/go/internal/storetest"
	"cairn.dev/clients/go/ipam"
	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// smallNetwork has room for two VIPs and three node addresses, so the test reaches exhaustion.
func smallNetwork() *ipamv1.Network {
	return &ipamv1.Network{
		Name:      "net-t",
		Prefixes:  []string{"10.30.0.0/16"},
		Gateways:  []string{"10.30.0.1"},
		ManagedBy: Managed,
		Pools: []*ipamv1.Pool{
			{Name: "vip", Purpose: ipamv1.PoolPurpose_POOL_PURPOSE_VIP, Ranges: []string{"10.30.1.10-10.30.1.11"}},
			{Name: "nodes", Purpose: ipamv1.PoolPurpose_POOL_PURPOSE_NODE, Ranges: []string{"10.30.2.10-10.30.2.12"}},
		},
	}
}

func inRange(t *testing.T, what, addr, first, last string) {
	t.Helper()
	a, err := netip.ParseAddr(addr)
	if err != nil {
		t.Fatalf("%s: %q is not an address: %v", what, addr, err)
	}
	if a.Compare(netip.MustParseAddr(first)) < 0 || a.Compare(netip.MustParseAddr(last)) > 0 {
		t.Fatalf("%s: %s outside %s-%s", what, addr, first, last)
	}
}

func used(t *testing.T, ctx context.Context, c *ipam.Client, pool string) string {
	t.Helper()
	u, err := c.GetUsage(ctx, &ipamv1.GetUsageRequest{Network: "net-t"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range u.GetPools() {
		if p.GetPool() == pool {
			return p.GetUsed()
		}
	}
	t.Fatalf("no usage for pool %s in %v", pool, u)
	return ""
}

// The cloud service's flow against a live store: network, cluster creation (VIP + nodes),
// idempotent retries, exhaustion, the other error classes, and release on deletion.
func TestCloudFlowAgainstLiveStore(t *testing.T) {
	srv := storetest.Start(t, "--default-reuse-grace", "0s")
	c, err := ipam.Dial(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	changed, err := EnsureNetwork(ctx, c, smallNetwork())
	if err != nil || !changed {
		t.Fatalf("first upsert: changed=%v err=%v", changed, err)
	}
	if changed, err = EnsureNetwork(ctx, c, smallNetwork()); err != nil || changed {
		t.Fatalf("identical upsert: changed=%v (want false) err=%v", changed, err)
	}

	c1, err := CreateCluster(ctx, c, "net-t", "c1", []string{"c1-n1", "c1-n2"})
	if err != nil {
		t.Fatal(err)
	}
	inRange(t, "c1 VIP", c1.APIServerVIP, "10.30.1.10", "10.30.1.11")
	if len(c1.Nodes) != 2 || c1.Nodes[0].Address == c1.Nodes[1].Address {
		t.Fatalf("c1 nodes: %+v", c1.Nodes)
	}
	for _, n := range c1.Nodes {
		inRange(t, "c1 node "+n.Name, n.Address, "10.30.2.10", "10.30.2.12")
	}
	var out bytes.Buffer
	Print(&out, c1)
	if !strings.Contains(out.String(), "cluster c1: api-server VIP "+c1.APIServerVIP) ||
		!strings.Contains(out.String(), "cluster c1: node c1-n2 "+c1.Nodes[1].Address) {
		t.Fatalf("printed:\n%s", out.String())
	}

	// Idempotent: the retry gets the same addresses, and the store says nothing was created.
	again, err := CreateCluster(ctx, c, "net-t", "c1", []string{"c1-n1", "c1-n2"})
	if err != nil {
		t.Fatal(err)
	}
	if again.APIServerVIP != c1.APIServerVIP || again.Nodes[0] != c1.Nodes[0] || again.Nodes[1] != c1.Nodes[1] {
		t.Fatalf("re-allocation moved addresses: first %+v, retry %+v", c1, again)
	}
	r, err := c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-t", Owner: &ipamv1.Owner{
		ClusterId: "c1", Kind: ipamv1.OwnerKind_OWNER_KIND_API_SERVER, Name: APIServerName,
	}})
	if err != nil || r.GetCreated() || r.GetAllocation().GetAddresses()[0] != c1.APIServerVIP {
		t.Fatalf("direct re-Allocate: %v, %v (want created=false, %s)", r, err, c1.APIServerVIP)
	}

	// c2 gets the second VIP and the last node address; its second node finds the pool full.
	c2, err := CreateCluster(ctx, c, "net-t", "c2", []string{"c2-n1", "c2-n2"})
	if !errors.Is(err, ipam.ErrExhausted) {
		t.Fatalf("third node address in a 3-address pool: err=%v, want ErrExhausted", err)
	}
	if errors.Is(err, ipam.ErrConflict) || status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("exhaustion decoded as %v (code %v)", err, status.Code(err))
	}
	var se *ipam.Error
	if !errors.As(err, &se) || se.Message == "" || !strings.Contains(err.Error(), "c2-n2") {
		t.Fatalf("exhaustion error lacks the store's message or the node: %v", err)
	}
	if len(c2.Nodes) != 1 || c2.APIServerVIP == "" || c2.APIServerVIP == c1.APIServerVIP {
		t.Fatalf("c2 before exhaustion: %+v", c2)
	}

	// The other classes the store reports.
	_, err = c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-t", RequestedAddresses: []string{c1.APIServerVIP},
		Owner: &ipamv1.Owner{ClusterId: "c3", Kind: ipamv1.OwnerKind_OWNER_KIND_API_SERVER, Name: APIServerName}})
	if !errors.Is(err, ipam.ErrConflict) {
		t.Fatalf("another cluster asking for c1's VIP: err=%v, want ErrConflict", err)
	}
	_, err = c.GetAllocation(ctx, &ipamv1.GetAllocationRequest{Network: "net-t", Owner: &ipamv1.Owner{
		ClusterId: "nobody", Kind: ipamv1.OwnerKind_OWNER_KIND_NODE, Name: "x"}})
	if !errors.Is(err, ipam.ErrNotFound) {
		t.Fatalf("GetAllocation of an unknown owner: err=%v, want ErrNotFound", err)
	}
	_, err = CreateVM(ctx, c, "net-t", "Bad_Cluster", "n1")
	if !errors.Is(err, ipam.ErrInvalid) || !strings.Contains(err.Error(), "cluster") {
		t.Fatalf("invalid cluster id: err=%v, want ErrInvalid naming the field", err)
	}
	overlapping := smallNetwork()
	overlapping.Name, overlapping.ManagedBy = "net-u", ""
	if _, err = EnsureNetwork(ctx, c, overlapping); !errors.Is(err, ipam.ErrOverlap) {
		t.Fatalf("overlapping network: err=%v, want ErrOverlap", err)
	}

	// Deleting c1 releases its three addresses; c2 can then finish.
	if got := used(t, ctx, c, "nodes"); got != "3" {
		t.Fatalf("nodes used before delete: %s, want 3", got)
	}
	n, err := DeleteCluster(ctx, c, "net-t", "c1")
	if err != nil || n != 3 {
		t.Fatalf("delete c1: released %d (want 3), err=%v", n, err)
	}
	_, err = c.GetAllocation(ctx, &ipamv1.GetAllocationRequest{Network: "net-t", Owner: &ipamv1.Owner{
		ClusterId: "c1", Kind: ipamv1.OwnerKind_OWNER_KIND_API_SERVER, Name: APIServerName}})
	if !errors.Is(err, ipam.ErrNotFound) {
		t.Fatalf("c1's VIP after delete: err=%v, want ErrNotFound", err)
	}
	if got := used(t, ctx, c, "nodes"); got != "1" {
		t.Fatalf("nodes used after deleting c1: %s, want 1", got)
	}
	c2, err = CreateCluster(ctx, c, "net-t", "c2", []string{"c2-n1", "c2-n2"})
	if err != nil || len(c2.Nodes) != 2 {
		t.Fatalf("c2 after c1 released its addresses: %+v, err=%v", c2, err)
	}
	if err := DeleteVM(ctx, c, "net-t", "c2", "c2-n2"); err != nil {
		t.Fatal(err)
	}
	if n, err = DeleteCluster(ctx, c, "net-t", "c2"); err != nil || n != 2 {
		t.Fatalf("delete c2: released %d (want 2: VIP and c2-n1), err=%v", n, err)
	}
	for _, pool := range []string{"vip", "nodes"} {
		if got := used(t, ctx, c, pool); got != "0" {
			t.Fatalf("%s used after deleting every cluster: %s", pool, got)
		}
	}
}

// The command itself, as a user runs it (with the URL form CAIRN_IPAM_ENDPOINT takes).
func TestDemoCommandAgainstLiveStore(t *testing.T) {
	srv := storetest.Start(t, "--default-reuse-grace", "0s")
	var out bytes.Buffer
	if err := run([]string{"-endpoint", "http://" + srv.Addr, "-cluster", "k1", "-nodes", "2", "demo"}, &out); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		"network net-a: changed=true",
		"cluster k1: api-server VIP 10.20.1.",
		"cluster k1: node k1-node-1 10.20.2.",
		"cluster k1: node k1-node-2 10.20.2.",
		"cluster k1: released 3 addresses",
	} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("demo output lacks %q:\n%s", want, out.String())
		}
	}
	// Flags after the command, as the package documentation shows them.
	out.Reset()
	if err := run([]string{"create", "-endpoint", srv.Addr, "-cluster", "k2", "-nodes", "1"}, &out); err != nil ||
		!strings.Contains(out.String(), "cluster k2: node k2-node-1 10.20.2.") {
		t.Fatalf("create with flags after the command: %v\n%s", err, out.String())
	}
	if err := run([]string{"-endpoint", srv.Addr, "frobnicate"}, &out); err == nil || !strings.Contains(err.Error(), "frobnicate") {
		t.Fatalf("unknown command: err=%v", err)
	}
}
