package ipam

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestDecodeErrorMapsEveryStoreCode(t *testing.T) {
	for code, want := range map[codes.Code]error{
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
	} {
		err := DecodeError(status.Error(code, "msg"))
		if !errors.Is(err, want) {
			t.Errorf("%v: %v does not match %v", code, err, want)
		}
		for _, other := range sentinels {
			if other != want && errors.Is(err, other) {
				t.Errorf("%v: %v also matches %v", code, err, other)
			}
		}
		if status.Code(err) != code {
			t.Errorf("%v: status.Code of the decoded error is %v", code, status.Code(err))
		}
		// Wrapped by the caller, it still matches, and decoding twice changes nothing.
		wrapped := fmt.Errorf("creating VM: %w", err)
		if !errors.Is(wrapped, want) || DecodeError(wrapped) != wrapped {
			t.Errorf("%v: wrapping or re-decoding lost the class", code)
		}
	}
}

func TestDecodeErrorLeavesOthersAlone(t *testing.T) {
	if DecodeError(nil) != nil {
		t.Fatal("nil must stay nil")
	}
	plain := errors.New("not a status")
	if DecodeError(plain) != plain {
		t.Fatal("an error without a gRPC status must be returned unchanged")
	}
	err := DecodeError(status.Error(codes.DeadlineExceeded, "late"))
	for _, s := range sentinels {
		if errors.Is(err, s) {
			t.Fatalf("DEADLINE_EXCEEDED matched %v", s)
		}
	}
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.DeadlineExceeded || e.Message != "late" {
		t.Fatalf("decoded: %#v", err)
	}
}
