"""The aiohttp application, split by stage into modules named for their job:

- proxy.state: ``ProxyState`` (what the proxy holds while serving) and ``Draft`` (what
  one request did so far);
- proxy.guard: the middleware every request passes: public endpoints, the token, the
  refusals that come before any route, and the one record per request;
- proxy.routes: ``create_app``, the probes, ``/metrics`` and the models endpoints;
- proxy.forwarding_handler: the forwarded routes, from the request body to the answer;
- proxy.streaming: the SSE relay around the sans-IO ``StreamChecker``;
- proxy.records: the evidence record, metrics and access line of a request;
- proxy.replies: the OpenAI-shaped error answer.

Layering: the policy modules decide (pure), ``Upstream`` talks to the backend, and these
modules wire them together. Every request, refused or forwarded, ends in exactly one
evidence record and one metrics update, written by ``guard``. A request is forwarded
only after the evidence log has proven it can still record.

This module keeps the names other code imports from it (proxy.server, the tests).
"""

from __future__ import annotations

from .guard import guard
from .records import request_record_fields
from .routes import create_app
from .state import DRAFT, STATE, Draft, ProxyState

__all__ = ["DRAFT", "STATE", "Draft", "ProxyState", "create_app", "guard", "request_record_fields"]
