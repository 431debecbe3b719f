package ipam

import (
	"context"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// LeaderMetadata is the response metadata key in which a follower replica of an HA store
// (`cairn-ipam serve --backend etcd`) names the leader's URL when it refuses a call with
// UNAVAILABLE.
const LeaderMetadata = "cairn-leader"

// DefaultFailoverWait bounds how long a call to several replicas keeps trying while no replica
// leads (an election after the leader died takes about the leader lease, 5 s by default), when
// the call's context has no earlier deadline.
const DefaultFailoverWait = 30 * time.Second

// WithFailoverWait sets how long a call to several replicas keeps trying while no replica
// leads (default DefaultFailoverWait; the call's context deadline, when earlier, wins).
func WithFailoverWait(d time.Duration) Option {
	return func(o *options) { o.failoverWait = d }
}

// replicas sends each call to the replica that leads: the one last seen leading, else the
// one a follower names in its refusal, else the next. Only unary calls are retried, and only
// after UNAVAILABLE: every RPC of the API is safe to repeat (Allocate and Release are
// idempotent per owner; an UpsertNetwork that already took effect reports changed = false),
// and a follower refuses before doing anything. A stream (WatchAllocations, ExportStream,
// ImportStream) goes to the current replica and is not retried: a stream a follower refused or
// a failover cut ends with UNAVAILABLE, and the next call or stream goes to the new leader.
type replicas struct {
	conns []*grpc.ClientConn
	// host:port of each target, to find the one a follower names.
	hosts []string
	cur   atomic.Int32
	wait  time.Duration
}

// hostPort is a target or leader URL without scheme and trailing slash.
func hostPort(s string) string {
	for _, p := range []string{"http://", "https://"} {
		s = strings.TrimPrefix(s, p)
	}
	return strings.TrimSuffix(s, "/")
}

// leaderOf returns the leader a follower named in its refusal, if any.
func leaderOf(md ...metadata.MD) string {
	for _, m := range md {
		if v := m.Get(LeaderMetadata); len(v) > 0 && v[0] != "" {
			return v[0]
		}
	}
	return ""
}

// next is the replica to try after replica i refused, naming leader (may be empty).
func (r *replicas) next(i int32, leader string) int32 {
	if leader != "" {
		want := hostPort(leader)
		for j, h := range r.hosts {
			if h == want {
				return int32(j)
			}
		}
	}
	return (i + 1) % int32(len(r.conns))
}

func (r *replicas) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	if len(r.conns) == 1 {
		// Nothing to fail over to: UNAVAILABLE goes straight to the caller.
		return r.conns[0].Invoke(ctx, method, args, reply, opts...)
	}
	giveUp := time.Now().Add(r.wait)
	backoff := 50 * time.Millisecond
	for {
		i := r.cur.Load()
		var header, trailer metadata.MD
		err := r.conns[i].Invoke(ctx, method, args, reply, append(opts, grpc.Header(&header), grpc.Trailer(&trailer))...)
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil || time.Now().After(giveUp) {
			return err
		}
		leader := leaderOf(header, trailer)
		n := r.next(i, leader)
		r.cur.CompareAndSwap(i, n)
		// Straight on to a leader a follower named; otherwise (an election under way, a
		// replica down) wait a little first.
		if leader == "" || n == i {
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return err
			case <-t.C:
			}
			backoff = min(backoff*2, time.Second)
		}
	}
}

func (r *replicas) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return r.conns[r.cur.Load()].NewStream(ctx, desc, method, opts...)
}

// current is the connection to the replica calls go to now.
func (r *replicas) current() *grpc.ClientConn { return r.conns[r.cur.Load()] }
