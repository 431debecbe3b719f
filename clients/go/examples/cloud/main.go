// Command cloud does what an on-prem cloud service does with the Cairn store: it defines a
// shared network with a VIP pool and a NODE pool, takes a cluster's API-server VIP and its
// nodes' addresses when the cluster's VMs are created, and gives them back when they are
// deleted.
//
//	cloud [-endpoint 127.0.0.1:50051 | http://HOST:PORT] [-ca ca.pem -cert client.pem -key client-key.pem] CMD
//
//	network                          create or update the shared network (managed by "cloud")
//	create  -cluster ID -nodes N     allocate the API-server VIP and N node addresses; print them
//	delete  -cluster ID              release every address the cluster holds on the network
//	demo    -cluster ID -nodes N     network, create, delete in one go
//
// Every step is idempotent: running create twice prints the same addresses.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"cairn.dev/clients/go/ipam"
	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// Managed is the managed_by value of the networks this service defines: an upsert by anyone
// else that changes them is refused by the store.
const Managed = "cloud"

// DefaultNetwork is the shared network of the architecture picture: VIPs of every cluster in
// one pool, node addresses in another.
func DefaultNetwork(name string) *ipamv1.Network {
	return &ipamv1.Network{
		Name:       name,
		Prefixes:   []string{"10.20.0.0/16"},
		Gateways:   []string{"10.20.0.1"},
		DnsServers: []string{"10.20.0.2"},
		Vlan:       20,
		ManagedBy:  Managed,
		Pools: []*ipamv1.Pool{
			{Name: "vip", Purpose: ipamv1.PoolPurpose_POOL_PURPOSE_VIP, Ranges: []string{"10.20.1.0/24"}},
			{Name: "nodes", Purpose: ipamv1.PoolPurpose_POOL_PURPOSE_NODE, Ranges: []string{"10.20.2.0/24"}},
		},
	}
}

// EnsureNetwork creates or updates the network definition; it reports whether anything changed.
func EnsureNetwork(ctx context.Context, c *ipam.Client, def *ipamv1.Network) (changed bool, err error) {
	r, err := c.UpsertNetwork(ctx, &ipamv1.UpsertNetworkRequest{Network: def})
	if err != nil {
		return false, fmt.Errorf("network %s: %w", def.GetName(), err)
	}
	return r.GetChanged(), nil
}

// Cluster is what the cloud hands a new cluster: its API-server VIP and one address per node.
type Cluster struct {
	ID           string
	APIServerVIP string
	Nodes        []Node
}

// Node is a VM of a cluster.
type Node struct {
	Name    string
	Address string
}

// APIServerName is the conventional owner name of a cluster's API-server VIP.
const APIServerName = "kube-apiserver"

// CreateCluster allocates the API-server VIP (from the VIP pools) and an address for every
// node (from the NODE pools). A retry returns what the cluster already holds. On an error the
// addresses taken so far stay allocated, so a retry continues where this call stopped and
// DeleteCluster releases them all.
func CreateCluster(ctx context.Context, c *ipam.Client, network, clusterID string, nodes []string) (Cluster, error) {
	cl := Cluster{ID: clusterID}
	vip, err := allocate(ctx, c, network, &ipamv1.Owner{
		ClusterId: clusterID, Kind: ipamv1.OwnerKind_OWNER_KIND_API_SERVER, Name: APIServerName,
	})
	if err != nil {
		return cl, fmt.Errorf("cluster %s: API-server VIP: %w", clusterID, err)
	}
	cl.APIServerVIP = vip
	for _, n := range nodes {
		addr, err := CreateVM(ctx, c, network, clusterID, n)
		if err != nil {
			return cl, err
		}
		cl.Nodes = append(cl.Nodes, Node{Name: n, Address: addr})
	}
	return cl, nil
}

// CreateVM allocates the address of one node VM.
func CreateVM(ctx context.Context, c *ipam.Client, network, clusterID, node string) (string, error) {
	addr, err := allocate(ctx, c, network, &ipamv1.Owner{
		ClusterId: clusterID, Kind: ipamv1.OwnerKind_OWNER_KIND_NODE, Name: node,
	})
	if err != nil {
		return "", fmt.Errorf("cluster %s: node %s: %w", clusterID, node, err)
	}
	return addr, nil
}

func allocate(ctx context.Context, c *ipam.Client, network string, owner *ipamv1.Owner) (string, error) {
	// Purpose left unset: the store picks VIP pools for API_SERVER and NODE pools for NODE.
	r, err := c.Allocate(ctx, &ipamv1.AllocateRequest{Network: network, Owner: owner})
	if err != nil {
		return "", err
	}
	addrs := r.GetAllocation().GetAddresses()
	if len(addrs) == 0 {
		return "", fmt.Errorf("store returned an allocation without addresses for %s/%s", owner.GetClusterId(), owner.GetName())
	}
	return addrs[0], nil
}

