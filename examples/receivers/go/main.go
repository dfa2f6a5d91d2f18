// Command receiver is a minimal wsbridge webhook receiver that verifies Standard Webhooks
// signatures with the Go standard library alone (crypto/hmac, crypto/sha256,
// encoding/base64): no SDK is needed to trust wsbridge's webhooks (the repository README,
// "Signatures (Standard Webhooks)").
//
//	go run . --port 9200 --secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
//
// Contract shared by the Python, Node.js and Go receivers:
//   - --port N (0 = any free port); prints "LISTENING <port>" once bound.
//   - --secret S (repeatable, for secret rotation) or the WEBHOOK_SECRET environment variable
//     (several secrets separated by spaces); a message is accepted if any secret verifies it.
//   - Every POST: 204 when the signature verifies (also for a duplicate), 400 when it does not.
//   - One JSON line per request on stdout:
//     {"ok": bool, "id": webhook-id, "type": event type, "duplicate": bool, "error": str|null}
//     "type" is the ce-type header (binary mode) or the envelope's type (structured mode).
//   - Deduplication by webhook-id is the receiver's job (delivery is at-least-once): a
//     verified id seen before is acknowledged again and printed with "duplicate": true.
//
// The verification follows the Standard Webhooks spec: the signed content is
// "<webhook-id>.<webhook-timestamp>.<body>" over the exact body bytes, HMAC-SHA256 with the
// base64-decoded part of "whsec_<base64>", compared in constant time against every
// space-separated "v1,<base64>" entry of webhook-signature; the timestamp must be within
// five minutes of the receiver's clock, either way.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// tolerance is how far webhook-timestamp may be from our clock, as in the spec's libraries.
const tolerance = 5 * time.Minute

// maxBody bounds what we read from one request.
const maxBody = 1 << 20

var (
	errMissingHeaders = errors.New("missing required headers")
	errBadTimestamp   = errors.New("invalid signature headers: webhook-timestamp is not unix seconds")
	errTooOld         = errors.New("message timestamp too old")
	errTooNew         = errors.New("message timestamp too new")
	errNoMatch        = errors.New("no matching signature found")
)

// parseSecret decodes "whsec_<base64>" (or bare base64; padding optional) into the HMAC key.
func parseSecret(secret string) ([]byte, error) {
	encoded := strings.TrimPrefix(strings.TrimSpace(secret), "whsec_")
	key, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(encoded, "="))
	if err != nil {
		return nil, fmt.Errorf("secret is not base64: %w", err)
	}
	if len(key) == 0 {
		return nil, errors.New("secret is empty")
	}
	return key, nil
}

// sign returns the raw HMAC-SHA256 signature of one message.
func sign(key []byte, id, timestamp string, body []byte) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id))
	mac.Write([]byte("."))
	mac.Write([]byte(timestamp))
	mac.Write([]byte("."))
	mac.Write(body)
	return mac.Sum(nil)
}

// verify checks one delivery against every key; nil when any v1 signature matches any key.
func verify(keys [][]byte, header http.Header, body []byte, now time.Time) error {
	id := header.Get("webhook-id")
	timestamp := header.Get("webhook-timestamp")
	signatures := header.Get("webhook-signature")
	if id == "" || timestamp == "" || signatures == "" {
		return errMissingHeaders
	}
	secs, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return errBadTimestamp
	}
	sent := time.Unix(secs, 0)
	if now.Sub(sent) > tolerance {
		return errTooOld
	}
	if sent.Sub(now) > tolerance {
		return errTooNew
	}
	for _, key := range keys {
		// Sign with the header's own timestamp string: the sender signed exactly that text.
		expected := sign(key, id, timestamp, body)
		for _, entry := range strings.Split(signatures, " ") {
			version, sig, found := strings.Cut(entry, ",")
			if !found || version != "v1" {
				continue
			}
			got, err := base64.StdEncoding.DecodeString(sig)
			if err != nil {
				continue
			}
			if hmac.Equal(got, expected) { // constant time
				return nil
			}
		}
	}
	return errNoMatch
}

// eventType is ce-type in binary mode, the envelope's type in structured mode.
func eventType(header http.Header, body []byte) *string {
	if t := header.Get("ce-type"); t != "" {
		return &t
	}
	var envelope map[string]json.RawMessage
	if json.Unmarshal(body, &envelope) != nil {
		return nil
	}
	if _, ok := envelope["specversion"]; !ok {
		return nil
	}
	var t string
	if json.Unmarshal(envelope["type"], &t) != nil {
		return nil
	}
	return &t
}

// record is one printed line.
type record struct {
	OK        bool    `json:"ok"`
	ID        *string `json:"id"`
	Type      *string `json:"type"`
	Duplicate bool    `json:"duplicate"`
	Error     *string `json:"error"`
}

type receiver struct {
	keys [][]byte
	mu   sync.Mutex // guards seen and out
	seen map[string]bool
	out  *json.Encoder
}

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("allow", http.MethodPost)
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	rec := record{Type: eventType(r.Header, body)}
	if id := r.Header.Get("webhook-id"); id != "" {
		rec.ID = &id
	}
	verr := verify(rc.keys, r.Header, body, time.Now())
	rc.mu.Lock()
	if verr == nil {
		rec.OK = true
		rec.Duplicate = rc.seen[*rec.ID]
		rc.seen[*rec.ID] = true
	} else {
		msg := verr.Error()
		rec.Error = &msg
	}
	// Encode writes one line, unbuffered, straight to stdout.
	if err := rc.out.Encode(rec); err != nil {
		log.Printf("writing stdout: %v", err)
	}
	rc.mu.Unlock()

	if verr != nil {
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": verr.Error()})
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

type secretList []string

func (s *secretList) String() string     { return fmt.Sprintf("%d secret(s)", len(*s)) }
func (s *secretList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	port := flag.Int("port", 0, "port to listen on (0 = any free port)")
	host := flag.String("host", "127.0.0.1", "address to listen on")
	var secrets secretList
	flag.Var(&secrets, "secret", "whsec_... secret; repeat during rotation (default: $WEBHOOK_SECRET)")
	flag.Parse()
	if len(secrets) == 0 {
		secrets = strings.Fields(os.Getenv("WEBHOOK_SECRET"))
	}
	if len(secrets) == 0 {
		fmt.Fprintln(os.Stderr, "give --secret whsec_... or set WEBHOOK_SECRET")
		os.Exit(2)
	}
	rc := &receiver{seen: map[string]bool{}, out: json.NewEncoder(os.Stdout)}
	for i, s := range secrets {
		key, err := parseSecret(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "secret #%d: %v\n", i+1, err)
			os.Exit(2)
		}
		rc.keys = append(rc.keys, key)
	}

	ln, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("LISTENING %d\n", ln.Addr().(*net.TCPAddr).Port)
	srv := &http.Server{Handler: rc, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}
