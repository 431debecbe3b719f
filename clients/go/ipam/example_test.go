package ipam_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"cairn.dev/clients/go/ipam"
	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// The README's example (compiled, not run: it needs a store).
func ExampleDial() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := ipam.Dial("127.0.0.1:50051") // or ipam.Dial(addr, ipam.WithTLS("ca.pem", "client.pem", "client-key.pem"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	r, err := c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-a", Owner: &ipamv1.Owner{
		ClusterId: "cluster-a", Kind: ipamv1.OwnerKind_OWNER_KIND_API_SERVER, Name: "kube-apiserver"}})
	switch {
	case errors.Is(err, ipam.ErrExhausted):
		fmt.Println("the VIP pool is full")
	case err != nil:
		fmt.Println(err)
	default:
		fmt.Println("API-server VIP", r.GetAllocation().GetAddresses()[0]) // same answer on every retry
	}
}
