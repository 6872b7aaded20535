#!/usr/bin/env python3
"""Cross-checks fleetd's message format against an independent JWS
implementation (jwcrypto).

  jose_interop.py make DIR NOW      keys in DIR/keys, a co-signed message in DIR/py-message.json
  jose_interop.py verify DIR FILE   verify FILE (from fleetctl) with DIR/keys/{fleet,cosigner}.pub.pem
"""
import json
import os
import sys

from jwcrypto import jwk, jws
from jwcrypto.common import base64url_decode, base64url_encode, json_decode

# P-256's group order. fleetd accepts only low-S ES256 signatures (one
# encoding per signature); jwcrypto, like most signers, makes either.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def low_s(signature_b64):
    raw = base64url_decode(signature_b64)
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    if s > P256_N // 2:
        s = P256_N - s
    return base64url_encode(r + s.to_bytes(32, "big"))


def make(directory, now):
    keys = os.path.join(directory, "keys")
    os.makedirs(keys, exist_ok=True)
    signers = []
    for kid in ("fleet", "cosigner"):
        key = jwk.JWK.generate(kty="EC", crv="P-256")
        with open(os.path.join(keys, kid + ".pub.pem"), "wb") as f:
            f.write(key.export_to_pem())
        priv = os.path.join(keys, kid + ".key.pem")
        with open(os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(key.export_to_pem(private_key=True, password=None))
        signers.append((kid, key))
    claims = {
        "typ": "fleetd.update.v1",
        "jti": "py-interop-0001",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "project": "acme-gateways",
        "target": {"hardware": "rpi4-gw", "devices": ["gw-0042"], "groups": []},
        "version": 9,
        "name": "made-by-jwcrypto",
        "image": {
            "url": "https://updates.example.com/x.img",
            "size": 1048576,
            "sha256": "c7be90c1253943c94f256c17c430305e300d117d8a70adaf749bf2488913b184",
        },
    }
    token = jws.JWS(json.dumps(claims).encode())
    for kid, key in signers:
        token.add_signature(key, alg="ES256", protected=json.dumps({"alg": "ES256", "kid": kid}))
    message = json.loads(token.serialize())  # general JSON serialization with two signatures
    assert "signatures" in message
    for sig in message["signatures"]:
        sig["signature"] = low_s(sig["signature"])
    message = json.dumps(message)
    with open(os.path.join(directory, "py-message.json"), "w") as f:
        f.write(message)


def verify(directory, path):
    with open(path) as f:
        raw = f.read()
    envelope = json.loads(raw)
    kids = []
    for sig in envelope["signatures"]:
        header = json_decode(jws.base64url_decode(sig["protected"]))
        assert header["alg"] == "ES256", header
        kids.append(header["kid"])
    assert sorted(kids) == ["cosigner", "fleet"], kids
    payload = None
    for kid in kids:
        with open(os.path.join(directory, "keys", kid + ".pub.pem"), "rb") as f:
            key = jwk.JWK.from_pem(f.read())
        token = jws.JWS()
        token.deserialize(raw)
        token.verify(key, alg="ES256")  # raises unless a signature verifies with this key
        payload = token.payload
    # And a wrong key must not verify.
    stranger = jwk.JWK.generate(kty="EC", crv="P-256")
    token = jws.JWS()
    token.deserialize(raw)
    try:
        token.verify(stranger, alg="ES256")
    except jws.InvalidJWSSignature:
        pass
    else:
        raise SystemExit("a stranger's key verified the message")
    print(payload.decode())


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "verify":
        verify(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
