package ipam

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// The store's TLS listener lands with issue 12; until then these tests put the client's TLS
// options against a Go gRPC server that requires a client certificate, with real certificates.

type pki struct {
	dir                       string
	caFile, certFile, keyFile string
	serverCert                tls.Certificate
	caPool                    *x509.CertPool
	otherCAFile               string
}

func newCA(t *testing.T, cn string) (*x509.Certificate, *ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func issue(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string, serial int64, usage x509.ExtKeyUsage) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ca, caKey, caPEM := newCA(t, "cairn test CA")
	srvCert, srvKey := issue(t, ca, caKey, "cairn-ipam", 2, x509.ExtKeyUsageServerAuth)
	cliCert, cliKey := issue(t, ca, caKey, "cloud", 3, x509.ExtKeyUsageClientAuth)
	_, _, otherPEM := newCA(t, "some other CA")
	server, err := tls.X509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &pki{
		dir:         dir,
		caFile:      write("ca.pem", caPEM),
		certFile:    write("client.pem", cliCert),
		keyFile:     write("client-key.pem", cliKey),
		otherCAFile: write("other-ca.pem", otherPEM),
		serverCert:  server,
		caPool:      pool,
	}
}

// whoami answers GetUsage with the client certificate's common name as the network name.
type whoami struct {
	ipamv1.UnimplementedIpamServiceServer
}

func (whoami) GetUsage(ctx context.Context, _ *ipamv1.GetUsageRequest) (*ipamv1.GetUsageResponse, error) {
	p, _ := peer.FromContext(ctx)
	info, _ := p.AuthInfo.(credentials.TLSInfo)
	cn := ""
	if chains := info.State.VerifiedChains; len(chains) > 0 {
		cn = chains[0][0].Subject.CommonName
	}
	return &ipamv1.GetUsageResponse{Pools: []*ipamv1.PoolUsage{{Network: cn}}}, nil
}

func mtlsServer(t *testing.T, p *pki) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{p.serverCert},
		ClientCAs:    p.caPool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	})))
	ipamv1.RegisterIpamServiceServer(s, whoami{})
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return l.Addr().String()
}

func usageCN(t *testing.T, addr string, opts ...Option) (string, error) {
	t.Helper()
	c, err := Dial(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.GetUsage(ctx, &ipamv1.GetUsageRequest{})
	if err != nil {
		return "", err
	}
	return r.GetPools()[0].GetNetwork(), nil
}

func TestWithTLSPresentsTheClientCertificate(t *testing.T) {
	p := newPKI(t)
	addr := mtlsServer(t, p)
	cn, err := usageCN(t, addr, WithTLS(p.caFile, p.certFile, p.keyFile))
	if err != nil || cn != "cloud" {
		t.Fatalf("mTLS call: server saw client %q, err=%v", cn, err)
	}
	// Without a client certificate the server refuses the handshake.
	if _, err := usageCN(t, addr, WithTLS(p.caFile, "", "")); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("no client certificate: err=%v, want ErrUnavailable (handshake refused)", err)
	}
	// A CA that did not sign the server's certificate: the client refuses the server.
	if _, err := usageCN(t, addr, WithTLS(p.otherCAFile, p.certFile, p.keyFile)); !errors.Is(err, ErrUnavailable) ||
		!strings.Contains(err.Error(), "certificate") {
		t.Fatalf("wrong CA: err=%v, want ErrUnavailable about the certificate", err)
	}
	// Plaintext against a TLS server fails too.
	if _, err := usageCN(t, addr); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("plaintext to a TLS server: err=%v", err)
	}
	// The URL form of the Rust tools: https:// with the options works...
	if cn, err := usageCN(t, "https://"+addr, WithTLS(p.caFile, p.certFile, p.keyFile)); err != nil || cn != "cloud" {
		t.Fatalf("https:// target: %q, %v", cn, err)
	}
	// ...and without options means TLS with the system roots, which do not hold the test CA.
	if _, err := usageCN(t, "https://"+addr); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("https:// with system roots against a private CA: err=%v", err)
	}
}

func TestWithTLSNamesTheBadInput(t *testing.T) {
	p := newPKI(t)
	missing := filepath.Join(p.dir, "missing.pem")
	for _, tc := range []struct {
		name               string
		ca, cert, key, msg string
	}{
		{"missing CA", missing, "", "", "CA file"},
		{"CA without PEM", p.keyFile, "", "", "no PEM certificate"},
		{"cert without key", p.caFile, p.certFile, "", "key file: required"},
		{"key without cert", p.caFile, "", p.keyFile, "certificate file: required"},
		{"key that is no key", p.caFile, p.certFile, p.caFile, "client certificate"},
	} {
		_, err := Dial("127.0.0.1:1", WithTLS(tc.ca, tc.cert, tc.key))
		if err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: err=%v, want one naming %q", tc.name, err, tc.msg)
		}
	}
	for _, target := range []string{"", "http://", "https://"} {
		if _, err := Dial(target); err == nil || !strings.Contains(err.Error(), "target") {
			t.Errorf("target %q: err=%v", target, err)
		}
	}
	if _, err := Dial("http://127.0.0.1:1", WithTLS(p.caFile, "", "")); err == nil || !strings.Contains(err.Error(), "plaintext") {
		t.Errorf("http:// with TLS options: err=%v", err)
	}
	if _, err := Dial("127.0.0.1:1", WithTLSConfig(nil)); err == nil || !strings.Contains(err.Error(), "WithTLSConfig") {
		t.Errorf("WithTLSConfig(nil): err=%v", err)
	}
}
