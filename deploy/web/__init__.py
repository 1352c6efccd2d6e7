"""The operators' JSON API and the fleet dashboard of `edge-deploy serve` (docs/control-plane.md).

routes.py   the route table, its handlers and the OpenAPI document generated from it
server.py   the HTTP server: auth (bearer token, mutual TLS), JSON errors, the event stream, the page
events.py   the registry watched for changes, fanned out to the event streams
static/     the page: index.html, app.css, app.js (no build step, nothing fetched from elsewhere)
"""

from deploy.web.server import ApiServer, check_exposure, ensure_token, start_api

__all__ = ["ApiServer", "check_exposure", "ensure_token", "start_api"]
