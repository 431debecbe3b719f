package ipam

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cairn.dev/clients/go/internal/storetest"
	ipamv1 "cairn.dev/clients/go/ipam/v1"
)

// The client's TLS options against the store's own mutual TLS (`cairn-ipam serve --tls-cert
// --tls-key --client-ca`), with certificates made here: a private CA, the server's certificate
// for 127.0.0.1, and client certificates whose SPIFFE URI SANs are the store's identities.

const trustDomain = "cairn.test"

type pki struct {
	dir                           string
	caFile, certFile, keyFile     string // the cloud identity
	readerCertFile, readerKeyFile string // a reader
	serverCertFile, serverKeyFile string
	otherCAFile                   string
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

func issue(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string, serial int64, usage x509.ExtKeyUsage, uris ...string) (certPEM, keyPEM []byte) {
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
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
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
	cliCert, cliKey := issue(t, ca, caKey, "cloud", 3, x509.ExtKeyUsageClientAuth, "spiffe://"+trustDomain+"/cloud")
	rdCert, rdKey := issue(t, ca, caKey, "reader", 4, x509.ExtKeyUsageClientAuth, "spiffe://"+trustDomain+"/reader")
	_, _, otherPEM := newCA(t, "some other CA")
	return &pki{
		dir:            dir,
		caFile:         write("ca.pem", caPEM),
		certFile:       write("client.pem", cliCert),
		keyFile:        write("client-key.pem", cliKey),
		readerCertFile: write("reader.pem", rdCert),
		readerKeyFile:  write("reader-key.pem", rdKey),
		serverCertFile: write("server.pem", srvCert),
		serverKeyFile:  write("server-key.pem", srvKey),
		otherCAFile:    write("other-ca.pem", otherPEM),
	}
}

// mtlsStore runs a real cairn-ipam that speaks mutual TLS only.
func mtlsStore(t *testing.T, p *pki) string {
	t.Helper()
	return storetest.Start(t, "--tls-cert", p.serverCertFile, "--tls-key", p.serverKeyFile,
		"--client-ca", p.caFile, "--trust-domain", trustDomain, "--default-reuse-grace", "0s").Addr
}

// call dials addr with opts and makes one call with the client.
func call[T any](t *testing.T, addr string, f func(context.Context, *Client) (T, error), opts ...Option) (T, error) {
	t.Helper()
	c, err := Dial(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return f(ctx, c)
}

func usage(ctx context.Context, c *Client) (*ipamv1.GetUsageResponse, error) {
	return c.GetUsage(ctx, &ipamv1.GetUsageRequest{})
}

func allocate(ctx context.Context, c *Client) (*ipamv1.AllocateResponse, error) {
	return c.Allocate(ctx, &ipamv1.AllocateRequest{Network: "net-tls", Owner: &ipamv1.Owner{
		ClusterId: "c1", Kind: ipamv1.OwnerKind_OWNER_KIND_API_SERVER, Name: "kube-apiserver"}})
}

func TestWithTLSAgainstTheStoresMutualTLS(t *testing.T) {
	p := newPKI(t)
	addr := mtlsStore(t, p)
	cloud := WithTLS(p.caFile, p.certFile, p.keyFile)
	if _, err := call(t, addr, func(ctx context.Context, c *Client) (*ipamv1.UpsertNetworkResponse, error) {
		return c.UpsertNetwork(ctx, &ipamv1.UpsertNetworkRequest{Network: &ipamv1.Network{Name: "net-tls",
			Pools: []*ipamv1.Pool{{Name: "vip", Purpose: ipamv1.PoolPurpose_POOL_PURPOSE_VIP, Ranges: []string{"10.50.0.10-10.50.0.20"}}}}})
	}, cloud); err != nil {
		t.Fatalf("the cloud identity defining a network: %v", err)
	}
	r, err := call(t, addr, allocate, cloud)
	if err != nil || r.GetAllocation().GetAddresses()[0] != "10.50.0.10" {
		t.Fatalf("the cloud identity allocating: %v, %v", r, err)
	}
	// A reader reads, and may not write: PERMISSION_DENIED naming the identity.
	reader := WithTLS(p.caFile, p.readerCertFile, p.readerKeyFile)
	if u, err := call(t, addr, usage, reader); err != nil || len(u.GetPools()) != 1 {
		t.Fatalf("a reader's GetUsage: %v, %v", u, err)
	}
	if _, err := call(t, addr, allocate, reader); !errors.Is(err, ErrPermissionDenied) || !strings.Contains(err.Error(), "reader") {
		t.Fatalf("a reader allocating: err=%v, want ErrPermissionDenied naming the reader", err)
	}
	// Without a client certificate the server refuses the handshake.
	if _, err := call(t, addr, usage, WithTLS(p.caFile, "", "")); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("no client certificate: err=%v, want ErrUnavailable (handshake refused)", err)
	}
	// A CA that did not sign the server's certificate: the client refuses the server.
	if _, err := call(t, addr, usage, WithTLS(p.otherCAFile, p.certFile, p.keyFile)); !errors.Is(err, ErrUnavailable) ||
		!strings.Contains(err.Error(), "certificate") {
		t.Fatalf("wrong CA: err=%v, want ErrUnavailable about the certificate", err)
	}
	// Plaintext against a TLS server fails too.
	if _, err := call(t, addr, usage); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("plaintext to a TLS server: err=%v", err)
	}
	// The URL form of the Rust tools: https:// with the options works...
	if _, err := call(t, "https://"+addr, usage, cloud); err != nil {
		t.Fatalf("https:// target: %v", err)
	}
	// ...and without options means TLS with the system roots, which do not hold the test CA.
	if _, err := call(t, "https://"+addr, usage); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "certificate") {
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
