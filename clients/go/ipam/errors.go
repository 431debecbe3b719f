package ipam

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The store's error classes, one per gRPC code it uses (see proto/cairn/ipam/v1/ipam.proto).
// Errors from a Client wrap exactly one of them: test with errors.Is.
var (
	// ErrInvalid: INVALID_ARGUMENT, a malformed request; the message names the field.
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: NOT_FOUND, no such network, pool or allocation.
	ErrNotFound = errors.New("not found")
	// ErrOverlap: ALREADY_EXISTS, a definition would overlap one that exists.
	ErrOverlap = errors.New("overlaps an existing definition")
	// ErrConflict: FAILED_PRECONDITION, the request conflicts with what the store holds (address
	// held by another owner, uid mismatch, managed by someone else, pool in use, version).
	ErrConflict = errors.New("conflict")
	// ErrExhausted: RESOURCE_EXHAUSTED, no free address left in the selected pool(s).
	ErrExhausted = errors.New("pool exhausted")
	// ErrUnavailable: UNAVAILABLE, a transient fault (store shutting down or unreachable, disk
	// failure); retry with backoff.
	ErrUnavailable = errors.New("store unavailable")
	// ErrAborted: ABORTED, a watcher fell too far behind; watch again.
	ErrAborted = errors.New("aborted")
	// ErrPermissionDenied: PERMISSION_DENIED, the store runs mutual TLS and the client
	// certificate's identity may not make this call (the message names both identities).
	ErrPermissionDenied = errors.New("permission denied")
	// ErrUnauthenticated: UNAUTHENTICATED, the store runs mutual TLS and the client certificate
	// carries no identity it accepts (no or a foreign spiffe:// URI SAN).
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrTooLarge: OUT_OF_RANGE, a message over the 16 MiB limit (MaxMessageSize); use the
	// paginated or streamed calls.
	ErrTooLarge = errors.New("message too large")
)

var sentinels = map[codes.Code]error{
	codes.InvalidArgument:    ErrInvalid,
	codes.NotFound:           ErrNotFound,
	codes.AlreadyExists:      ErrOverlap,
	codes.FailedPrecondition: ErrConflict,
	codes.ResourceExhausted:  ErrExhausted,
	codes.Unavailable:        ErrUnavailable,
	codes.Aborted:            ErrAborted,
	codes.PermissionDenied:   ErrPermissionDenied,
	codes.Unauthenticated:    ErrUnauthenticated,
	codes.OutOfRange:         ErrTooLarge,
}

// Error is an error the store (or the connection to it) returned.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the store's message (it names the field or the conflicting holder).
	Message string
	status  *status.Status
}

func (e *Error) Error() string {
	return fmt.Sprintf("cairn-ipam: %s: %s", e.Code, e.Message)
}

// Unwrap returns the sentinel error of e's code (nil for codes the store does not use, such as
// DEADLINE_EXCEEDED or CANCELED).
func (e *Error) Unwrap() error { return sentinels[e.Code] }

// GRPCStatus keeps status.Code and status.FromError working on decoded errors.
func (e *Error) GRPCStatus() *status.Status { return e.status }

// DecodeError turns a gRPC error into an *Error; nil stays nil and an error that carries no
// gRPC status is returned unchanged.
func DecodeError(err error) error {
	if err == nil {
		return nil
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return &Error{Code: st.Code(), Message: st.Message(), status: st}
}
