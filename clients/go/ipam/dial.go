// Package ipam is a thin Go client for the Cairn IPAM store (cairn.ipam.v1.IpamService).
//
// Dial opens a connection and returns a Client, which embeds the generated
// ipamv1.IpamServiceClient: every RPC of the API is called on it directly. Errors returned by a
// Client's calls are decoded into *Error values that wrap one of the sentinel errors of this
// package (ErrExhausted, ErrConflict, ...), so callers branch with errors.Is. Errors from a
// connection made elsewhere can be decoded with DecodeError.
//
// The connection is plaintext unless WithTLS or WithTLSConfig is given: the server's CA, and
// for a store that runs mutual TLS (`cairn-ipam serve --client-ca`) a client certificate whose
// spiffe:// URI SAN is the caller's identity (…/cluster/<id>, …/cloud or …/reader; a call the
// identity may not make fails with ErrPermissionDenied).
package ipam

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// Client is a connection to the store. All of ipamv1.IpamServiceClient's methods are available
// on it; their errors wrap this package's sentinel errors.
type Client struct {
	ipamv1.IpamServiceClient
	replicas *replicas
}

// Close closes the connection (every replica's).
func (c *Client) Close() error {
	var errs []error
	for _, conn := range c.replicas.conns {
		errs = append(errs, conn.Close())
	}
	return errors.Join(errs...)
}

// Conn is the underlying connection (for health checks or other services); with several
// replicas, the one calls go to now.
func (c *Client) Conn() *grpc.ClientConn { return c.replicas.current() }

type options struct {
	tls          *tls.Config
	tlsErr       error
	dialOpts     []grpc.DialOption
	failoverWait time.Duration
}

// Option configures Dial.
type Option func(*options)

// WithTLS connects over TLS. caFile is a PEM bundle the server's certificate must chain to
// (empty: the system roots). certFile and keyFile are a PEM client certificate and its key for
// mutual TLS; give both or neither.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(o *options) {
		cfg, err := tlsConfig(caFile, certFile, keyFile)
		if err != nil {
			o.tlsErr = err
			return
		}
		o.tls = cfg
	}
}

// WithTLSConfig connects over TLS with a configuration built by the caller.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(o *options) {
		if cfg == nil {
			o.tlsErr = errors.New("ipam: WithTLSConfig: nil *tls.Config")
			return
		}
		o.tls = cfg.Clone()
	}
}

// WithDialOptions passes extra options to grpc.NewClient (interceptors, keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

func tlsConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("ipam: TLS CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ipam: TLS CA file %s: no PEM certificate found", caFile)
		}
		cfg.RootCAs = pool
	}
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("ipam: TLS client certificate (%s, %s): %w", certFile, keyFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case certFile != "":
		return nil, fmt.Errorf("ipam: TLS client key file: required with certificate file %s", certFile)
	case keyFile != "":
		return nil, fmt.Errorf("ipam: TLS client certificate file: required with key file %s", keyFile)
	}
	return cfg, nil
}

// MaxMessageSize is the largest message the store and this client send or accept (16 MiB, as
// documented in the proto); grpc-go's receive default is 4 MiB.
const MaxMessageSize = 16 << 20

// Dial returns a Client for target: "host:port" or any grpc.NewClient target, or a URL as the
// Rust tools take it (CAIRN_IPAM_ENDPOINT): "http://host:port" is plaintext, "https://host:port"
// is TLS (the system's roots unless WithTLS/WithTLSConfig say otherwise). Like grpc.NewClient
// it does not wait for the connection: the first call does.
//
// The replicas of an HA store (`cairn-ipam serve --backend etcd`) are given as one
// comma-separated target, "http://a:50051,http://b:50051,http://c:50051", as the Rust tools
// take them. Every call then goes to the replica that leads: a follower's refusal
// (UNAVAILABLE) names the leader in LeaderMetadata, and a unary call is sent on to it, or,
// while no replica leads, retried with backoff for up to WithFailoverWait (default
// DefaultFailoverWait) or the context's deadline. Streams are not retried (see the replicas
// type).
func Dial(target string, opts ...Option) (*Client, error) {
	if strings.TrimSpace(target) == "" {
		return nil, errors.New("ipam: target: must not be empty")
	}
	o := options{failoverWait: DefaultFailoverWait}
	for _, opt := range opts {
		opt(&o)
	}
	if o.tlsErr != nil {
		return nil, o.tlsErr
	}
	r := &replicas{wait: o.failoverWait}
	for i, t := range strings.Split(target, ",") {
		conn, err := dialOne(strings.TrimSpace(t), o)
		if err != nil {
			for _, c := range r.conns {
				_ = c.Close()
			}
			if strings.Contains(target, ",") {
				return nil, fmt.Errorf("ipam: target %d of %q: %w", i, target, err)
			}
			return nil, err
		}
		r.conns = append(r.conns, conn)
		r.hosts = append(r.hosts, hostPort(conn.Target()))
	}
	return &Client{IpamServiceClient: ipamv1.NewIpamServiceClient(r), replicas: r}, nil
}

// dialOne connects to one target (see Dial).
func dialOne(target string, o options) (*grpc.ClientConn, error) {
	if target == "" {
		return nil, errors.New("ipam: target: must not be empty")
	}
	if rest, ok := strings.CutPrefix(target, "http://"); ok {
		if o.tls != nil {
			return nil, fmt.Errorf("ipam: target %q: http:// is plaintext, but TLS options were given (use https://)", target)
		}
		target = strings.TrimSuffix(rest, "/")
	} else if rest, ok := strings.CutPrefix(target, "https://"); ok {
		if o.tls == nil {
			o.tls = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		target = strings.TrimSuffix(rest, "/")
	}
	if target == "" {
		return nil, errors.New("ipam: target: no host:port")
	}
	creds := insecure.NewCredentials()
	if o.tls != nil {
		creds = credentials.NewTLS(o.tls)
	}
	dialOpts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)),
		grpc.WithChainUnaryInterceptor(decodeUnary),
		grpc.WithChainStreamInterceptor(decodeStream),
	}, o.dialOpts...)
	conn, err := grpc.NewClient(target, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("ipam: dial %s: %w", target, err)
	}
	return conn, nil
}

func decodeUnary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return DecodeError(invoker(ctx, method, req, reply, cc, opts...))
}

func decodeStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, DecodeError(err)
	}
	return decodingStream{s}, nil
}

// decodingStream decodes the errors of a server stream (WatchAllocations); io.EOF, the normal
// end of a stream, passes through unchanged.
type decodingStream struct{ grpc.ClientStream }

func (s decodingStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err == nil || errors.Is(err, io.EOF) {
		return err
	}
	return DecodeError(err)
}