// DeleteVM releases the address of one node VM; releasing nothing is not an error.
func DeleteVM(ctx context.Context, c *ipam.Client, network, clusterID, node string) error {
	_, err := c.Release(ctx, &ipamv1.ReleaseRequest{Network: network, Owner: &ipamv1.Owner{
		ClusterId: clusterID, Kind: ipamv1.OwnerKind_OWNER_KIND_NODE, Name: node,
	}})
	if err != nil {
		return fmt.Errorf("cluster %s: node %s: %w", clusterID, node, err)
	}
	return nil
}

// DeleteCluster releases every allocation the cluster holds on the network (its VIP, its nodes,
// and any Service VIPs its controller left behind) and returns how many it released.
func DeleteCluster(ctx context.Context, c *ipam.Client, network, clusterID string) (int, error) {
	var held []*ipamv1.Allocation
	token := ""
	for {
		r, err := c.ListAllocations(ctx, &ipamv1.ListAllocationsRequest{
			Network: network, ClusterId: clusterID, PageToken: token,
		})
		if err != nil {
			return 0, fmt.Errorf("cluster %s: listing allocations: %w", clusterID, err)
		}
		held = append(held, r.GetAllocations()...)
		if token = r.GetNextPageToken(); token == "" {
			break
		}
	}
	released := 0
	for _, a := range held {
		r, err := c.Release(ctx, &ipamv1.ReleaseRequest{Network: network, Owner: a.GetOwner()})
		if err != nil {
			return released, fmt.Errorf("cluster %s: releasing %s: %w", clusterID, a.GetOwner().GetName(), err)
		}
		if r.GetReleased() {
			released++
		}
	}
	return released, nil
}

// Print writes a cluster's addresses, one per line.
func Print(w io.Writer, cl Cluster) {
	fmt.Fprintf(w, "cluster %s: api-server VIP %s\n", cl.ID, cl.APIServerVIP)
	for _, n := range cl.Nodes {
		fmt.Fprintf(w, "cluster %s: node %s %s\n", cl.ID, n.Name, n.Address)
	}
}

func nodeNames(clusterID string, n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s-node-%d", clusterID, i+1)
	}
	return names
}

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "cloud:", err)
		if errors.Is(err, ipam.ErrExhausted) {
			fmt.Fprintln(os.Stderr, "cloud: the pool is full: grow it (network ranges) or delete a cluster")
		}
		os.Exit(1)
	}
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("cloud", flag.ContinueOnError)
	endpoint := fs.String("endpoint", envOr("CAIRN_IPAM_ENDPOINT", "127.0.0.1:50051"), "store address: host:port, http://host:port or https://host:port (default $CAIRN_IPAM_ENDPOINT)")
	network := fs.String("network", "net-a", "network name")
	ca := fs.String("ca", "", "PEM CA bundle of the store's certificate (enables TLS)")
	cert := fs.String("cert", "", "PEM client certificate (mutual TLS; with -key)")
	key := fs.String("key", "", "PEM client key (mutual TLS; with -cert)")
	cluster := fs.String("cluster", "demo", "cluster id")
	nodes := fs.Int("nodes", 3, "node VMs of the cluster")
	timeout := fs.Duration("timeout", 30*time.Second, "deadline for the whole command")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: cloud network|create|delete|demo [flags]")
		fs.PrintDefaults()
	}
	// Flags may come before or after the command: `cloud -endpoint X create -cluster c1`.
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return errors.New("a command is required: network, create, delete or demo")
	}
	cmd := fs.Arg(0)
	if err := fs.Parse(fs.Args()[1:]); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments after %s: %v", cmd, fs.Args())
	}
	if *nodes < 0 {
		return fmt.Errorf("-nodes: %d is negative", *nodes)
	}
	var opts []ipam.Option
	if *ca != "" || *cert != "" || *key != "" {
		opts = append(opts, ipam.WithTLS(*ca, *cert, *key))
	}
	c, err := ipam.Dial(*endpoint, opts...)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	doNetwork := func() error {
		changed, err := EnsureNetwork(ctx, c, DefaultNetwork(*network))
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "network %s: changed=%v\n", *network, changed)
		return nil
	}
	doCreate := func() error {
		cl, err := CreateCluster(ctx, c, *network, *cluster, nodeNames(*cluster, *nodes))
		if err != nil {
			return err
		}
		Print(out, cl)
		return nil
	}
	doDelete := func() error {
		n, err := DeleteCluster(ctx, c, *network, *cluster)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "cluster %s: released %d addresses\n", *cluster, n)
		return nil
	}
	switch cmd {
	case "network":
		return doNetwork()
	case "create":
		return doCreate()
	case "delete":
		return doDelete()
	case "demo":
		for _, step := range []func() error{doNetwork, doCreate, doDelete} {
			if err := step(); err != nil {
				return err
			}
		}
		return nil
	default:
		return fmt.Errorf("unknown command %q: network, create, delete or demo", cmd)
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
