"""X-Hub-Signature-256 checks: HMAC-SHA256 of the raw body under any configured secret."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.webhook.signature import sign, verify_signature

BODY = b'{"ref": "refs/heads/main", "after": "abc"}'


def github_signature(body: bytes, secret: str) -> str:
    """Computed independently of the module, as GitHub documents it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_sign_matches_githubs_algorithm() -> None:
    assert sign(BODY, "s3cret") == github_signature(BODY, "s3cret")
    # GitHub's documented example (docs "Validating webhook deliveries").
    assert sign(b"Hello, World!", "It's a Secret to Everybody") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_valid_signature_is_accepted() -> None:
    assert verify_signature(BODY, github_signature(BODY, "s3cret"), ["s3cret"]) is True


@pytest.mark.parametrize("used", ["old-secret", "new-secret", "third"])
def test_any_of_several_secrets_is_accepted(used: str) -> None:
    secrets = ["old-secret", "new-secret", "third"]
    assert verify_signature(BODY, github_signature(BODY, used), secrets) is True


def test_wrong_secret_is_refused() -> None:
    assert verify_signature(BODY, github_signature(BODY, "guess"), ["s3cret", "other"]) is False


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_refused(header: str | None) -> None:
    assert verify_signature(BODY, header, ["s3cret"]) is False


def test_sha1_signature_is_refused_even_when_correct() -> None:
    sha1 = "sha1=" + hmac.new(b"s3cret", BODY, hashlib.sha1).hexdigest()
    assert verify_signature(BODY, sha1, ["s3cret"]) is False
    # The hex digest alone, without any prefix, is refused too.
    bare = github_signature(BODY, "s3cret").removeprefix("sha256=")
    assert verify_signature(BODY, bare, ["s3cret"]) is False


def test_tampered_body_is_refused() -> None:
    header = github_signature(BODY, "s3cret")
    assert verify_signature(BODY.replace(b"main", b"mein"), header, ["s3cret"]) is False
    assert verify_signature(BODY + b" ", header, ["s3cret"]) is False


def test_empty_secret_list_accepts_nothing() -> None:
    # Not even a signature made with the empty string as key.
    assert verify_signature(BODY, github_signature(BODY, ""), []) is False
    assert verify_signature(BODY, github_signature(BODY, "s3cret"), []) is False


def test_uppercase_hex_is_refused() -> None:
    # GitHub sends lower-case hex; the comparison is exact.
    header = github_signature(BODY, "s3cret")
    assert verify_signature(BODY, "sha256=" + header[7:].upper(), ["s3cret"]) is False
