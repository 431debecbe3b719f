package ipam_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"cairn.dev/clients/go/internal/storetest"
	"cairn.dev/clients/go/ipam"
	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// serving polls the replica's gRPC health for IpamService until it says SERVING (it leads).
func serving(t *testing.T, addr string) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	h := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(storetest.StartDeadline)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: "cairn.ipam.v1.IpamService"})
		cancel()
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %s not leading within %v (last: %v %v)", addr, storetest.StartDeadline, r.GetStatus(), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func service(name string) *ipamv1.Owner {
	return &ipamv1.Owner{ClusterId: "c1", Kind: ipamv1.OwnerKind_OWNER_KIND_SERVICE, Namespace: "default", Name: name}
}

// Two replicas of an HA store on a real etcd: a client given both (the follower first) reaches
// the leader through the follower's refusal, and after the leader is killed -9 its calls go on
// to the replica that takes over — with every acknowledged allocation where it was.
func TestDialSeveralReplicasFollowsTheLeader(t *testing.T) {
	etcd := storetest.StartEtcd(t)
	flags := []string{"--backend", "etcd", "--etcd-endpoints", etcd, "--etcd-prefix", "/go-client",
		"--leader-lease", "2s", "--default-reuse-grace", "0s"}
	a := storetest.Start(t, flags...)
	serving(t, a.Addr)
	b := storetest.Start(t, flags...)

	c, err := ipam.Dial("http://" + b.Addr + ", http://" + a.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := c.UpsertNetwork(ctx, &ipamv1.UpsertNetworkRequest{Network: &ipamv1.Network{
		Name:  "net-ha",
		Pools: []*ipamv1.Pool{{Name: "vip", Purpose: ipamv1.PoolPurpose_POOL_PURPOSE_VIP, Ranges: []string{"10.40.0.10-10.40.0.20"}}},
	}}); err != nil {
		t.Fatalf("upsert through the follower's redirect: %v", err)
	}
	if got := c.Conn().Target(); got != a.Addr {
		t.Fatalf("calls go to %s, want the leader %s", got, a.Addr)
	}
	first, err := c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-ha", Owner: service("web")})
	if err != nil {
		t.Fatal(err)
	}

	// One replica alone is not failed over: the follower's refusal of a write reaches the
	// caller. Reads it answers from its replica of the ledger, which follows the leader's
	// commits through etcd.
	solo, err := ipam.Dial(b.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer solo.Close()
	if _, err := solo.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-ha", Owner: service("other")}); !errors.Is(err, ipam.ErrUnavailable) {
		t.Fatalf("a follower alone answered a write with %v, want ErrUnavailable", err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		got, err := solo.GetAllocation(ctx, &ipamv1.GetAllocationRequest{Network: "net-ha", Owner: service("web")})
		if err == nil && got.GetAddresses()[0] == first.GetAllocation().GetAddresses()[0] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the follower's read of web: %v, %v; want %v", got.GetAddresses(), err, first.GetAllocation().GetAddresses())
		}
		time.Sleep(20 * time.Millisecond)
	}

	a.Kill(t)
	// The next calls wait out the election (a 2 s lease) and land on b.
	again, err := c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-ha", Owner: service("web")})
	if err != nil {
		t.Fatalf("allocate after the leader died: %v", err)
	}
	if got := c.Conn().Target(); got != b.Addr {
		t.Fatalf("calls go to %s, want the new leader %s", got, b.Addr)
	}
	if again.GetCreated() || again.GetAllocation().GetAddresses()[0] != first.GetAllocation().GetAddresses()[0] {
		t.Fatalf("after failover web holds %v (created %v), before %v", again.GetAllocation().GetAddresses(),
			again.GetCreated(), first.GetAllocation().GetAddresses())
	}
	other, err := c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-ha", Owner: service("api")})
	if err != nil {
		t.Fatal(err)
	}
	if other.GetAllocation().GetAddresses()[0] == first.GetAllocation().GetAddresses()[0] {
		t.Fatalf("the new leader handed %s out twice", first.GetAllocation().GetAddresses()[0])
	}
}
