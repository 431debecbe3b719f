// Package storetest runs a real `cairn-ipam serve` process for tests, on 127.0.0.1 port 0 in
// a fresh temporary data directory.
//
// The binary is named by CAIRN_IPAM_BIN (`make test-go` builds it and sets it). When the
// variable is unset the test fails with instructions: a live-store test never passes without
// a store.
package storetest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// StartDeadline bounds how long the server may take to start serving (debug builds on a busy
// 2-core machine).
const StartDeadline = 60 * time.Second

// EnvBin names the environment variable holding the cairn-ipam binary.
const EnvBin = "CAIRN_IPAM_BIN"

// Server is a running cairn-ipam.
type Server struct {
	// Addr is the gRPC listener, host:port.
	Addr string
	// Metrics is the /metrics listener, host:port.
	Metrics string
	cmd     *exec.Cmd
	log     string
	exited  chan struct{}
}

// Bin returns the cairn-ipam binary or fails the test saying how to provide one.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(EnvBin)
	if bin == "" {
		t.Fatalf("%s is not set: this test runs against a live cairn-ipam. From the repository root run "+
			"`make test-go`, or `cargo build -p cairn-ipam --bin cairn-ipam` and then "+
			"`cd clients/go && %s=$PWD/../../target/debug/cairn-ipam go test ./...`", EnvBin, EnvBin)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s=%s: %v (build it with `cargo build -p cairn-ipam --bin cairn-ipam`)", EnvBin, bin, err)
	}
	return bin
}

// Start runs `cairn-ipam serve` with extra flags appended and waits for its --addr-file. The
// process is killed when the test ends; when the test failed, the tail of its log is printed.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	bin := Bin(t)
	dir := t.TempDir()
	addrFile := filepath.Join(dir, "addrs")
	s := &Server{log: filepath.Join(dir, "server.log"), exited: make(chan struct{})}
	logf, err := os.Create(s.log)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"serve",
		"--listen", "127.0.0.1:0",
		"--metrics-listen", "127.0.0.1:0",
		"--data-dir", filepath.Join(dir, "data"),
		"--addr-file", addrFile,
	}, extra...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = append(withoutStoreEnv(os.Environ()), "RUST_LOG=info")
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", bin, err)
	}
	go func() {
		_ = s.cmd.Wait()
		logf.Close()
		close(s.exited)
	}()
	t.Cleanup(func() {
		_ = s.cmd.Process.Kill()
		<-s.exited
		if t.Failed() {
			t.Logf("cairn-ipam log (tail):\n%s", s.LogTail(40))
		}
	})

	deadline := time.Now().Add(StartDeadline)
	for {
		if text, err := os.ReadFile(addrFile); err == nil {
			for _, line := range strings.Split(string(text), "\n") {
				if a, ok := strings.CutPrefix(line, "grpc="); ok {
					s.Addr = a
				} else if a, ok := strings.CutPrefix(line, "metrics="); ok {
					s.Metrics = a
				}
			}
			if s.Addr != "" {
				return s
			}
		}
		select {
		case <-s.exited:
			t.Fatalf("cairn-ipam serve exited (%v) before serving\n%s", s.cmd.ProcessState, s.LogTail(40))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("cairn-ipam serve wrote no %s within %v\n%s", addrFile, StartDeadline, s.LogTail(40))
		}
	}
}

// LogTail returns the last n lines of the server's log.
func (s *Server) LogTail(n int) string {
	f, err := os.Open(s.log)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// withoutStoreEnv drops the server's own CAIRN_IPAM_* settings so flags alone configure it.
func withoutStoreEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, "CAIRN_IPAM_LISTEN=") &&
			!strings.HasPrefix(kv, "CAIRN_IPAM_DATA_DIR=") &&
			!strings.HasPrefix(kv, "CAIRN_IPAM_METRICS_LISTEN=") {
			out = append(out, kv)
		}
	}
	return out
}

// Kill stops the server with SIGKILL (a crash) and waits until it has exited.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 cairn-ipam: %v", err)
	}
	select {
	case <-s.exited:
	case <-time.After(StartDeadline):
		t.Fatalf("cairn-ipam did not exit within %v of SIGKILL", StartDeadline)
	}
}

// EnvEtcdBin names the environment variable holding the etcd binary, for tests of an HA
// store (`make test-go` sets it to the etcd `make tools` built).
const EnvEtcdBin = "CAIRN_ETCD_BIN"

// The limits cairn-ipam requires of its etcd (`cairn_ipam::store::etcd::server_flags`).
var etcdFlags = []string{"--max-txn-ops=16384", "--max-request-bytes=33554432"}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// StartEtcd runs a one-member etcd on loopback, with the limits cairn-ipam requires, until the
// test ends, and returns its client URL once it reports healthy.
func StartEtcd(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(EnvEtcdBin)
	if bin == "" {
		t.Fatalf("%s is not set: this test runs a real etcd. From the repository root run `make test-go` "+
			"(`make tools` builds etcd into .cache/bin)", EnvEtcdBin)
	}
	dir := t.TempDir()
	client := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	logf, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{
		"--name=m0",
		"--data-dir=" + filepath.Join(dir, "data"),
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=m0=" + peer,
		"--log-level=warn",
	}, etcdFlags...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(StartDeadline)
	for {
		if resp, err := http.Get(client + "/health"); err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(body), `"health":"true"`) {
				return client
			}
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "etcd.log"))
			t.Fatalf("etcd exited before it was healthy:\n%s", log)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd at %s not healthy within %v", client, StartDeadline)
		}
	}
}
