"""A report's failure reason: one model for every section of the report, whichever
module judges it (harness.report, harness.proxy_proof)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Reason(BaseModel):
    model_config = ConfigDict(frozen=True)
    code: str
    message: str


def fail(code: str, message: str) -> Reason:
    """A failure reason (tests/test_docs.py reads the codes passed here, in each module
    that judges a section: each is documented in docs/troubleshooting.md)."""
    return Reason(code=code, message=message)
