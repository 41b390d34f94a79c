"""Credential-looking values out of what a job carries and what is logged about it.

A SageMaker job's hyperparameters and environment show in its description and the console, its source
(with the resolved params.yaml) sits in S3, and MLflow params are readable by anyone with the experiment.
URIs with a password, AWS access keys, session tokens, presigned-URL signatures and values under keys
named like secrets are replaced by REDACTED before any of them is written.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# scheme://user:password@host -> scheme://user:***@host (a bare user@ is kept: it is not a secret)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*):(?P<secret>[^/@\s]+)@")
_TOKEN_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<secret>(?:dapi|ghp_|gho_|glpat-|xox[bp]-)"
                             r"[^/@\s]+)@")
_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\bdapi[0-9a-f]{32}(?:-\d+)?\b"),  # Databricks personal access tokens
    re.compile(r"\b(?:ghp|gho|ghs|ghu)_[A-Za-z0-9]{36}\b|\bglpat-[A-Za-z0-9_-]{20}\b"),  # GitHub, GitLab
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JWTs (bearer tokens)
)
# ?X-Amz-Signature=..., &token=..., ;password=...
_QUERY = re.compile(r"(?i)(?P<head>[?&;](?:x-amz-(?:signature|credential|security-token)|aws_secret_access_key|"
                    r"aws_session_token|token|access_token|password|passwd|pwd|secret|sig|signature|api_key|apikey)=)"
                    r"(?P<secret>[^&;#\s]+)")
_SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|credential|api_?key|private_?key)")


def has_userinfo(uri: str) -> bool:
    """A URI that carries a password or token before its host."""
    return bool(_USERINFO.search(uri) or _TOKEN_USERINFO.search(uri))


def redact(value: str) -> str:
    """value with every credential-looking part replaced by ***."""
    out = _USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", value)
    out = _TOKEN_USERINFO.sub(lambda m: f"{m['head']}{REDACTED}@", out)
    out = _QUERY.sub(lambda m: f"{m['head']}{REDACTED}", out)
    for pattern in _PATTERNS:
        out = pattern.sub(REDACTED, out)
    return out


def redact_tree(value: Any, key: str = "") -> Any:
    """A copy of a params-like structure (dicts, lists, strings) with secrets replaced; a non-empty string under
    a key named like a secret (password, token, api_key...) is replaced whole."""
    if isinstance(value, dict):
        return {k: redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v, key) for v in value]
    if isinstance(value, str):
        if value and key and _SECRET_KEY.search(key):
            return REDACTED
        return redact(value)
    return value


def is_clean(value: str) -> bool:
    return redact(value) == value
