#!/usr/bin/env bash
# Regenerates the throw-away signing keys used by tests/external_auth.rs:
# two RSA keys (RS256, kids key-a and key-b) and one P-256 key (ES256, kid key-ec),
# each as a PKCS#8 private key (to sign test tokens) and its public JWK (served by
# the test JWKS server). These keys protect nothing; never use them elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../tests/fixtures/jwks"
b64url() { python3 -c 'import sys,base64; print(base64.urlsafe_b64encode(bytes.fromhex(sys.stdin.read().strip())).decode().rstrip("="))'; }
for kid in key-a key-b; do
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$kid.pem" 2>/dev/null
    n=$(openssl pkey -in "$kid.pem" -noout -text | python3 -c '
import sys, re
t = sys.stdin.read()
m = re.search(r"modulus:\n((?:\s+[0-9a-f:]+\n)+)", t)
h = re.sub(r"[\s:]", "", m.group(1)).lstrip("0") if m else ""
print(h if len(h) % 2 == 0 else "0" + h)' | b64url)
    openssl pkey -in "$kid.pem" -pubout -out "$kid.pub.pem"
    printf '{"kty":"RSA","use":"sig","alg":"RS256","kid":"%s","n":"%s","e":"AQAB"}\n' "$kid" "$n" > "$kid.jwk.json"
done
kid=key-ec
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$kid.pem" 2>/dev/null
pub=$(openssl pkey -in "$kid.pem" -noout -text | python3 -c '
import sys, re
t = sys.stdin.read()
m = re.search(r"pub:\n((?:\s+[0-9a-f:]+\n)+)", t)
print(re.sub(r"[\s:]", "", m.group(1)))')
x=$(echo "${pub:2:64}" | b64url)
y=$(echo "${pub:66:64}" | b64url)
openssl pkey -in "$kid.pem" -pubout -out "$kid.pub.pem"
printf '{"kty":"EC","use":"sig","alg":"ES256","kid":"%s","crv":"P-256","x":"%s","y":"%s"}\n' "$kid" "$x" "$y" > "$kid.jwk.json"
