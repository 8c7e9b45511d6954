#!/usr/bin/env bash
# Make a throw-away CA and certificates for trying mutual TLS on one machine (and for the tests).
#   scripts/make_test_certs.sh DIR [CLIENT...]      (clients default to: aggregator c0 c1)
# Writes DIR/ca.{crt,key}, DIR/server.{crt,key} (for 127.0.0.1 and localhost) and
# DIR/<client>.{crt,key} with CN=<client>: with Mosquitto's use_identity_as_username the CN is
# the MQTT user name, so the ACL's %u is the device id. EC P-256 keys, unencrypted, valid 2 days.
# Not for production: there the CA key lives offline and each device makes its own key.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DIR [CLIENT...]" >&2
  exit 2
fi
DIR="$1"
shift
CLIENTS=("$@")
[ ${#CLIENTS[@]} -gt 0 ] || CLIENTS=(aggregator c0 c1)
command -v openssl >/dev/null || { echo "openssl not found: apt-get install openssl" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
umask 077
DAYS=2

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME SUBJECT EXTENSIONS: NAME.key -> NAME.crt, signed by the CA.
sign() {
  key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  printf '%b' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
    -sha256 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=splitfed test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.crt 2>/dev/null

sign server "/CN=localhost" \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
for c in "${CLIENTS[@]}"; do
  if ! [[ "$c" =~ ^[A-Za-z0-9_-]{1,64}$ ]]; then
    echo "bad client id $c: use 1-64 of A-Z a-z 0-9 _ -" >&2
    exit 2
  fi
  sign "$c" "/CN=$c" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
done
rm -f ca.srl
chmod 0644 ./*.crt
echo "wrote $(pwd): ca.crt, server.crt/key, ${CLIENTS[*]/%/.crt/key}"
